"""moe_experts benchmarks: forward and forward+backward at 25/50/75/100% of the expert FFN width d'
(and a mixed per-token-width batch) and of the active experts E'; CPU (reference backend) and GPU
(Triton), beside torch._grouped_mm and a dense per-expert loop on the GPU (and vLLM's fused_moe
forward when it is importable — installed beside ours, never committed).

Nemotron-style experts (non-gated relu2). With rows = tokens * top_k, d = d' and E_t the expected
number of distinct experts touched (E_t = E' (1 - (1 - top_k/E')^tokens) for uniform routing):
    FLOPs (forward)  = 2 * rows * hidden * d * mats          (mats = 2, or 3 when gated)
    bytes (forward)  = e * (E_t * mats * d * hidden + 2 * tokens * hidden) + 12 * rows
(weights of the touched experts' prefixes, x read, y written, ids and weights). Forward+backward
counts 3x the forward's FLOPs and bytes (dX and dW each cost one forward). The E' sweep keeps
top_k experts per token, so its FLOPs stay flat: the ideal ratio there is 1 (only weight bytes fall).

Targets: >= 70% of dense bf16 matmul TFLOP/s at the training shape; time at d' = F/2
<= 0.6x full.

NVFP4 experts (W4A16): ``bench_moe_nvfp4`` times the Triton forward with NVFP4 w1/w2
(0.5 byte codes + 1/16 byte scales = 0.5625 bytes per weight) against the same call with the bf16
weights, in the same run (``speedup_vs_bf16``); weight bytes fall 3.56x, so decode (weight-bound)
is where it should win, while at the training shape the in-loop decoding competes with the MMAs.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import elastic_kernels as ek
from common import record, run_bench, time_fn

WIDTHS = [0.25, 0.5, 0.75, 1.0]
SHAPES = {"cpu": dict(tokens=128, hidden=256, ffn=512, experts=16, top_k=4),
          "train": dict(tokens=16384, hidden=2688, ffn=1856, experts=128, top_k=6),
          "decode": dict(tokens=16, hidden=2688, ffn=1856, experts=128, top_k=6)}


def _inputs(device, dtype, s, n_act, requires_grad=False):
    t, h, f, e, k = (s[n] for n in ("tokens", "hidden", "ffn", "experts", "top_k"))
    def mk(*shape, scale):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_(requires_grad)
    tw, ids = ek.moe_route(torch.randn(t, e, device=device), k, num_experts_active=n_act)
    return dict(x=mk(t, h, scale=1.0), topk_weights=tw, topk_ids=ids, w1=mk(e, f, h, scale=h ** -0.5),
                w2=mk(e, h, f, scale=f ** -0.5))


def cost(s, d, n_act, elem, mats=2, w_elem=None):
    """(bytes, FLOPs) of the forward; ``w_elem``: bytes per weight element (default ``elem``)."""
    t, h, k = s["tokens"], s["hidden"], s["top_k"]
    rows = t * k
    touched = n_act * (1 - (1 - k / n_act) ** t)
    flops = 2 * rows * h * d * mats
    w_elem = elem if w_elem is None else w_elem
    return w_elem * touched * mats * d * h + elem * 2 * t * h + 12 * rows, flops


def _widths(s, width, device):
    """ffn_width argument and the mean active fraction for a width point ("mixed": per token)."""
    f = s["ffn"]
    if width == "mixed":  # tokens cycle through 25/50/75/100 %
        w = torch.tensor([int(f * WIDTHS[i % 4]) for i in range(s["tokens"])], device=device)
        return w, float(w.float().mean()) / f
    return int(f * width), width


def _run(mode, inp, **kw):
    y = ek.moe_experts(inp["x"], inp["topk_weights"], inp["topk_ids"], inp["w1"], inp["w2"], **kw)
    if mode != "fwd":
        torch.autograd.grad(y, [inp["x"], inp["w1"], inp["w2"]], torch.ones_like(y))


def _setup(device, mode):
    shape = "cpu" if device.type == "cpu" else "train"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "reference"
    return SHAPES[shape], dtype, backend, 5 if device.type == "cpu" else 20


@pytest.mark.parametrize("width", WIDTHS + ["mixed"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def bench_moe_ffn_width(benchmark, device, mode, width):
    """d' sweep at all experts active (CPU: reference; GPU: Triton at the training shape)."""
    s, dtype, backend, rounds = _setup(device, mode)
    inp = _inputs(device, dtype, s, s["experts"], requires_grad=(mode != "fwd"))
    ffn_width, frac = _widths(s, width, device)
    run_bench(benchmark, lambda: _run(mode, inp, ffn_width=ffn_width, backend=backend), device, rounds=rounds)
    by, fl = cost(s, frac * s["ffn"], s["experts"], inp["x"].element_size())
    mult = 1 if mode == "fwd" else 3
    record(benchmark, device=device, bytes_moved=by * mult, flops=fl * mult, group=f"moe d' {mode}",
           width=width if width != "mixed" else f"mixed({frac:.3f})", impl=backend)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def bench_moe_num_experts(benchmark, device, mode, width):
    """E' sweep at full d' (routing among the first E' experts; FLOPs stay flat)."""
    s, dtype, backend, rounds = _setup(device, mode)
    n_act = max(s["top_k"], int(s["experts"] * width))
    inp = _inputs(device, dtype, s, n_act, requires_grad=(mode != "fwd"))
    run_bench(benchmark, lambda: _run(mode, inp, num_experts_active=n_act, backend=backend), device,
              rounds=rounds)
    by, fl = cost(s, s["ffn"], n_act, inp["x"].element_size())
    mult = 1 if mode == "fwd" else 3
    record(benchmark, device=device, bytes_moved=by * mult, flops=fl * mult, group=f"moe E' {mode}",
           width=width, impl=backend)


# ---------------------------------------------------------------------------------------------
# GPU only: decode shape and baselines
# ---------------------------------------------------------------------------------------------

def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return torch.device("cuda")


@pytest.mark.parametrize("width", [0.5, 0.75, 1.0])
def bench_moe_decode(benchmark, width):
    """Decode shape (16 tokens), forward, Triton, at d' = 50/75/100%."""
    device = _cuda()
    s = SHAPES["decode"]
    inp = _inputs(device, torch.bfloat16, s, s["experts"])
    d = int(s["ffn"] * width)
    run_bench(benchmark, lambda: _run("fwd", inp, ffn_width=d, backend="triton"), device)
    by, fl = cost(s, d, s["experts"], 2)
    record(benchmark, device=device, bytes_moved=by, flops=fl, group="moe decode fwd", width=width, impl="triton")


def _sorted_rows(ids, n_act):
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(n_act, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, order // ids.shape[1], counts


def _grouped_mm_moe(inp, d):
    """Baseline: torch._grouped_mm over the sorted rows with prefix views of the weights."""
    x, tw, ids, w1, w2 = (inp[k] for k in ("x", "topk_weights", "topk_ids", "w1", "w2"))
    order, tok, counts = _sorted_rows(ids, w1.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x[tok], w1[:, :d].transpose(1, 2), offs=offs)
    o = torch._grouped_mm(torch.relu(h).square(), w2[:, :, :d].transpose(1, 2), offs=offs)
    wr = tw.reshape(-1)[order].to(o.dtype)
    return torch.zeros_like(x).index_add(0, tok, o * wr[:, None])


def _loop_moe(inp, d):
    """Baseline: a dense matmul per expert over its gathered tokens (host-synchronizing)."""
    x, tw, ids, w1, w2 = (inp[k] for k in ("x", "topk_weights", "topk_ids", "w1", "w2"))
    order, tok, counts = _sorted_rows(ids, w1.shape[0])
    wr = tw.reshape(-1)[order].to(x.dtype)
    y = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        t = tok[start:start + n]
        o = torch.relu(x[t] @ w1[e, :d].T).square() @ w2[e, :, :d].T
        y = y.index_add(0, t, o * wr[start:start + n, None])
        start += n
    return y


@pytest.mark.parametrize("width", [0.5, 0.75, 1.0])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def bench_moe_baselines(benchmark, impl, mode, width):
    """torch._grouped_mm and the per-expert loop at the training shape, same inputs as Triton."""
    device = _cuda()
    s = SHAPES["train"]
    inp = _inputs(device, torch.bfloat16, s, s["experts"], requires_grad=(mode != "fwd"))
    d = int(s["ffn"] * width)
    fn = _grouped_mm_moe if impl == "grouped_mm" else _loop_moe

    def run():
        y = fn(inp, d)
        if mode != "fwd":
            torch.autograd.grad(y, [inp["x"], inp["w1"], inp["w2"]], torch.ones_like(y))
    try:
        run()
    except (RuntimeError, NotImplementedError) as exc:  # e.g. _grouped_mm needs sm_90 and aligned strides
        pytest.skip(f"{impl} unavailable here: {exc}")
    run_bench(benchmark, run, device)
    by, fl = cost(s, d, s["experts"], 2)
    mult = 1 if mode == "fwd" else 3
    record(benchmark, device=device, bytes_moved=by * mult, flops=fl * mult, group=f"moe d' {mode}",
           width=width, impl=impl)


@pytest.mark.parametrize("shape", ["train", "decode"])
def bench_moe_vllm_fused_moe(benchmark, shape):
    """vLLM's fused_moe Triton kernel, forward, full width (only when vllm is importable)."""
    device = _cuda()
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed beside elastic_kernels")
    from vllm.model_executor.layers.fused_moe import fused_experts
    s = SHAPES[shape]
    inp = _inputs(device, torch.bfloat16, s, s["experts"])
    try:  # vLLM's non-gated relu2 path; its signature changes between releases
        run = lambda: fused_experts(inp["x"], inp["w1"], inp["w2"], inp["topk_weights"],  # noqa: E731
                                    inp["topk_ids"].to(torch.int32), activation="relu2_no_mul")
        run()
    except (TypeError, ValueError, RuntimeError) as exc:
        pytest.skip(f"vllm fused_experts could not run this case: {exc}")
    run_bench(benchmark, run, device)
    by, fl = cost(s, s["ffn"], s["experts"], 2)
    record(benchmark, device=device, bytes_moved=by, flops=fl,
           group="moe d' fwd" if shape == "train" else "moe decode fwd", width=1.0, impl="vllm")


NVFP4_BYTES = 0.5 + 1 / 16  # per weight element: one E2M1 code and a 16th of an e4m3 block scale


@pytest.mark.parametrize("width", [0.5, 1.0])
@pytest.mark.parametrize("shape", ["decode", "train"])
def bench_moe_nvfp4(benchmark, shape, width):
    """NVFP4 (W4A16) vs bf16 expert weights: Triton forward, same inputs and routing, d' = 50/100%."""
    device = _cuda()
    s = SHAPES[shape]
    inp = _inputs(device, torch.bfloat16, s, s["experts"])
    q = dict(inp, w1=ek.nvfp4.quantize(inp["w1"]), w2=ek.nvfp4.quantize(inp["w2"]))
    d = int(s["ffn"] * width) // 16 * 16  # NVFP4 w2 slices its input features at multiples of 16
    t_bf16 = time_fn(lambda: _run("fwd", inp, ffn_width=d, backend="triton"), device)
    run_bench(benchmark, lambda: _run("fwd", q, ffn_width=d, backend="triton"), device)
    by, fl = cost(s, d, s["experts"], 2, w_elem=NVFP4_BYTES)
    record(benchmark, device=device, bytes_moved=by, flops=fl, group=f"moe nvfp4 {shape} fwd", width=width,
           impl="triton-nvfp4", bf16_median_s=t_bf16,
           speedup_vs_bf16=t_bf16 / benchmark.stats.stats.median)
