"""Evaluation of elastic budget control: accuracy against latency for every setting, the Pareto
frontier, and whether phase-switched (think, answer) pairs beat single models.

Settings:

- **pairs**: every (think, answer) pair of budgets, thinking uncapped (bounded only by the task's
  longest correct trace). ``think == answer`` is the plain single model.
- **caps**: every single model (``think == answer``) with a thinking-token cap (the usual
  "thinking budget" baseline: ``</think>`` is forced after the cap).
- **reuse**: every pair with ``think != answer`` again in the experimental ``cache_mode="reuse"``
  (no re-prefill at the switch); reported with its accuracy change, kept off the frontier.

Latency and cost are measured four ways:

- ``latency_s`` (with ``latency=`` profiles of :mod:`.latency`): the *measured single-request*
  latency of every request, batch 1 on one thread, from its real token counts: prefill + think
  decodes + switch (re-prefill) + answer decodes on the physically sliced submodels; rows carry
  the median (``latency_s``), p90 and mean over the problems. This is the latency axis.
- ``wall_s``: wall time of batched generation over the evaluation set, per problem (the minimum
  over ``repeats`` passes): a *throughput*, mixed-phase batches running at the larger width.
- ``flops`` and ``bytes``: cost models per problem (:class:`.cost.CostModel`): the arithmetic of
  the tokens computed at each phase's budget, and the memory traffic at batch 1.

A re-prefill at the switch is charged to the answer phase in all three.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

from ..models.config import Budget
from .cost import CostModel
from .generate import CACHE_MODES, Generation, generate
from .latency import BudgetLatency, percentile, request_latency

__all__ = ["Setting", "build_settings", "evaluate_settings", "pareto_frontier", "analyze",
           "default_caps", "budget_order", "COST_AXES", "Workers"]

COST_AXES = ("latency_s", "flops", "bytes", "wall_s")


class Workers:
    """How independent evaluation work is spread over processes; this one is a single process.

    ``map(fn, items)`` returns ``fn``'s per-item results for ``items``, in order (``fn`` takes a
    list of items and returns one result per item); ``once(fn)`` returns ``fn()``. The training
    runner's data-parallel ranks provide the same two methods (``world`` processes: each rank
    applies ``fn`` to ``items[rank::world]``, the results are gathered back in order; ``once``
    runs on rank 0 and is broadcast), so every caller gets the single-process result.
    """

    world = 1

    def map(self, fn: Callable[[list], Sequence], items: Sequence) -> list:
        items = list(items)
        out = list(fn(items)) if items else []
        if len(out) != len(items):
            raise ValueError(f"Workers.map: fn returned {len(out)} results for {len(items)} items")
        return out

    def once(self, fn: Callable[[], object]):
        return fn()


@dataclass(frozen=True)
class Setting:
    """One inference configuration: think and answer budget names, a thinking cap, a cache mode."""

    think: str
    answer: str
    max_think_tokens: int | None = None
    cache_mode: str = "reprefill"

    def __post_init__(self) -> None:
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"Setting: cache_mode must be one of {CACHE_MODES}, got {self.cache_mode!r}")

    @property
    def kind(self) -> str:
        """``"single"`` (one model, capped or not), ``"pair"`` (think != answer), ``"reuse"``."""
        if self.cache_mode == "reuse":
            return "reuse"
        return "single" if self.think == self.answer else "pair"

    @property
    def label(self) -> str:
        s = self.think if self.kind == "single" else f"{self.think}->{self.answer}"
        if self.max_think_tokens is not None:
            s += f" cap{self.max_think_tokens}"
        if self.cache_mode == "reuse":
            s += " (reuse)"
        return s


def build_settings(names: Sequence[str], caps: Sequence[int], *, reuse: bool = True) -> list[Setting]:
    """Every (think, answer) pair of ``names`` uncapped, every single model at every cap in
    ``caps``, and (``reuse``) every pair with think != answer in cache-reuse mode."""
    if not names:
        raise ValueError("build_settings: names must not be empty")
    out = [Setting(t, a) for t in names for a in names]
    out += [Setting(b, b, int(c)) for b in names for c in sorted(set(caps))]
    if reuse:
        out += [Setting(t, a, cache_mode="reuse") for t in names for a in names if t != a]
    return out


def evaluate_settings(model, task, problems: Sequence, budgets: Mapping[str, Budget], settings: Sequence[Setting], *,
                      batch_size: int = 64, think_bound: int | None = None, max_answer_tokens: int | None = None,
                      repeats: int = 1, warmup: bool = True, latency: Mapping[str, BudgetLatency] | None = None,
                      progress: Callable[[int, int, Setting], None] | None = None) -> list[dict]:
    """Run every setting over ``problems`` (of an :class:`~elastic_kernels.tasks.Task`).

    ``think_bound`` bounds uncapped thinking (default: the task's longest completion + 4);
    ``max_answer_tokens`` defaults to ``task.max_answer_len() + 2``. Returns one row per setting:
    ``setting`` (dict), ``label``, ``kind``, ``accuracy``, ``n``, means per problem of
    ``think_tokens``, ``answer_tokens``, ``flops``, ``bytes``, ``wall_s``; ``switch_rate``,
    ``forced_rate``; ``wall_s_total`` and ``wall_s_passes``; ``correct`` (0/1 per problem, for
    paired tests). Wall time is the minimum over ``repeats`` round-robin passes over all settings
    (generation is deterministic for greedy decoding; outputs come from the first pass). With
    ``latency`` (``{budget name: BudgetLatency}``), also ``latency_s`` (median over problems of the
    per-request latency), ``latency_p90_s``, ``latency_mean_s`` and ``latency_parts`` (mean
    ``prefill_s``, ``think_s``, ``switch_s``, ``answer_s``).
    """
    if not problems:
        raise ValueError("evaluate_settings: problems must not be empty")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"evaluate_settings: repeats must be an int >= 1, got {repeats!r}")
    unknown = sorted({n for s in settings for n in (s.think, s.answer)} - set(budgets))
    if unknown:
        raise ValueError(f"evaluate_settings: settings use budgets {unknown} that are not in budgets {sorted(budgets)}")
    if think_bound is None:
        think_bound = task.max_completion_len() + 4
    if max_answer_tokens is None:
        max_answer_tokens = task.max_answer_len() + 2
    prompts = task.prompts(problems)
    # submitted sorted by length, so that the requests joining the batch together mostly share one
    # (a batched prefill, no packing); every request's tokens do not depend on the batch
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    by_length, rank = [prompts[i] for i in order], [0] * len(order)
    for j, i in enumerate(order):
        rank[i] = j
    cost = CostModel(model, budgets)
    common = dict(budgets=budgets, max_answer_tokens=max_answer_tokens, batch_size=batch_size,
                  end_think_id=task.end_think_id, eos_id=task.eos_id)
    if warmup:  # first calls pay one-time dispatch/allocation costs; keep them out of the timings
        for s in settings:
            if s.cache_mode == "reprefill" and s.think != s.answer:
                generate(model, prompts[:2], think_budget=s.think, answer_budget=s.answer,
                         max_think_tokens=4, **common)
                break
        generate(model, prompts[:2], max_think_tokens=4, **common)
    n = len(problems)
    outputs: list[list[Generation]] = []
    walls: list[list[float]] = [[] for _ in settings]
    for rep in range(repeats):  # round-robin passes: a burst of other load hits one pass, not one setting
        for i, s in enumerate(settings):
            cap = think_bound if s.max_think_tokens is None else min(s.max_think_tokens, think_bound)
            t0 = time.perf_counter()
            done = generate(model, by_length, think_budget=s.think, answer_budget=s.answer, max_think_tokens=cap,
                            cache_mode=s.cache_mode, **common)
            gens = [done[j] for j in rank]
            walls[i].append(time.perf_counter() - t0)
            if rep == 0:
                outputs.append(gens)
                if progress is not None:
                    progress(i, len(settings), s)
    rows = []
    for s, gens, wall in zip(settings, outputs, walls):
        ok = [int(task.score(p, g.completion)) for g, p in zip(gens, problems)]
        costs = [cost.request_cost(g) for g in gens]
        row = {
            "setting": asdict(s), "label": s.label, "kind": s.kind, "n": n, "accuracy": sum(ok) / n, "correct": ok,
            "think_tokens": sum(len(g.thinking) for g in gens) / n,
            "answer_tokens": sum(len(g.answer) for g in gens) / n,
            "switch_rate": sum(g.switched for g in gens) / n,
            "forced_rate": sum(g.forced_switch for g in gens) / n,
            "flops": sum(c["flops"] for c in costs) / n, "bytes": sum(c["bytes"] for c in costs) / n,
            "wall_s": min(wall) / n, "wall_s_total": min(wall), "wall_s_passes": wall,
        }
        if latency is not None:
            lat = [request_latency(g.work, latency[g.think_budget], latency[g.answer_budget]) for g in gens]
            tot = [x["total_s"] for x in lat]
            row |= {"latency_s": percentile(tot, 50), "latency_p90_s": percentile(tot, 90),
                    "latency_mean_s": sum(tot) / n,
                    "latency_parts": {k: sum(x[k] for x in lat) / n for k in ("prefill_s", "think_s", "switch_s",
                                                                                 "answer_s")}}
        rows.append(row)
    return rows


def pareto_frontier(rows: Sequence[dict], cost: str, acc: str = "accuracy") -> list[int]:
    """Indices of the rows no other row dominates (cost <= and accuracy >=, one strictly), in
    increasing cost. Among rows with equal cost and accuracy the first is kept."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i][cost], -rows[i][acc], i))
    out, best = [], -math.inf
    for i in order:
        if rows[i][acc] > best:
            out.append(i)
            best = rows[i][acc]
    return out


def analyze(rows: Sequence[dict], axes: Sequence[str] | None = None) -> dict:
    """Frontier and pair-versus-single comparison on every cost axis.

    For each axis: ``frontier`` (labels, cheapest first, over single and pair settings; reuse rows
    are left out), and ``pairs_beating_singles``: every pair whose accuracy is above the best single
    setting (any budget, any cap) that costs no more, with that single setting (or None when every
    single setting costs more) and ``dominates`` (single labels the pair strictly Pareto-dominates).
    ``pair_dominates_best_single``: whether some pair beats the best single setting at its cost.
    ``reuse_pairs_beating_singles`` / ``reuse_pair_dominates_best_single``: the same for the
    pairs run in the experimental cache-reuse mode. ``reuse``: per pair, accuracy and cost of
    reuse against re-prefill. ``axes``: the cost axes (default: those of :data:`COST_AXES` every
    row has); ``out["axes"]`` lists them.
    """
    if axes is None:
        axes = [a for a in COST_AXES if rows and all(a in r for r in rows)]
    main = [r for r in rows if r["kind"] in ("single", "pair")]
    singles = [r for r in main if r["kind"] == "single"]

    def beating(candidates: Sequence[dict], axis: str) -> list[dict]:
        found = []
        for p in candidates:
            cheaper = [s for s in singles if s[axis] <= p[axis]]
            best = max(cheaper, key=lambda s: (s["accuracy"], -s[axis])) if cheaper else None
            if best is None or p["accuracy"] > best["accuracy"]:
                dominated = [s["label"] for s in singles if p[axis] <= s[axis] and p["accuracy"] >= s["accuracy"]
                             and (p[axis] < s[axis] or p["accuracy"] > s["accuracy"])]
                found.append({"pair": p["label"], "accuracy": p["accuracy"], "cost": p[axis],
                              "best_single_within_cost": None if best is None else best["label"],
                              "best_single_accuracy": None if best is None else best["accuracy"],
                              "dominates": dominated})
        return found

    out: dict = {"axes": list(axes)}
    for axis in axes:
        pairs = beating([r for r in main if r["kind"] == "pair"], axis)
        reused = beating([r for r in rows if r["kind"] == "reuse"], axis)
        out[axis] = {"frontier": [main[i]["label"] for i in pareto_frontier(main, axis)],
                     "pairs_beating_singles": pairs,
                     "pair_dominates_best_single": any(b["best_single_within_cost"] is not None for b in pairs),
                     "reuse_pairs_beating_singles": reused,
                     "reuse_pair_dominates_best_single": any(b["best_single_within_cost"] is not None
                                                             for b in reused)}
    reuse = []
    by_key = {(r["setting"]["think"], r["setting"]["answer"], r["setting"]["max_think_tokens"]): r
              for r in main}
    for r in rows:
        if r["kind"] != "reuse":
            continue
        s = r["setting"]
        ref = by_key.get((s["think"], s["answer"], s["max_think_tokens"]))
        if ref is not None:
            reuse.append({"pair": ref["label"], "accuracy_reprefill": ref["accuracy"],
                          "accuracy_reuse": r["accuracy"], "delta": r["accuracy"] - ref["accuracy"],
                          "flops_saved": 1.0 - r["flops"] / ref["flops"] if ref["flops"] else 0.0,
                          "bytes_saved": 1.0 - r["bytes"] / ref["bytes"] if ref["bytes"] else 0.0,
                          "wall_saved": 1.0 - r["wall_s"] / ref["wall_s"] if ref["wall_s"] else 0.0})
    out["reuse"] = reuse
    return out


def default_caps(task, fractions: Sequence[float] = (0.25, 0.5, 0.75)) -> list[int]:
    """Thinking caps at ``fractions`` of the task's longest correct thinking trace (at least 1)."""
    longest = task.max_think_len()
    return sorted({max(1, int(round(f * longest))) for f in fractions})


def budget_order(model, budgets: Mapping[str, Budget]) -> list[str]:
    """Budget names from the largest submodel (active parameters) to the smallest."""
    return sorted(budgets, key=lambda n: (-model.param_count(budgets[n], active=True), n))

