"""Measured single-request latency of nested submodels (batch 1, one thread).

Each budget is timed on its *physically sliced* submodel (``models.load_nested`` per budget, or
``ElasticHybridLM.slice``): really smaller tensors, not the parent run at a narrower width. One
request at a time, one CPU thread, after warm-up; every timing is the min and the median of
``repeats`` (>= 7) runs, the budgets timed interleaved (one run of each per round) on the thread's
CPU clock, which other load on a shared machine disturbs far less than the wall clock:

- **prefill**: one forward over ``L`` prompt tokens into a fresh cache, at several ``L``; the
  median times are fitted with ``a + b * L``.
- **decode**: one one-token forward with the cache already holding ``c`` tokens, at several
  contexts ``c`` (the cache is cloned before every run so each run sees the same state); fitted
  with ``a + b * c``.

A request's latency is then built from its real token counts (``Generation.work`` of
:mod:`.generate`): prefill of the prompt at the think budget + one decode per thinking token at
its context + the switch cost (re-prefill of prompt and trace at the answer budget, when the
answer submodel differs) + one decode per answer token (:func:`request_latency`).

**Overhead check.** A model as small as the reference one spends most of a decode step in
framework overhead, so its budgets barely differ in time. When the smallest budget's decode time
exceeds ``0.9 x`` the full model's, :func:`wider_clone` builds a random-weight model whose every
axis is ``factor`` times wider, with the *same shape fractions* per budget, and the latency is
measured on it instead (the reports say so). :func:`fit_time_vs_bytes` fits measured decode time
against the cost model's bytes (``R^2`` shows whether the time follows the bytes).
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..models import Budget, ElasticHybridConfig, ElasticHybridLM
from .cost import CostModel

__all__ = ["BudgetLatency", "measure_budget", "measure_budgets", "profile_budgets", "request_latency", "overhead_bound",
           "wider_clone", "wider_budget", "fit_time_vs_bytes", "percentile", "OVERHEAD_RATIO"]

OVERHEAD_RATIO = 0.9


@contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _linfit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least squares ``y = intercept + slope * x``; ``r2`` (the squared correlation) is None
    where it is undefined: fewer than two distinct ``xs`` (then the slope is 0) or constant ``ys``."""
    if len(set(xs)) < 2:
        return {"intercept": float(statistics.fmean(ys)), "slope": 0.0, "r2": None}
    fit = statistics.linear_regression(xs, ys)
    r2 = None if len(set(ys)) < 2 else statistics.correlation(xs, ys) ** 2
    return {"intercept": float(fit.intercept), "slope": float(fit.slope), "r2": r2}


@dataclass
class BudgetLatency:
    """Timings of one submodel. ``prefill``: ``[{"tokens", "min_s", "median_s"}]``; ``decode``:
    ``[{"context", "min_s", "median_s"}]``; ``prefill_fit`` / ``decode_fit``: ``{"intercept",
    "slope", "r2"}`` of the median seconds against tokens / context."""

    name: str
    params_total: int
    prefill: list[dict] = field(default_factory=list)
    decode: list[dict] = field(default_factory=list)
    prefill_fit: dict = field(default_factory=dict)
    decode_fit: dict = field(default_factory=dict)

    def prefill_s(self, tokens: int) -> float:
        """Modelled seconds of one prefill forward of ``tokens`` tokens."""
        f = self.prefill_fit
        return max(0.0, f["intercept"] + f["slope"] * tokens)

    def decode_s(self, context: int) -> float:
        """Modelled seconds of one decode forward at cache length ``context``."""
        f = self.decode_fit
        return max(0.0, f["intercept"] + f["slope"] * context)

    def decode_median_at(self, context: int) -> float:
        """The measured median decode seconds at the measured context nearest ``context``."""
        return min(self.decode, key=lambda d: abs(d["context"] - context))["median_s"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_inputs(fn: str, repeats, prefill_lengths, decode_contexts) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 7:
        raise ValueError(f"{fn}: repeats must be an int >= 7, got {repeats!r}")
    if not prefill_lengths or min(prefill_lengths) < 1 or not decode_contexts or min(decode_contexts) < 1:
        raise ValueError(f"{fn}: prefill_lengths and decode_contexts must be non-empty lists of ints >= 1, "
                         f"got {list(prefill_lengths)} and {list(decode_contexts)}")


def _interleaved(fns: Mapping[str, object], repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """``{name: (min, median)}`` thread-CPU seconds of every zero-argument ``fns[name]``: each warmed
    up ``warmup`` times, then timed in rounds (one run of every function per round, ``repeats``
    rounds), so a slow spell of the machine lands on every function alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for n, fn in fns.items():
            t0 = time.thread_time()
            fn()
            ts[n].append(time.thread_time() - t0)
    return {n: (min(v), statistics.median(v)) for n, v in ts.items()}


@torch.no_grad()
def measure_budgets(submodels: Mapping[str, ElasticHybridLM], *, prefill_lengths: Sequence[int],
                    decode_contexts: Sequence[int], repeats: int = 7, warmup: int = 2,
                    seed: int = 0) -> dict[str, BudgetLatency]:
    """Time every standalone ``{name: submodel}`` at batch 1 on one thread (see the module docstring).

    prefill_lengths: prompt lengths ``L`` (>= 1); decode_contexts: cache lengths ``c`` (>= 1) of
    the timed one-token decodes; repeats (>= 7) timed runs per point after ``warmup`` untimed ones.
    The submodels are timed interleaved (one run of each per round) on the thread's CPU clock
    (``time.thread_time``: on an idle core the wall time of the request; unlike wall time, hardly
    moved by other processes on a shared machine). Token ids are random (timing does not depend
    on them) and the same for every submodel.
    """
    _check_inputs("measure_budgets", repeats, prefill_lengths, decode_contexts)
    models = {n: m.eval() for n, m in submodels.items()}
    devices = {n: next(m.parameters()).device for n, m in models.items()}
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(seed)
    out = {n: BudgetLatency(n, m.param_count(None)) for n, m in models.items()}
    with _one_thread():
        for length in sorted(set(int(x) for x in prefill_lengths)):
            ids = torch.randint(0, vocab, (1, length), generator=gen)

            def prefill(m, dev):
                x = ids.to(dev)
                return lambda: m(x, cache=m.new_cache(1, device=dev))
            times = _interleaved({n: prefill(m, devices[n]) for n, m in models.items()}, repeats, warmup)
            for n, (lo, med) in times.items():
                out[n].prefill.append({"tokens": length, "min_s": lo, "median_s": med})
        for ctx in sorted(set(int(x) for x in decode_contexts)):
            prompt = torch.randint(0, vocab, (1, ctx), generator=gen)
            one = torch.randint(0, vocab, (1, 1), generator=gen)

            def decode(m, dev):
                cache = m.new_cache(1, device=dev)
                m(prompt.to(dev), cache=cache)
                it = iter([copy.deepcopy(cache) for _ in range(warmup + repeats)])
                x = one.to(dev)
                return lambda: m(x, cache=next(it))
            times = _interleaved({n: decode(m, devices[n]) for n, m in models.items()}, repeats, warmup)
            for n, (lo, med) in times.items():
                out[n].decode.append({"context": ctx, "min_s": lo, "median_s": med})
    for lat in out.values():
        lat.prefill_fit = _linfit([p["tokens"] for p in lat.prefill], [p["median_s"] for p in lat.prefill])
        lat.decode_fit = _linfit([d["context"] for d in lat.decode], [d["median_s"] for d in lat.decode])
    return out


def measure_budget(model: ElasticHybridLM, name: str, *, prefill_lengths: Sequence[int],
                   decode_contexts: Sequence[int], repeats: int = 7, warmup: int = 2, seed: int = 0) -> BudgetLatency:
    """:func:`measure_budgets` of one standalone submodel."""
    _check_inputs("measure_budget", repeats, prefill_lengths, decode_contexts)
    return measure_budgets({name: model}, prefill_lengths=prefill_lengths, decode_contexts=decode_contexts,
                           repeats=repeats, warmup=warmup, seed=seed)[name]


def overhead_bound(lat: Mapping[str, BudgetLatency], largest: str, smallest: str, context: int) -> dict:
    """``{"ratio", "overhead_bound"}``: the smallest budget's measured median decode time at
    ``context`` over the largest's, and whether it exceeds :data:`OVERHEAD_RATIO`."""
    r = lat[smallest].decode_median_at(context) / lat[largest].decode_median_at(context)
    return {"ratio": r, "overhead_bound": r > OVERHEAD_RATIO}


def request_latency(work: Mapping[str, Mapping[str, int]], think: BudgetLatency, answer: BudgetLatency) -> dict:
    """Seconds of one request from its token counts (``Generation.work``): ``{"prefill_s",
    "think_s", "switch_s", "answer_s", "total_s"}``.

    A phase's prefill forwards split its prefill tokens evenly; its decode time is the decode
    fit summed over its decoded tokens' contexts (``decode_context`` is that sum, each token
    counting the positions it attends to, itself included, so the cache held one fewer).
    """
    out = {}
    for phase, lat in (("think", think), ("answer", answer)):
        w = work[phase]
        nf, nt = int(w["prefill_forwards"]), int(w["prefill_tokens"])
        pre = sum(lat.prefill_s(nt // nf + (i < nt % nf)) for i in range(nf)) if nf else 0.0
        nd = int(w["decode_tokens"])
        f = lat.decode_fit
        dec = max(0.0, nd * f["intercept"] + f["slope"] * (int(w["decode_context"]) - nd)) if nd else 0.0
        out[phase] = (pre, dec)
    res = {"prefill_s": out["think"][0], "think_s": out["think"][1], "switch_s": out["answer"][0],
           "answer_s": out["answer"][1]}
    res["total_s"] = sum(res.values())
    return res


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation) of ``values``."""
    if not values:
        raise ValueError("percentile: values must not be empty")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def wider_budget(budget: Budget, config: ElasticHybridConfig, factor: int) -> Budget:
    """The budget of :func:`wider_clone`: every width axis ``factor`` times larger, experts kept."""
    sizes = budget.resolve(config)
    kw = {"hidden": sizes["hidden"][0] * factor, "experts": sizes["experts"]}
    for axis in ("mamba_heads", "expert_ffn", "ffn"):
        kw[axis] = tuple(s * factor for s in sizes[axis])
    return Budget(**kw)


def wider_clone(config: ElasticHybridConfig, factor: int, *, seed: int = 0) -> ElasticHybridLM:
    """A random-weight model with every width axis of ``config`` (hidden size, Mamba heads,
    attention heads, expert and dense FFN widths) ``factor`` times wider; head dims, groups,
    state size, experts and the layer pattern are kept, so a budget's shape fractions carry over
    (:func:`wider_budget`)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"wider_clone: factor must be an int >= 1, got {factor!r}")
    if config.layer_sizes is not None:
        raise ValueError("wider_clone: config must be a parent config (layer_sizes None)")
    wide = dataclasses.replace(
        config, hidden_size=config.hidden_size * factor, mamba_heads=config.mamba_heads * factor,
        attn_heads=config.attn_heads * factor, attn_kv_heads=config.attn_kv_heads * factor,
        attn_head_dim=config.head_dim, moe_ffn=config.moe_ffn * factor,
        moe_shared_ffn=config.moe_shared_ffn * factor, ffn_size=config.ffn_size * factor)
    torch.manual_seed(seed)
    return ElasticHybridLM(wide)


def fit_time_vs_bytes(points: Sequence[tuple[float, float]]) -> dict:
    """Least-squares ``seconds = intercept + slope * bytes`` over ``(bytes, seconds)`` points:
    ``{"intercept", "slope", "r2", "n"}`` (``r2`` None with fewer than two distinct byte counts or
    equal seconds)."""
    if not points:
        raise ValueError("fit_time_vs_bytes: points must not be empty")
    fit = _linfit([float(b) for b, _ in points], [float(s) for _, s in points])
    return fit | {"n": len(points)}


def profile_budgets(parent: ElasticHybridLM, table: Mapping[str, Budget], submodels: Mapping[str, ElasticHybridLM], *,
                    prefill_lengths: Sequence[int], decode_contexts: Sequence[int], repeats: int = 7,
                    clone_factor: int = 8, seed: int = 0) -> dict:
    """Latency profiles of every budget, with the overhead check and the time-vs-bytes fit.

    parent: the nested parent (its config and cost model); table: ``{name: Budget}``; submodels:
    ``{name: physically sliced submodel}`` (``load_nested`` per budget). When the smallest budget's
    median decode time at the middle context is above :data:`OVERHEAD_RATIO` times the largest's,
    the budgets are re-timed on :func:`wider_clone` (``clone_factor`` wider, same shape fractions)
    and those profiles are returned. Returns ``{"profiles": {name: BudgetLatency}, "timed_on":
    "checkpoint" | "wider clone", "clone_factor", "overhead": {"checkpoint": {...}, "clone": {...}},
    "bytes_fit": fit of decode seconds against modelled bytes (:func:`fit_time_vs_bytes`),
    "points": [(name, context, bytes, seconds)]}``.
    """
    order = sorted(table, key=lambda n: -parent.param_count(table[n]))
    largest, smallest = order[0], order[-1]
    mid = sorted(decode_contexts)[len(decode_contexts) // 2]
    kw = dict(prefill_lengths=prefill_lengths, decode_contexts=decode_contexts, repeats=repeats, seed=seed)
    prof = measure_budgets({n: submodels[n] for n in order}, **kw)
    out = {"timed_on": "checkpoint", "clone_factor": None,
           "overhead": {"checkpoint": overhead_bound(prof, largest, smallest, mid)}}
    model, tab = parent, dict(table)
    if out["overhead"]["checkpoint"]["overhead_bound"] and clone_factor > 1:
        wide = wider_clone(parent.config, clone_factor, seed=seed)
        wtab = {n: wider_budget(table[n], parent.config, clone_factor) for n in order}
        wprof = measure_budgets({n: wide.slice(wtab[n]) for n in order}, **kw)
        out["overhead"]["clone"] = overhead_bound(wprof, largest, smallest, mid)
        out |= {"timed_on": "wider clone", "clone_factor": clone_factor}
        prof, model, tab = wprof, wide, wtab
    cost = CostModel(model, tab)
    points = []
    for n in order:
        pb = cost.per_budget[n]
        for d in prof[n].decode:
            nbytes = pb["decode_bytes"] + cost.kv_bytes_per_position * (d["context"] + 1)
            points.append((n, d["context"], nbytes, d["median_s"]))
    out |= {"profiles": prof, "bytes_fit": fit_time_vs_bytes([(b, s) for _, _, b, s in points]), "points": points,
            "params_total": {n: model.param_count(tab[n]) for n in order}}
    return out
