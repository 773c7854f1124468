"""The Star Elastic reference loop (docs/design.md §1): parent, importance, routers + curriculum KD,
QAD, baselines, report.

Run it with ``elastic-train`` (or ``python -m elastic_kernels.train``); ``--help`` explains every
option. From Python::

    from elastic_kernels.train import make_config, run
    report = run(make_config("smoke", run_dir="runs/smoke"))

Layout: :mod:`.runner` (distributed setup, run directory, resumable step loop, stop/resume),
:mod:`.sharding` (FSDP2 sharding and gathering, ``--parallel fsdp``),
one module per stage (:mod:`.parent`, :mod:`.importance`, :mod:`.elastic`, :mod:`.qad`,
:mod:`.baselines`) using the runner's public API, :mod:`.pipeline` (stage order, report),
:mod:`.config` / :mod:`.cli` (options), :mod:`.router`, :mod:`.losses`, :mod:`.optim`,
:mod:`.evaluate`, :mod:`.report`, :mod:`.checkpoint`, :mod:`.metrics`, :mod:`.lock`. Tasks live in
:mod:`elastic_kernels.tasks`.
"""
from __future__ import annotations

from .config import PRESETS, TrainConfig, make_config

__all__ = ["PRESETS", "TrainConfig", "make_config", "run", "StopRun"]


def __getattr__(name: str):
    # torch-heavy names load on first use, so `import elastic_kernels.train.cli` parses a command
    # line before torch is imported
    if name == "run":
        from .pipeline import run
        return run
    if name == "StopRun":
        from .runner import StopRun
        return StopRun
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
