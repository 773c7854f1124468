"""``elastic-eval --run-dir X`` / ``python -m elastic_kernels.infer --run-dir X``: the
budget-control report (every think/answer budget pair and single-model thinking caps, accuracy vs
latency, Pareto frontier) of a training run directory; writes ``budget_control.{json,md,png}``.

Options come from :class:`EvalConfig` through tyro, named as ``elastic-train``'s (``--run-dir``,
``--device``, ``--threads``, bare booleans with a ``--no-`` form); every bad value is a usage error
(exit 2) before torch is imported. Ctrl-C or SIGTERM stops cleanly (exit 130 / 143).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Literal, Sequence

from .._cli import UsageError, option_name, terminate_as_interrupt, usage_exit

__all__ = ["main", "parse_args", "EvalConfig"]

PROG = "elastic-eval"


@dataclass
class EvalConfig:
    """Elastic budget control on a training run: evaluates every (think budget, answer budget) pair
    and every single model with thinking-token caps on the run's test split (accuracy, wall time,
    FLOPs/bytes cost model), finds the Pareto frontier and writes budget_control.json / .md / .png."""

    run_dir: str
    """run directory written by elastic-train (holds nested/)"""
    report_dir: str = ""
    """directory of the report files ('' = the run directory)"""
    checkpoint: Literal["nested", "qad"] = "nested"
    """nested checkpoint inside --run-dir: nested (elastic stage) or qad (quantized export)"""
    limit: int = 0
    """evaluate only the first N test problems (0 = all)"""
    caps: list[int] = field(default_factory=list)
    """thinking-token caps of the single-model baseline (none = 25/50/75% of the task's longest trace)"""
    batch_size: int = 64
    """requests decoded together"""
    reuse: bool = True
    """also run the pairs in the experimental cache-reuse mode"""
    repeats: int = 1
    """timing passes over all settings; wall time is the minimum (robust to other load)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch device of the model"""
    threads: int = 1
    """torch CPU threads (0 = torch default, all cores); the tiny models decode fastest on one"""

    def validate(self) -> None:
        for name, lo in (("limit", 0), ("batch_size", 1), ("repeats", 1), ("threads", 0)):
            v = getattr(self, name)
            if v < lo:
                raise UsageError(option_name(name), f"must be >= {lo}, got {v}")
        bad = [c for c in self.caps if c < 0]
        if bad:
            raise UsageError("--caps", f"caps must be >= 0, got {bad[0]}")
        if not self.run_dir:
            raise UsageError("--run-dir", "must name a run directory")


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    """The validated :class:`EvalConfig` of a command line (UsageError or SystemExit(2))."""
    import tyro

    cfg = tyro.cli(EvalConfig, args=list(sys.argv[1:] if argv is None else argv), prog=PROG)
    cfg.validate()
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except UsageError as e:
        usage_exit(PROG, e)
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        usage_exit(PROG, UsageError("--device", "cuda was requested but torch sees no CUDA device"))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    from .report import REPORT_NAME, RunDirError, budget_control_markdown, run_budget_control
    with terminate_as_interrupt() as term:
        try:
            rep = run_budget_control(cfg.run_dir, limit=cfg.limit or None, caps=cfg.caps or None,
                                     batch_size=cfg.batch_size, reuse=cfg.reuse, device=device,
                                     repeats=cfg.repeats, out_dir=cfg.report_dir or None, checkpoint=cfg.checkpoint)
        except RunDirError as e:
            usage_exit(PROG, UsageError("--run-dir", str(e)))
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; no report written", file=sys.stderr)
            return 143 if term.signum is not None else 130
    print(budget_control_markdown(rep))
    out = cfg.report_dir or cfg.run_dir
    print(f"report: {out}/{REPORT_NAME}.md ({REPORT_NAME}.json, {REPORT_NAME}.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
