"""NVFP4: the recipe bit-exact across backends, nested slicing, W4A16/W4A4 matmul,
fake quantization with straight-through gradients, serialization, bad input."""
from __future__ import annotations

import itertools
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import elastic_kernels as ek
from elastic_kernels import nvfp4
from elastic_kernels.formats import FP8Tensor, quantize_fp8
from elastic_kernels.formats.nvfp4 import unpack
from elastic_kernels.nvfp4 import NVFP4Tensor
from helpers import assert_close_to_truth

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
LOW = [torch.bfloat16, torch.float16]


# ---- plain, per-element oracles (independent of the library) ----------------------------------

def f32(v: float) -> float:
    """Round a Python float to the nearest float32."""
    return struct.unpack("f", struct.pack("f", v))[0]


def e4m3_value(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 15, byte & 7
    return sign * (m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


E4M3_POS = sorted({e4m3_value(b) for b in range(0x7F)})  # finite non-negative values (0x7F is NaN)


def nearest_even(v: float, grid: list[float], index_parity) -> float:
    """Nearest grid value; ties go to the value whose encoding has an even last bit."""
    best = min(grid, key=lambda g: abs(g - v))
    ties = [g for g in grid if abs(g - v) == abs(best - v)]
    return best if len(ties) == 1 else next(g for g in ties if index_parity(g) == 0)


def e4m3_parity(v: float) -> int:
    return next(b for b in range(0x7F) if e4m3_value(b) == v) & 1


def oracle_quantize_row(row: list[float], g: float):
    """docs/design.md §5 per element in float32 (Python floats rounded with f32 after every operation)."""
    codes, scales = [], []
    for b in range(0, len(row), 16):
        block = [f32(v) for v in row[b:b + 16]]
        bamax = max(abs(v) for v in block)
        s = min(max(f32(f32(bamax / 6.0) / g), 2.0 ** -6), 448.0)
        s = nearest_even(s, E4M3_POS, e4m3_parity)
        r = f32(f32(1.0 / g) / s)
        scales.append(s)
        for v in block:
            u = min(max(f32(v * r), -6.0), 6.0)
            mag = E2M1.index(nearest_even(abs(u), E2M1, lambda x: E2M1.index(x) & 1))
            codes.append(mag | (8 if math.copysign(1.0, u) < 0 else 0))  # -0 keeps its sign
    return codes, scales


def decode64(q: NVFP4Tensor) -> torch.Tensor:
    """A plain float64 decoder: value = e2m1(code) * e4m3(scale byte) * g, element by element."""
    data, sb = q.data.cpu(), q.scales.cpu().view(torch.uint8)
    g = q.global_scale.cpu().double()
    *lead, n, half = data.shape
    out = torch.empty(*lead, n, half * 2, dtype=torch.float64)
    for *li, r, c in itertools.product(*(range(s) for s in (*lead, n, half * 2))):
        byte = int(data[(*li, r, c // 2)])
        code = (byte >> 4) if c % 2 else (byte & 15)
        val = (-1.0 if code & 8 else 1.0) * E2M1[code & 7]
        out[(*li, r, c)] = val * e4m3_value(int(sb[(*li, r, c // 16)])) * float(g[tuple(li)])
    return out


def inputs(kind: str, shape=(24, 64), dtype=torch.float32) -> torch.Tensor:
    """Test weights in ``dtype``; fp16 gets the extremes it can represent (1e-30/1e30 are 0/inf)."""
    return _inputs(kind, shape, 1e4 if dtype == torch.float16 else 1e30).to(dtype)


def _inputs(kind: str, shape, huge: float) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(shape)
    if kind == "student_t":
        return torch.distributions.StudentT(torch.tensor(1.5)).sample(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "tiny":
        return torch.randn(shape) / huge
    if kind == "huge":
        return torch.randn(shape) * huge
    if kind == "mixed":  # per block: zero, tiny, huge, normal, constant, a single spike
        w = torch.randn(shape)
        blocks = w.view(*shape[:-1], -1, 16)
        blocks[..., 0::6, :] = 0
        blocks[..., 1::6, :] /= huge ** 0.4
        blocks[..., 2::6, :] *= huge ** 0.4
        blocks[..., 3::6, :] = 3.0
        blocks[..., 4::6, :] = 0
        blocks[..., 4::6, 5] = -7.0
        return w
    if kind == "subnormal":  # amax < 2688 * 2**-121 (g takes its floor); blocks 1e-36 / 1e-40 / 1e-44 / 0
        w = torch.randn(shape)
        blocks = w.view(*shape[:-1], -1, 16)
        blocks[..., 0::4, :] *= 1e-36
        blocks[..., 1::4, :] *= 1e-40   # float32 subnormals
        blocks[..., 2::4, :] *= 1e-44
        blocks[..., 3::4, :] = 0
        return w
    raise ValueError(kind)


KINDS = ["normal", "student_t", "zeros", "tiny", "huge", "mixed", "subnormal"]


def same_bits(a: NVFP4Tensor, b: NVFP4Tensor) -> bool:
    return (torch.equal(a.data.cpu(), b.data.cpu())
            and torch.equal(a.scales.cpu().view(torch.uint8), b.scales.cpu().view(torch.uint8))
            and torch.equal(a.global_scale.cpu(), b.global_scale.cpu()))


# ---- acceptance 1: the recipe -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_per_element_oracle(kind):
    w = inputs(kind, (3, 48))
    q = nvfp4.quantize(w, backend="reference")
    g = float(q.global_scale)
    assert g == (max(f32(float(w.abs().max()) / 2688.0), 2.0 ** -121) if kind != "zeros" else 1.0)
    codes = unpack(q.data)
    for r in range(w.shape[0]):
        want_codes, want_scales = oracle_quantize_row(w[r].tolist(), g)
        assert codes[r].tolist() == want_codes
        assert q.scales[r].float().tolist() == want_scales
    deq = q.dequantize(torch.float64)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq, decode64(q))
    assert torch.equal(q.dequantize(torch.float32), decode64(q).float())
    if kind == "zeros":
        assert torch.equal(deq, torch.zeros_like(deq)) and (q.scales.float() == 2.0 ** -6).all()


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_backends_bit_exact(triton_device, kind, dtype, request):
    if kind == "subnormal" and dtype == torch.bfloat16 and triton_device.type == "cpu":
        # Triton's CPU interpreter (3.x, runtime/interpreter.py `_convert_float`) widens bf16 subnormals to
        # float32 wrongly (2.76e-40 loads as 5.88e-39); the GPU's cvt is exact. Strict: XPASS once it is fixed.
        request.applymarker(pytest.mark.xfail(strict=True, reason="Triton interpreter: bf16 subnormal -> fp32"))
    w = inputs(kind, (21, 80), dtype)
    ref_q = nvfp4.quantize(w, backend="reference")
    tri_q = nvfp4.quantize(w.to(triton_device), backend="triton")
    assert same_bits(ref_q, tri_q)
    assert torch.equal(tri_q.dequantize(torch.float32).cpu(), ref_q.dequantize(torch.float32))
    assert torch.isfinite(ref_q.dequantize(torch.float32)).all()


def test_stacked_experts_per_expert_scale(triton_device):
    w = torch.randn(3, 10, 32) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    w[1] = 0
    q = nvfp4.quantize(w, backend="reference")
    assert q.global_scale.shape == (3,) and float(q.global_scale[1]) == 1.0
    for e in range(3):
        assert same_bits(q[e], nvfp4.quantize(w[e], backend="reference"))
    assert same_bits(q, nvfp4.quantize(w.to(triton_device), backend="triton"))
    assert torch.equal(q.dequantize(torch.float64), decode64(q))


def test_explicit_global_scale_saturates_finitely():
    w = torch.randn(4, 32)
    q = nvfp4.quantize(w, global_scale=float(w.abs().max()) / 2688 / 10)
    assert q.scales.float().max() == 448 and torch.isfinite(q.dequantize(torch.float32)).all()
    assert same_bits(q, nvfp4.quantize(w, global_scale=q.global_scale))


FINITE = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(w=hnp.arrays("float32", st.tuples(st.integers(1, 3), st.sampled_from([16, 32, 48])), elements=FINITE),
       scale=st.sampled_from([1e-20, 1.0, 1e20]))
# a float32-subnormal tensor (2.3e-41): with g's old floor 2**-126, (1/g)/s overflowed and every element encoded as 6
@example(w=np.full((1, 16), 2.2868497e-21, dtype=np.float32), scale=1e-20)
@example(w=np.array([[1e4] + [1e-16] * 15], dtype=np.float32), scale=1e-20)
def test_properties(w, scale):
    w = torch.from_numpy(w) * scale
    q = nvfp4.quantize(w, backend="reference")
    s = q.scales.float()
    assert ((s >= 2.0 ** -6) & (s <= 448)).all()
    codes = unpack(q.data)
    assert (codes < 16).all()
    # the sign of zero is kept: -0 (code 8) exactly for negative values (and -0.0) that round to 0
    assert torch.equal(codes == 8, ((codes & 7) == 0) & w.float().signbit())
    # |dequant - x| <= half the local E2M1 spacing, in units of the block's s * g
    unit = (s.double() * q.global_scale.double()).repeat_interleave(16, dim=-1)
    u = (w.double() / unit).abs()
    half_step = torch.where(u < 2, 0.25, torch.where(u < 4, 0.5, 1.0))
    err = (q.dequantize(torch.float64) - w.double()).abs()
    assert (err <= half_step * unit * (1 + 1e-6)).all()
    # idempotence with the same global scale
    assert same_bits(nvfp4.quantize(q.dequantize(torch.float32), global_scale=q.global_scale), q)


def _every_byte_and_scale():
    """Packed data holding every byte under every e4m3 scale byte (NaN scales included)."""
    data = torch.arange(256, dtype=torch.uint8).repeat(256, 1)             # (256, 256): K = 512
    scales = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 32).contiguous()
    return data, scales.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", LOW)
def test_scaled_values_in_low_precision_equal_the_float32_decode(dtype):
    from elastic_kernels.formats.nvfp4 import scaled_values
    data, scales = _every_byte_and_scale()
    low = scaled_values(data, scales, dtype)              # one lookup in the (scale, byte) table
    ref = scaled_values(data, scales, torch.float32)      # lookup, then the multiply
    assert torch.equal(low.isnan(), ref.isnan())
    fin = ~ref.isnan()
    assert torch.equal(low[fin].view(torch.int16), ref[fin].to(dtype).view(torch.int16))  # exact, -0 kept


@pytest.mark.parametrize("dtype", LOW)
def test_table_lookup_equals_dequantize(dtype):
    from elastic_kernels.formats.nvfp4 import dequantize, dequantize_table, lookup_scaled
    data, scales = _every_byte_and_scale()
    g = torch.tensor(3.7e-3)
    got = lookup_scaled(data, scales, dequantize_table(g, dtype), dtype)
    want = dequantize(data, scales, g, dtype)
    fin = ~want.isnan()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[fin].view(torch.int16), want[fin].view(torch.int16))
    q = nvfp4.quantize(torch.randn(3, 40, 96))
    sl = q[1, 3:20, 16:80]
    assert torch.equal(lookup_scaled(sl.data, sl.scales, dequantize_table(sl.global_scale, dtype), dtype),
                       sl.dequantize(dtype))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        dequantize_table(sl.global_scale, torch.float32)


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [2, 17])
def test_bf16_prefill_is_bf16_linear_on_the_dequantized_weight(m, with_bias, act_quant):
    """The reference's bf16 path (M > 1): bit for bit bf16 ``F.linear`` on the weight dequantized
    to bf16 and the bias in bf16 (W4A4: on the dequantized activation too)."""
    from elastic_kernels.reference.nvfp4 import activation_scaled_reference
    q = nvfp4.quantize(torch.randn(70, 96))[3:60, 16:96]   # a nested slice
    x = torch.randn(m, 80).bfloat16()
    bias = torch.randn(57) if with_bias else None
    y = ek.nvfp4_linear(x, q, bias, act_quant=act_quant, backend="reference")
    xin = x
    if act_quant:
        xs, gx = activation_scaled_reference(x)
        xin = (xs * gx).bfloat16()
    want = torch.nn.functional.linear(xin, q.dequantize(torch.bfloat16), None if bias is None else bias.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
def test_reference_linear_tiles(monkeypatch, m, dtype):
    """Decoded a few rows at a time (a ragged last tile, a nested slice) the reference linear
    is as close to the float64 truth as in one tile."""
    import elastic_kernels.reference.nvfp4 as ref
    q = nvfp4.quantize(torch.randn(70, 96))[3:60, 16:96]   # (57, 80): rows of 40 bytes
    x = torch.randn(m, 80).to(dtype)
    bias = torch.randn(57)
    one = ek.nvfp4_linear(x, q, bias, backend="reference")
    monkeypatch.setattr(ref, "_TILE_BYTES", 4 * 80 * 5)                 # 5 rows a tile: 12 tiles
    tiled = ek.nvfp4_linear(x, q, bias, backend="reference")
    truth = x.double() @ q.dequantize(torch.float64).T + bias.double()
    same = torch.nn.functional.linear(x, q.dequantize(dtype), bias.to(dtype))
    for name, y in (("one tile", one), ("tiled", tiled)):
        assert y.shape == (m, 57) and y.dtype == dtype
        assert_close_to_truth(y, truth, same, dtype, name=name)


def test_scaled_values_into_a_buffer():
    from elastic_kernels.formats.nvfp4 import scaled_values
    data, scales = _every_byte_and_scale()
    buf = torch.full((256 * 512,), 7.0)
    got = scaled_values(data, scales, out=buf)
    want = scaled_values(data, scales)
    assert got.shape == want.shape and got.data_ptr() == buf.data_ptr()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    for bad in (torch.empty(256 * 511), torch.empty(256 * 512, dtype=torch.float64), torch.empty(512, 512).T):
        with pytest.raises(ValueError, match="out must be"):
            scaled_values(data, scales, out=bad)
    with pytest.raises(ValueError, match="out must be"):
        scaled_values(data, scales, torch.bfloat16, out=buf)


# ---- acceptance 2: nested slicing ----------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(40, 96), (17, 48), (1, 16), (40, 32)])
def test_nested_slice_views(triton_device, n, k):
    q = nvfp4.quantize(torch.randn(40, 96))
    for sl in (q[..., :n, :k], q[:n, :k], q.narrow_nested(out_features=n, in_features=k)):
        assert sl.shape == (n, k)
        assert torch.equal(sl.dequantize(torch.float32), q.dequantize(torch.float32)[:n, :k])
        assert sl.data.untyped_storage().data_ptr() == q.data.untyped_storage().data_ptr()
        assert sl.scales.untyped_storage().data_ptr() == q.scales.untyped_storage().data_ptr()
    x = torch.randn(5, k, dtype=torch.bfloat16)
    truth = x.double() @ sl.dequantize(torch.float64).T
    same = x @ sl.dequantize(torch.bfloat16).T
    for be, dev in (("reference", "cpu"), ("triton", triton_device)):
        y = ek.nvfp4_linear(x.to(dev), sl.to(dev) if be == "triton" else sl, backend=be)
        assert_close_to_truth(y.cpu(), truth, same, torch.bfloat16, name=be)


def test_offset_and_expert_slices():
    w = torch.randn(2, 24, 64)
    q = nvfp4.quantize(w)
    sl = q[1, 3:20, 16:48]
    assert sl.shape == (17, 32) and sl.global_scale.shape == ()
    assert torch.equal(sl.dequantize(torch.float32), q.dequantize(torch.float32)[1, 3:20, 16:48])
    sl2 = q[1:, :5]
    assert sl2.shape == (1, 5, 64) and torch.equal(sl2.global_scale, q.global_scale[1:])
    assert sl.data.untyped_storage().data_ptr() == q.data.untyped_storage().data_ptr()


# ---- acceptance 3: nvfp4_linear -----------------------------------------------------------------

def _linear_case(m, n, k, dtype, bias):
    q = nvfp4.quantize(torch.randn(n, k))
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    truth = x.double() @ q.dequantize(torch.float64).T + (b.double() if bias else 0)
    same = x @ q.dequantize(dtype).T + (b if bias else 0)
    return q, x, b, truth, same


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("m,n,k", [(1, 37, 64), (7, 70, 96), (129, 37, 48)])
def test_linear_reference_and_triton(triton_device, m, n, k, dtype):
    q, x, b, truth, same = _linear_case(m, n, k, dtype, bias=(m == 7))
    y = ek.nvfp4_linear(x, q, b, backend="reference")
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close_to_truth(y, truth, same, dtype, name="reference")
    qd = q.to(triton_device)
    y = ek.nvfp4_linear(x.to(triton_device), qd, b.to(triton_device) if b is not None else None, backend="triton")
    assert_close_to_truth(y.cpu(), truth, same, dtype, name="triton")


def test_linear_leading_dims_fp32_and_empty(triton_device):
    q = nvfp4.quantize(torch.randn(9, 32))
    x = torch.randn(2, 3, 32)
    truth = x.double() @ q.dequantize(torch.float64).T
    for be, dev in (("reference", "cpu"), ("triton", triton_device)):
        y = ek.nvfp4_linear(x.to(dev), q.to(dev), backend=be).cpu()
        assert_close_to_truth(y, truth, x @ q.dequantize(torch.float32).T, torch.float32, name=be)
        assert ek.nvfp4_linear(x[:0].to(dev), q.to(dev), backend=be).shape == (0, 3, 9)


@pytest.mark.parametrize("dtype", LOW)
def test_w4a4_quantized_inputs_bit_exact(triton_device, dtype):
    from elastic_kernels.reference.nvfp4 import activation_scaled_reference
    from elastic_kernels.triton import nvfp4 as tnv
    q = nvfp4.quantize(torch.randn(37, 64))
    x = (torch.randn(7, 64) * torch.logspace(-3, 3, 64)).to(dtype)
    xq = ek.fake_quant_nvfp4(x, backend="reference")
    assert torch.equal(xq, nvfp4.quantize(x).dequantize(dtype))
    assert torch.equal(ek.fake_quant_nvfp4(x.to(triton_device), backend="triton").cpu(), xq)
    xs, gx = activation_scaled_reference(x)
    assert torch.equal(tnv.scaled_activation(x.to(triton_device), gx.reshape(1).to(triton_device)).cpu(),
                       xs.to(dtype))
    xq64 = nvfp4.quantize(x).dequantize(torch.float64)
    truth = xq64 @ q.dequantize(torch.float64).T
    same = xq @ q.dequantize(dtype).T
    for be, dev in (("reference", "cpu"), ("triton", triton_device)):
        y = ek.nvfp4_linear(x.to(dev), q.to(dev), act_quant=True, backend=be)
        assert_close_to_truth(y.cpu(), truth, same, dtype, name=be)


def test_linear_gradients():
    q = nvfp4.quantize(torch.randn(11, 32))
    x = torch.randn(5, 32, dtype=torch.float64).float().requires_grad_()
    b = torch.randn(11).requires_grad_()
    gy = torch.randn(5, 11)
    for aq in (False, True):
        y = ek.nvfp4_linear(x, q, b, act_quant=aq)
        gx, gb = torch.autograd.grad(y, (x, b), gy)
        w64 = q.dequantize(torch.float64)
        assert torch.allclose(gx.double(), gy.double() @ w64, rtol=1e-5, atol=1e-5)
        assert torch.allclose(gb, gy.sum(0), rtol=1e-5, atol=1e-5)


# ---- acceptance 4: fake quantization ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_fake_quant_nvfp4_forward_and_ste(triton_device, dtype):
    x = torch.randn(3, 5, 32).to(dtype)
    want = nvfp4.quantize(x.reshape(15, 32)).dequantize(dtype).reshape(x.shape)
    gy = torch.randn_like(x)
    for be, dev in (("reference", "cpu"), ("triton", triton_device)):
        xl = x.to(dev).requires_grad_()
        y = ek.fake_quant_nvfp4(xl, backend=be)
        assert torch.equal(y.detach().cpu(), want)
        (gx,) = torch.autograd.grad(y, xl, gy.to(dev))
        assert torch.equal(gx.cpu(), gy)
    g = torch.tensor(0.01)
    assert torch.equal(ek.fake_quant_nvfp4(x, global_scale=g),
                       nvfp4.quantize(x.reshape(15, 32), global_scale=g).dequantize(dtype).reshape(x.shape))


def test_fake_quant_nonfinite_documented():
    x = torch.randn(2, 16)
    x[0, 3] = float("inf")
    assert torch.isnan(ek.fake_quant_nvfp4(x, backend="reference")).all()


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_fake_quant_fp8(dtype):
    x = (torch.randn(6, 7) * 3).to(dtype).requires_grad_()
    y = ek.fake_quant_fp8(x)
    scale = x.detach().float().abs().max() / 448
    want = ((x.detach().float() / scale).to(torch.float8_e4m3fn).float() * scale).to(dtype)
    assert torch.equal(y.detach(), want)
    gy = torch.randn_like(x)
    assert torch.equal(torch.autograd.grad(y, x, gy)[0], gy)
    assert torch.equal(ek.fake_quant_fp8(torch.zeros(3, dtype=dtype)), torch.zeros(3, dtype=dtype))
    assert torch.equal(ek.fake_quant_fp8(x.detach(), scale=1.0),
                       x.detach().float().clamp(-448, 448).to(torch.float8_e4m3fn).float().to(dtype))


def test_opcheck():
    opsmod = torch.ops.elastic_kernels
    w = torch.randn(9, 32)
    q = nvfp4.quantize(w)
    x = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    g = q.global_scale
    torch.library.opcheck(opsmod.nvfp4_quantize.default, (w, g, "reference"))
    torch.library.opcheck(opsmod.fake_quant_nvfp4.default, (x, g, "reference"))
    torch.library.opcheck(opsmod.fake_quant_fp8.default, (x, torch.tensor(0.01)))
    for aq in (False, True):
        torch.library.opcheck(opsmod.nvfp4_linear.default, (x, q.data, q.scales.view(torch.uint8), g, b, aq, "reference"))
    torch.library.opcheck(opsmod.nvfp4_linear.default, (x, q.data, q.scales.view(torch.uint8), g, None, False, "reference"))


def test_opcheck_triton(triton_device):
    opsmod = torch.ops.elastic_kernels
    q = nvfp4.quantize(torch.randn(9, 32)).to(triton_device)
    x = torch.randn(4, 32, device=triton_device, requires_grad=True)
    torch.library.opcheck(opsmod.nvfp4_linear.default, (x, q.data, q.scales.view(torch.uint8), q.global_scale, None, False, "triton"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(opsmod.fake_quant_nvfp4.default, (x, q.global_scale, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    q = nvfp4.quantize(torch.randn(12, 48))
    b = torch.randn(12)

    def f(x):
        h = ek.nvfp4_linear(ek.fake_quant_fp8(x), q, b, backend="reference")
        return ek.fake_quant_nvfp4(h[..., :0].new_zeros(x.shape) + x, backend="reference").sum() + h.sum()

    x = torch.randn(3, 48, requires_grad=True)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, want = cf(x), f(x)
    assert torch.allclose(out, want)
    assert torch.allclose(torch.autograd.grad(out, x)[0], torch.autograd.grad(want, x)[0])


# ---- serialization ----------------------------------------------------------------------------

def test_state_dict_roundtrip(tmp_path):
    q = nvfp4.quantize(torch.randn(20, 64))
    qe = nvfp4.quantize(torch.randn(2, 8, 32))
    f8 = quantize_fp8(torch.randn(6, 40))
    tensors = {"layers.0.proj.weight": q[:, :32], "layers.0.proj.bias": torch.randn(20), "experts.weight": qe,
               "fp8.weight": f8[:4], "norm_scale": torch.randn(3)}
    sd = nvfp4.pack_state_dict(tensors)
    assert sd["layers.0.proj.weight"].dtype == torch.uint8 and sd["layers.0.proj.weight_scale_2"].shape == ()
    assert sd["experts.weight_scale_2"].shape == (2,)
    assert sd["fp8.weight"].dtype == torch.float8_e4m3fn and sd["fp8.weight_scale"].shape == ()
    path = tmp_path / "model.safetensors"
    nvfp4.save_file(tensors, path)
    back = nvfp4.load_file(path)
    assert set(back) == set(tensors)
    assert same_bits(back["layers.0.proj.weight"], q[:, :32]) and same_bits(back["experts.weight"], qe)
    assert torch.equal(back["layers.0.proj.bias"], tensors["layers.0.proj.bias"])
    assert isinstance(back["fp8.weight"], FP8Tensor) and torch.equal(back["fp8.weight"].dequantize(torch.float32),
                                                                     f8.dequantize(torch.float32)[:4])
    assert torch.equal(back["norm_scale"], tensors["norm_scale"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_state_dict_errors(tmp_path):
    q = nvfp4.quantize(torch.randn(8, 32))
    sd = nvfp4.to_state_dict(q, "p.weight")
    with pytest.raises(ValueError, match="lacks"):
        nvfp4.from_state_dict({k: v for k, v in sd.items() if k != "p.weight_scale"}, "p.weight")
    with pytest.raises(ValueError, match="mismatched"):
        nvfp4.from_state_dict({**sd, "p.weight_scale": sd["p.weight_scale"][:, :1]}, "p.weight")
    with pytest.raises(TypeError, match="p.weight_scale must have dtype"):
        nvfp4.from_state_dict({**sd, "p.weight_scale": sd["p.weight_scale"].float()}, "p.weight")
    with pytest.raises(ValueError, match="positive"):
        nvfp4.from_state_dict({**sd, "p.weight_scale_2": torch.tensor(-1.0)}, "p.weight")
    f8 = nvfp4.to_state_dict(quantize_fp8(torch.randn(3, 5)), "f")
    with pytest.raises(ValueError, match="f_scale must be positive"):
        nvfp4.from_state_dict({**f8, "f_scale": torch.tensor(float("nan"))}, "f")
    with pytest.raises(ValueError, match="no matching 'p.weight_scale_2'"):
        nvfp4.unpack_state_dict({"p.weight": sd["p.weight"], "p.weight_scale": sd["p.weight_scale"]})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="cannot read"):
        nvfp4.load_file(bad)


# ---- acceptance 5: bad input ----------------------------------------------------------------------

def test_bad_inputs():
    w = torch.randn(8, 32)
    q = nvfp4.quantize(w)
    bad = [
        (ValueError, "multiple of 16", lambda: nvfp4.quantize(torch.randn(4, 20))),
        (TypeError, "w must have dtype", lambda: nvfp4.quantize(torch.ones(4, 16, dtype=torch.int32))),
        (ValueError, r"\(N, K\)", lambda: nvfp4.quantize(torch.randn(16))),
        (ValueError, "NaN or Inf", lambda: nvfp4.quantize(torch.full((2, 16), float("nan")))),
        (ValueError, "NaN or Inf", lambda: nvfp4.quantize(torch.full((2, 16), float("inf")))),
        (ValueError, "at least", lambda: nvfp4.quantize(w, global_scale=0.0)),
        (ValueError, r"at least 3.762e-37 \(2\*\*-121\)", lambda: nvfp4.quantize(w, global_scale=2.0 ** -122)),
        (ValueError, "global_scale must be", lambda: ek.fake_quant_nvfp4(w, global_scale=1e-38)),
        (ValueError, "global_scale must have shape", lambda: nvfp4.quantize(w, global_scale=torch.ones(2))),
        (ValueError, "multiples of 16", lambda: q[:, :24]),
        (ValueError, "multiples of 16", lambda: q[:, 8:]),
        (TypeError, "unit-step", lambda: q[:, ::2]),
        (TypeError, "row index", lambda: q[3]),
        (ValueError, "in_features", lambda: q.narrow_nested(in_features=8)),
        (ValueError, "out_features", lambda: q.narrow_nested(out_features=9)),
        (ValueError, "K=32", lambda: ek.nvfp4_linear(torch.randn(2, 16), q)),
        (TypeError, "x must have dtype", lambda: ek.nvfp4_linear(torch.ones(2, 32, dtype=torch.int64), q)),
        (TypeError, "NVFP4Tensor", lambda: ek.nvfp4_linear(torch.randn(2, 32), w)),
        (ValueError, "q\\[e\\]", lambda: ek.nvfp4_linear(torch.randn(2, 32), nvfp4.quantize(torch.randn(2, 8, 32)))),
        (ValueError, "bias must have shape", lambda: ek.nvfp4_linear(torch.randn(2, 32), q, torch.randn(7))),
        (TypeError, "act_quant", lambda: ek.nvfp4_linear(torch.randn(2, 32), q, act_quant=1)),
        (ValueError, "backend must be one of", lambda: ek.nvfp4_linear(torch.randn(2, 32), q, backend="tpu")),
        (RuntimeError, "CUDA tensors", lambda: ek.nvfp4_linear(torch.randn(2, 32), q, backend="cuda")),
        (ValueError, "multiple of 16", lambda: ek.fake_quant_nvfp4(torch.randn(3, 24))),
        (ValueError, "positive", lambda: ek.fake_quant_fp8(torch.randn(3), scale=-1.0)),
        (TypeError, "scales must have dtype", lambda: NVFP4Tensor(q.data, q.scales.float(), q.global_scale)),
        (ValueError, "scales has shape", lambda: NVFP4Tensor(q.data, q.scales[:, :1], q.global_scale)),
        (TypeError, "dequantize", lambda: q.dequantize(torch.int8)),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()


def test_bad_container_and_state_dict_inputs():
    q = nvfp4.quantize(torch.randn(8, 32))
    qe = nvfp4.quantize(torch.randn(2, 8, 32))
    sd = nvfp4.to_state_dict(q, "p.weight")
    bad = [
        (ValueError, "data must have shape", lambda: NVFP4Tensor(q.data[0], q.scales[0], q.global_scale)),
        (ValueError, "global_scale has shape", lambda: NVFP4Tensor(q.data, q.scales, torch.ones(1))),
        (ValueError, "contiguous along the last", lambda: NVFP4Tensor(q.data.T.contiguous().T, q.scales, q.global_scale)),
        (IndexError, "one Ellipsis", lambda: q[..., ...]),
        (IndexError, "too many indices", lambda: q[0, 0, :]),
        (IndexError, "too many indices", lambda: q[:, :, :]),
        (TypeError, "expert indices", lambda: qe[0.5]),
        (TypeError, "NVFP4Tensor", lambda: nvfp4.to_state_dict(3, "p")),
        (ValueError, "negative block scales", lambda: nvfp4.from_state_dict(
            {**sd, "p.weight_scale": (-sd["p.weight_scale"].float()).to(torch.float8_e4m3fn)}, "p.weight")),
        (ValueError, "collides", lambda: nvfp4.pack_state_dict({"p": q, "p_scale": torch.zeros(1)})),
        (TypeError, "must be a Tensor or a QuantizedTensor", lambda: nvfp4.pack_state_dict({"p.w": 3})),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
    # Model-Optimizer checkpoints may store the 2-d global scale as shape (1,)
    assert same_bits(nvfp4.from_state_dict({**sd, "p.weight_scale_2": sd["p.weight_scale_2"].reshape(1)}, "p.weight"), q)
    assert "shape=(8, 32)" in repr(q)


def test_empty_weight():
    q = nvfp4.quantize(torch.randn(0, 32))
    assert q.data.shape == (0, 16) and q.scales.shape == (0, 2) and float(q.global_scale) == 1.0
    assert ek.nvfp4_linear(torch.randn(3, 32), q).shape == (3, 0)
    q0, b = nvfp4.quantize(torch.randn(5, 0)), torch.randn(5)
    assert torch.equal(ek.nvfp4_linear(torch.randn(3, 0), q0, b), b.expand(3, 5))


def test_empty_activations(triton_device):
    for shape in ((0, 32), (4, 0), (2, 0, 16)):
        x = torch.randn(shape)
        for be, dev in (("reference", "cpu"), ("triton", triton_device)):
            assert ek.fake_quant_nvfp4(x.to(dev), backend=be).shape == shape
        assert ek.fake_quant_fp8(x).shape == shape


# ---- GPU (CUDA C++ backend; skipped without a GPU) -----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_cuda_quantize_bit_exact(cuda_device, kind, dtype):
    w = inputs(kind, (3, 50, 208), dtype)
    assert same_bits(nvfp4.quantize(w.to(cuda_device), backend="cuda"), nvfp4.quantize(w, backend="reference"))
    x = w.reshape(150, 208)
    assert torch.equal(ek.fake_quant_nvfp4(x.to(cuda_device), backend="cuda").cpu(),
                       ek.fake_quant_nvfp4(x, backend="reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("m,n,k", [(1, 37, 64), (4, 2688, 1856), (16, 70, 96), (129, 1856, 2688), (300, 130, 48)])
@pytest.mark.parametrize("act_quant", [False, True])
def test_cuda_linear(cuda_device, m, n, k, dtype, act_quant):
    q, x, b, truth, same = _linear_case(m, n, k, dtype, bias=True)
    if act_quant:
        truth = nvfp4.quantize(x).dequantize(torch.float64) @ q.dequantize(torch.float64).T + b.double()
        same = ek.fake_quant_nvfp4(x) @ q.dequantize(dtype).T + b
    qd = q.to(cuda_device)
    for be in ("cuda", "triton"):
        y = ek.nvfp4_linear(x.to(cuda_device), qd, b.to(cuda_device), act_quant=act_quant, backend=be)
        assert_close_to_truth(y.cpu(), truth, same, dtype, name=be)
    sl = qd[: n // 2 + 1, : (k // 32) * 16 or 16]
    xs = x[:, : sl.in_features].to(cuda_device)
    y = ek.nvfp4_linear(xs, sl, backend="cuda").cpu()
    sl_cpu = q[: n // 2 + 1, : sl.in_features]
    assert_close_to_truth(y, xs.cpu().double() @ sl_cpu.dequantize(torch.float64).T,
                          xs.cpu() @ sl_cpu.dequantize(dtype).T, dtype, name="cuda slice")



# ---- the weight protocol: format-generic linear, shared-scale containers, FP8 -------------------

def test_linear_dispatches_on_weight_type():
    from elastic_kernels.ops import linear
    x, w, b = torch.randn(3, 5, 32), torch.randn(7, 32), torch.randn(7)
    assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))
    q = nvfp4.quantize(w)
    assert torch.equal(linear(x, q, b), ek.nvfp4_linear(x, q, b))
    assert torch.equal(linear(x[..., :16], q[:4, :16]), ek.nvfp4_linear(x[..., :16], q[:4, :16]))
    with pytest.raises(TypeError, match="weight must be one of"):
        linear(x, quantize_fp8(w))


def test_shared_scale_container_slices_and_reshapes_like_a_tensor():
    """A 3-d weight with one global scale (the Mamba head projection) slices and regroups its
    leading dimensions as a dense weight does, zero-copy, equal to slicing the flat 2-d weight."""
    w = torch.randn(4, 3, 48)
    flat = nvfp4.quantize(w.reshape(12, 48))
    q = flat.reshape(4, 3, 48)
    assert q.shape == (4, 3, 48) and q.global_scale.shape == () and q.data.data_ptr() == flat.data.data_ptr()
    sub = q[:2, :, :32].reshape(6, 32)
    assert same_bits(sub, flat[:6, :32]) and sub.data.data_ptr() == flat.data.data_ptr()
    assert torch.equal(q.dequantize(torch.float32), flat.dequantize(torch.float32).reshape(4, 3, 48))
    assert same_bits(q[1], flat[3:6])
    qe = nvfp4.quantize(w)  # one scale per matrix: the leading dimension stays
    with pytest.raises(ValueError, match="keeps its leading dimensions"):
        qe.reshape(12, 48)
    with pytest.raises(ValueError, match="input features stay whole"):
        q.reshape(4, 144)


def test_fp8_container():
    w = torch.randn(6, 40) * 3
    f = quantize_fp8(w)
    assert torch.equal(f.dequantize(torch.float32), ek.fake_quant_fp8(w))
    assert torch.equal(f[:2, :8].dequantize(torch.float32), ek.fake_quant_fp8(w)[:2, :8])
    assert f.reshape(3, 2, 40).shape == (3, 2, 40) and f.nbytes == 6 * 40 + 4
    with pytest.raises(ValueError, match=r"scale must have shape \(\)"):
        FP8Tensor(f.codes, torch.ones(1))


def test_op_args_name_gradients():
    """Autograd of the ops addresses inputs by name; a gradient for a non-tensor or unknown
    input is an error, not a silent shift."""
    from elastic_kernels.ops import moe as moe_ops
    args = moe_ops._ARGS
    assert args.tensors[:6] == ("x", "topk_weights", "topk_ids", "w1", "w2", "w3")
    g = args.grads(x=1, w2=2)
    assert g[args.names.index("x")] == 1 and g[args.names.index("w2")] == 2 and sum(v is not None for v in g) == 2
    with pytest.raises(ValueError, match="not tensor inputs"):
        args.grads(backend=1)
