"""``elastic-train`` / ``python -m elastic_kernels.train``: run (or resume) the Star Elastic
reference loop.

The command line is built from :class:`~.config.TrainConfig` by tyro (options, types, choices
and help come from the dataclass; booleans are bare flags with a ``--no-`` form) and checked with
:meth:`TrainConfig.validate` before torch is imported: every bad value is a usage error (exit
status 2, the option named, no traceback). ``--resume --run-dir X`` alone continues the run in
``X`` with its saved configuration; options given with it must agree with that configuration
(except ``--threads``, ``--device``, ``--stop-after``, ``--progress``, ``--parallel`` and ``--procs``).
``--procs N`` (N > 1, not under torchrun) starts N data-parallel worker processes running this
same command line and waits for them (:mod:`.launch`).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from .._cli import UsageError, json_dict_registry, option_name, usage_exit
from .config import PRESETS, RESUME_FREE, ConfigError, TrainConfig, preset_config

__all__ = ["main", "parse_args"]

PROG = "elastic-train"


def _description() -> str:
    presets = "; ".join(f"{name}: " + (", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(over.items())
                                                  if k != "model") or "(the defaults)")
                        for name, over in PRESETS.items())
    return (f"{inspect.cleandoc(TrainConfig.__doc__)}\n\nDefaults shown are those of the chosen --preset "
            f"(presets: {presets}; each preset also sets a model). Explicit options override the preset. "
            "--resume --run-dir X continues the run in X with its saved configuration.")


def _saved_config(argv: Sequence[str]) -> tuple[TrainConfig | None, Path | None]:
    """The preset named on the command line, or (``--resume``) the run's saved configuration."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--run-dir")
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(list(argv))
    if not known.resume:
        return preset_config(known.preset if known.preset in PRESETS else "tiny"), None
    run_dir = Path(known.run_dir or f"runs/{known.preset if known.preset in PRESETS else 'tiny'}")
    path = run_dir / "progress.json"
    if not path.is_file():
        raise UsageError("--resume", f"{run_dir} holds no run to resume (no {path.name}); drop --resume to start "
                                     "a new run there")
    try:
        saved = json.loads(path.read_text())["config"]
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(saved) - names)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        cfg = TrainConfig(**saved)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UsageError("--resume", f"{path} is unreadable or corrupt ({type(e).__name__}: {e}); restore it or "
                                     "start a new run in another --run-dir") from None
    cfg.resume = True
    return cfg, path


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The validated :class:`TrainConfig` of a command line; :class:`UsageError` or SystemExit(2)
    (tyro's own parse errors) for a bad one."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        defaults, saved_path = _saved_config(argv)
    except ConfigError as e:
        raise UsageError(option_name(e.field), e.detail) from None
    cfg = tyro.cli(TrainConfig, args=argv, default=defaults, prog=PROG, description=_description(),
                   registry=json_dict_registry())
    if saved_path is not None:
        for f in dataclasses.fields(TrainConfig):
            if f.name in RESUME_FREE:
                continue
            given, kept = getattr(cfg, f.name), getattr(defaults, f.name)
            if given != kept:
                raise UsageError(option_name(f.name), f"{given!r} conflicts with the saved configuration of the run "
                                                      f"({saved_path}: {kept!r}); a resumed run keeps its "
                                                      "configuration: drop the option")
    try:
        cfg.validate()
    except ConfigError as e:
        raise UsageError(option_name(e.field), e.detail) from None
    return cfg


def _check_environment(cfg: TrainConfig) -> None:
    """Checks that need torch (after parsing): the task name and the device."""
    import torch

    from .. import tasks

    if cfg.task not in tasks.names():
        raise UsageError("--task", f"must be one of {list(tasks.names())}, got {cfg.task!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "cuda was requested but torch sees no CUDA device")


def _cpu_only_torch() -> bool:
    """Whether the installed torch is a CPU-only build (``+cpu`` in its version), read from the
    package metadata without importing torch (seconds of start-up the launcher need not spend)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("torch").endswith("+cpu")
    except PackageNotFoundError:
        return False


def _worker_processes(cfg: TrainConfig) -> int:
    """How many processes :func:`main` starts: ``--procs`` (at most one per GPU on CUDA), or 1
    under torchrun (which started them) and for ``--procs 1``."""
    if cfg.procs == 1 or "WORLD_SIZE" in os.environ:
        return 1
    if cfg.device == "cpu" or (cfg.device == "auto" and _cpu_only_torch()):
        return cfg.procs
    import torch

    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        n = max(1, min(cfg.procs, torch.cuda.device_count()))
        if n < cfg.procs:
            logging.getLogger("elastic_kernels.train").warning(
                "--procs %d on CUDA: one process per GPU, %d here", cfg.procs, n)
        return n
    return cfg.procs


def main(argv: Sequence[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = parse_args(argv)
        procs = _worker_processes(cfg)
        if procs == 1:  # a launcher leaves the checks that import torch to its workers (rank 0 reports)
            _check_environment(cfg)
    except UsageError as e:
        if rank == 0:
            usage_exit(PROG, e)
        raise SystemExit(2) from None
    # under torchrun or --procs only rank 0 logs; the other ranks keep errors
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("elastic_kernels.train")
    if procs > 1:
        from .launch import launch
        return launch(list(sys.argv[1:] if argv is None else argv), procs, threads=cfg.threads)
    from .checkpoint import CheckpointError
    from .lock import RunLockedError
    from .pipeline import run
    from .runner import RunError, StopRun
    try:
        if cfg.seeds > 1:
            from .seeds import run_seeds
            summary = run_seeds(cfg)
            if summary:
                print(f"seeds {summary['seeds']}: {cfg.resolved_run_dir()}/seeds.md (seeds.json)")
            return 0
        rep = run(cfg)
    except StopRun as e:
        log.warning("%s", e)
        return e.exit_code
    except (RunError, RunLockedError, CheckpointError, FileExistsError) as e:
        if rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            print(f"{PROG}: aborted without a checkpoint of the current step; --resume continues from the last "
                  "one", file=sys.stderr)
        return 130
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
