"""The stride and NaN/Inf contract of every public op on every backend (docs/design.md §5), and
regression tests of the bugs it found.

The generic tests are driven by :mod:`contract`: each op x backend x view kind, every tensor
argument replaced in turn by a strided / transposed / expanded / offset view, outputs and
gradients compared with the reference on contiguous inputs; and NaN/Inf put into each float
argument, non-finite outputs compared with the reference position by position.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import contract
import elastic_kernels as ek
from elastic_kernels import nvfp4
from elastic_kernels.nvfp4 import NVFP4Tensor
from elastic_kernels.formats import nvfp4 as fmt_nvfp4

# a few deterministic examples per configuration: the first is hypothesis' smallest draw
FEW = settings(max_examples=2, derandomize=True, deadline=None, database=None, phases=(Phase.generate,),
               suppress_health_check=list(HealthCheck))
NAN, INF = float("nan"), float("inf")


def _device(request, backend: str):
    """CPU for the reference, the triton_device / cuda_device fixtures otherwise (they skip)."""
    if backend == "reference":
        return torch.device("cpu")
    return request.getfixturevalue("triton_device" if backend == "triton" else "cuda_device")


CONFIGS = [(c, b) for c in contract.CASES for b in c.backends]
IDS = [f"{c.name}-{b}" for c, b in CONFIGS]


@pytest.mark.parametrize("kind", contract.VIEW_KINDS)
@pytest.mark.parametrize("case, backend", CONFIGS, ids=IDS)
def test_every_argument_accepts_views(request, case, backend, kind):
    device = _device(request, backend)
    checked = []

    @FEW
    @given(st.data(), st.integers(0, 2 ** 16))
    def check(data, seed):
        params = case.draw(data)
        tensors = case.make(params, torch.Generator().manual_seed(seed))
        for arg in contract.view_args(case, params, tensors, kind):
            contract.check_view(case, params, tensors, arg, kind, backend, device, seed)
            checked.append(arg)
    check()
    assert checked, f"{kind} views apply to no argument of {case.name}"


NONFINITE_CONFIGS = [(c, b) for c, b in CONFIGS if b != "reference" or c.rejects_nonfinite]


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("case, backend", NONFINITE_CONFIGS, ids=[f"{c.name}-{b}" for c, b in NONFINITE_CONFIGS])
def test_nonfinite_inputs_reach_the_same_outputs_as_the_reference(request, case, backend, value):
    device = _device(request, backend)

    @FEW
    @given(st.data(), st.integers(0, 2 ** 16))
    def check(data, seed):
        params = case.draw(data)
        tensors = case.make(params, torch.Generator().manual_seed(seed))
        for arg in contract.nonfinite_args(case, tensors):
            contract.check_nonfinite(case, params, tensors, arg, value, backend, device, seed)
    check()


# ---------------------------------------------------------------------------------------------
# regression tests (each failed before its fix)
# ---------------------------------------------------------------------------------------------

def _moe_inputs(tokens=7, hidden=12, ffn=10, experts=3, top_k=2, device="cpu"):
    return (torch.randn(tokens, hidden, device=device), torch.randint(0, experts, (tokens, top_k), device=device),
            torch.randn(experts, ffn, hidden, device=device) / hidden ** 0.5,
            torch.randn(experts, hidden, ffn, device=device) / ffn ** 0.5)


@pytest.mark.parametrize("layout", ["every-other-column", "top1-every-other", "expanded-scalar", "transposed"])
def test_moe_experts_triton_reads_topk_weights_with_their_strides(triton_device, layout):
    """The unpermute kernel read ``topk_weights.reshape(-1)`` as unit-strided: a
    ``rand(T, 2k)[:, ::2]`` view (which reshapes to a stride-2 view) or an expanded tensor gave
    wrong outputs."""
    top_k = 1 if layout == "top1-every-other" else 2
    x, ids, w1, w2 = _moe_inputs(top_k=top_k, device=triton_device)
    t = x.shape[0]
    if layout in ("every-other-column", "top1-every-other"):
        tw = torch.rand(t, 2 * top_k, device=triton_device)[:, ::2]
    elif layout == "expanded-scalar":
        tw = torch.rand((), device=triton_device).expand(t, top_k)
    else:
        tw = torch.rand(top_k, t, device=triton_device).T
    got = ek.moe_experts(x, tw, ids, w1, w2, backend="triton")
    want = ek.moe_experts(x.cpu(), tw.contiguous().cpu(), ids.cpu(), w1.cpu(), w2.cpu(), backend="reference")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["every-other", "expanded", "offset"])
def test_nvfp4_linear_triton_reads_bias_with_its_stride(triton_device, layout):
    """The GEMM epilogue read ``bias`` as unit-strided (``bias[::2]``, an expanded bias)."""
    n, k = 24, 32
    q = nvfp4.quantize(torch.randn(n, k, device=triton_device))
    x = torch.randn(5, k, device=triton_device)
    if layout == "every-other":
        bias = torch.randn(2 * n, device=triton_device)[::2]
    elif layout == "expanded":
        bias = torch.randn(1, device=triton_device).expand(n)
    else:
        bias = torch.randn(n + 3, device=triton_device)[3:]
    got = ek.nvfp4_linear(x, q, bias, backend="triton")
    want = ek.nvfp4_linear(x, q, bias.contiguous(), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("activation, gated", [("relu2", False), ("relu2", True), ("silu", False)])
def test_moe_experts_nan_token_poisons_exactly_its_row(request, backend, activation, gated):
    """ReLU^2 in the Triton kernels was ``max(h, 0)``, which turned NaN into 0; NaN in x[t] must
    make exactly y[t] NaN (every other token is finite) on every backend."""
    device = _device(request, backend)
    x, ids, w1, w2 = _moe_inputs(device=device)
    x[3, 5] = NAN
    tw = torch.rand(ids.shape, device=device)
    w3 = torch.randn_like(w1) if gated else None
    y = ek.moe_experts(x, tw, ids, w1, w2, w3=w3, activation=activation, backend=backend)
    expect = torch.zeros_like(y, dtype=torch.bool)
    expect[3] = True
    assert torch.equal(y.isnan(), expect)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_moe_experts_backward_propagates_nan_like_the_reference(request, backend):
    device = _device(request, backend)
    x, ids, w1, w2 = _moe_inputs(device=device)
    x[2, 0] = NAN
    tw = torch.rand(ids.shape, device=device)
    grads = []
    for be, dev in ((backend, device), ("reference", "cpu")):
        leaves = [t.detach().to(dev).clone().requires_grad_(True) for t in (x, tw, w1, w2)]
        ek.moe_experts(leaves[0], leaves[1], ids.to(dev), leaves[2], leaves[3], backend=be).sum().backward()
        grads.append([t.grad.isnan().cpu() for t in leaves])
    for name, got, want in zip(("x", "topk_weights", "w1", "w2"), *grads):
        assert torch.equal(got, want), f"NaN pattern of the gradient of {name} differs from the reference"


def _nvfp4_backends():
    return ["reference", "triton", "cuda"]


@pytest.mark.parametrize("backend", _nvfp4_backends())
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_fake_quant_nvfp4_nonfinite_block_is_nan(request, backend, value):
    """A NaN/Inf element makes exactly its 16-element block NaN (its block scale is NaN: e4m3 has
    no Inf) with a given global scale, and every output NaN with the default one (amax / 2688).
    Triton turned NaN into finite values (``tl.max`` and the clamps dropped it)."""
    device = _device(request, backend)
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    x = torch.randn(3, 64, device=device, dtype=dtype)
    x[1, 21] = value
    y = ek.fake_quant_nvfp4(x, global_scale=4.0 / 2688, backend=backend)
    expect = torch.zeros(3, 64, dtype=torch.bool)
    expect[1, 16:32] = True
    assert torch.equal(y.isnan().cpu(), expect)
    assert torch.isnan(ek.fake_quant_nvfp4(x, backend=backend)).all()


@pytest.mark.parametrize("backend", _nvfp4_backends())
@pytest.mark.parametrize("act_quant", [False, True])
def test_nvfp4_linear_nan_in_x_reaches_the_outputs_that_depend_on_it(request, backend, act_quant):
    """Without act_quant a NaN in x[m] makes row m NaN; with act_quant every output is NaN (the
    activation's global scale is amax(x) / 2688). Triton's activation quantizer gave finite values."""
    device = _device(request, backend)
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    q = nvfp4.quantize(torch.randn(8, 32, device=device))
    x = torch.randn(4, 32, device=device, dtype=dtype)
    x[2, 7] = NAN
    y = ek.nvfp4_linear(x, q, act_quant=act_quant, backend=backend)
    expect = torch.ones(4, 8, dtype=torch.bool) if act_quant else (torch.arange(4) == 2)[:, None].expand(4, 8)
    assert torch.equal(y.isnan().cpu(), expect)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dt_limit", [(0.0, INF), (0.01, 1.0)])
def test_ssd_scan_nan_dt_propagates(request, backend, dt_limit):
    """softplus and the dt clamp in the Triton kernels (``min(v, 20)``, ``max(v, lo)``) turned a NaN
    dt into a finite value. A NaN dt[b, t, h] makes y[b, c:, h] NaN, c the first step of t's chunk
    (the chunked products multiply the masked future by 0, as documented in ssd_scan), and leaves
    earlier chunks, other heads and other samples finite, identically on every backend."""
    device = _device(request, backend)
    b, l, h, p, n = 2, 9, 2, 4, 4
    x, z = torch.randn(b, l, h, p, device=device), torch.randn(b, l, h, p, device=device)
    dt = torch.rand(b, l, h, device=device) - 0.5
    A = -torch.rand(h, device=device) - 0.1
    B, C = torch.randn(b, l, 1, n, device=device), torch.randn(b, l, 1, n, device=device)
    dt[1, 5, 0] = NAN
    y = ek.ssd_scan(x, dt, A, B, C, chunk_size=4, z=z, dt_softplus=True, dt_limit=dt_limit, backend=backend)
    expect = torch.zeros(b, l, h, p, dtype=torch.bool)
    expect[1, 4:, 0] = True
    assert torch.equal(y.isnan().cpu(), expect)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ssd_scan_rejects_decreasing_seq_idx(request, backend):
    """``seq_idx`` must be non-decreasing (documented); a decreasing one was accepted and the result
    depended on chunk_size and on the backend."""
    device = _device(request, backend)
    b, l, h, p, n = 2, 6, 2, 4, 4
    args = (torch.randn(b, l, h, p, device=device), torch.rand(b, l, h, device=device), -torch.rand(h, device=device),
            torch.randn(b, l, 1, n, device=device), torch.randn(b, l, 1, n, device=device))
    seq = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 0, 1]], dtype=torch.int32, device=device)
    msg = r"seq_idx must be non-decreasing along seqlen, got 1 then 0 at index \(1, 3\)"
    with pytest.raises(ValueError, match=msg):
        ek.ssd_scan(*args, chunk_size=4, seq_idx=seq, backend=backend)
    ok = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 3, 3]], dtype=torch.int32, device=device)
    assert torch.isfinite(ek.ssd_scan(*args, chunk_size=4, seq_idx=ok, backend=backend)).all()


def test_seq_idx_check_is_skipped_while_tracing():
    """Like the width checks, the host read is skipped under torch.compile (fullgraph works)."""
    b, l, h, p, n = 1, 5, 2, 4, 4
    args = (torch.randn(b, l, h, p), torch.rand(b, l, h), -torch.rand(h), torch.randn(b, l, 1, n),
            torch.randn(b, l, 1, n))
    seq = torch.tensor([[0, 0, 1, 1, 2]], dtype=torch.int32)
    f = torch.compile(lambda *a: ek.ssd_scan(*a, chunk_size=4, seq_idx=seq, backend="reference"),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(*args), ek.ssd_scan(*args, chunk_size=4, seq_idx=seq, backend="reference"))


# ---- the sign of zero in NVFP4 codes ------------------------------------------------------------

def _oracle_codes(w: torch.Tensor, g: float) -> torch.Tensor:
    """Per-element oracle of the recipe's codes (docs/design.md §5; float32 scalar steps), keeping
    the sign bit of a value that rounds to zero."""
    w = w.float()
    g32 = torch.tensor(g, dtype=torch.float32)
    rows, k = w.shape
    codes = torch.empty(rows, k, dtype=torch.uint8)
    bounds = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
    for r in range(rows):
        for b in range(0, k, 16):
            block = w[r, b:b + 16]
            s = ((block.abs().max() / 6.0) / g32).clamp(2.0 ** -6, 448.0).to(torch.float8_e4m3fn).float()
            inv = (1.0 / g32) / s
            for i in range(16):
                u = float((block[i] * inv).clamp(-6.0, 6.0))
                mag = sum((abs(u) >= t) if up else (abs(u) > t) for t, up in bounds)
                codes[r, b + i] = mag | (8 if math.copysign(1.0, u) < 0 else 0)
    return codes


def _small_values(device, rows=6, k=32):
    """Random rows whose blocks hold values tiny against the block amax (they round to +-0),
    exact zeros of both signs, and regular values."""
    w = torch.randn(rows, k, device=device)
    w[:, ::3] *= 1e-3
    w[0, 1], w[0, 2] = 0.0, -0.0
    return w


@pytest.mark.parametrize("backend", _nvfp4_backends())
def test_quantize_keeps_the_sign_of_zero(request, backend):
    """Negative values that round to zero are code 8 (-0), as cvt.rn.satfinite.e2m1x2 and torchao
    write them; they were written as +0."""
    device = _device(request, backend)
    w = _small_values(device)
    g = float(fmt_nvfp4.global_scale_of(w.cpu(), (0, 1)))
    q = nvfp4.quantize(w, global_scale=g, backend=backend)
    codes = fmt_nvfp4.unpack(q.data.cpu())
    want = _oracle_codes(w.cpu(), g)
    assert (want == 8).any(), "the inputs hold no negative value that rounds to zero"
    assert torch.equal(codes, want)
    assert torch.equal(q.dequantize(torch.float32).cpu().signbit()[want == 8], torch.ones(int((want == 8).sum()),
                                                                                         dtype=torch.bool))


@pytest.mark.parametrize("backend", _nvfp4_backends())
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 32)])
def test_quantize_is_bit_exact_with_torchao(request, backend, shape):
    mx = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor",
                             reason="torchao's NVFP4 quantizer is the cross-check")
    device = _device(request, backend)
    w = torch.randn(shape, device=device)
    w[..., ::5] *= 1e-3
    q = nvfp4.quantize(w, backend=backend)
    for e in range(shape[0] if len(shape) == 3 else 1):
        we = w[e] if len(shape) == 3 else w
        ge = q.global_scale[e] if len(shape) == 3 else q.global_scale
        scales, data = mx.nvfp4_quantize(we.cpu().contiguous(), per_tensor_scale=ge.cpu())
        qe = q[e] if len(shape) == 3 else q
        assert torch.equal(qe.data.cpu(), data.view(torch.uint8))
        assert torch.equal(qe.scales.cpu().view(torch.uint8), scales.view(torch.uint8).reshape(qe.scales.shape))


def test_moe_experts_nvfp4_triton_reads_an_expanded_global_scale(triton_device):
    """Stacked NVFP4 experts whose per-expert global scale is an expanded (stride-0) tensor: the
    launcher passed it on as is and the kernels read g[e] unit-strided."""
    e, f, h = 3, 32, 16
    q = nvfp4.quantize(torch.randn(e, f, h, device=triton_device), global_scale=0.01)
    q2 = nvfp4.quantize(torch.randn(e, h, f, device=triton_device), global_scale=0.02)
    w1 = NVFP4Tensor(q.data, q.scales, torch.tensor([0.01], device=triton_device).expand(e))
    w2 = NVFP4Tensor(q2.data, q2.scales, torch.tensor([0.02], device=triton_device).expand(e))
    x = torch.randn(6, h, device=triton_device)
    ids = torch.randint(0, e, (6, 2), device=triton_device)
    tw = torch.rand(6, 2, device=triton_device)
    got = ek.moe_experts(x, tw, ids, w1, w2, backend="triton")
    want = ek.moe_experts(x, tw, ids, q, q2, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("channel", [3, 12])
def test_moe_experts_nan_in_w2_reaches_the_tokens_of_its_expert_within_the_width(request, backend, channel):
    """With an int width d' = 8, a NaN in w2[e, 4, c] makes y[t, 4] NaN for the tokens t routed to e
    when c < d', and no output NaN when c >= d' (the channel is never read)."""
    device = _device(request, backend)
    x, ids, w1, w2 = _moe_inputs(ffn=16, device=device)
    w2[1, 4, channel] = NAN
    tw = torch.rand(ids.shape, device=device)
    y = ek.moe_experts(x, tw, ids, w1, w2, ffn_width=8, backend=backend)
    expect = torch.zeros(y.shape, dtype=torch.bool)
    if channel < 8:
        expect[:, 4] = (ids == 1).any(1).cpu()
    assert expect.any() or channel >= 8
    assert torch.equal(y.isnan().cpu(), expect)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantize_of_a_transposed_weight_gives_contiguous_codes(request, backend):
    """A (N, K) weight stored transposed: the reference's elementwise ops kept that layout, so its
    codes came back transposed and NVFP4Tensor refused them (found by ``contract.tally``)."""
    device = _device(request, backend)
    w = torch.randn(5, 16)
    for wt in (w.t().contiguous().t(), torch.randn(16, 5).t()):
        q = nvfp4.quantize(wt.to(device), backend=backend)
        want = nvfp4.quantize(wt.contiguous(), backend="reference")
        assert q.data.is_contiguous() and q.scales.is_contiguous()
        assert torch.equal(q.data.cpu(), want.data) and torch.equal(q.scales.cpu().view(torch.uint8),
                                                                    want.scales.view(torch.uint8))


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("width", ["int0", "per_token"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_moe_nonfinite_routing_weight_reaches_a_zero_width_token(request, backend, width, value):
    """A token of width 0 has an exactly zero expert output, which its routing weight still
    multiplies: a NaN/Inf weight makes y[t] NaN (the documented contract, and the Triton
    kernels' weighted sum); the reference skipped such pairs and gave 0 (found by
    ``contract.tally`` at 20 examples), and Triton's int-width-0 shortcut returned zeros."""
    device = _device(request, backend)
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = torch.randn(4, 8, generator=gen), torch.randn(3, 16, 8, generator=gen), torch.randn(3, 8, 16, generator=gen)
    tw = torch.rand(4, 2, generator=gen)
    tw[1, 0] = value
    tw[3] = -tw[3]
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    ffn_width = 0 if width == "int0" else torch.tensor([16, 0, 0, 8], device=device)
    y = ek.moe_experts(*(t.to(device) for t in (x, tw, ids, w1, w2)), ffn_width=ffn_width, backend=backend).cpu()
    assert y[1].isnan().all()
    assert torch.isfinite(y[[0, 2, 3]]).all()
    if width == "int0":  # every output is +0 but the NaN row
        assert (y[[0, 2, 3]].view(torch.int32) == 0).all()
