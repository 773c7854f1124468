"""The Star Elastic reference loop (DESIGN §1): data, routers, curriculum KD, QAD, baselines, report.

Run it with ``elastic-train`` (or ``python -m elastic_kernels.train``); ``--help`` explains every
option. From Python::

    from elastic_kernels.train import make_config, run
    report = run(make_config("smoke", run_dir="runs/smoke"))

Modules: :mod:`.data` (self-generated arithmetic reasoning task, tokenizer, disjoint splits),
:mod:`.router` (budget routers, Gumbel-softmax schedules, curriculum), :mod:`.losses` (masked CE,
forward KL), :mod:`.loop` (the staged, resumable, DDP-capable pipeline), :mod:`.qad` (stage 3),
:mod:`.evaluate`, :mod:`.report`, :mod:`.config`, :mod:`.checkpoint`, :mod:`.metrics`, :mod:`.cli`.
"""
from .config import PRESETS, TrainConfig, make_config
from .loop import StopRun, run

__all__ = ["PRESETS", "TrainConfig", "make_config", "run", "StopRun"]
