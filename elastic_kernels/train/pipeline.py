"""The Star Elastic reference pipeline: which stages run, in which order, and the report.

Stages (each resumable; a finished stage leaves an artifact in the run directory):

0. ``parent``       (:mod:`.parent`) the full model trained from scratch (the frozen teacher).
1. ``importance``   (:mod:`.importance`) activation importance and the permutation of the parent.
2. ``elastic``      (:mod:`.elastic`) routers + curriculum distillation of every nested budget.
3. ``qad``          (:mod:`.qad`, ``--qad``) quantization-aware distillation, nested NVFP4/FP8 export.
4. ``baseline-<b>`` (:mod:`.baselines`) an independent model of each nested size from scratch, and
   ``prune-<b>`` (:mod:`.prune_distill`) the permuted parent sliced to that size and distilled alone;
   with several processes these run at the same time, one per process (:func:`concurrent`).
5. ``evaluate``     (:mod:`.science`) every model on the same test problems, budget control with
   measured latency, the claims.
6. ``report``       report.md / report.json / report.png (:mod:`.report`), budget_control.*.
"""
from __future__ import annotations

from typing import Callable

import json

from . import baselines, elastic, importance, parent, prune_distill, qad, science
from .config import TrainConfig
from .report import write_report
from .runner import Runner

__all__ = ["stages", "concurrent", "assemble_report", "run"]


def stages(runner: Runner) -> list[tuple[str, Callable[[], object]]]:
    """``[(name, fn), ...]`` of the run, the report last."""
    cfg = runner.cfg
    out: list[tuple[str, Callable[[], object]]] = [
        ("parent", lambda: parent.run(runner)), ("importance", lambda: importance.run(runner)),
        ("elastic", lambda: elastic.run(runner))]
    if cfg.qad:
        out.append(("qad", lambda: qad.run(runner)))
    if cfg.baselines:
        for i, t in enumerate(cfg.budgets):
            if t < 1.0:
                out.append((f"baseline-{t:g}", lambda i=i: baselines.run(runner, i)))
                out.append((f"prune-{t:g}", lambda i=i: prune_distill.run(runner, i)))
    out.append(("evaluate", lambda: science.run(runner)))
    out.append(("report", lambda: report_stage(runner)))
    return out


def assemble_report(runner: Runner) -> dict:
    """The report dict of a finished run (every stage's results, tokens and times)."""
    res, prog = runner.results, runner.progress
    return {
        "config": runner.cfg.to_json(),
        "model_config": runner.model_config.to_dict(),
        "task": {**runner.task.to_dict(), "description": runner.task.describe(),
                 "premise": runner.task.premise() if hasattr(runner.task, "premise") else None,
                 "val_size": len(runner.val), "test_size": len(runner.test)},
        "parent": res["parent"],
        "budgets": res["budgets"],
        "interpolated": res.get("interpolated", []),
        "stages": [name for name, _ in stages(runner) if name != "report"],
        "tokens": prog["tokens"],
        "time_s": prog["time_s"],
        "cpu_s": prog.get("cpu_s", {}),
        "skipped_steps": prog.get("skipped_steps", {}),
        "qad": res.get("qad"),
        "claims": res.get("claims"),
    }


def report_stage(runner: Runner) -> dict:
    rep = assemble_report(runner)
    ev = runner.dir / "evaluation.json"
    if runner.is_main and ev.is_file():
        rep["budget_control"] = json.loads(ev.read_text())["budget_control"]
    if runner.is_main:
        write_report(rep, runner.dir)
    runner.finish_stage("report")
    return rep


def concurrent(names) -> frozenset[str]:
    """The stages independent of each other that may run at the same time, one per process: the
    baselines (each reads only the parent / permuted parent and the elastic stage's shapes)."""
    return frozenset(n for n in names if n.startswith(("baseline-", "prune-")))


def run(cfg: TrainConfig) -> dict:
    """Run (or resume) the whole pipeline; returns the report dict (rank 0; {} on other ranks)."""
    runner = Runner(cfg)
    try:
        plan = stages(runner)
        return runner.run(plan, concurrent=concurrent(n for n, _ in plan))
    finally:
        runner.close()
