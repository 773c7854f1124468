"""``elastic-train`` / ``python -m elastic_kernels.train``: run the Star Elastic reference loop."""
from __future__ import annotations

import logging
import sys

from .config import config_from_args

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .loop import StopRun, run
    try:
        rep = run(cfg)
    except StopRun as e:
        logging.getLogger("elastic_kernels.train").warning("%s", e)
        return 130 if e.interrupted else 0
    if rep:
        run_dir = cfg.resolved_run_dir()
        print(f"report: {run_dir}/report.md ({run_dir}/report.json, {run_dir}/report.png)")
        p = rep["parent"]
        print(f"parent: test acc {p['test_acc']:.3f}  val loss {p['val_loss']:.3f}  params {p['params_total']:,}")
        for r in rep["budgets"]:
            b = r.get("baseline")
            base = f"  baseline test acc {b['test_acc']:.3f}" if b else ""
            print(f"budget {r['target']:.2f}: achieved {r['achieved']:.3f}  test acc {r['test_acc']:.3f}{base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
