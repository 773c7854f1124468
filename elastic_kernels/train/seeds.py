"""``--seeds N``: repeat the whole run with N seeds and report the spread of every claim.

Seed ``s`` runs in ``<run_dir>/seed-<s>`` (its own full report); ``seeds.json`` / ``seeds.md`` in
``<run_dir>`` list, per measured quantity, the value of every seed and their mean, standard
deviation, min and max, and for every yes/no claim how many seeds said yes.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from .._io import atomic_write_text
from .config import TrainConfig

__all__ = ["run_seeds", "seed_summary", "write_seed_summary"]


def _quantities(rep: dict) -> tuple[dict[str, float], dict[str, bool]]:
    c = rep["claims"]
    nums = {"parent": c["parent"]["accuracy"]}
    flags = {"strictly_decreasing": c["order"]["strictly_decreasing"],
             "gap_5_points_disjoint": c["order"]["gap_at_least_5_points"] and not c["order"]["intervals_overlap"],
             "caps_strictly_increasing": c["caps_strictly_increasing"],
             "router_within_3pct": c["router"]["all_within_3pct"], "full_is_parent": c["router"]["full_is_parent"]}
    for r in c["budgets"]:
        t = f"{r['target']:g}"
        nums[f"nested@{t}"] = r["nested"]["accuracy"]
        for base in ("scratch", "prune_distill"):
            if r[base]:
                nums[f"{base}@{t}"] = r[base]["accuracy"]
                flags[f"nested>{base}@{t} (p<0.05)"] = r[base]["diff"] > 0 and r[base]["mcnemar_p"] < 0.05
        if r.get("qad"):  # science.claims: the paired test of PTQ minus QAD
            nums[f"qad@{t}"] = r["qad"]["accuracy"]
            nums[f"qad-ptq@{t}"] = -r["qad"]["diff"]
            flags[f"qad>ptq@{t} (p<0.05)"] = r["qad"]["diff"] < 0 and r["qad"]["mcnemar_p"] < 0.05
    if c["pair_swap"]:
        nums["pair_swap_diff"] = c["pair_swap"]["diff"]
        flags["pair_swap_differ"] = c["pair_swap"]["differ"]
    if c["pairs_vs_singles"] and c["pairs_vs_singles"]["best"]:
        nums["best_pair_gain_at_equal_latency"] = c["pairs_vs_singles"]["best"]["gain"]
        flags["pair_above_singles"] = c["pairs_vs_singles"]["pair_above_singles"]
    return nums, flags


def seed_summary(reports: dict[int, dict]) -> dict:
    """``{"seeds", "quantities": {name: {"values", "mean", "std", "min", "max"}}, "claims": {name:
    {"yes", "of"}}}`` over the per-seed reports ``{seed: report}``."""
    per = {s: _quantities(r) for s, r in reports.items()}
    names = sorted({k for nums, _ in per.values() for k in nums})
    out: dict = {"seeds": sorted(reports), "quantities": {}, "claims": {}}
    for k in names:
        vals = [per[s][0][k] for s in sorted(per) if k in per[s][0]]
        out["quantities"][k] = {"values": vals, "mean": statistics.fmean(vals),
                                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "min": min(vals),
                                "max": max(vals)}
    for k in sorted({k for _, flags in per.values() for k in flags}):
        got = [per[s][1][k] for s in sorted(per) if k in per[s][1]]
        out["claims"][k] = {"yes": sum(bool(g) for g in got), "of": len(got)}
    return out


def _markdown(summary: dict) -> str:
    lines = [f"# Spread over seeds {summary['seeds']}", "", "| quantity | mean | std | min | max | per seed |",
             "|---|---|---|---|---|---|"]
    for k, q in summary["quantities"].items():
        lines.append(f"| {k} | {q['mean']:.3f} | {q['std']:.3f} | {q['min']:.3f} | {q['max']:.3f} | "
                     + ", ".join(f"{v:.3f}" for v in q["values"]) + " |")
    lines += ["", "| claim | seeds saying yes |", "|---|---|"]
    lines += [f"| {k} | {v['yes']} / {v['of']} |" for k, v in summary["claims"].items()]
    return "\n".join(lines) + "\n"


def run_seeds(cfg: TrainConfig) -> dict:
    """Run ``cfg.seeds`` seeds (``cfg.seed`` upward) and write the spread; returns the summary
    (rank 0; {} on the other ranks of a data-parallel run)."""
    from .pipeline import run
    from .runner import process_group

    base = Path(cfg.resolved_run_dir())
    reports = {}
    with process_group(cfg) as info:  # one process group for every seed's run (torchrun / --procs)
        for k in range(cfg.seeds):
            seed = cfg.seed + k
            one = dataclasses.replace(cfg, seed=seed, seeds=1, run_dir=str(base / f"seed-{seed}"))
            reports[seed] = run(one)
    if not info.main:
        return {}
    return write_seed_summary(reports, base)


def write_seed_summary(reports: dict[int, dict], out_dir: str | Path) -> dict:
    """:func:`seed_summary` of ``{seed: report}`` written to ``out_dir/seeds.json`` and ``seeds.md``
    (also for reports of separate runs, e.g. ``elastic-train --seed 1 --seeds 2`` beside seed 0)."""
    summary = seed_summary(reports)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "seeds.json", json.dumps(summary, indent=2, sort_keys=True))
    atomic_write_text(out / "seeds.md", _markdown(summary))
    return summary
