"""ssd_scan benchmarks: forward and forward+backward at 25/50/75/100% of the heads and a mixed-width
batch; CPU (reference backend) and GPU (Triton, beside mamba_ssm's mamba_chunk_scan_combined when
it is importable — fetched and installed beside ours, never committed).

Bytes the forward must move (at active fraction w): read x, z, dt for the active heads, B, C for all
groups, write y for all heads (inactive heads are written as zeros):
    bytes = e * (b*l*h*p*(2w + 1) + 2*b*l*g*n) + 4*b*l*h*w
FLOPs of the chunked algorithm (chunk L, nc chunks): per chunk 2 L^2 n g (C B^T) + 2 L^2 p h w
(intra-chunk) + 4 L n p h w (chunk states and the inter-chunk term).
Targets: time at 50% width <= 0.55x full; full width no slower than mamba_ssm.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import elastic_kernels as ek
from common import record, run_bench

WIDTHS = [0.25, 0.5, 0.75, 1.0]
SHAPES = {"cpu": dict(batch=4, seqlen=512, nheads=16, headdim=64, ngroups=4, dstate=64, chunk=64),
          "cuda": dict(batch=8, seqlen=4096, nheads=64, headdim=64, ngroups=8, dstate=128, chunk=128)}


def _inputs(device, dtype, s, requires_grad=False):
    b, l, h, p, g, n = (s[k] for k in ("batch", "seqlen", "nheads", "headdim", "ngroups", "dstate"))
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_(requires_grad)  # noqa: E731
    return dict(x=mk(b, l, h, p), dt=mk(b, l, h, scale=0.5), A=(-torch.rand(h, device=device)).requires_grad_(requires_grad),
                B=mk(b, l, g, n, scale=0.3), C=mk(b, l, g, n, scale=0.3), z=mk(b, l, h, p),
                dt_bias=torch.zeros(h, device=device).requires_grad_(requires_grad), D=torch.ones(h, device=device))


def cost(s, w, elem):
    b, l, h, p, g, n, L = (s[k] for k in ("batch", "seqlen", "nheads", "headdim", "ngroups", "dstate", "chunk"))
    nc = -(-l // L)
    bytes_fwd = elem * (b * l * h * p * (2 * w + 1) + 2 * b * l * g * n) + 4 * b * l * h * w
    flops_fwd = b * nc * (2 * L * L * n * g + 2 * L * L * p * h * w + 4 * L * n * p * h * w)
    return bytes_fwd, flops_fwd


def _width_arg(s, w, device):
    h, g = s["nheads"], s["ngroups"]
    if w == "mixed":  # samples cycle through 25/50/75/100 %
        k = [int(h * WIDTHS[i % 4]) // g * g for i in range(s["batch"])]
        return torch.tensor(k, device=device), sum(k) / (h * len(k))
    return int(h * w) // g * g, w


@pytest.mark.parametrize("width", WIDTHS + ["mixed"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def bench_ssd_scan(benchmark, device, mode, width):
    s = SHAPES[device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "reference"
    inp = _inputs(device, dtype, s, requires_grad=(mode != "fwd"))
    active, w = _width_arg(s, width, device)
    gy = torch.randn_like(inp["x"])

    def run():
        y = ek.ssd_scan(**inp, chunk_size=s["chunk"], dt_softplus=True, head_layout="interleaved",
                        active_heads=active, backend=backend)
        if mode != "fwd":
            torch.autograd.grad(y, [inp["x"], inp["dt"], inp["B"], inp["C"], inp["z"]], gy)
    run_bench(benchmark, run, device)
    by, fl = cost(s, w, inp["x"].element_size())
    mult = 1 if mode == "fwd" else 3  # backward ~2x the forward's traffic and FLOPs
    record(benchmark, device=device, bytes_moved=by * mult, flops=fl * mult,
           group=f"ssd_scan {mode}", width=1.0 if width == 1.0 else (width if width != "mixed" else f"mixed({w:.3f})"),
           impl=backend)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def bench_ssd_scan_mamba_ssm(benchmark, mode):
    """Baseline: mamba_ssm's mamba_chunk_scan_combined at full width on the same shapes (GPU only)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("needs a GPU and mamba_ssm installed beside elastic_kernels")
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    device = torch.device("cuda")
    s = SHAPES["cuda"]
    inp = _inputs(device, torch.bfloat16, s, requires_grad=(mode != "fwd"))
    gy = torch.randn_like(inp["x"])

    def run():
        y = mamba_chunk_scan_combined(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], s["chunk"], D=inp["D"],
                                      z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
        if mode != "fwd":
            torch.autograd.grad(y, [inp["x"], inp["dt"], inp["B"], inp["C"], inp["z"]], gy)
    run_bench(benchmark, run, device)
    by, fl = cost(s, 1.0, 2)
    mult = 1 if mode == "fwd" else 3
    record(benchmark, device=device, bytes_moved=by * mult, flops=fl * mult, group=f"ssd_scan {mode}",
           width=1.0, impl="mamba_ssm")
