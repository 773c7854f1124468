"""The budget-control report of a training run directory.

:func:`run_budget_control` loads the run's nested checkpoint and test split, evaluates every
setting (:mod:`.evaluate`) and writes, next to the training report::

    budget_control.json   {"run_dir", "checkpoint", "task", "budgets", "caps", "rows", "analysis", ...}
    budget_control.md     the table (:func:`budget_control_markdown`)
    budget_control.png    accuracy (95% Wilson error bars) against measured single-request latency,
                          FLOPs and bytes, one panel each, frontier marked

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
from .claims import pair_swap, pairs_vs_singles, think_curves
from .cost import CostModel
from .evaluate import Workers, analyze, budget_order, build_settings, default_caps, evaluate_settings
from .latency import profile_budgets
from .stats import wilson_interval

__all__ = ["budget_control", "run_budget_control", "write_budget_control", "budget_control_markdown",
           "plot_budget_control", "latency_inputs", "RunDirError", "REPORT_NAME"]

log = logging.getLogger(__name__)

REPORT_NAME = "budget_control"
_AXIS_TITLES = {"latency_s": "median single-request latency, s (measured, batch 1, 1 thread)",
                "flops": "FLOPs per problem (cost model)", "bytes": "bytes per problem at batch 1 (cost model)",
                "wall_s": "batched wall seconds per problem (a throughput, not a latency)"}


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


def latency_inputs(task, problems: Sequence) -> dict:
    """Prefill lengths and decode contexts that cover ``problems``: the shortest and longest prompt
    and the longest prompt + trace + answer."""
    lens = [len(p) for p in task.prompts(problems)]
    longest = max(lens) + task.max_completion_len()
    return {"prefill_lengths": sorted({min(lens), max(lens), longest}),
            "decode_contexts": sorted({min(lens), (min(lens) + longest) // 2, longest})}


def budget_control(nested_dir: str | os.PathLike, task, problems: Sequence, *, caps: Sequence[int] | None = None,
                   batch_size: int = 64, reuse: bool = False, device: str = "cpu", repeats: int = 1,
                   latency: bool = True, latency_repeats: int = 7, workers: Workers | None = None) -> dict:
    """Evaluate every budget-control setting of the nested checkpoint ``nested_dir`` on ``problems``.

    caps: thinking-token caps of the single models (default :func:`~.evaluate.default_caps`).
    reuse: also run the pairs in the experimental cache-reuse mode. latency: time every budget's
    physically sliced submodel (``load_nested`` per budget; :func:`~.latency.profile_budgets`, a
    wider random-weight clone when the model is overhead-bound) and give every setting its
    measured per-request latency. workers: the processes the settings are spread over (default:
    this one; :class:`~.evaluate.Workers`): each runs its share of the settings (rows merged in
    setting order; every row's outcomes are the single-process ones), the latency profile is
    measured once (``workers.once``) and shared. Returns the report dict (see
    :func:`budget_control_markdown`); ``processes`` says how many processes ran the settings
    concurrently (their ``wall_s`` were measured in different processes).
    """
    workers = workers or Workers()
    from ..models import load_nested, read_nested_config

    _, table = read_nested_config(nested_dir)
    model = load_nested(nested_dir, None, device=device).eval()
    names = budget_order(model, table)
    caps = default_caps(task) if caps is None else sorted({int(c) for c in caps})
    settings = build_settings(names, caps, reuse=reuse)
    lat = None
    if latency:
        def measure() -> dict:
            subs = {n: load_nested(nested_dir, n, device=device).eval() for n in names}
            return profile_budgets(model, table, subs, repeats=latency_repeats, **latency_inputs(task, problems))
        lat = workers.once(measure)

    def progress(i, n, s):
        log.info("budget control %d/%d: %s", i + 1, n, s.label)

    rows = workers.map(lambda part: evaluate_settings(
        model, task, problems, table, part, batch_size=batch_size, repeats=repeats,
        latency=None if lat is None else lat["profiles"], progress=progress), settings)
    cost = CostModel(model, table)
    rep = {
        "checkpoint": str(nested_dir),
        "task": {**task.to_dict(), "description": task.describe(), "split": "test", "n_problems": len(problems)},
        "budgets": {n: {"budget": table[n].to_dict(), **cost.per_budget[n]} for n in names},
        "budget_order": names, "caps": caps, "batch_size": batch_size, "device": device, "repeats": repeats,
        "processes": workers.world,
        "rows": rows, "analysis": analyze(rows),
        "think_curves": think_curves(rows, names),
        "pair_swap": pair_swap(rows, names[-1], names[0]) if len(names) > 1 else None,
    }
    if lat is not None:
        rep["latency"] = {k: v for k, v in lat.items() if k != "profiles"} | {
            "profiles": {n: p.to_dict() for n, p in lat["profiles"].items()}}
        rep["pairs_vs_singles"] = pairs_vs_singles(rows, "latency_s")
    return rep


def run_budget_control(run_dir: str | os.PathLike, *, limit: int | None = None, caps: Sequence[int] | None = None,
                       batch_size: int = 64, reuse: bool = True, device: str = "cpu", repeats: int = 1,
                       write: bool = True, out_dir: str | os.PathLike | None = None,
                       checkpoint: str = "nested", latency: bool = True) -> dict:
    """Evaluate every budget-control setting of the run in ``run_dir`` on its test split
    (:func:`budget_control`).

    limit: evaluate only the first ``limit`` test problems (None: all). repeats: timing passes of
    the batched throughput (its wall time is the minimum). write: write the three report files
    into ``out_dir`` (default ``run_dir``). checkpoint: the nested checkpoint directory inside the
    run (``"nested"``, the elastic stage's; ``"qad"``, the quantized export, evaluated as loaded).
    Returns the report dict.
    """
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
    rep = {"run_dir": str(run_dir)} | budget_control(run_dir / checkpoint, task, problems, caps=caps,
                                                     batch_size=batch_size, reuse=reuse, device=device,
                                                     repeats=repeats, latency=latency)
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


def _ci(r: dict) -> str:
    lo, hi = wilson_interval(sum(r["correct"]), len(r["correct"])) if "correct" in r else (None, None)
    return f"{r['accuracy']:.3f}" + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]")


def _yes(flag) -> str:
    return "—" if flag is None else ("**yes**" if flag else "**no**")


def budget_control_markdown(rep_or_dir) -> str:
    """The budget-control section (Markdown) of a report dict or of a run directory holding
    ``budget_control.json``; an empty string when the run directory has none (so a training
    report can always include it)."""
    rep = _load_report(rep_or_dir)
    if rep is None:
        return ""
    an = rep["analysis"]
    axes = an.get("axes", [])
    fronts = {axis: set(an[axis]["frontier"]) for axis in axes}
    t = rep["task"]
    lines = ["## Elastic budget control (think budget -> answer budget)", "",
             f"Test split, {t['n_problems']} problems ({t['description']}); greedy decoding. `A->B`: think with "
             "budget A, answer with budget B (the answer model re-prefills prompt + thinking at the switch, charged "
             "to the pair); `A cap N`: single model with </think> forced after N thinking tokens (caps the model was "
             "trained for). Accuracy with its 95% Wilson interval. Latency: measured per request at batch 1 on one "
             "thread from each request's token counts (median and p90 over the problems). FLOPs and bytes: cost "
             f"model. Throughput: batched generation (batch {rep['batch_size']}, {rep['device']}), problems per "
             "second — a throughput, not a latency"
             + (f"; the settings ran split over {rep['processes']} concurrent processes, so throughputs of different "
                "settings were measured in different processes" if rep.get("processes", 1) > 1 else "") + ".", "",
             "| setting | kind | test acc [95% CI] | think tok | median ms | p90 ms | MFLOPs | KB (batch 1) | "
             "throughput /s | frontier (" + " / ".join(axes) + ") |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        if r["kind"] == "reuse":
            continue
        marks = " / ".join("**yes**" if r["label"] in fronts[a] else "no" for a in axes)
        med = "—" if "latency_s" not in r else f"{1e3 * r['latency_s']:.2f}"
        p90 = "—" if "latency_p90_s" not in r else f"{1e3 * r['latency_p90_s']:.2f}"
        lines.append(f"| {r['label']} | {r['kind']} | {_ci(r)} | {r['think_tokens']:.1f} | {med} | {p90} | "
                     f"{r['flops'] / 1e6:.3f} | {r['bytes'] / 1e3:.1f} | {1 / r['wall_s']:.0f} | {marks} |")
    lines.append("")
    curves = rep.get("think_curves") or {}
    if curves:
        lines += ["### Thinking caps (accuracy against the cap, per single model)", ""]
        for name in rep["budget_order"]:
            c = curves[name]
            pts = ", ".join(f"{'uncapped' if p['cap'] is None else 'cap ' + str(p['cap'])}: {p['accuracy']:.3f}"
                            for p in c["points"])
            ps = ", ".join(f"{st['mcnemar_p']:.2g}" for st in c["steps"])
            lines.append(f"- {name}: {pts} — strictly increasing: {_yes(c['strictly_increasing'])} "
                         f"(McNemar p of each step: {ps})")
        lines.append("")
    sw = rep.get("pair_swap")
    if sw:
        a, b = sw["think_small_answer_big"], sw["think_big_answer_small"]
        lines += ["### Think small, answer big against think big, answer small", "",
                  f"{a['label']}: {a['accuracy']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]; {b['label']}: "
                  f"{b['accuracy']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]; difference {sw['diff']:+.3f}, "
                  f"McNemar p = {sw['mcnemar_p']:.3g} ({sw['a_only']} vs {sw['b_only']} discordant). "
                  f"They differ (p < 0.05): {_yes(sw['differ'])}.", ""]
    pv = rep.get("pairs_vs_singles")
    if pv:
        lines += ["### Does a pair beat every single model at its measured latency?", ""]
        best = pv["best"]
        if best is None:
            lines.append("No pair costs as much as some single setting; no comparison at equal latency.")
        else:
            bs = best["best_single"]
            lines.append(f"Best pair {best['pair']['label']} ({best['pair']['accuracy']:.3f} "
                         f"[{best['pair']['ci_low']:.3f}, {best['pair']['ci_high']:.3f}], median "
                         f"{1e3 * best['cost']:.2f} ms) against the best single setting that is no slower, "
                         f"{bs['label']} ({bs['accuracy']:.3f} [{bs['ci_low']:.3f}, {bs['ci_high']:.3f}], "
                         f"{1e3 * best['best_single_cost']:.2f} ms): gain {best['gain']:+.3f}, McNemar p = "
                         f"{best['test']['mcnemar_p']:.3g}. A pair above every single model's curve: "
                         f"{_yes(pv['pair_above_singles'])}; significantly: {_yes(pv['significant'])}. Pairs on the "
                         f"measured-latency frontier: {', '.join(pv['on_frontier']) or 'none'}.")
        lines.append("")
    lat = rep.get("latency")
    if lat:
        ob = lat["overhead"]["checkpoint"]
        lines += ["### Latency measurement", "",
                  f"Each budget timed on its physically sliced submodel (`load_nested`), batch 1, one thread, after "
                  f"warm-up, min and median of >= 7 runs, the budgets interleaved run by run, on the thread's CPU "
                  f"clock (on an idle core the wall time; other load on the machine hardly moves it). "
                  f"Smallest/largest budget decode time on the trained model: {ob['ratio']:.2f}."]
        if lat["timed_on"] == "wider clone":
            oc = lat["overhead"]["clone"]
            lines.append(f"That is above 0.9 (framework overhead dominates the tiny model), so **latency is timed on "
                         f"a {lat['clone_factor']}x wider random-weight clone with the same shape fractions per budget** "
                         f"(its ratio: {oc['ratio']:.2f}); accuracies are the trained model's.")
        fit = lat["bytes_fit"]
        r2 = "—" if fit["r2"] is None else f"{fit['r2']:.3f}"
        lines.append(f"Measured decode time against modelled bytes per decode step: R^2 = {r2} over {fit['n']} "
                     f"points (slope {fit['slope']:.3g} s/byte, intercept {1e3 * fit['intercept']:.3f} ms).")
        lines += ["", "| budget | params (timed model) | prefill ms/token (median fit) | decode ms at contexts |",
                  "|---|---|---|---|"]
        for n in rep["budget_order"]:
            p = lat["profiles"][n]
            dec = ", ".join(f"{d['context']}: {1e3 * d['median_s']:.3f}" for d in p["decode"])
            lines.append(f"| {n} | {lat['params_total'][n]:,} | {1e3 * p['prefill_fit']['slope']:.4f} | {dec} |")
        lines.append("")
    if an.get("reuse"):
        lines += ["Experimental cache reuse at the switch (no re-prefill) against the exact re-prefill:", "",
                  "| pair | acc (re-prefill) | acc (reuse) | change |", "|---|---|---|---|"]
        for r in an["reuse"]:
            lines.append(f"| {r['pair']} | {r['accuracy_reprefill']:.3f} | {r['accuracy_reuse']:.3f} | "
                         f"{r['delta']:+.3f} |")
        lines.append("")
    return "\n".join(lines)


def _err(rows: Sequence[dict]) -> list[list[float]]:
    lo, hi = [], []
    for r in rows:
        a, b = wilson_interval(sum(r["correct"]), len(r["correct"]))
        lo.append(r["accuracy"] - a)
        hi.append(b - r["accuracy"])
    return [lo, hi]


def plot_budget_control(rep: dict, path: str | os.PathLike) -> None:
    """One panel per question: accuracy against measured latency (singles with their caps joined,
    pairs as labelled markers), accuracy against the thinking cap, and accuracy against FLOPs;
    95% Wilson error bars; legends outside the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = [r for r in rep["rows"] if r["kind"] != "reuse"]
    axis0 = "latency_s" if all("latency_s" in r for r in rows) else "wall_s"
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "^vDPX*hs<>"
    for ax, axis in ((axes[0], axis0), (axes[2], "flops")):
        scale = 1e3 if axis == "latency_s" else 1.0
        for c, name in enumerate(rep["budget_order"]):
            pts = sorted((r for r in rows if r["kind"] == "single" and r["setting"]["think"] == name),
                         key=lambda r: r[axis])
            ax.errorbar([scale * r[axis] for r in pts], [r["accuracy"] for r in pts], yerr=_err(pts), fmt="o-",
                        color=colors[c % len(colors)], capsize=3, label=f"single {name} (caps, then uncapped)")
        pairs = [r for r in rows if r["kind"] == "pair"]
        for j, r in enumerate(pairs):
            ax.errorbar([scale * r[axis]], [r["accuracy"]], yerr=_err([r]), fmt=markers[j % len(markers)],
                        color="k", markersize=8, capsize=3, label=f"pair {r['label']}")
        if axis in rep["analysis"]:
            front = set(rep["analysis"][axis]["frontier"])
            fr = sorted((r for r in rows if r["label"] in front), key=lambda r: r[axis])
            ax.step([scale * r[axis] for r in fr], [r["accuracy"] for r in fr], where="post", color="r", lw=1.2,
                    alpha=0.5, label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_xlabel(("median single-request latency (ms, measured)" if axis == "latency_s" else
                       _AXIS_TITLES[axis]))
        ax.set_ylabel("test exact-match accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy vs measured latency")
    axes[2].set_title("accuracy vs FLOPs (cost model)")
    curves = rep.get("think_curves") or {}
    for c, (name, cur) in enumerate((n, curves[n]) for n in rep["budget_order"] if n in curves):
        longest = max([p["cap"] for p in cur["points"] if p["cap"] is not None] or [0])
        xs = [longest * 1.25 + 1 if p["cap"] is None else p["cap"] for p in cur["points"]]
        ys = [p["accuracy"] for p in cur["points"]]
        err = [[p["accuracy"] - p["ci_low"] for p in cur["points"]], [p["ci_high"] - p["accuracy"] for p in cur["points"]]]
        axes[1].errorbar(xs, ys, yerr=err, fmt="o-", color=colors[c % len(colors)], capsize=3, label=f"single {name}")
    axes[1].set_title("thinking caps (rightmost point: uncapped)")
    axes[1].set_xlabel("thinking-token cap")
    axes[1].set_ylabel("test exact-match accuracy")
    axes[1].grid(alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()  # makes room for the legends below the axes: no bbox_inches="tight" re-draw (~25%)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
