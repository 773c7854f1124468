"""The budget-control report of a training run directory.

:func:`run_budget_control` loads the run's nested checkpoint and test split, evaluates every
setting (:mod:`.evaluate`) and writes, next to the training report::

    budget_control.json   {"run_dir", "checkpoint", "task", "budgets", "caps", "rows", "analysis", ...}
    budget_control.md     the table (:func:`budget_control_markdown`)
    budget_control.png    accuracy against FLOPs / bytes / wall time, frontier marked

Run directory layout read (written by ``elastic_kernels.train``): ``progress.json`` (``task``: the
task spec :func:`elastic_kernels.tasks.from_dict` rebuilds; ``config``: the TrainConfig, of which
``test_size`` is read) and ``nested/`` (the nested checkpoint of
``save_nested`` with the budget table ``{"1": Budget, "0.75": ..., ...}``), or ``qad/`` (the
quantized nested export of ``--qad``) with ``checkpoint="qad"``. The test split is the
training loop's: ``task.problems("test", test_size, seed=0)``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from .._io import atomic_path, atomic_write_text
from .evaluate import (COST_AXES, CostModel, analyze, budget_order, build_settings, default_caps,
                       evaluate_settings)

__all__ = ["run_budget_control", "write_budget_control", "budget_control_markdown", "plot_budget_control",
           "RunDirError", "REPORT_NAME"]

log = logging.getLogger(__name__)

REPORT_NAME = "budget_control"
_AXIS_TITLES = {"flops": "FLOPs per problem (cost model)", "bytes": "bytes per problem at batch 1 (cost model)",
                "wall_s": "wall seconds per problem (batched, measured)"}


class RunDirError(ValueError):
    """A run directory without the files the evaluation needs."""


def _read_run(run_dir: Path, checkpoint: str) -> dict:
    prog = run_dir / "progress.json"
    if not prog.is_file():
        raise RunDirError(f"{run_dir} is not a training run directory (no progress.json); run elastic-train first")
    try:
        saved = json.loads(prog.read_text())
        cfg, task = saved["config"], saved["task"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RunDirError(f"{prog} is unreadable or has no 'config' and 'task': {e}") from e
    nested = run_dir / checkpoint
    if not (nested / "config.json").is_file():
        stage = "elastic" if checkpoint == "nested" else "qad" if checkpoint == "qad" else checkpoint
        raise RunDirError(f"{run_dir} has no nested checkpoint {checkpoint!r} ({nested}/config.json); the run has "
                          f"not finished its {stage} stage")
    return {"config": cfg, "task": task}


def run_budget_control(run_dir: str | os.PathLike, *, limit: int | None = None, caps: Sequence[int] | None = None,
                       batch_size: int = 64, reuse: bool = True, device: str = "cpu", repeats: int = 1,
                       write: bool = True, out_dir: str | os.PathLike | None = None,
                       checkpoint: str = "nested") -> dict:
    """Evaluate every budget-control setting of the run in ``run_dir`` on its test split.

    limit: evaluate only the first ``limit`` test problems (None: all). caps: thinking-token caps
    of the single-model baseline (default :func:`~.evaluate.default_caps`). reuse: also run the
    pairs in the experimental cache-reuse mode. repeats: timing passes (wall time is the minimum).
    write: write the three report files into
    ``out_dir`` (default ``run_dir``). checkpoint: the nested checkpoint directory inside the run
    (``"nested"``, the elastic stage's; ``"qad"``, the quantized export, evaluated as loaded).
    Returns the report dict.
    """
    from ..models import load_nested, read_nested_config
    from ..tasks import from_dict

    run_dir = Path(run_dir)
    saved = _read_run(run_dir, checkpoint)
    cfg = saved["config"]
    try:
        task = from_dict(saved["task"])
    except (TypeError, ValueError) as e:
        raise RunDirError(f"{run_dir / 'progress.json'}: its task spec cannot be rebuilt: {e}") from e
    problems = task.problems("test", int(cfg["test_size"]), seed=0)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"run_budget_control: limit must be >= 1, got {limit}")
        problems = problems[:limit]
    _, table = read_nested_config(run_dir / checkpoint)
    model = load_nested(run_dir / checkpoint, None, device=device).eval()
    names = budget_order(model, table)
    caps = default_caps(task) if caps is None else sorted({int(c) for c in caps})
    settings = build_settings(names, caps, reuse=reuse)

    def progress(i, n, s):
        log.info("budget control %d/%d: %s", i + 1, n, s.label)

    rows = evaluate_settings(model, task, problems, table, settings, batch_size=batch_size, repeats=repeats,
                             progress=progress)
    cost = CostModel(model, table)
    rep = {
        "run_dir": str(run_dir), "checkpoint": str(run_dir / checkpoint),
        "task": {**task.to_dict(), "description": task.describe(), "split": "test", "n_problems": len(problems)},
        "budgets": {n: {"budget": table[n].to_dict(), **cost.per_budget[n]} for n in names},
        "budget_order": names, "caps": caps, "batch_size": batch_size, "device": device,
        "repeats": repeats,
        "rows": rows, "analysis": analyze(rows),
    }
    if write:
        out = Path(out_dir) if out_dir is not None else run_dir
        out.mkdir(parents=True, exist_ok=True)
        write_budget_control(rep, out)
    return rep


def write_budget_control(rep: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``budget_control.{json,md,png}`` into ``out_dir`` atomically; returns the paths."""
    out_dir = Path(out_dir)
    paths = {k: out_dir / f"{REPORT_NAME}.{k}" for k in ("json", "md", "png")}
    atomic_write_text(paths["json"], json.dumps(rep, indent=2, sort_keys=True))
    atomic_write_text(paths["md"], budget_control_markdown(rep))
    plot_budget_control(rep, paths["png"])
    return paths


def _load_report(rep_or_dir) -> dict | None:
    if isinstance(rep_or_dir, dict):
        return rep_or_dir
    path = Path(rep_or_dir) / f"{REPORT_NAME}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _sci(x: float) -> str:
    return f"{x:.3g}"


def budget_control_markdown(rep_or_dir) -> str:
    """The budget-control section (Markdown) of a report dict or of a run directory holding
    ``budget_control.json``; an empty string when the run directory has none (so a training
    report can always include it)."""
    rep = _load_report(rep_or_dir)
    if rep is None:
        return ""
    an = rep["analysis"]
    fronts = {axis: set(an[axis]["frontier"]) for axis in COST_AXES}
    t = rep["task"]
    lines = ["## Elastic budget control (think budget -> answer budget)", "",
             f"Test split, {t['n_problems']} problems ({t['description']}); "
             "greedy decoding; when the answer budget differs from the think budget, the answer model "
             "re-prefills prompt + thinking at the switch (charged to the pair). "
             "`A->B`: think with budget A, answer with budget B; `cap N`: single model with </think> forced after "
             "N thinking tokens. FLOPs and bytes are per problem from the cost model; wall time per problem of "
             f"batched generation (batch {rep['batch_size']}, {rep['device']}, best of {rep.get('repeats', 1)} "
             "passes). Frontier: Pareto-optimal on that axis.",
             "",
             "| setting | kind | test acc | think tok | answer tok | forced | MFLOPs | KB (batch 1) | wall ms | "
             "frontier (FLOPs / bytes / wall) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        if r["kind"] == "reuse":
            continue
        marks = " / ".join("**yes**" if r["label"] in fronts[a] else "no" for a in COST_AXES)
        lines.append(f"| {r['label']} | {r['kind']} | {r['accuracy']:.3f} | {r['think_tokens']:.1f} | "
                     f"{r['answer_tokens']:.1f} | {r['forced_rate']:.2f} | {r['flops'] / 1e6:.3f} | "
                     f"{r['bytes'] / 1e3:.1f} | {1e3 * r['wall_s']:.2f} | {marks} |")
    lines.append("")
    spreads = sorted((max(r["wall_s_passes"]) - min(r["wall_s_passes"])) / min(r["wall_s_passes"])
                     for r in rep["rows"] if len(r.get("wall_s_passes", [])) > 1 and min(r["wall_s_passes"]) > 0)
    if spreads:
        lines.append(f"Wall-time noise: the median setting's passes spread by {100 * spreads[len(spreads) // 2]:.0f}% "
                     "(max - min over min); wall-time differences smaller than that are not resolved.")
        lines.append("")
    for axis in COST_AXES:
        a = an[axis]
        lines.append(f"- **{_AXIS_TITLES[axis]}**: frontier {', '.join(a['frontier'])}.")
        real = [b for b in a["pairs_beating_singles"] if b["best_single_within_cost"] is not None]
        if real:
            for b in real:
                dom = f"; strictly dominates {', '.join(b['dominates'])}" if b["dominates"] else ""
                lines.append(f"  - pair {b['pair']} (acc {b['accuracy']:.3f}, cost {_sci(b['cost'])}) beats the best "
                             f"single setting within its cost, {b['best_single_within_cost']} "
                             f"(acc {b['best_single_accuracy']:.3f}){dom}.")
        else:
            lines.append("  - no (think, answer) pair beats the best single-model setting at any cost on this axis.")
        cheap = [b for b in a["pairs_beating_singles"] if b["best_single_within_cost"] is None]
        for b in cheap:
            lines.append(f"  - pair {b['pair']} (acc {b['accuracy']:.3f}) costs less than every single-model setting.")
        reused = [b for b in a.get("reuse_pairs_beating_singles", []) if b["best_single_within_cost"] is not None]
        if reused:
            best = max(reused, key=lambda b: b["accuracy"] - b["best_single_accuracy"])
            lines.append(f"  - with the experimental cache reuse, {len(reused)} pair(s) beat the best single setting "
                         f"within their cost, most clearly {best['pair']} (acc {best['accuracy']:.3f} against "
                         f"{best['best_single_within_cost']} at {best['best_single_accuracy']:.3f}).")
    if an["reuse"]:
        lines += ["", "Experimental cache reuse at the switch (no re-prefill) against the exact re-prefill:", "",
                  "| pair | acc (re-prefill) | acc (reuse) | change | FLOPs saved | bytes saved | wall saved |",
                  "|---|---|---|---|---|---|---|"]
        for r in an["reuse"]:
            lines.append(f"| {r['pair']} | {r['accuracy_reprefill']:.3f} | {r['accuracy_reuse']:.3f} | "
                         f"{r['delta']:+.3f} | {100 * r['flops_saved']:.1f}% | {100 * r['bytes_saved']:.1f}% | "
                         f"{100 * r['wall_saved']:.1f}% |")
    lines.append("")
    return "\n".join(lines)


def plot_budget_control(rep: dict, path: str | os.PathLike) -> None:
    """Accuracy against each cost axis: single models (caps joined), pairs, frontier."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = [r for r in rep["rows"] if r["kind"] != "reuse"]
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(6 * len(COST_AXES), 4.8))
    for ax, axis in zip(axes, COST_AXES):
        for name in rep["budget_order"]:
            pts = sorted((r for r in rows if r["kind"] == "single" and r["setting"]["think"] == name),
                         key=lambda r: r[axis])
            ax.plot([r[axis] for r in pts], [r["accuracy"] for r in pts], "o-", alpha=0.8,
                    label=f"single {name} (thinking caps)")
        pairs = [r for r in rows if r["kind"] == "pair"]
        ax.scatter([r[axis] for r in pairs], [r["accuracy"] for r in pairs], marker="^", s=60, color="k",
                   zorder=3, label="think->answer pair")
        for r in pairs:
            ax.annotate(r["label"], (r[axis], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = {lab: i for i, lab in enumerate(rep["analysis"][axis]["frontier"])}
        fr = sorted((r for r in rows if r["label"] in front), key=lambda r: r[axis])
        ax.step([r[axis] for r in fr], [r["accuracy"] for r in fr], where="post", color="r", lw=1.5, alpha=0.6,
                label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_xlabel(_AXIS_TITLES[axis])
        ax.set_ylabel("test exact-match accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Elastic budget control: accuracy vs latency")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
