r"""Pure-PyTorch reference of the NVFP4 recipe (docs/design.md §5): the ground truth every backend matches
bit for bit, and the CPU path.

The recipe, with every step an IEEE float32 operation in exactly this order:

    amax = max |w|                        (over the tensor; over each expert for (E, N, K))
    g    = amax / 2688                    (2688 = 6 * 448; the per-tensor *decode* scale)
    s    = e4m3(clamp((block_amax / 6) / g, 2**-6, 448))    (per block of 16 along K, RNE)
    r    = (1 / g) / float(s)             (the block's *encode* multiplier)
    code = e2m1_rne(clamp(x * r, -6, 6))  (bit 3 = sign, bits 0..2 index {0,.5,1,1.5,2,3,4,6})
    value = e2m1(code) * float(s) * g     (decode; e2m1(code) * s is exact in fp32)

Conventions that make the recipe total (no inf/NaN for any finite input):

- **All-zero tensor** (``amax == 0``): ``g = 1``. Every block scale is then the clamp floor
  ``2**-6`` and every code 0, so the tensor decodes to exact zeros.
- **Tiny tensors**: ``g`` is clamped below at ``2**-121``, so ``r = (1/g)/s <= 2**127`` stays finite
  for every block scale ``s >= 2**-6``; it only matters when ``amax < 2688 * 2**-121 ≈ 1.0e-33``
  (1e-30 is unaffected). A caller's ``global_scale`` below ``2**-121`` is rejected.
- **Rounding to E2M1** is round-half-to-even on the code index: ties 0.25, 1.25, 2.5, 5 go down,
  ties 0.75, 1.75, 3.5 go up. The sign bit of a value that rounds to 0 is kept: -0 is code 8, as
  torchao's ``nvfp4_quantize`` and the hardware conversion ``cvt.rn.satfinite.e2m1x2`` write it
  (it decodes to -0.0), so the packed bytes are bit-exact with both.
- Clamping ``x * r`` to ±6 and the block scale to ≤ 448 only matters when a caller passes a
  ``global_scale`` smaller than ``amax / 2688`` (values then saturate).
- NaN/Inf inputs are rejected by :func:`elastic_kernels.nvfp4.quantize`; the fake-quant ops do
  not check (training hot path). A block holding a NaN or Inf gets a NaN block scale (e4m3 has no
  Inf) and codes 0, so its 16 outputs are NaN and the other blocks are unaffected; with the
  default global scale ``amax / 2688`` (NaN or Inf) every output is NaN.
"""
from __future__ import annotations

import torch

from .._memory import Scratch
from ..formats import fp8
from ..formats.nvfp4 import (BLOCK, E2M1_MAX, E4M3_MAX, SCALE_MIN, dequantize_table, e2m1_decode,
                             global_scale_of, lookup_scaled, pack, scaled_values)


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, sign in bit 3) of float32 ``v`` already clamped to [-6, 6] (RNE on the index)."""
    a = v.abs()
    mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
           + (a > 2.5) + (a >= 3.5) + (a > 5.0))
    neg = torch.signbit(v) & ~torch.isnan(v)   # -0 keeps its sign (code 8); NaN gives code 0
    return mag | (neg.to(torch.uint8) << 3)


def quantize_rows(x: torch.Tensor, g_rows: torch.Tensor):
    """Quantize rows with per-row decode scales.

    Args:
        x: (rows, K) any float dtype, K % 16 == 0, finite.
        g_rows: (rows,) float32 decode scale of each row's tensor.
    Returns:
        codes: (rows, K) uint8 (unpacked, sign in bit 3); scales: (rows, K/16) float8_e4m3fn.
    """
    rows, k = x.shape
    xb = x.float().reshape(rows, k // BLOCK, BLOCK)
    g = g_rows.float().reshape(rows, 1)
    bamax = xb.abs().amax(dim=-1) if xb.numel() else xb.new_zeros(rows, k // BLOCK)
    s = torch.clamp((bamax / E2M1_MAX) / g, min=SCALE_MIN, max=E4M3_MAX)
    s = torch.where(torch.isinf(bamax), torch.nan, s).to(torch.float8_e4m3fn)  # e4m3 has no Inf
    r = torch.reciprocal(g) / s.float()
    v = torch.clamp(xb * r[..., None], min=-E2M1_MAX, max=E2M1_MAX)
    return e2m1_round(v).reshape(rows, k), s


def quantize_reference(w: torch.Tensor, g: torch.Tensor):
    """Quantize ``w: (..., N, K)`` with decode scale ``g: w.shape[:-2]`` (float32).

    Returns ``(data (..., N, K/2) uint8, scales (..., N, K/16) float8_e4m3fn)``, contiguous
    whatever ``w``'s strides (elementwise ops keep a transposed input's layout).
    """
    *lead, n, k = w.shape
    g_rows = g.float().reshape(*lead, 1).expand(*lead, n).reshape(-1)
    codes, s = quantize_rows(w.reshape(w.shape[:-1].numel(), k), g_rows)
    return (pack(codes).reshape(*lead, n, k // 2).contiguous(),
            s.reshape(*lead, n, k // BLOCK).contiguous())


def fake_quant_nvfp4_reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``dequantize(quantize(x))`` of ``x: (..., K)`` with one decode scale ``g: ()``, in x.dtype."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    codes, s = quantize_rows(x.reshape(rows, k), g.float().reshape(1).expand(rows))
    sv = e2m1_decode(codes).reshape(rows, k // BLOCK, BLOCK) * s.float()[..., None]
    return (sv * g.float()).reshape(x.shape).to(x.dtype)


def activation_scaled_reference(x: torch.Tensor):
    """W4A4 activation quantization of ``x: (M, K)``: returns ``(e2m1(code) * s_x`` as float32,
    ``g_x)``, so that the quantized activation is their product."""
    g = global_scale_of(x, (0, 1))
    m, k = x.shape
    codes, s = quantize_rows(x, g.reshape(1).expand(m))
    sv = e2m1_decode(codes).reshape(m, k // BLOCK, BLOCK) * s.float()[..., None]
    return sv.reshape(m, k), g


# Rows of the weight decoded at a time by the reference linear: about this many bytes of the
# decoded tile (fp32, or bf16 for the bf16 GEMM of a prefill), written into memory the thread
# reuses call after call. Measured for the M=1 matvec at N=K=4096 (fp32 decode, one thread,
# AMD Zen 5, median of 11): 512 KiB tiles 9.7 ms (the Python and dispatch cost of 128 tiles),
# 1 MiB 8.6, 2-4 MiB 7.6-7.9, 8 MiB 8.0-8.4, 16 MiB 10-15 ms (the tile leaves the caches).
_TILE_BYTES = 1 << 22


def nvfp4_linear_reference(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, g: torch.Tensor,
                           bias: torch.Tensor | None, act_quant: bool) -> torch.Tensor:
    """``y = x @ dequantize(W).T + bias`` with float32 accumulation.

    x: (M, K); data: (N, K/2); scales: (N, K/16); g: (); bias: (N,) or None -> y: (M, N) x.dtype.
    Computed as ``((x @ (e2m1 * s).T) * g) + bias`` (W4A4: ``((xs @ ws.T) * g) * g_x``), which is
    how the kernels do it: the tensor-core operand ``e2m1 * s`` is exact in bf16/fp16. The weight
    is decoded a tile of rows at a time (about 4 MiB, into a reused buffer), never as a whole dense matrix.

    bf16 ``x`` with ``M > 1`` (a prefill, not a decode step) runs as bf16 ``F.linear`` does on the
    CPU, fp32 accumulation on AMX / AVX512-BF16 where the CPU has them (5x the fp32 GEMM on an
    AMX Xeon): on the weight dequantized to bf16 (``e2m1 * s * g`` rounded once, tile by tile) and
    the bias in bf16 (W4A4: the activation ``xs * g_x`` in bf16 too), the result rounded once, so
    its accuracy is that of ``F.linear`` on ``dequantize(W, torch.bfloat16)`` (the tests' same-
    precision reference), not that of the fp32 path. Every other case (fp32 / fp16 ``x``; M = 1,
    where the decode, not the product, is the cost) accumulates and scales in fp32 as above.
    """
    if x.dtype == torch.bfloat16 and x.shape[0] > 1:
        return _linear_bf16(x, data, scales, g, bias, act_quant)
    if act_quant:
        xs, gx = activation_scaled_reference(x)
    else:
        xs, gx = x.float(), None
    m, k = xs.shape
    n = data.shape[0]
    y = xs.new_empty(m, n)
    tile = max(1, min(n, _TILE_BYTES // max(4 * k, 1)))
    with Scratch(x.device) as scratch:
        buf = scratch.empty((tile, k), torch.float32)
        for r0 in range(0, n, tile):
            r1 = min(n, r0 + tile)
            w = scaled_values(data[r0:r1], scales[r0:r1], out=buf[:r1 - r0])
            if m == 1:
                torch.mv(w, xs[0], out=y[0, r0:r1])
            else:
                y[:, r0:r1] = xs @ w.T
    y = y * g.float()
    if gx is not None:
        y = y * gx
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _linear_bf16(x, data, scales, g, bias, act_quant):
    """The bf16 prefill of :func:`nvfp4_linear_reference`: ``F.linear`` in bf16 on weight tiles
    dequantized to bf16 (about ``_TILE_BYTES`` each)."""
    if act_quant:
        xs, gx = activation_scaled_reference(x)
        x = (xs * gx).to(torch.bfloat16)
    m, k = x.shape
    n = data.shape[0]
    b = None if bias is None else bias.to(torch.bfloat16)
    y = x.new_empty(m, n)
    tile = max(1, _TILE_BYTES // max(2 * k, 1))
    table = dequantize_table(g, torch.bfloat16)
    for r0 in range(0, n, tile):
        w = lookup_scaled(data[r0:r0 + tile], scales[r0:r0 + tile], table, torch.bfloat16)
        part = y[:, r0:r0 + tile]
        if b is None:
            torch.mm(x, w.T, out=part)
        else:
            torch.addmm(b[r0:r0 + tile], x, w.T, out=part)
    return y


def fake_quant_fp8_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor E4M3 fake quantization: ``e4m3(clamp(x / scale, ±448)) * scale`` in x.dtype."""
    return fp8.decode(fp8.encode(x, scale), scale.float(), x.dtype)
