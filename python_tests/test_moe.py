"""moe_route / moe_experts against a float64 loop-over-experts truth written plainly here.

The Triton backend runs on CPU tensors under TRITON_INTERPRET=1 (tests keep shapes small); its
error must stay within 2x the same-precision reference's error (helpers.assert_close_to_truth).
"""
from __future__ import annotations

import math

import pytest
import torch

import elastic_kernels as ek
from helpers import assert_close_to_truth, assert_compile_matches_eager, grads_of

ACTS = ("relu2", "silu", "gelu")
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


# ---------------------------------------------------------------------------------------------
# float64 truth, written plainly: full-size weights, masks for E' and the widths
# ---------------------------------------------------------------------------------------------

def act64(h, activation):
    if activation == "relu2":
        return torch.relu(h) ** 2
    if activation == "silu":
        return h * torch.sigmoid(h)
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def truth_experts(x, topk_weights, topk_ids, w1, w2, w3=None, channel_scale=None, *, activation, n_act, width):
    x, topk_weights, w1, w2 = x.double(), topk_weights.double(), w1.double(), w2.double()
    tokens, ffn = x.shape[0], w1.shape[1]
    if width is None:
        width = ffn
    widths = width if isinstance(width, torch.Tensor) else torch.full((tokens,), width)
    keep = (torch.arange(ffn)[None, :] < widths[:, None]).double()  # (tokens, F)
    y = torch.zeros(tokens, x.shape[1], dtype=FP64)
    for e in range(n_act):
        for j in range(topk_ids.shape[1]):
            t = (topk_ids[:, j] == e).nonzero().flatten()
            if t.numel() == 0:
                continue
            a = act64(x[t] @ w1[e].T, activation)
            if w3 is not None:
                a = a * (x[t] @ w3[e].double().T)
            if channel_scale is not None:
                cs = channel_scale.double()
                a = a * (cs if cs.dim() == 1 else cs[t])
            a = a * keep[t]
            y = y.index_add(0, t, topk_weights[t, j, None] * (a @ w2[e].T))
    return y


def truth_route(logits, top_k, n_act, score, renormalize, bias):
    """Per token: scores, chosen experts by (score + bias) among e < n_act, weights."""
    logits = logits.double()
    ws, ids = [], []
    for row in logits:
        act = row[:n_act]
        p = torch.softmax(act, 0) if score == "softmax" else torch.sigmoid(act)
        sel = p + (bias[:n_act].double() if bias is not None else 0)
        order = sorted(range(n_act), key=lambda e: -float(sel[e]))[:top_k]
        w = p[order]
        ws.append(w / w.sum() if renormalize else w)
        ids.append(order)
    return torch.stack(ws), torch.tensor(ids)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def make_case(tokens, hidden, ffn, n_exp, n_act, top_k, *, gated, width, cs, skip_experts=()):
    """Random inputs; ids are distinct per token, drawn from [0, n_act) minus ``skip_experts``."""
    allowed = torch.tensor([e for e in range(n_act) if e not in skip_experts])
    ids = torch.stack([allowed[torch.randperm(len(allowed))[:top_k]] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, top_k, dtype=torch.int64)
    inp = dict(x=torch.randn(tokens, hidden), topk_weights=torch.rand(tokens, top_k) + 0.1, topk_ids=ids,
               w1=torch.randn(n_exp, ffn, hidden) / math.sqrt(hidden),
               w2=torch.randn(n_exp, hidden, ffn) / math.sqrt(ffn),
               w3=torch.randn(n_exp, ffn, hidden) / math.sqrt(hidden) if gated else None)
    if cs == "channel":
        inp["channel_scale"] = torch.rand(ffn) + 0.5
    elif cs == "token":
        inp["channel_scale"] = torch.rand(tokens, ffn) + 0.5
    else:
        inp["channel_scale"] = None
    if width == "int":
        w = (2 * ffn) // 3
    elif width == "tensor":
        w = torch.randint(0, ffn + 1, (tokens,))
        w[: min(tokens, 2)] = torch.tensor([ffn, 0])[: min(tokens, 2)]
    else:
        w = None
    return inp, w


def grad_names(inp):
    return [k for k in ("x", "topk_weights", "w1", "w2", "w3", "channel_scale") if inp[k] is not None]


def run_op(backend, activation, n_act, width):
    def fn(x, topk_weights, topk_ids, w1, w2, w3, channel_scale):
        return ek.moe_experts(x, topk_weights, topk_ids, w1, w2, w3=w3, activation=activation,
                              num_experts_active=n_act, ffn_width=width, channel_scale=channel_scale,
                              backend=backend)
    return fn


def forward_backward(fn, inputs, names, grad_out, device=torch.device("cpu")):
    """``fn(**inputs)`` on ``device`` and the gradients of ``names`` (0 where the output does not
    depend on them), returned on the CPU."""
    leaves = {k: (v.detach().to(device).requires_grad_(k in names) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    out = fn(**leaves)
    if out.requires_grad:
        out.backward(grad_out.to(device, out.dtype))
    return out.detach().cpu(), {k: (leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k])).cpu()
                                for k in names}


def to_float64(inp):
    """``inp`` with every floating-point tensor in float64 (the truth's inputs)."""
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}


def check_fp32_reference(case, activation, n_act, width):
    """The fp32 reference's output and every gradient (for a random output gradient) against the
    float64 truth, each within 1e-5 x max |truth|; returns the reference's (y, grads)."""
    names = grad_names(case)
    gy = torch.randn(case["x"].shape)
    truth = lambda **kw: truth_experts(**kw, activation=activation, n_act=n_act, width=width)  # noqa: E731
    y64, g64 = forward_backward(truth, to_float64(case), names, gy.double())
    y, g = forward_backward(run_op("reference", activation, n_act, width), case, names, gy)
    for name, got, want in [("y", y, y64)] + [(f"grad {k}", g[k], g64[k]) for k in names]:
        scale = max(want.abs().max().item(), 1e-6)
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max error {err:.3e} > 1e-5 x scale {scale:.3e}"
    return y, g


def check_against_truth(inp, width, activation, n_act, dtype, backend, device=torch.device("cpu")):
    """Forward and every gradient of ``backend`` at ``dtype`` on ``device`` vs the float64 truth
    (truth and same-precision reference on the CPU)."""
    names = grad_names(inp)
    low = {k: (v.to(dtype) if k in ("x", "w1", "w2", "w3") and v is not None else v) for k, v in inp.items()}
    exact = to_float64(low)
    gy = torch.randn(inp["x"].shape).to(dtype)
    truth = lambda **kw: truth_experts(**kw, activation=activation, n_act=n_act, width=width)  # noqa: E731
    y64, g64 = forward_backward(truth, exact, names, gy.double())
    y_ref, g_ref = forward_backward(run_op("reference", activation, n_act, width), low, names, gy)
    kernel_width = width.to(device) if isinstance(width, torch.Tensor) else width
    y, g = forward_backward(run_op(backend, activation, n_act, kernel_width), low, names, gy, device)
    assert y.dtype == dtype
    assert_close_to_truth(y, y64, y_ref, dtype, "y")
    for k in names:
        assert g[k].dtype == low[k].dtype and g[k].shape == low[k].shape, k
        assert_close_to_truth(g[k], g64[k], g_ref[k], dtype, f"grad {k}")
        if k in ("w1", "w2", "w3"):  # experts >= E' and channels >= d' get exactly 0
            assert not g[k][n_act:].any(), k
            if isinstance(width, int):
                assert not (g[k][:, width:] if k != "w2" else g[k][:, :, width:]).any(), k
    return y, g


# ---------------------------------------------------------------------------------------------
# the reference backend (the CPU path) in float64 against the plain truth
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", range(1, 9))
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("gated", [False, True])
def test_reference_float64_matches_truth(top_k, activation, gated):
    width, cs = [(None, None), ("int", "channel"), ("tensor", "token"), ("tensor", "channel")][top_k % 4]
    inp, w = make_case(11, 12, 10, 10, 9, top_k, gated=gated, width=width, cs=cs, skip_experts=(3,))
    inp = to_float64(inp)
    names = grad_names(inp)
    gy = torch.randn(11, 12, dtype=FP64)
    truth = lambda **kw: truth_experts(**kw, activation=activation, n_act=9, width=w)  # noqa: E731
    ref = run_op("reference", activation, 9, w)
    torch.testing.assert_close(ref(**inp), truth(**inp), rtol=1e-10, atol=1e-12)
    g_ref, g64 = grads_of(ref, inp, names, gy), grads_of(truth, inp, names, gy)
    for k in names:
        torch.testing.assert_close(g_ref[k], g64[k], rtol=1e-10, atol=1e-12, msg=k)


def test_auto_backend_on_cpu_is_reference():
    inp, w = make_case(5, 8, 6, 4, 4, 2, gated=True, width="tensor", cs="token")
    y_auto = run_op("auto", "silu", 4, w)(**inp)
    torch.testing.assert_close(y_auto, run_op("reference", "silu", 4, w)(**inp), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the Triton backend (interpreter on CPU) against the truth
# ---------------------------------------------------------------------------------------------

TRITON_CASES = [
    # tokens, hidden, F, E, E', top_k, gated, activation, width, channel_scale, dtype
    (13, 24, 40, 6, 4, 2, False, "relu2", None, None, FP32),
    (13, 24, 40, 6, 4, 2, True, "silu", "int", "channel", BF16),
    (9, 20, 36, 10, 9, 8, False, "gelu", "tensor", "token", FP16),
    (17, 16, 33, 5, 5, 1, True, "gelu", "tensor", "channel", FP32),
    (1, 24, 40, 6, 3, 3, True, "relu2", "int", "token", BF16),
    (11, 33, 20, 8, 7, 6, False, "silu", "tensor", None, BF16),
    (7, 24, 40, 9, 8, 7, True, "relu2", "tensor", "channel", FP16),
    (10, 17, 48, 8, 8, 5, True, "gelu", None, "token", BF16),
    (6, 16, 24, 6, 5, 4, False, "relu2", "int", None, FP16),
    (12, 20, 36, 7, 6, 3, True, "silu", "tensor", "token", FP32),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"T{c[0]}-H{c[1]}-F{c[2]}-E{c[4]}of{c[3]}-k{c[5]}-"
                                                         f"{'gated-' if c[6] else ''}{c[7]}-w{c[8]}-cs{c[9]}-"
                                                         f"{str(c[10])[6:]}")
def test_triton_matches_truth(case, triton_device, poison_empty):
    tokens, hidden, ffn, n_exp, n_act, top_k, gated, activation, width, cs, dtype = case
    inp, w = make_case(tokens, hidden, ffn, n_exp, n_act, top_k, gated=gated, width=width, cs=cs,
                       skip_experts=(1,) if n_act - 1 >= top_k else ())
    check_against_truth(inp, w, activation, n_act, dtype, "triton", triton_device)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("tokens", [0, 1])
def test_tiny_and_empty_inputs(backend, tokens, poison_empty):
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and not _interpreting():
            pytest.skip("needs TRITON_INTERPRET=1")
    inp, w = make_case(tokens, 16, 20, 4, 3, 2, gated=True, width="tensor", cs="token")
    y, g = check_against_truth(inp, w, "silu", 3, FP32, backend)
    assert y.shape == (tokens, 16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_width_and_strided_prefix_views(backend, poison_empty):
    """ffn_width=0 gives zeros; strided slices of larger tensors (weights, column-major x) and int32
    ids work unchanged."""
    if backend == "triton" and not (torch.cuda.is_available() or _interpreting()):
        pytest.skip("needs TRITON_INTERPRET=1")
    inp, _ = make_case(9, 16, 20, 5, 4, 2, gated=True, width=None, cs="channel")
    y0 = run_op(backend, "relu2", 4, 0)(**inp)
    assert y0.shape == (9, 16) and not y0.any()
    big1 = torch.randn(6, 24, 40)
    big1[:5, :20, 3:19] = inp["w1"]
    big2 = torch.randn(5, 16, 50).transpose(1, 2)  # (5, 50, 16): F-major storage
    big2[:, 5:25] = inp["w3"]
    xt = torch.empty(16, 9).T  # column-major x
    xt.copy_(inp["x"])
    strided = dict(inp, x=xt, w1=big1[:5, :20, 3:19], w3=big2[:, 5:25], topk_ids=inp["topk_ids"].int())
    check_against_truth(strided, 13, "gelu", 4, FP32, backend)


@pytest.mark.parametrize("widths", ["classes", "odd"])
@pytest.mark.parametrize("activation,gated,cs", [("relu2", False, None), ("silu", True, "token"),
                                                  ("gelu", False, "channel"), ("relu2", True, "channel")])
def test_reference_fp32_per_token_widths_match_truth(widths, activation, gated, cs, poison_empty):
    """The fp32 reference (one matmul per expert and FFN column block) with per-token widths
    against the float64 truth, on strided views: "classes" draws widths from a few multiples of 8
    (16-byte aligned column blocks), "odd" any width in [0, F] (misaligned blocks)."""
    tokens, hidden, ffn, n_exp, n_act, top_k = 37, 32, 48, 6, 5, 3
    inp, _ = make_case(tokens, hidden, ffn, n_exp, n_act, top_k, gated=gated, width=None, cs=cs, skip_experts=(2,))
    gen = torch.Generator().manual_seed(7)
    if widths == "classes":
        w = torch.tensor([0, 8, 24, 40, 48])[torch.randint(0, 5, (tokens,), generator=gen)]
    else:
        w = torch.randint(0, ffn + 1, (tokens,), generator=gen)
    w[:3] = torch.tensor([ffn, 0, 8 if widths == "classes" else 1])
    big1 = torch.randn(n_exp + 1, ffn + 8, hidden + 16)
    big1[:n_exp, 8:, 16:] = inp["w1"]
    big2 = torch.randn(n_exp, ffn + 4, hidden).transpose(1, 2)  # (E, hidden, F + 4): hidden-major storage
    big2[:, :, 4:] = inp["w2"]
    xt = torch.empty(hidden, tokens).T  # column-major x
    xt.copy_(inp["x"])
    strided = dict(inp, x=xt, w1=big1[:n_exp, 8:, 16:], w2=big2[:, :, 4:])
    _, g = check_fp32_reference(strided, activation, n_act, w)
    for k in ("w1", "w2", "w3"):
        if k in g:
            assert not g[k][n_act:].any(), k


@pytest.mark.parametrize("activation,gated,cs", [("relu2", False, None), ("silu", True, "token"),
                                                  ("gelu", True, "channel")])
def test_reference_fp32_experts_in_some_width_blocks_match_truth(activation, gated, cs, poison_empty):
    """Per-token widths where experts reach different FFN column blocks (the reference runs its
    GEMMs expert by expert over the blocks an expert has pairs in): expert 0 takes only the
    widest tokens, expert 1 only the narrowest, expert 2 every width, expert 3 the middle ones,
    expert 4 none; every argument a strided view; output and gradients against the float64 truth."""
    tokens, hidden, ffn, n_exp, top_k = 40, 24, 40, 6, 2
    inp, _ = make_case(tokens, hidden, ffn, n_exp, n_exp, top_k, gated=gated, width=None, cs=cs)
    w = torch.tensor([8, 16, 24, 40])[torch.arange(tokens) % 4]
    first = torch.tensor([1, 3, 3, 0])[torch.arange(tokens) % 4]  # narrow -> 1, middle -> 3, widest -> 0
    ids = torch.stack([first, torch.full((tokens,), 2)], 1)
    ids[::8, 1] = 5
    big_x = torch.randn(tokens, 2, hidden)[:, 1]  # row stride 2 * hidden
    big_x.copy_(inp["x"])
    big_tw = torch.randn(top_k, tokens).T  # column-major
    big_tw.copy_(inp["topk_weights"])
    big1 = torch.randn(n_exp, ffn + 3, hidden + 5)[:, 3:, 5:]
    big1.copy_(inp["w1"])
    big2 = torch.randn(n_exp, ffn, hidden).transpose(1, 2)  # (E, hidden, F), hidden-major storage
    big2.copy_(inp["w2"])
    strided = dict(inp, x=big_x, topk_weights=big_tw, topk_ids=torch.empty(top_k, tokens, dtype=torch.int64).T,
                   w1=big1, w2=big2)
    strided["topk_ids"].copy_(ids)
    if gated:
        big3 = torch.randn(n_exp + 2, ffn, hidden)[1:-1]
        big3.copy_(inp["w3"])
        strided["w3"] = big3
    if cs == "token":
        big_cs = torch.randn(ffn, tokens).T
        big_cs.copy_(inp["channel_scale"])
        strided["channel_scale"] = big_cs
    _, g = check_fp32_reference(strided, activation, n_exp, w)
    assert not g["w1"][4].any() and not g["w2"][4].any()
    assert not g["w1"][1, 8:].any() and not g["w2"][1, :, 8:].any()  # expert 1: narrowest tokens only
    assert not g["w1"][3, 24:].any() and g["w1"][0, 24:].any()


@pytest.mark.parametrize("pair_major", [True, False])
def test_reference_fp32_pair_major_down_projection(monkeypatch, pair_major):
    """Where the pair-major form is on (Intel CPUs), experts with few rows at a large FFN width
    take the pair-major down projection ``(w2[e] @ a_e.T).T`` (reference/moe.py
    ``_PAIR_MAJOR_ROWS``), those with many the row form; where it is off, all take the row form:
    both against the float64 truth, w2 a strided prefix view, whatever CPU runs the test."""
    import elastic_kernels.reference.moe as ref
    monkeypatch.setattr(ref, "PAIR_MAJOR", pair_major)
    tokens, hidden, ffn, n_exp, top_k = 60, 16, 1024, 4, 2
    inp, _ = make_case(tokens, hidden, ffn, n_exp, n_exp, top_k, gated=False, width=None, cs=None)
    ids = torch.stack([torch.zeros(tokens, dtype=torch.int64), torch.arange(tokens) % 3 + 1], 1)  # 60 / 20 / 20 / 20
    big2 = torch.randn(n_exp, hidden, ffn + 16)
    big2[:, :, 16:] = inp["w2"]
    check_fp32_reference(dict(inp, topk_ids=ids, w2=big2[:, :, 16:]), "relu2", n_exp, None)


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score,renormalize,bias", [("softmax", True, False), ("softmax", False, False),
                                                    ("sigmoid", True, True), ("sigmoid", False, True),
                                                    ("softmax", True, True)])
@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_route_matches_truth(score, renormalize, bias, top_k):
    logits = torch.randn(13, 10)
    b = torch.randn(10) * 0.3 if bias else None
    w, ids = ek.moe_route(logits, top_k, num_experts_active=7, score=score, renormalize=renormalize,
                          correction_bias=b)
    w64, ids64 = truth_route(logits, top_k, 7, score, renormalize, b)
    assert ids.dtype == torch.int64 and w.dtype == FP32 and (ids < 7).all()
    assert torch.equal(ids, ids64)
    torch.testing.assert_close(w.double(), w64, rtol=1e-6, atol=1e-7)


def test_route_gradients_and_inactive_experts():
    logits = torch.randn(9, 8, dtype=FP64, requires_grad=True)
    fn = lambda lg: ek.moe_route(lg, 3, num_experts_active=5, score="softmax")[0]  # noqa: E731
    torch.autograd.gradcheck(fn, (logits,))
    w, _ = ek.moe_route(logits, 3, num_experts_active=5)
    w.sum().backward()
    assert not logits.grad[:, 5:].any()
    bias = torch.randn(8, dtype=FP64)
    fn = lambda lg: ek.moe_route(lg, 2, score="sigmoid", correction_bias=bias)[0]  # noqa: E731
    torch.autograd.gradcheck(fn, (logits.detach().requires_grad_(True),))


def test_route_then_experts_end_to_end():
    """The routing output feeds moe_experts directly; gradients reach the router logits."""
    logits = torch.randn(10, 6, requires_grad=True)
    inp, _ = make_case(10, 12, 16, 6, 4, 2, gated=False, width=None, cs=None)
    w, ids = ek.moe_route(logits, 2, num_experts_active=4)
    y = ek.moe_experts(inp["x"], w, ids, inp["w1"], inp["w2"], num_experts_active=4, ffn_width=8)
    y.square().sum().backward()
    assert logits.grad[:, :4].abs().sum() > 0 and not logits.grad[:, 4:].any()


# ---------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile, GPU without host sync
# ---------------------------------------------------------------------------------------------

def _op_args(backend):
    inp, w = make_case(7, 16, 20, 5, 4, 2, gated=True, width="tensor", cs="token")
    args = (inp["x"], inp["topk_weights"], inp["topk_ids"], inp["w1"], inp["w2"], inp["w3"], *(None,) * 6,
            inp["channel_scale"], w, "silu", 4, -1, backend)  # None: no NVFP4 scales
    return tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    if backend == "triton" and not (torch.cuda.is_available() or _interpreting()):
        pytest.skip("needs TRITON_INTERPRET=1")
    args = _op_args(backend)
    torch.library.opcheck(torch.ops.elastic_kernels.moe_experts.default, args)
    gy = torch.randn(7, 16)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    _, saved = torch.ops.elastic_kernels.moe_experts.default(*args)  # what the forward saves
    bargs = (gy, *args[:14], saved, *args[14:])  # saved comes after width_t
    torch.library.opcheck(torch.ops.elastic_kernels.moe_experts_backward.default, bargs)


def test_torch_compile_fullgraph():
    inp, w = make_case(8, 12, 16, 6, 4, 2, gated=True, width="tensor", cs="channel")

    def f(logits, x, w1, w2, w3, cs, widths):
        tw, ids = ek.moe_route(logits, 2, num_experts_active=4, score="sigmoid")
        y = ek.moe_experts(x, tw, ids, w1, w2, w3=w3, activation="silu", num_experts_active=4,
                           ffn_width=widths, channel_scale=cs)
        return (y * y).sum()
    args = [torch.randn(8, 6)] + [inp[k] for k in ("x", "w1", "w2", "w3", "channel_scale")]
    assert_compile_matches_eager(f, args, w)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_triton_gpu_no_host_sync(dtype):
    """On a GPU: routing + experts forward and backward without any host synchronization, and
    the Triton results match the reference backend."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda")
    inp, w = make_case(300, 256, 192, 16, 12, 4, gated=True, width="tensor", cs="token")
    low = {k: (v.to(dev, dtype) if k in ("x", "w1", "w2", "w3") else (v.to(dev) if v is not None else None))
           for k, v in inp.items()}
    w = w.to(dev)
    logits = torch.randn(300, 16, device=dev, requires_grad=True)
    names = grad_names(low)
    leaves = {k: (v.detach().requires_grad_(k in names) if isinstance(v, torch.Tensor) else v) for k, v in low.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tw, ids = ek.moe_route(logits, 4, num_experts_active=12)
        y = ek.moe_experts(leaves["x"], tw * leaves["topk_weights"], ids, leaves["w1"], leaves["w2"],
                           w3=leaves["w3"], activation="silu", num_experts_active=12, ffn_width=w,
                           channel_scale=leaves["channel_scale"], backend="triton")
        y.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(y).all() and logits.grad is not None
    ref = ek.moe_experts(low["x"], (tw * low["topk_weights"]).detach(), ids, low["w1"], low["w2"], w3=low["w3"],
                         activation="silu", num_experts_active=12, ffn_width=w, channel_scale=low["channel_scale"],
                         backend="reference")
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == FP32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y.float(), ref.float(), **tol)


# ---------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument
# ---------------------------------------------------------------------------------------------

def _good():
    inp, _ = make_case(5, 8, 6, 4, 3, 2, gated=True, width=None, cs=None)
    return inp


BAD_EXPERTS = [
    ("x", lambda i: dict(i, x=i["x"].numpy())),
    ("x", lambda i: dict(i, x=i["x"].long())),
    ("x", lambda i: dict(i, x=i["x"][None])),
    ("topk_weights", lambda i: dict(i, topk_weights=i["topk_weights"][:4])),
    ("topk_weights", lambda i: dict(i, topk_weights=i["topk_weights"].long())),
    ("topk_ids", lambda i: dict(i, topk_ids=i["topk_ids"].float())),
    ("topk_ids", lambda i: dict(i, topk_ids=i["topk_ids"][:4])),
    ("topk_ids", lambda i: dict(i, topk_ids=torch.where(i["topk_ids"] == 0, 4, i["topk_ids"]))),
    ("topk_ids", lambda i: dict(i, topk_ids=torch.where(i["topk_ids"] == 0, -1, i["topk_ids"]))),
    ("num_experts_active", lambda i: dict(i, topk_ids=torch.full_like(i["topk_ids"], 2), num_experts_active=2)),
    ("num_experts_active", lambda i: dict(i, num_experts_active=5)),
    ("num_experts_active", lambda i: dict(i, num_experts_active=0)),
    ("w1", lambda i: dict(i, w1=i["w1"][:, :, :7])),
    ("w1", lambda i: dict(i, w1=i["w1"].double())),
    ("w2", lambda i: dict(i, w2=i["w2"][:, :, :5])),
    ("w2", lambda i: dict(i, w2=i["w2"].to("meta"))),
    ("w3", lambda i: dict(i, w3=i["w3"][:3])),
    ("ffn_width", lambda i: dict(i, ffn_width=7)),
    ("ffn_width", lambda i: dict(i, ffn_width=torch.tensor([1, 2, 3]))),
    ("ffn_width", lambda i: dict(i, ffn_width=torch.tensor([1, 2, 3, 9, 0]))),
    ("ffn_width", lambda i: dict(i, ffn_width=2.5)),
    ("channel_scale", lambda i: dict(i, channel_scale=torch.ones(7))),
    ("channel_scale", lambda i: dict(i, channel_scale=torch.ones(5, 6, dtype=torch.int32))),
    ("activation", lambda i: dict(i, activation="tanh")),
    ("backend", lambda i: dict(i, backend="cuda")),
    ("backend", lambda i: dict(i, backend="fast")),
]


@pytest.mark.parametrize("needle,mutate", BAD_EXPERTS, ids=[f"{n}-{k}" for k, (n, _) in enumerate(BAD_EXPERTS)])
def test_bad_experts_calls_name_the_argument(needle, mutate):
    kw = mutate(dict(_good(), num_experts_active=3))
    with pytest.raises((ValueError, TypeError)) as info:
        ek.moe_experts(kw.pop("x"), kw.pop("topk_weights"), kw.pop("topk_ids"), kw.pop("w1"), kw.pop("w2"), **kw)
    assert needle in str(info.value)


BAD_ROUTE = [
    ("router_logits", dict(router_logits=torch.randn(6))),
    ("router_logits", dict(router_logits=torch.ones(4, 6, dtype=torch.int64))),
    ("top_k", dict(top_k=0)),
    ("top_k", dict(top_k=5, num_experts_active=4)),
    ("num_experts_active", dict(num_experts_active=7)),
    ("score", dict(score="relu")),
    ("correction_bias", dict(correction_bias=torch.zeros(5))),
    ("renormalize", dict(renormalize="yes")),
]


@pytest.mark.parametrize("needle,over", BAD_ROUTE, ids=[f"{n}-{k}" for k, (n, _) in enumerate(BAD_ROUTE)])
def test_bad_route_calls_name_the_argument(needle, over):
    kw = dict(router_logits=torch.randn(4, 6), top_k=2) | over
    with pytest.raises((ValueError, TypeError)) as info:
        ek.moe_route(kw.pop("router_logits"), kw.pop("top_k"), **kw)
    assert needle in str(info.value)
