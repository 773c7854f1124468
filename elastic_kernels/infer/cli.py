"""``elastic-eval RUN_DIR`` / ``python -m elastic_kernels.infer RUN_DIR``: the budget-control report
(every think/answer budget pair and single-model thinking caps, accuracy vs latency, Pareto
frontier) of a training run directory; writes ``budget_control.{json,md,png}`` into it."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

__all__ = ["main", "build_parser"]


def _caps(text: str) -> list[int]:
    try:
        caps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--caps: expected comma-separated ints, got {text!r}") from None
    if any(c < 0 for c in caps):
        raise argparse.ArgumentTypeError(f"--caps: caps must be >= 0, got {text!r}")
    return caps


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elastic-eval",
        description="Elastic budget control on a training run: evaluates every (think budget, answer budget) "
                    "pair and every single model with thinking-token caps on the run's test split (accuracy, "
                    "wall time, FLOPs/bytes cost model), finds the Pareto frontier and writes "
                    "budget_control.json / .md / .png into RUN_DIR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by elastic-train (holds nested/)")
    p.add_argument("--limit", type=_positive, default=None, help="evaluate only the first N test problems")
    p.add_argument("--caps", type=_caps, default=None,
                   help="thinking-token caps of the single-model baseline, comma list (default: 25/50/75%% of "
                        "the task's longest thinking trace)")
    p.add_argument("--batch-size", type=_positive, default=64, help="requests decoded together")
    p.add_argument("--no-reuse", dest="reuse", action="store_false",
                   help="skip the experimental cache-reuse runs of the pairs")
    p.add_argument("--repeats", type=_positive, default=1,
                   help="timing passes over all settings; wall time is the minimum (robust to other load)")
    p.add_argument("--checkpoint", default="nested",
                   help="nested checkpoint directory inside RUN_DIR: nested (elastic stage) or qad (quantized export)")
    p.add_argument("--out", default=None, help="directory of the report files (default: RUN_DIR)")
    p.add_argument("--device", default="cpu", help="torch device of the model")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from .report import REPORT_NAME, RunDirError, budget_control_markdown, run_budget_control
    try:
        rep = run_budget_control(args.run_dir, limit=args.limit, caps=args.caps, batch_size=args.batch_size,
                                 reuse=args.reuse, device=args.device, repeats=args.repeats,
                                 out_dir=args.out, checkpoint=args.checkpoint)
    except RunDirError as e:
        print(f"elastic-eval: {e}", file=sys.stderr)
        return 2
    print(budget_control_markdown(rep))
    out = args.out or args.run_dir
    print(f"report: {out}/{REPORT_NAME}.md ({REPORT_NAME}.json, {REPORT_NAME}.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
