"""Shared benchmark helpers (docs/design.md §7): timing, device ceilings, and the per-benchmark report.

Every benchmark states the bytes it must move and the FLOPs it must do; ``record`` turns a
measured median time into achieved GB/s and TFLOP/s and, on a GPU, the fraction of the device's
measured ceilings (device-to-device copy bandwidth, large bf16 matmul). Width sweeps are
summarised as ratios to full width by ``bench/conftest.py`` at the end of the session.
"""
from __future__ import annotations

import functools
import math
import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup: int = 2, reps: int = 10) -> float:
    """Median seconds of ``fn()``.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed between runs). CPU: the process's CPU
    time (``time.process_time``) with one intra-op thread, which other load on a shared machine
    disturbs far less than wall time; it equals wall time on an idle single-threaded run.
    """
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


class Timings(dict):
    """``{name: median seconds}`` of interleaved runs; ``rounds`` holds every round's seconds
    (``{name: [s, ...]}``, round ``i`` of every candidate taken side by side)."""

    def __init__(self, rounds: dict):
        super().__init__({name: statistics.median(ts) for name, ts in rounds.items()})
        self.rounds = rounds

    def scaled(self, factors: dict) -> "Timings":
        """The same timings with each candidate's seconds multiplied by ``factors[name]`` (e.g. per token)."""
        return Timings({name: [t * factors[name] for t in ts] for name, ts in self.rounds.items()})


def median_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free interval of the median of ``values``: the order statistics
    ``(x_(k), x_(n+1-k))`` with the largest ``k`` whose coverage ``1 - 2 P(Binomial(n, 1/2) < k)``
    is at least ``confidence``. Returns ``(low, high, coverage)``; below 6 values no ``k`` reaches
    95 % and the interval is ``(min, max)`` with its (lower) coverage."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval: no values")
    k, cdf = 1, 1 / 2 ** n  # cdf = P(B < k) = P(B <= k - 1)
    while k + 1 <= (n + 1) // 2:
        nxt = cdf + math.comb(n, k) / 2 ** n     # P(B < k + 1)
        if 1 - 2 * nxt < confidence:
            break
        k, cdf = k + 1, nxt
    return xs[k - 1], xs[n - k], 1 - 2 * cdf


def interleaved_medians(fns: dict, reps: int = 7, warmup: int = 1) -> Timings:
    """Median thread CPU seconds (``time.thread_time``, one intra-op thread) of every callable in
    ``fns``, run interleaved: each of ``reps`` rounds runs every candidate once, so that load
    changes on a shared machine hit all candidates alike. Returns :class:`Timings` (``{name:
    median seconds}``, every round's seconds in ``.rounds``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.thread_time()
                fn()
                times[name].append(time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return Timings(times)


def run_bench(benchmark, fn, device: torch.device, *, rounds: int | None = None) -> float:
    """Time ``fn`` with :func:`time_fn` (the figure every report uses, stored as ``median_s``) and
    let pytest-benchmark show it in its table (synchronized on CUDA). Returns the median seconds."""
    def synced():
        fn()
        sync(device)
    benchmark.pedantic(synced, warmup_rounds=1, rounds=rounds or (3 if device.type == "cpu" else 20))
    med = time_fn(fn, device)
    benchmark.extra_info["median_s"] = med
    return med


@functools.lru_cache(maxsize=None)
def ceilings(device_type: str) -> dict:
    """Measured ceilings of the device: copy bandwidth (GB/s) and bf16 matmul (TFLOP/s)."""
    device = torch.device(device_type)
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # bytes: 256 MiB (>> L2) on GPU
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    m = 8192 if device.type == "cuda" else 512
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(m, m, device=device, dtype=dt)
    b = torch.randn(m, m, device=device, dtype=dt)
    tm = time_fn(lambda: a @ b, device)
    return {"copy_GBps": 2 * n / t / 1e9, "matmul_TFLOPs": 2 * m**3 / tm / 1e12,
            "matmul_dtype": str(dt).replace("torch.", "")}


def record(benchmark, *, device: torch.device, bytes_moved: float, flops: float, group: str,
           width: float | None = None, **extra) -> None:
    """Attach bytes/FLOPs, achieved rates and fractions of the ceilings to a pytest-benchmark result."""
    info = benchmark.extra_info
    med = info.get("median_s") or benchmark.stats.stats.median
    info.update(group=group, width=width, bytes=bytes_moved, flops=flops, median_s=med,
                GBps=bytes_moved / med / 1e9, TFLOPs=flops / med / 1e12, device=str(device), **extra)
    if device.type == "cuda":
        c = ceilings("cuda")
        info.update(frac_copy_ceiling=info["GBps"] / c["copy_GBps"],
                    frac_matmul_ceiling=info["TFLOPs"] / c["matmul_TFLOPs"])
