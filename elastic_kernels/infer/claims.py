"""The budget-control questions, answered from evaluated settings with intervals and paired tests.

Every function takes the rows of :func:`~elastic_kernels.infer.evaluate.evaluate_settings` (each
with ``correct``: 0/1 per problem, the same problems in every row) and answers one question; each
answer carries the measured numbers, 95% Wilson intervals and exact McNemar p-values
(:mod:`.stats`), and a plain ``yes``/``no`` computed from them, never set by hand.
"""
from __future__ import annotations

from typing import Sequence

from .stats import accuracy_summary, compare_paired, intervals_overlap

__all__ = ["think_curves", "pair_swap", "pairs_vs_singles", "with_intervals"]


def with_intervals(row: dict) -> dict:
    """``accuracy_summary`` of a row's per-problem outcomes, with its label."""
    return {"label": row["label"], **accuracy_summary(row["correct"])}


def think_curves(rows: Sequence[dict], names: Sequence[str]) -> dict:
    """Accuracy against the thinking cap of every single model (caps ascending, uncapped last).

    Returns ``{name: {"points": [{"cap", "think_tokens", "latency_s", accuracy summary}],
    "strictly_increasing": bool, "steps": [paired test of each cap against the next]}}``.
    """
    out = {}
    for name in names:
        pts = [r for r in rows if r["kind"] == "single" and r["setting"]["think"] == name]
        pts.sort(key=lambda r: (r["setting"]["max_think_tokens"] is None, r["setting"]["max_think_tokens"] or 0))
        points = [{"cap": r["setting"]["max_think_tokens"], "think_tokens": r["think_tokens"],
                   "latency_s": r.get("latency_s"), **accuracy_summary(r["correct"])} for r in pts]
        steps = [{"from": a["label"], "to": b["label"], **compare_paired(b["correct"], a["correct"])}
                 for a, b in zip(pts, pts[1:])]
        out[name] = {"points": points, "steps": steps,
                     "strictly_increasing": all(b["accuracy"] > a["accuracy"] for a, b in zip(points, points[1:]))}
    return out


def _row(rows: Sequence[dict], think: str, answer: str) -> dict | None:
    for r in rows:
        s = r["setting"]
        if (s["think"], s["answer"], s["max_think_tokens"], s["cache_mode"]) == (think, answer, None, "reprefill"):
            return r
    return None


def pair_swap(rows: Sequence[dict], small: str, big: str) -> dict | None:
    """(think small, answer big) against (think big, answer small): accuracies with intervals, the
    paired test, and ``differ`` (McNemar p < 0.05). None when either pair was not evaluated."""
    a, b = _row(rows, small, big), _row(rows, big, small)
    if a is None or b is None:
        return None
    test = compare_paired(a["correct"], b["correct"])
    return {"think_small_answer_big": with_intervals(a), "think_big_answer_small": with_intervals(b), **test,
            "differ": test["mcnemar_p"] < 0.05, "intervals_overlap": intervals_overlap(accuracy_summary(a["correct"]),
                                                                                       accuracy_summary(b["correct"]))}


def pairs_vs_singles(rows: Sequence[dict], axis: str = "latency_s") -> dict:
    """Does some (think, answer) pair beat every single model at its measured cost?

    For each pair (think != answer, uncapped, re-prefill): the best single setting (any budget, any
    cap) whose ``axis`` cost is at most the pair's, and the paired test of the pair against it.
    ``best``: the pair with the largest accuracy gain over its best single. ``pair_above_singles``:
    some pair is more accurate than every single setting that costs no more (measured, on these
    problems); ``significant``: and its McNemar p < 0.05. ``on_frontier``: the pairs on the
    Pareto frontier over pairs and singles.
    """
    main = [r for r in rows if r["kind"] in ("single", "pair") and axis in r]
    singles = [r for r in main if r["kind"] == "single"]
    pairs = [r for r in main if r["kind"] == "pair" and r["setting"]["max_think_tokens"] is None]
    found = []
    for p in pairs:
        cheaper = [s for s in singles if s[axis] <= p[axis]]
        best = max(cheaper, key=lambda s: (s["accuracy"], -s[axis])) if cheaper else None
        item = {"pair": with_intervals(p), "cost": p[axis], "best_single": None, "gain": None, "test": None}
        if best is not None:
            item |= {"best_single": with_intervals(best), "best_single_cost": best[axis],
                     "gain": p["accuracy"] - best["accuracy"], "test": compare_paired(p["correct"], best["correct"])}
        found.append(item)
    comparable = [f for f in found if f["gain"] is not None]
    best = max(comparable, key=lambda f: f["gain"]) if comparable else None
    frontier, top = [], -1.0
    for r in sorted(main, key=lambda r: (r[axis], -r["accuracy"])):
        if r["accuracy"] > top:
            top = r["accuracy"]
            if r["kind"] == "pair":
                frontier.append(r["label"])
    above = best is not None and best["gain"] > 0
    return {"axis": axis, "pairs": found, "best": best, "pair_above_singles": above,
            "significant": bool(above and best["test"]["mcnemar_p"] < 0.05), "on_frontier": frontier}
