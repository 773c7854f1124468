"""NVFP4 benchmarks: W4A16 ``nvfp4_linear`` beside a high-precision ``x @ w.T`` measured
in the same run, and the quantize kernel beside a device copy.

Bytes the W4A16 GEMM must move: packed weights at 4.5 bits/element (4-bit codes + one e4m3 scale
per 16), activations and output in 16 bits:  bytes = N*K*(1/2 + 1/16) + 2*M*K + 2*M*N.
The baseline reads bf16 weights: 2*N*K + 2*M*K + 2*M*N. FLOPs of both: 2*M*N*K.
Quantize must read 2*N*K (bf16) and write N*K*(1/2 + 1/16); with the default global scale it also
reads the tensor once more for ``amax`` and once for the finiteness check (``scale="auto"``,
the public API); ``scale="given"`` times the quantize kernel alone (one pass).

GPU (targets on H100): decode M = 1, 4, 16 >= 3.0x the bf16 cuBLAS matmul (byte limit
3.56x); prefill M = 4096 >= 0.8x; quantize >= 80% of the copy bandwidth. ``speedup_vs_baseline``
and ``frac_of_copy`` use the same timer on both sides (do_bench medians on a GPU). On the CPU the reference
backend runs against an fp32 matmul (the CPU has no fast bf16 path): ratios only, noisy.
"""
from __future__ import annotations

import pytest
import torch

import elastic_kernels as ek
from common import record, run_bench, time_fn

GPU_SHAPES = [(2688, 1856), (1856, 2688), (8192, 8192)]
CPU_SHAPES = [(512, 384)]


def linear_cost(m: int, n: int, k: int) -> tuple[float, float, float]:
    """(bytes of the W4A16 GEMM, bytes of the bf16-weight baseline, FLOPs) of x (m, k) @ W^T (n, k)."""
    return n * k * (0.5 + 1 / 16) + 2 * m * k + 2 * m * n, 2 * n * k + 2 * m * k + 2 * m * n, 2 * m * n * k


def quantize_bytes(n: int, k: int) -> float:
    """Bytes one quantize pass must move: read (n, k) bf16, write the codes and the scale bytes."""
    return n * k * (2 + 0.5 + 1 / 16)


def _impls(device):
    if device.type == "cpu":
        return ["reference"]
    return ["triton"] + (["cuda"] if ek._ext.c_has_cuda() else [])


def _linear_cases():
    for m in (1, 4, 16, 4096):
        for n, k in GPU_SHAPES:
            yield "cuda", m, n, k
    for m in (1, 16, 256):
        for n, k in CPU_SHAPES:
            yield "cpu", m, n, k


@pytest.mark.parametrize("case", list(_linear_cases()), ids=lambda c: f"{c[0]}-M{c[1]}-N{c[2]}-K{c[3]}")
@pytest.mark.parametrize("impl_idx", [0, 1])
def bench_nvfp4_linear(benchmark, device, case, impl_idx):
    dev_type, m, n, k = case
    if dev_type != device.type:
        pytest.skip(f"{dev_type} shape")
    impls = _impls(device)
    if impl_idx >= len(impls):
        pytest.skip("backend not available here")
    impl = impls[impl_idx]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w = torch.randn(n, k, device=device) * 0.05
    q = ek.nvfp4.quantize(w)
    wd = w.to(dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    if impl == "reference":
        x = x.float()
    fn = lambda: ek.nvfp4_linear(x, q, backend=impl)  # noqa: E731
    base = lambda: x @ wd.T  # noqa: E731
    fn()
    t, tb = run_bench(benchmark, fn, device), time_fn(base, device)
    bytes_w4, bytes_bf16, flops = linear_cost(m, n, k)
    record(benchmark, device=device, bytes_moved=bytes_w4, flops=flops,
           group=f"nvfp4_linear M={m} N={n} K={k}", impl=impl,
           baseline_median_s=tb, baseline=("bf16 x @ w.T (cuBLAS)" if device.type == "cuda" else "fp32 x @ w.T"),
           speedup_vs_baseline=tb / t, byte_limit_speedup=bytes_bf16 / bytes_w4,
           baseline_TFLOPs=2 * m * n * k / tb / 1e12)


@pytest.mark.parametrize("scale", ["given", "auto"])
@pytest.mark.parametrize("impl_idx", [0, 1])
def bench_nvfp4_quantize(benchmark, device, scale, impl_idx):
    impls = _impls(device)
    if impl_idx >= len(impls):
        pytest.skip("backend not available here")
    impl = impls[impl_idx]
    n, k = (8192, 8192) if device.type == "cuda" else (1024, 1024)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    if scale == "given":  # the kernel alone: one pass
        from elastic_kernels.ops.nvfp4 import quantize_raw
        g = w.abs().amax().float() / 2688
        fn = lambda: quantize_raw(w, g, backend=impl)  # noqa: E731
    else:  # the public API: finiteness check (a read and a host sync), amax pass, kernel
        fn = lambda: ek.nvfp4.quantize(w, backend=impl)  # noqa: E731
    fn()
    t = run_bench(benchmark, fn, device)
    out = torch.empty(n * k * 2 + n * k // 2 + n * k // 16, dtype=torch.uint8, device=device)
    src = torch.empty_like(out)
    tc = time_fn(lambda: out.copy_(src), device)
    moved = quantize_bytes(n, k)
    record(benchmark, device=device, bytes_moved=moved, flops=0, group=f"nvfp4_quantize {n}x{k} scale={scale}",
           impl=impl, copy_GBps=2 * out.numel() / tc / 1e9, frac_of_copy=(moved / t) / (2 * out.numel() / tc))
