"""The run report: ``report.json``, ``report.md`` and ``report.png`` in the run directory.

The report dict (written as JSON) has::

    {"config": {...}, "model_config": {...}, "task": {...}, "parent": {row}, "budgets": [row, ...],
     "interpolated": [{target, budget, achieved}, ...], "stages": [name, ...], "tokens": {stage: n},
     "time_s": {stage: wall seconds}, "cpu_s": {stage: CPU seconds}, "qad": {...} | None}

where a budget row holds ``target``, ``params_total``, ``params_active``, ``achieved`` (chosen
params / parent params in the budget metric), ``budget`` (the router's per-axis choices),
``val_loss``, ``val_acc``, ``test_acc`` and ``baseline`` (a row of the independently trained model
of the same size, or None).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .._io import atomic_path, atomic_write_text

__all__ = ["write_report", "render_markdown"]


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def render_markdown(rep: dict) -> str:
    cfg = rep["config"]
    lines = ["# Star Elastic reference run", ""]
    lines.append(f"Preset `{cfg['preset']}`, seed {cfg['seed']}, task: {rep['task']['description']}.")
    lines.append(f"Budgets are fractions of the parent's **{cfg['budget_metric']}** parameters. "
                 "Exact-match accuracy: greedy generation of the thinking trace and answer; "
                 "the answer (after `</think>`) must equal the true value.")
    lines.append("")
    p = rep["parent"]
    lines.append(f"Parent (stage 0, teacher): {p['params_total']:,} params ({p['params_active']:,} active), "
                 f"val loss {_fmt(p['val_loss'])}, val acc {_fmt(p['val_acc'])}, "
                 f"**test acc {_fmt(p['test_acc'])}**.")
    lines.append("")
    lines.append("| budget | params total | params active | achieved/target | val loss | test acc | "
                 "baseline test acc | baseline val loss | nested ≥ baseline |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rep["budgets"]:
        b = r.get("baseline")
        better = "—" if b is None else ("yes" if r["test_acc"] >= b["test_acc"] else "no")
        lines.append(
            f"| {r['target']:.2f} | {r['params_total']:,} | {r['params_active']:,} | "
            f"{r['achieved']:.3f} / {r['target']:.2f} ({100 * (r['achieved'] / r['target'] - 1):+.1f}%) | "
            f"{_fmt(r['val_loss'])} | {_fmt(r['test_acc'])} | {_fmt(b and b['test_acc'])} | "
            f"{_fmt(b and b['val_loss'])} | {better} |")
    lines.append("")
    lines.append("## Router choices (sizes per axis; per layer where the axis is per layer)")
    lines.append("")
    for r in rep["budgets"]:
        sizes = ", ".join(f"{a}={v}" for a, v in r["budget"].items())
        lines.append(f"- budget {r['target']:.2f}: {sizes}")
    if rep.get("interpolated"):
        lines.append("")
        lines.append("In-between targets (router input blended between the two neighbouring budgets; the "
                     "routers saw random in-between targets on the size loss only, never distilled there):")
        lines.append("")
        for r in rep["interpolated"]:
            sizes = ", ".join(f"{a}={v}" for a, v in r["budget"].items())
            lines.append(f"- target {r['target']:.3f}: achieved {r['achieved']:.3f} "
                         f"({100 * (r['achieved'] / r['target'] - 1):+.1f}%); {sizes}")
    lines.append("")
    lines.append("## Tokens and time per stage")
    lines.append("")
    lines.append("Tokens: real (non-pad) input tokens of the training batches (global batch). Wall time includes "
                 "evaluation; CPU time is this process's (rank 0) user+system time — on a busy shared machine "
                 "it is the better estimate of the wall time on an idle one.")
    lines.append("")
    lines.append("| stage | tokens | wall time (s) | CPU time (s) |")
    lines.append("|---|---|---|---|")
    cpu = rep.get("cpu_s", {})
    for stage in rep["stages"]:
        n = rep["tokens"].get(stage)
        lines.append(f"| {stage} | {'—' if n is None else format(n, ',')} | {_fmt(rep['time_s'].get(stage), '.1f')} | "
                     f"{_fmt(cpu.get(stage), '.1f')} |")
    total = sum(rep["time_s"].get(s, 0.0) for s in rep["stages"])
    total_cpu = sum(cpu.get(s, 0.0) for s in rep["stages"])
    lines.append(f"| **total** | {sum(rep['tokens'].get(s, 0) for s in rep['stages']):,} | {total:.1f} | "
                 f"{total_cpu:.1f} |")
    if rep.get("qad"):
        q = rep["qad"]
        lines.append("")
        lines.append(f"## Stage 3: QAD ({q['format']})")
        lines.append("")
        lines.append(f"Nested checkpoint: `{q['checkpoint']}`.")
        lines.append("")
        lines.append("| budget | test acc (unquantized student) | test acc (PTQ: stage-2 model quantized) | "
                     "test acc (QAD, loaded from the nested checkpoint) | val loss PTQ | val loss QAD |")
        lines.append("|---|---|---|---|---|---|")
        for r in q["budgets"]:
            lines.append(f"| {r['target']:.2f} | {_fmt(r['ref_test_acc'])} | {_fmt(r.get('ptq_test_acc'))} | "
                         f"{_fmt(r['test_acc'])} | {_fmt(r.get('ptq_val_loss'))} | {_fmt(r['val_loss'])} |")
    lines.append("")
    return "\n".join(lines)


def _plot(rep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    rows = rep["budgets"]
    x = [r["params_active" if rep["config"]["budget_metric"] == "active" else "params_total"] for r in rows]
    ax[0].plot(x, [r["test_acc"] for r in rows], "o-", label="nested (Star Elastic)")
    bx = [xi for xi, r in zip(x, rows) if r.get("baseline")]
    by = [r["baseline"]["test_acc"] for r in rows if r.get("baseline")]
    if bx:
        ax[0].plot(bx, by, "s--", label="independent baseline")
    if rep.get("qad"):
        ax[0].plot(x, [r["test_acc"] for r in rep["qad"]["budgets"]], "^:", label=f"QAD {rep['qad']['format']}")
    ax[0].set_xlabel(f"{rep['config']['budget_metric']} parameters (thousands)")
    ax[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}"))
    ax[0].set_ylabel("test exact-match accuracy")
    ax[0].set_ylim(-0.02, 1.02)
    ax[0].legend()
    ax[0].grid(alpha=0.3)
    t = [r["target"] for r in rows]
    ax[1].plot(t, t, "k:", label="target")
    ax[1].plot(t, [r["achieved"] for r in rows], "o", label="router choice")
    ax[1].set_xlabel("target budget")
    ax[1].set_ylabel("chosen params / parent params")
    ax[1].legend()
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_report(rep: dict, run_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the three report files; returns their paths."""
    run_dir = Path(run_dir)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "png": run_dir / "report.png"}
    atomic_write_text(paths["json"], json.dumps(rep, indent=2, sort_keys=True))
    atomic_write_text(paths["md"], render_markdown(rep))
    _plot(rep, paths["png"])
    return paths
