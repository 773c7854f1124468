"""The run report: ``report.json``, ``report.md`` and ``report.png`` in the run directory.

The report dict (written as JSON) has::

    {"config": {...}, "model_config": {...}, "task": {...}, "parent": {row}, "budgets": [row, ...],
     "interpolated": [{target, budget, achieved}, ...], "stages": [name, ...], "tokens": {stage: n},
     "time_s": {stage: wall seconds}, "cpu_s": {stage: CPU seconds}, "qad": {...} | None,
     "claims": {...} (elastic_kernels.train.science.claims), "budget_control": {...}}

The Markdown leads with the claims table (nested vs from-scratch vs prune+distill per budget with
95% Wilson intervals and exact McNemar p-values; budget ordering; thinking caps; think small /
answer big against think big / answer small; the best pair against the best single model at equal
measured latency; QAD against PTQ), each yes/no exactly as measured; the budget-control section
(``budget_control.{json,md,png}``) follows.

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
from ..infer.report import budget_control_markdown, write_budget_control

__all__ = ["write_report", "render_markdown"]


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def _acc(a: dict | None) -> str:
    return "—" if a is None else f"{a['accuracy']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"


def _yn(flag) -> str:
    return "—" if flag is None else ("**yes**" if flag else "**no**")


def _vs(v: dict | None) -> str:
    if v is None:
        return "—"
    return f"{_acc(v)}; nested {v['diff']:+.3f}, p = {v['mcnemar_p']:.2g}"


def render_claims(rep: dict) -> list[str]:
    """The claims section (Markdown lines)."""
    c = rep["claims"]
    n = c["parent"]["n"]
    lines = ["## Claims (as measured)", "",
             f"{n} test problems, one seed; 95% Wilson intervals; p: exact McNemar test on the same problems "
             "(nested minus baseline). \"yes\" / \"no\" are computed from the numbers below.", ""]
    if rep["task"].get("premise"):
        lines += [f"**Premise the task encodes:** {rep['task']['premise']}.", ""]
    lines += [f"Parent (teacher): {_acc(c['parent'])}.", "",
              "| budget | total params (ratio) | active params | nested | from scratch (equal tokens) | "
              "prune+distill (equal tokens) | QAD vs PTQ |", "|---|---|---|---|---|---|---|"]
    for r in c["budgets"]:
        q = r["qad"]
        qs = "—" if q is None else (f"QAD {_acc(q)}; PTQ {q['accuracy'] + q['diff']:.3f}; "
                                    f"p = {q['mcnemar_p']:.2g}")
        lines.append(f"| {r['target']:.2f} | {r['params_total']:,} ({r['total_ratio']:.3f}) | {r['params_active']:,} | "
                     f"{_acc(r['nested'])} | "
                     f"{_vs(r['scratch'])} | {_vs(r['prune_distill'])} | {qs} |")
    lines.append("")
    o, rt = c["order"], c["router"]
    q = [
        ("Nested better than from scratch at every budget below 1.0 (p < 0.05)",
         _all(c, "scratch")),
        ("Nested better than prune+distill at every budget below 1.0 (p < 0.05)", _all(c, "prune_distill")),
        ("Accuracy strictly decreasing with budget", o["strictly_decreasing"]),
        (f"Largest minus smallest budget >= 5 points ({100 * o['largest_minus_smallest']:+.1f}) with non-overlapping "
         "intervals", o["gap_at_least_5_points"] and not o["intervals_overlap"]),
        ("Thinking caps strictly increase accuracy for every single model", c["caps_strictly_increasing"]),
        ("(think small, answer big) and (think big, answer small) differ (p < 0.05)",
         None if c["pair_swap"] is None else c["pair_swap"]["differ"]),
        ("Some pair above every single model at its measured latency",
         None if c["pairs_vs_singles"] is None else c["pairs_vs_singles"]["pair_above_singles"]),
        ("... and significantly (p < 0.05)",
         None if c["pairs_vs_singles"] is None else c["pairs_vs_singles"]["significant"]),
        ("Router: every budget's total parameters within 3% of its target", rt["all_within_3pct"]),
        ("Router: budget 1.0 is the parent's shape", rt["full_is_parent"]),
    ]
    if any(r["qad"] for r in c["budgets"]):
        q.append(("QAD better than PTQ at every budget (p < 0.05)",
                  all(r["qad"]["diff"] < 0 and r["qad"]["mcnemar_p"] < 0.05 for r in c["budgets"])))
    lines += ["| question | answer |", "|---|---|"] + [f"| {a} | {_yn(b)} |" for a, b in q] + [""]
    if o.get("adjacent"):
        tests = "; ".join(f"{d['larger']:g} vs {d['smaller']:g}: {d['diff']:+.3f}, McNemar p = {d['mcnemar_p']:.2g}"
                          for d in o["adjacent"])
        lines.append(f"- Budget ordering, each budget against the next smaller one (paired, same problems): {tests}.")
    sw = c["pair_swap"]
    if sw:
        a, b = sw["think_small_answer_big"], sw["think_big_answer_small"]
        lines.append(f"- {a['label']}: {_acc(a)}; {b['label']}: {_acc(b)}; McNemar p = {sw['mcnemar_p']:.2g}.")
    pv = c["pairs_vs_singles"]
    if pv and pv["best"]:
        bb = pv["best"]
        lines.append(f"- Best pair at equal measured latency: {bb['pair']['label']} {_acc(bb['pair'])} against "
                     f"{bb['best_single']['label']} {_acc(bb['best_single'])} (no slower): gain {bb['gain']:+.3f}, "
                     f"p = {bb['test']['mcnemar_p']:.2g}.")
    for name, cur in c["think_curves"].items():
        pts = ", ".join(f"{'uncapped' if p['cap'] is None else p['cap']}: {p['accuracy']:.3f}" for p in cur["points"])
        lines.append(f"- Thinking caps, single {name}: {pts}.")
    if c["interpolated"]:
        lines.append("- In-between targets (router input blended, never distilled at that target): " + ", ".join(
            f"{r['target']:.3f}: {_acc(r)}" for r in c["interpolated"]) + ".")
    lines.append("")
    return lines


def _all(c: dict, key: str):
    vs = [r[key] for r in c["budgets"] if r["target"] < 1.0]
    if not vs or any(v is None for v in vs):
        return None
    return all(v["diff"] > 0 and v["mcnemar_p"] < 0.05 for v in vs)


def render_markdown(rep: dict) -> str:
    cfg = rep["config"]
    lines = ["# Star Elastic reference run", ""]
    lines.append(f"Preset `{cfg['preset']}`, seed {cfg['seed']}, task: {rep['task']['description']}.")
    lines.append("")
    if rep.get("claims"):
        lines += render_claims(rep)
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
    decode = rep["config"].get("router_decode", "argmax")
    if decode == "feasible":
        band = 100 * rep["config"]["router_decode_tolerance"]
        lines.append(f"Each budget takes the routers' argmax shape if it is within ±{band:g}% "
                     "of its target, else their most probable shape within that band (docs/design.md §1); where the chosen shape "
                     "is not the argmax, the argmax is listed too.")
        lines.append("")
    for r in rep["budgets"]:
        sizes = ", ".join(f"{a}={v}" for a, v in r["budget"].items())
        am = r.get("argmax_budget")
        alt = ""
        if am is not None and am != r["budget"]:
            alt = (f" (argmax: {', '.join(f'{a}={v}' for a, v in am.items())}, achieved "
                   f"{r['argmax_achieved']:.3f})")
        lines.append(f"- budget {r['target']:.2f}: {sizes}{alt}")
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
    if rep.get("budget_control"):
        lines.append(budget_control_markdown(rep["budget_control"]))
    return "\n".join(lines)


def _plot(rep: dict, path: Path) -> None:
    """Accuracy per budget (nested, from scratch, prune+distill, QAD; 95% Wilson error bars)
    against total parameters, and the router's chosen sizes against the targets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.8))
    c = rep.get("claims")
    if c:
        rows = c["budgets"]
        x = [r["params_total"] for r in rows]
        series = [("nested (Star Elastic)", "o-", [r["nested"] for r in rows]),
                  ("from scratch", "s--", [r["scratch"] for r in rows]),
                  ("prune+distill", "D-.", [r["prune_distill"] for r in rows]),
                  ("QAD", "^:", [r["qad"] for r in rows])]
        for j, (label, fmt, accs) in enumerate(series):
            pts = [(xi * (1 + 0.012 * (j - 1.5)), a) for xi, a in zip(x, accs) if a is not None]
            if not pts:
                continue
            ax[0].errorbar([p[0] for p in pts], [p[1]["accuracy"] for p in pts], fmt=fmt, capsize=3, label=label,
                           yerr=[[p[1]["accuracy"] - p[1]["ci_low"] for p in pts],
                                 [p[1]["ci_high"] - p[1]["accuracy"] for p in pts]])
        ax[0].set_title("test accuracy per budget (95% Wilson intervals)")
    else:
        rows = rep["budgets"]
        ax[0].plot([r["params_total"] for r in rows], [r["test_acc"] for r in rows], "o-", label="nested")
        ax[0].set_title("test accuracy per budget")
    ax[0].set_xlabel("total parameters (thousands)")
    ax[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}"))
    ax[0].set_ylabel("test exact-match accuracy")
    ax[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4, frameon=False)
    ax[0].grid(alpha=0.3)
    t = [r["target"] for r in rep["budgets"]]
    ax[1].plot(t, t, "k:", label="target")
    ax[1].plot(t, [r["achieved"] for r in rep["budgets"]], "o", label=f"router choice ({rep['config']['budget_metric']})")
    ax[1].set_xlabel("target budget")
    ax[1].set_ylabel("chosen params / parent params")
    ax[1].set_title("router: chosen size against target")
    ax[1].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()  # makes room for the legends below the axes: no bbox_inches="tight" re-draw (~25%)
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
    if rep.get("budget_control"):
        paths |= {f"budget_control_{k}": v for k, v in write_budget_control(rep["budget_control"], run_dir).items()}
    return paths
