"""moe_experts with NVFP4 expert weights (W4A16) against a float64 loop over experts that uses the
dequantized weights (``truth_experts`` of test_moe.py, fed ``q.dequantize(float64)``, exact).

The yardstick of the numerics policy is moe_experts on the reference backend with the weights
dequantized to the test dtype (plain tensors). The Triton backend runs under TRITON_INTERPRET=1
on CPU (on the GPU when present).
"""
from __future__ import annotations

import pytest
import torch

import elastic_kernels as ek
from elastic_kernels.nvfp4 import NVFP4Tensor, quantize
from helpers import assert_close_to_truth, assert_compile_matches_eager
from test_moe import forward_backward, make_case, run_op, truth_experts

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
WEIGHTS = ("w1", "w2", "w3")


def nvfp4_case(tokens, hidden, ffn, n_exp, n_act, top_k, *, gated, width, cs, quant=WEIGHTS):
    """Random inputs with the weights named in ``quant`` quantized (stacked, per-expert global
    scales); widths are multiples of 16 (an int d' < F, or per-token widths including 0 and F)."""
    inp, _ = make_case(tokens, hidden, ffn, n_exp, n_act, top_k, gated=gated, width=None, cs=cs,
                       skip_experts=(1,) if n_act - 1 >= top_k else ())
    for k in quant:
        if inp[k] is not None:
            inp[k] = quantize(inp[k])
    if width == "int":
        w = 16 * ((ffn // 16) // 2 + 1) if ffn > 16 else 16
    elif width == "tensor":
        w = 16 * torch.randint(0, ffn // 16 + 1, (tokens,))
        w[: min(tokens, 2)] = torch.tensor([ffn, 0])[: min(tokens, 2)]
    else:
        w = None
    return inp, w


def dense(v, dtype):
    """A weight as a plain tensor of ``dtype`` (NVFP4 dequantized); other values unchanged."""
    if isinstance(v, NVFP4Tensor):
        return v.dequantize(dtype)
    return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def grad_names(inp):
    return [k for k in ("x", "topk_weights", "w1", "w2", "w3", "channel_scale")
            if isinstance(inp[k], torch.Tensor)]


def check_nvfp4_against_truth(inp, width, activation, n_act, dtype, backend, device=torch.device("cpu")):
    """Forward and gradients (x, topk_weights, channel_scale, plain weights) of the NVFP4 op on
    ``backend`` vs the float64 truth with dequantized weights; yardstick: the reference backend
    with the weights dequantized to ``dtype``."""
    names = grad_names(inp)
    low = {k: (v.to(dtype) if k in ("x", *WEIGHTS) and isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    exact = {k: dense(v, FP64) for k, v in low.items()}
    deq = {k: dense(v, dtype) if k in WEIGHTS else v for k, v in low.items()}
    gy = torch.randn(inp["x"].shape).to(dtype)
    truth = lambda **kw: truth_experts(**kw, activation=activation, n_act=n_act, width=width)  # noqa: E731
    y64, g64 = forward_backward(truth, exact, names, gy.double())
    y_ref, g_ref = forward_backward(run_op("reference", activation, n_act, width), deq, names, gy)
    on_dev = {k: (v.to(device) if isinstance(v, NVFP4Tensor) else v) for k, v in low.items()}
    kernel_width = width.to(device) if isinstance(width, torch.Tensor) else width
    y, g = forward_backward(run_op(backend, activation, n_act, kernel_width), on_dev, names, gy, device)
    assert y.dtype == dtype
    assert_close_to_truth(y, y64, y_ref, dtype, "y")
    for k in names:
        assert g[k].dtype == low[k].dtype and g[k].shape == low[k].shape, k
        assert_close_to_truth(g[k], g64[k], g_ref[k], dtype, f"grad {k}")
        if k in WEIGHTS:  # a plain weight beside NVFP4 ones: experts >= E' get exactly 0
            assert not g[k][n_act:].any(), k
    if backend == "reference":  # decoding the prefix views == slicing the dequantized weights
        y_deq = run_op("reference", activation, n_act, width)(**deq)
        assert torch.equal(y, y_deq)
    return y


CASES = [
    # tokens, hidden, F, E, E', top_k, gated, activation, width, channel_scale, dtype, quantized weights
    (13, 32, 48, 6, 4, 2, False, "relu2", "int", None, BF16, WEIGHTS),
    (9, 16, 64, 5, 5, 3, True, "silu", "tensor", "token", FP16, WEIGHTS),
    (11, 48, 32, 7, 6, 2, True, "gelu", None, "channel", FP32, WEIGHTS),
    (10, 32, 48, 6, 5, 4, True, "relu2", "tensor", "channel", BF16, WEIGHTS),
    (8, 32, 48, 6, 5, 4, False, "silu", "tensor", "channel", BF16, ("w2",)),
    (7, 16, 48, 4, 3, 2, True, "relu2", 20, None, FP32, ("w1", "w3")),  # d' free: w2 stays plain
]


def _case_id(c):
    return (f"T{c[0]}-H{c[1]}-F{c[2]}-E{c[4]}of{c[3]}-k{c[5]}-{'gated-' if c[6] else ''}{c[7]}-w{c[8]}-"
            f"cs{c[9]}-{str(c[10])[6:]}-q{''.join(c[11])}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_nvfp4_experts_match_truth(case, backend, request, poison_empty):
    tokens, hidden, ffn, n_exp, n_act, top_k, gated, activation, width, cs, dtype, quant = case
    device = request.getfixturevalue("triton_device") if backend == "triton" else torch.device("cpu")
    inp, w = nvfp4_case(tokens, hidden, ffn, n_exp, n_act, top_k, gated=gated, width=width if isinstance(width, str)
                        else None, cs=cs, quant=quant)
    check_nvfp4_against_truth(inp, width if isinstance(width, int) else w, activation, n_act, dtype, backend, device)


@pytest.mark.parametrize("gated", [False, True])
def test_reference_float64_nvfp4_is_exact(gated):
    """float64 activations: the reference decodes exactly, so it equals the truth to rounding."""
    inp, w = nvfp4_case(11, 32, 48, 6, 5, 3, gated=gated, width="tensor", cs="token")
    inp = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    exact = {k: dense(v, FP64) for k, v in inp.items()}
    names = grad_names(inp)
    gy = torch.randn(11, 32, dtype=FP64)
    truth = lambda **kw: truth_experts(**kw, activation="silu", n_act=5, width=w)  # noqa: E731
    y, g = forward_backward(run_op("reference", "silu", 5, w), inp, names, gy)
    y64, g64 = forward_backward(truth, exact, names, gy)
    torch.testing.assert_close(y, y64, rtol=1e-10, atol=1e-12)
    for k in names:
        torch.testing.assert_close(g[k], g64[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_shared_global_scale_experts(backend, request):
    """Stacked weights quantized as one tensor (a single global scale, e.g. ``quantize(w.reshape(E*N, K))
    .reshape(E, N, K)``) run like per-expert ones: the scale is broadcast to every expert."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else torch.device("cpu")
    inp, w = nvfp4_case(9, 32, 48, 5, 4, 2, gated=True, width="tensor", cs=None, quant=())
    for k in WEIGHTS:
        e, n, kk = inp[k].shape
        inp[k] = quantize(inp[k].reshape(e * n, kk)).reshape(e, n, kk)
        assert inp[k].global_scale.shape == ()
    check_nvfp4_against_truth(inp, w, "silu", 4, FP32, backend, device)


def test_reference_decodes_only_the_prefix_views(monkeypatch):
    """The reference dequantizes w1[e, :d'], w3[e, :d'], w2[e, :, :d'] of experts e < E' only."""
    inp, _ = nvfp4_case(12, 32, 64, 8, 5, 2, gated=True, width=None, cs=None)
    seen = []
    orig = NVFP4Tensor.dequantize

    def spy(self, dtype=torch.bfloat16):
        seen.append(tuple(self.shape))
        return orig(self, dtype)
    monkeypatch.setattr(NVFP4Tensor, "dequantize", spy)
    run_op("reference", "silu", 5, 32)(**inp)
    assert seen and len(seen) <= 3 * 5
    assert set(seen) <= {(32, 32)}  # (d', hidden) for w1/w3 and (hidden, d') for w2, 2-d views


def _poison_inactive(q: NVFP4Tensor, n_act: int, rows: int | None, cols: int | None) -> NVFP4Tensor:
    """A copy of q with garbage codes and NaN block scales (0x7F) at experts >= n_act and at rows
    >= ``rows`` / columns >= ``cols`` of the active experts."""
    data, sb = q.data.clone(), q.scales.view(torch.uint8).clone()
    for t, div in ((data, 2), (sb, 16)):
        fill = 0x77 if t is data else 0x7F
        t[n_act:] = fill
        if rows is not None:
            t[:, rows:] = fill
        if cols is not None:
            t[:, :, cols // div:] = fill
    return NVFP4Tensor(data, sb.view(torch.float8_e4m3fn), q.global_scale)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inactive_experts_and_channels_are_never_read(backend, request):
    """Garbage beyond E' and d' (NaN scales, huge codes) leaves the output bit-identical."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else torch.device("cpu")
    inp, _ = nvfp4_case(10, 32, 64, 7, 4, 2, gated=True, width=None, cs="channel")
    inp["x"] = inp["x"].to(BF16)
    d = 32
    bad = dict(inp, w1=_poison_inactive(inp["w1"], 4, d, None), w3=_poison_inactive(inp["w3"], 4, d, None),
               w2=_poison_inactive(inp["w2"], 4, None, d))
    to_dev = lambda kw: {k: v.to(device) if isinstance(v, (torch.Tensor, NVFP4Tensor)) else v  # noqa: E731
                         for k, v in kw.items()}
    y = run_op(backend, "gelu", 4, d)(**to_dev(inp))
    y_bad = run_op(backend, "gelu", 4, d)(**to_dev(bad))
    assert torch.isfinite(y).all() and torch.equal(y, y_bad)


# ---------------------------------------------------------------------------------------------
# registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

def _op_args(backend):
    inp, w = nvfp4_case(7, 16, 32, 5, 4, 2, gated=True, width="tensor", cs="token")
    parts = [(q.data, q.scales.view(torch.uint8), q.global_scale) for q in (inp["w1"], inp["w2"], inp["w3"])]
    x, tw, cs = (inp[k].clone().requires_grad_(True) for k in ("x", "topk_weights", "channel_scale"))
    return (x, tw, inp["topk_ids"], *(p[0] for p in parts), *(p[1] for p in parts), *(p[2] for p in parts),
            cs, w, "silu", 4, -1, backend)


def test_opcheck_nvfp4():
    """The NVFP4 arguments of the ops (uint8 codes and scale bytes, float32 global scales); the
    backends share registration, fake kernels and autograd (test_moe.py opchecks Triton)."""
    args = _op_args("reference")
    torch.library.opcheck(torch.ops.elastic_kernels.moe_experts.default, args)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    _, saved = torch.ops.elastic_kernels.moe_experts.default(*args)  # what the forward saves
    bargs = (torch.randn(7, 16), *args[:14], saved, *args[14:])  # saved comes after width_t
    torch.library.opcheck(torch.ops.elastic_kernels.moe_experts_backward.default, bargs)


def test_torch_compile_fullgraph_nvfp4():
    inp, w = nvfp4_case(8, 16, 32, 6, 4, 2, gated=True, width="tensor", cs="channel")
    q1, q2, q3 = inp["w1"], inp["w2"], inp["w3"]

    def f(logits, x, cs, widths):
        tw, ids = ek.moe_route(logits, 2, num_experts_active=4)
        y = ek.moe_experts(x, tw, ids, q1, q2, w3=q3, activation="silu", num_experts_active=4, ffn_width=widths,
                           channel_scale=cs)
        return (y * y).sum()
    assert_compile_matches_eager(f, [torch.randn(8, 6), inp["x"], inp["channel_scale"]], w)


def test_triton_gpu_no_host_sync_nvfp4():
    """On a GPU: NVFP4 experts forward and backward (x, weights, channel scale) with no host
    synchronization, matching the reference backend."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda")
    inp, w = nvfp4_case(300, 256, 192, 16, 12, 4, gated=True, width="tensor", cs="token")
    q = {k: inp[k].to(dev) for k in WEIGHTS}
    x = inp["x"].to(dev, BF16).requires_grad_(True)
    cs = inp["channel_scale"].to(dev).requires_grad_(True)
    logits = torch.randn(300, 16, device=dev, requires_grad=True)
    w = w.to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tw, ids = ek.moe_route(logits, 4, num_experts_active=12)
        y = ek.moe_experts(x, tw, ids, q["w1"], q["w2"], w3=q["w3"], activation="silu", num_experts_active=12,
                           ffn_width=w, channel_scale=cs, backend="triton")
        y.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(y).all() and logits.grad is not None and x.grad is not None and cs.grad is not None
    ref = ek.moe_experts(x.detach(), tw.detach(), ids, q["w1"], q["w2"], w3=q["w3"], activation="silu",
                         num_experts_active=12, ffn_width=w, channel_scale=cs.detach(), backend="reference")
    torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def _good():
    inp, _ = nvfp4_case(5, 16, 32, 4, 3, 2, gated=True, width=None, cs=None)
    return inp


BAD = [
    ("ffn_width", lambda i: dict(i, ffn_width=20)),
    ("ffn_width", lambda i: dict(i, ffn_width=8)),
    ("ffn_width", lambda i: dict(i, ffn_width=torch.tensor([16, 32, 0, 24, 16]))),
    ("w3", lambda i: dict(i, w3=i["w3"].dequantize(torch.float32))),
    ("w3", lambda i: dict(i, w1=i["w1"].dequantize(torch.float32))),
    ("w1", lambda i: dict(i, w1=i["w1"][0])),
    ("w2", lambda i: dict(i, w2=i["w2"][:, :, :16])),
    ("w2", lambda i: dict(i, w2=i["w2"][:3])),
    ("w1", lambda i: dict(i, w1=i["w1"].to("meta"))),
]


@pytest.mark.parametrize("needle,mutate", BAD, ids=[f"{n}-{k}" for k, (n, _) in enumerate(BAD)])
def test_bad_nvfp4_calls_name_the_argument(needle, mutate):
    kw = mutate(dict(_good(), num_experts_active=3))
    with pytest.raises((ValueError, TypeError)) as info:
        ek.moe_experts(kw.pop("x"), kw.pop("topk_weights"), kw.pop("topk_ids"), kw.pop("w1"), kw.pop("w2"), **kw)
    assert needle in str(info.value)


def test_backend_table_rejects_unsupported_dtypes(triton_device):
    """The per-op backend table names what a backend supports (float64 runs on the reference only)."""
    inp, _ = nvfp4_case(4, 16, 32, 3, 3, 2, gated=False, width=None, cs=None)
    x = inp["x"].double().to(triton_device)
    args = (x, inp["topk_weights"].to(triton_device), inp["topk_ids"].to(triton_device),
            inp["w1"].to(triton_device), inp["w2"].to(triton_device))
    with pytest.raises(TypeError, match=r"backend 'triton' supports x of dtype \(float32, float16, bfloat16\), "
                                        r"got float64"):
        ek.moe_experts(*args, backend="triton")
    assert ek.moe_experts(*args, backend="reference").dtype == FP64
