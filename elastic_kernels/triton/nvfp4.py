r"""Triton kernels for NVFP4: fused quantize / fake-quant, and the W4A16 GEMM.

Quantize (per block of 16 along K; every operation IEEE float32, divisions ``div_rn``, in the
order of docs/design.md §5 so the codes are bit-identical to :mod:`elastic_kernels.reference.nvfp4`)::

    s = e4m3_rne(clamp((block_amax / 6) / g, 2**-6, 448));   r = (1 / g) / s
    code = e2m1_rne(clamp(x * r, -6, 6))

The sign bit of a value that rounds to zero is kept (-0 is code 8). A block holding a NaN or
Inf (or a NaN ``g``) gets a NaN block scale (byte 0x7F: e4m3 has no Inf) and codes 0, so it
decodes to NaN; max and clamp are written to propagate NaN (docs/design.md §5).

Three outputs from one kernel (``MODE``): 0 packed codes + scale bytes; 1 the fake-quantized
value ``e2m1 * s * g`` (forward of fake quant; its backward is the identity, straight-through);
2 the exact ``e2m1 * s`` (W4A4 activations, the GEMM applies ``g_x`` in its epilogue).

GEMM: ``y = ((x @ (e2m1 * s_w).T) * g_w) [* g_x] + bias``. Each K step unpacks a (BN, BK) weight
tile and multiplies its block scales in registers (``nvfp4_tile``, also used by the grouped GEMMs
of :mod:`elastic_kernels.triton.moe`; ``e2m1 * s`` is exact in bf16/fp16), then ``tl.dot``
accumulates in float32. Backward (x): ``dx = (dy @ (e2m1 * s_w)) * g_w`` (in PyTorch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e2m1_value(codes):
    """float32 value of 4-bit codes (int32): magnitude lut4 = [0, 2, 4, 6, 8, 12, 16, 24] / 4."""
    mag = codes & 7
    e = mag >> 1
    sig = tl.where(e > 0, 2, 0) + (mag & 1)
    v = (sig << tl.maximum(e, 1)).to(tl.float32) * 0.25
    return tl.where((codes & 8) != 0, -v, v)


@triton.jit
def _e4m3_value(b):
    """float32 value of float8_e4m3fn bytes (int32 0..255; NaN bytes are not produced by quantize)."""
    e = (b >> 3) & 15
    m = b & 7
    v = tl.where(e == 0, m, (8 + m) << tl.maximum(e - 1, 0)).to(tl.float32) * 0.001953125  # 2**-9
    return tl.where((b & 128) != 0, -v, v)


@triton.jit
def nvfp4_tile(data_ptr, scales_ptr, r0, r_lim, s_dr, s_sr, c0, c_lim, BR: tl.constexpr, BC: tl.constexpr):
    """float32 ``e2m1 * s`` tile (BR, BC) of an NVFP4 matrix packed along its columns: rows
    ``r0 + [0, BR)``, columns ``c0 + [0, BC)`` (c0 and c_lim multiples of 16, BC of 16); 0 at
    rows >= r_lim or columns >= c_lim. s_dr / s_sr: row strides of the codes / the scale bytes."""
    NB: tl.constexpr = BC // 16
    rows = r0 + tl.arange(0, BR).to(tl.int64)
    rmask = rows < r_lim
    offs_h = c0 // 2 + tl.arange(0, BC // 2).to(tl.int64)
    p = tl.load(data_ptr + rows[:, None] * s_dr + offs_h[None, :],
                mask=rmask[:, None] & (offs_h < c_lim // 2)[None, :], other=0).to(tl.int32)
    codes = tl.reshape(tl.join(p & 15, p >> 4), (BR, BC))
    offs_s = c0 // 16 + tl.arange(0, NB).to(tl.int64)
    sb = tl.load(scales_ptr + rows[:, None] * s_sr + offs_s[None, :],
                 mask=rmask[:, None] & (offs_s < c_lim // 16)[None, :], other=0).to(tl.int32)
    return tl.reshape(tl.reshape(_e2m1_value(codes), (BR, NB, 16)) * _e4m3_value(sb)[:, :, None], (BR, BC))


@triton.jit
def _bf16_rne(v):
    """Round float32 to the nearest-even bfloat16 value (kept in float32; the cast is then exact).

    The GPU conversion already rounds to nearest even; the CPU interpreter truncates, so the
    rounding is spelled out to keep the backends bit-identical.
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # & ~0xFFFF
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN (``tl.max`` drops it), for the block amax."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_kernel(x_ptr, g_ptr, data_ptr, scales_ptr, out_ptr, R, K, rows_per_g,
                     stride_xr, stride_dr, stride_sr, stride_or,
                     MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    NB: tl.constexpr = BLOCK_K // 16
    pid_r = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    rmask = rows < R
    mask = rmask[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows // rows_per_g, mask=rmask, other=1.0)
    xb = tl.reshape(x, (BLOCK_R, NB, 16))
    bamax = tl.reduce(tl.abs(xb), 2, _max_nan)
    sf = tl.math.div_rn(tl.math.div_rn(bamax, 6.0), g[:, None])
    # a block with a NaN/Inf element (or a NaN g) gets a NaN scale: e4m3 has no Inf
    sf = tl.where(bamax == float("inf"), float("nan"), sf)
    sf = tl.minimum(tl.maximum(sf, 0.015625, propagate_nan=tl.PropagateNan.ALL), 448.0,
                    propagate_nan=tl.PropagateNan.ALL)
    nan_blk = sf != sf
    # round to e4m3 (3 mantissa bits, nearest-even); sf is a normal number in [2**-6, 448]
    bits = sf.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # & ~0xFFFFF
    sq = tl.where(nan_blk, float("nan"), bits.to(tl.float32, bitcast=True))
    r = tl.math.div_rn(tl.math.div_rn(1.0, g)[:, None], sq)
    v = tl.reshape(xb * r[:, :, None], (BLOCK_R, BLOCK_K))
    v = tl.minimum(tl.maximum(v, -6.0, propagate_nan=tl.PropagateNan.ALL), 6.0, propagate_nan=tl.PropagateNan.ALL)
    a = tl.abs(v)
    mag = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
           + (a > 5.0).to(tl.int32))
    # the sign bit is kept for values that round to 0 (-0 is code 8); NaN gives code 0
    codes = tl.where((v.to(tl.int32, bitcast=True) < 0) & (v == v), mag | 8, mag)
    if MODE == 0:
        pairs = tl.reshape(codes, (BLOCK_R, BLOCK_K // 2, 2))
        lo, hi = tl.split(pairs)
        packed = (lo | (hi << 4)).to(tl.uint8)
        hcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2).to(tl.int64)
        hmask = rmask[:, None] & (hcols < K // 2)[None, :]
        tl.store(data_ptr + rows[:, None] * stride_dr + hcols[None, :], packed, mask=hmask)
        sbyte = tl.where(nan_blk, 0x7F, ((((bits >> 23) & 255) - 120) << 3) | ((bits >> 20) & 7))
        scols = pid_k * NB + tl.arange(0, NB).to(tl.int64)
        smask = rmask[:, None] & (scols < K // 16)[None, :]
        tl.store(scales_ptr + rows[:, None] * stride_sr + scols[None, :], sbyte.to(tl.uint8), mask=smask)
    else:
        sv = tl.reshape(tl.reshape(_e2m1_value(codes), (BLOCK_R, NB, 16)) * sq[:, :, None], (BLOCK_R, BLOCK_K))
        if MODE == 1:
            sv = sv * g[:, None]
        if out_ptr.dtype.element_ty == tl.bfloat16:
            sv = _bf16_rne(sv)
        tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :],
                 sv.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_kernel(x_ptr, data_ptr, scales_ptr, g_ptr, gx_ptr, bias_ptr, y_ptr, M, N, K,
                   stride_xm, stride_dn, stride_sn, stride_ym, stride_b,
                   HAS_BIAS: tl.constexpr, HAS_GX: tl.constexpr, DOT_F32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mmask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = nvfp4_tile(data_ptr, scales_ptr, pid_n * BLOCK_N, N, stride_dn, stride_sn, k0, K, BLOCK_N, BLOCK_K)
        if DOT_F32:  # fp32 inputs, and the CPU interpreter (its bf16 dot is broken): exact products
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    y = acc * tl.load(g_ptr)
    if HAS_GX:
        y = y * tl.load(gx_ptr)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n * stride_b, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if y_ptr.dtype.element_ty == tl.bfloat16:
        y = _bf16_rne(y)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_config(k: int) -> dict:
    """Row and K block of the quantize kernel for K columns (K a multiple of 16): the one place
    they are chosen (compiled by :mod:`elastic_kernels.triton.aot`)."""
    return dict(BLOCK_R=16, BLOCK_K=64 if k >= 64 else 16 * triton.next_power_of_2(max(k // 16, 1)))


def _quantize_launch(x: torch.Tensor, g: torch.Tensor, rows_per_g: int, mode: int):
    x = _row_major(x)
    r, k = x.shape
    g = g.float().contiguous()
    cfg = quantize_config(k)
    data = scales = out = None
    if mode == 0:
        data = torch.empty((r, k // 2), dtype=torch.uint8, device=x.device)
        scales = torch.empty((r, k // 16), dtype=torch.float8_e4m3fn, device=x.device)
    else:
        out = torch.empty_like(x)
    if r and k:
        sc = scales.view(torch.uint8) if scales is not None else None
        grid = (triton.cdiv(r, cfg["BLOCK_R"]), triton.cdiv(k, cfg["BLOCK_K"]))
        _quantize_kernel[grid](x, g, data, sc, out, r, k, max(rows_per_g, 1), x.stride(0),
                               data.stride(0) if data is not None else 0,
                               sc.stride(0) if sc is not None else 0,
                               out.stride(0) if out is not None else 0,
                               MODE=mode, **cfg)
    return (data, scales) if mode == 0 else out


def quantize(x: torch.Tensor, g: torch.Tensor, rows_per_g: int):
    """x: (rows, K); g: (rows / rows_per_g,) float32 -> (data (rows, K/2) uint8, scales (rows, K/16) e4m3)."""
    return _quantize_launch(x, g, rows_per_g, 0)


def fake_quant(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x: (rows, K); g: (1,) -> dequantize(quantize(x)) as x.dtype."""
    return _quantize_launch(x, g, x.shape[0], 1)


def scaled_activation(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x: (M, K); g: (1,) -> the exact ``e2m1 * s`` of quantize(x) as x.dtype (W4A4 operand)."""
    return _quantize_launch(x, g, x.shape[0], 2)


def linear_config(m: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles, warps, stages and the exact-fp32 flag of the W4A16 GEMM for ``m`` rows of x: the one
    place they are chosen (the AOT report, :mod:`elastic_kernels.triton.aot`, compiles what this
    returns for GPU inputs).

    M <= 16 (decode: the weight bytes bound the time) takes 16-row tiles (``mma.sync``; a
    warp-group MMA needs 64 rows); fp32 x (IEEE dots, FMA loops) and the CPU interpreter (its
    bf16 dot is broken) multiply exact fp32 products (DOT_F32).
    """
    dot_f32 = dtype == torch.float32 or device.type == "cpu"
    return dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, BLOCK_K=32 if dtype == torch.float32 else 64,
                DOT_F32=dot_f32, num_warps=4, num_stages=3)


def linear(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, g: torch.Tensor,
           bias: torch.Tensor | None, gx: torch.Tensor | None) -> torch.Tensor:
    """x: (M, K); data: (N, K/2); scales: (N, K/16) (row strides free) -> y: (M, N) x.dtype."""
    x = _row_major(x)
    m, k = x.shape
    n = data.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = linear_config(m, x.dtype, x.device)
    g = g.float().reshape(1)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    sc = scales.view(torch.uint8)
    _linear_kernel[grid](x, data, sc, g, gx.float().reshape(1) if gx is not None else g,
                         bias if bias is not None else g, y, m, n, k,
                         x.stride(0), data.stride(0), sc.stride(0), y.stride(0),
                         bias.stride(0) if bias is not None else 0,
                         HAS_BIAS=bias is not None, HAS_GX=gx is not None, **cfg)
    return y
