"""NVFP4 launchers of ``csrc/nvfp4.cu``: quantize (codes, fake quantization, the exact W4A4
activation operand) and the tensor-core W4A16 GEMM. Same functions as
:mod:`elastic_kernels.triton.nvfp4`; the math is in :mod:`elastic_kernels.reference.nvfp4`."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..formats.nvfp4 import BLOCK

QUANTIZE_CODES, QUANTIZE_FAKE, QUANTIZE_SCALED = 0, 1, 2   # modes of nvfp4_quantize (csrc/nvfp4.cu)


def _quantize_launch(x: Tensor, g: Tensor, rows_per_g: int, mode: int):
    C = _ext.require_cuda_ext("nvfp4")
    x = x if x.stride(-1) == 1 else x.contiguous()
    r, k = x.shape
    g = g.float().contiguous()
    a = C.Nvfp4QuantizeArgs()
    a.x, a.g = x.data_ptr(), g.data_ptr()
    a.rows, a.cols, a.rows_per_g, a.s_x = r, k, max(rows_per_g, 1), x.stride(0)
    a.dtype, a.mode, a.stream = _ext.DTYPE_CODES[x.dtype], mode, _ext.stream_handle(x.device)
    if mode == QUANTIZE_CODES:
        data = torch.empty((r, k // 2), dtype=torch.uint8, device=x.device)
        scales = torch.empty((r, k // BLOCK), dtype=torch.float8_e4m3fn, device=x.device)
        a.data, a.scales, a.s_data, a.s_scales = data.data_ptr(), scales.data_ptr(), data.stride(0), scales.stride(0)
        C.nvfp4_quantize(a)
        return data, scales
    out = torch.empty_like(x)
    a.out, a.s_out = out.data_ptr(), out.stride(0)
    C.nvfp4_quantize(a)
    return out


def quantize(x: Tensor, g: Tensor, rows_per_g: int) -> tuple[Tensor, Tensor]:
    """x: (rows, K); g: (rows / rows_per_g,) float32 -> (data (rows, K/2) uint8, scales (rows, K/16) e4m3)."""
    return _quantize_launch(x, g, rows_per_g, QUANTIZE_CODES)


def fake_quant(x: Tensor, g: Tensor) -> Tensor:
    """x: (rows, K); g: (1,) -> dequantize(quantize(x)) as x.dtype."""
    return _quantize_launch(x, g, x.shape[0], QUANTIZE_FAKE)


def scaled_activation(x: Tensor, g: Tensor) -> Tensor:
    """x: (M, K); g: (1,) -> the exact ``e2m1 * s`` of quantize(x) as x.dtype (W4A4 operand)."""
    return _quantize_launch(x, g, x.shape[0], QUANTIZE_SCALED)


def linear(x: Tensor, data: Tensor, scales: Tensor, g: Tensor, bias: Tensor | None,
           gx: Tensor | None) -> Tensor:
    """x: (M, K) bf16/fp16; data: (N, K/2); scales: (N, K/16) (row strides free) -> y: (M, N) x.dtype."""
    C = _ext.require_cuda_ext("nvfp4_linear")
    if x.stride(-1) != 1 or x.data_ptr() % 16 or x.stride(0) % 8:  # 16-byte row loads
        x = x.clone(memory_format=torch.contiguous_format)
    if data.data_ptr() % 8 or data.stride(0) % 8:  # 8-byte loads of 16 codes
        data = data.clone(memory_format=torch.contiguous_format)  # contiguous() keeps a misaligned view
    m, k = x.shape
    n = data.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    g = g.float().reshape(1)
    bias = bias.float().contiguous() if bias is not None else None
    gx = gx.float().reshape(1) if gx is not None else None
    a = C.Nvfp4LinearArgs()
    a.x, a.data, a.scales, a.g, a.y = x.data_ptr(), data.data_ptr(), scales.data_ptr(), g.data_ptr(), y.data_ptr()
    a.gx = gx.data_ptr() if gx is not None else 0
    a.bias = bias.data_ptr() if bias is not None else 0
    a.M, a.N, a.K = m, n, k
    a.s_x, a.s_data, a.s_scales, a.s_y = x.stride(0), data.stride(0), scales.stride(0), y.stride(0)
    if m <= 16:  # split-K scratch for decode shapes (at most 16 partial sums per output)
        ws = torch.empty(16 * m * n, dtype=torch.float32, device=x.device)
        a.workspace, a.workspace_floats = ws.data_ptr(), ws.numel()
    a.dtype, a.stream = _ext.DTYPE_CODES[x.dtype], _ext.stream_handle(x.device)
    C.nvfp4_linear(a)
    return y
