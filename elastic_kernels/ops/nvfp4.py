"""NVFP4 ops: ``nvfp4_linear`` (W4A16 / emulated W4A4), ``fake_quant_nvfp4``, ``fake_quant_fp8``,
and the quantize op behind :func:`elastic_kernels.nvfp4.quantize`.

Validation, dispatch, torch.library registration (fake kernels, autograd). The math lives in
:mod:`elastic_kernels.reference.nvfp4` (reference backend, the recipe), :mod:`elastic_kernels.triton.nvfp4`
(Triton) and ``csrc/nvfp4.cu`` (CUDA quantize and tensor-core W4A16 GEMM).

Stacked expert weights ``(E, N, K)`` quantize with a per-expert global scale; the grouped MoE op
:func:`elastic_kernels.moe_experts` (:mod:`elastic_kernels.ops.moe`) takes them directly (W4A16),
and ``q[e]`` gives one expert's 2-d weight for :func:`nvfp4_linear`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .._dispatch import resolve_backend
from .._validation import check_tensor
from ..nvfp4 import BLOCK, NVFP4Tensor, resolve_global_scale
from ..reference import nvfp4 as ref

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("reference", "triton", "cuda")


def _check_x(op: str, name: str, x, device=None) -> None:
    check_tensor(op, name, x, dtypes=X_DTYPES, device=device)
    if x.dim() < 1 or x.shape[-1] % BLOCK:
        raise ValueError(f"{op}: {name}'s last dimension must be a multiple of 16, got shape {tuple(x.shape)}")


def _resolve(op: str, backend, x: Tensor) -> str:
    be = resolve_backend(op, backend, x.device, _BACKENDS)
    if be == "cuda":
        _ext.require_cuda_ext(op)
    return be


# ---------------------------------------------------------------------------------------------
# CUDA launch helpers (raw pointers, strides, stream)
# ---------------------------------------------------------------------------------------------

def _cuda_quantize(x: Tensor, g: Tensor, rows_per_g: int, mode: int):
    """mode 0: (data, scales); 1: fake-quantized values; 2: exact e2m1*s (see csrc/nvfp4.cu)."""
    C = _ext.require_cuda_ext("nvfp4")
    x = x if x.stride(-1) == 1 else x.contiguous()
    r, k = x.shape
    g = g.float().contiguous()
    a = C.Nvfp4QuantizeArgs()
    a.x, a.g = x.data_ptr(), g.data_ptr()
    a.rows, a.cols, a.rows_per_g, a.s_x = r, k, max(rows_per_g, 1), x.stride(0)
    a.dtype, a.mode, a.stream = _ext.DTYPE_CODES[x.dtype], mode, _ext.stream_handle(x.device)
    if mode == 0:
        data = torch.empty((r, k // 2), dtype=torch.uint8, device=x.device)
        scales = torch.empty((r, k // BLOCK), dtype=torch.float8_e4m3fn, device=x.device)
        a.data, a.scales, a.s_data, a.s_scales = data.data_ptr(), scales.data_ptr(), data.stride(0), scales.stride(0)
        C.nvfp4_quantize(a)
        return data, scales
    out = torch.empty_like(x)
    a.out, a.s_out = out.data_ptr(), out.stride(0)
    C.nvfp4_quantize(a)
    return out


def _cuda_linear(x: Tensor, data: Tensor, scales: Tensor, g: Tensor, bias: Optional[Tensor],
                 gx: Optional[Tensor]) -> Tensor:
    C = _ext.require_cuda_ext("nvfp4_linear")
    if x.stride(-1) != 1 or x.data_ptr() % 16 or x.stride(0) % 8:  # 16-byte row loads
        x = x.clone(memory_format=torch.contiguous_format)
    if data.data_ptr() % 8 or data.stride(0) % 8:  # 8-byte loads of 16 codes
        data = data.contiguous()
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


# ---------------------------------------------------------------------------------------------
# quantize (no gradient)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("elastic_kernels::nvfp4_quantize", mutates_args=())
def _quantize_op(w: Tensor, g: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """-> (data uint8, scale bytes uint8); custom ops carry e4m3 scales as their bytes."""
    *lead, n, k = w.shape
    if backend == "reference":
        data, scales = ref.quantize_reference(w, g)
        return data, scales.view(torch.uint8)
    rows = w.reshape(w.shape[:-1].numel(), k)
    if backend == "triton":
        from ..triton import nvfp4 as tnv
        data, scales = tnv.quantize(rows, g.reshape(-1), n)
    else:
        data, scales = _cuda_quantize(rows, g.reshape(-1), n, 0)
    return data.reshape(*lead, n, k // 2), scales.view(torch.uint8).reshape(*lead, n, k // BLOCK)


@_quantize_op.register_fake
def _(w, g, backend):
    *lead, n, k = w.shape
    return (w.new_empty((*lead, n, k // 2), dtype=torch.uint8),
            w.new_empty((*lead, n, k // BLOCK), dtype=torch.uint8))


def quantize_raw(w: Tensor, g: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Packed codes and block scales of validated ``w: (..., N, K)`` with decode scales ``g: (...)``."""
    be = _resolve("nvfp4.quantize", backend, w)
    data, scale_bytes = _quantize_op(w, g, be)
    return data, scale_bytes.view(torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------
# fake quantization (straight-through gradient)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("elastic_kernels::fake_quant_nvfp4", mutates_args=())
def _fake_nvfp4_op(x: Tensor, g: Tensor, backend: str) -> Tensor:
    if backend == "reference":
        return ref.fake_quant_nvfp4_reference(x, g)
    k = x.shape[-1]
    rows = x.reshape(x.shape[:-1].numel(), k)
    if backend == "triton":
        from ..triton import nvfp4 as tnv
        y = tnv.fake_quant(rows, g.reshape(1))
    else:
        y = _cuda_quantize(rows, g.reshape(1), rows.shape[0], 1)
    return y.reshape(x.shape)


@_fake_nvfp4_op.register_fake
def _(x, g, backend):
    return torch.empty_like(x)


def _ste_setup(ctx, inputs, output):
    """The straight-through estimator needs nothing from the forward."""


def _ste_nvfp4_backward(ctx, grad):
    return grad, None, None


_fake_nvfp4_op.register_autograd(_ste_nvfp4_backward, setup_context=_ste_setup)


def fake_quant_nvfp4(x: Tensor, *, global_scale: Tensor | float | None = None,
                     backend: str = "auto") -> Tensor:
    """``dequantize(quantize(x))`` with the NVFP4 recipe along the last dimension (QAD/QAT).

    Args:
        x: (..., K) fp32/fp16/bf16, K % 16 == 0; blocks of 16 along K.
        global_scale: decode scale ``g`` (float32 ``()`` or float); default ``amax(x) / 2688``
            over the whole tensor (computed without gradient).
        backend: "auto" | "reference" | "triton" | "cuda".
    Returns:
        like x. Gradient: straight-through (identity) for x.
    Non-finite inputs are not checked (hot path): they make the whole output NaN.
    """
    op = "fake_quant_nvfp4"
    _check_x(op, "x", x)
    g = resolve_global_scale(op, global_scale, (), x.device)
    if g is None:
        g = ref.global_scale_of(x.detach(), tuple(range(x.dim())))
    return _fake_nvfp4_op(x, g, _resolve(op, backend, x))


@torch.library.custom_op("elastic_kernels::fake_quant_fp8", mutates_args=())
def _fake_fp8_op(x: Tensor, scale: Tensor) -> Tensor:
    return ref.fake_quant_fp8_reference(x, scale)


@_fake_fp8_op.register_fake
def _(x, scale):
    return torch.empty_like(x)


def _ste_fp8_backward(ctx, grad):
    return grad, None


_fake_fp8_op.register_autograd(_ste_fp8_backward, setup_context=_ste_setup)


def fake_quant_fp8(x: Tensor, *, scale: Tensor | float | None = None) -> Tensor:
    """Per-tensor FP8 E4M3 fake quantization: ``e4m3(clamp(x / scale, ±448)) * scale`` (RNE).

    Args:
        x: any shape, fp32/fp16/bf16. scale: float32 ``()`` or float, positive; default
            ``amax(x) / 448`` (1 for an all-zero tensor), computed without gradient.
    Returns:
        like x. Gradient: straight-through (identity). Runs as PyTorch ops on any device.
    """
    op = "fake_quant_fp8"
    check_tensor(op, "x", x, dtypes=X_DTYPES)
    s = resolve_global_scale(op, scale, (), x.device)
    if s is None:
        s = ref.fp8_scale_of(x.detach())
    return _fake_fp8_op(x, s)


# ---------------------------------------------------------------------------------------------
# nvfp4_linear
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("elastic_kernels::nvfp4_linear", mutates_args=())
def _linear_op(x: Tensor, data: Tensor, scales: Tensor, g: Tensor, bias: Optional[Tensor],
               act_quant: bool, backend: str) -> Tensor:
    """``scales`` are the e4m3 block scales' bytes (uint8)."""
    scales = scales.view(torch.float8_e4m3fn)
    if backend == "reference":
        return ref.nvfp4_linear_reference(x, data, scales, g, bias, act_quant)
    if backend == "triton":
        from ..triton import nvfp4 as tnv
        prequant, gemm = tnv.scaled_activation, tnv.linear
    else:
        prequant, gemm = (lambda t, gg: _cuda_quantize(t, gg, t.shape[0], 2)), _cuda_linear
    gx = None
    if act_quant:
        gx = ref.global_scale_of(x, (0, 1)).reshape(1)
        x = prequant(x, gx)
    return gemm(x, data, scales, g, bias, gx)


@_linear_op.register_fake
def _(x, data, scales, g, bias, act_quant, backend):
    return x.new_empty((x.shape[0], data.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, data, scales, g, bias, _, _ = inputs
    ctx.save_for_backward(data, scales, g)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx, grad_y):
    data, scales, g = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = ref.scaled_values(data, scales.view(torch.float8_e4m3fn))
        grad_x = ((grad_y.float() @ w) * g.float()).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        grad_bias = grad_y.float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def nvfp4_linear(x: Tensor, q: NVFP4Tensor, bias: Tensor | None = None, *, act_quant: bool = False,
                 backend: str = "auto") -> Tensor:
    r"""``y = x @ dequantize(q).T + bias`` with NVFP4 weights (W4A16), float32 accumulation.

    Args:
        x: (..., K) bf16/fp16 (fp32 on "reference"/"triton"), K == q.in_features.
        q: 2-d :class:`~elastic_kernels.nvfp4.NVFP4Tensor` (N, K), possibly a nested slice
            ``q[:n, :k]``; for stacked experts pass ``q[e]``.
        bias: (N,) float or None.
        act_quant: emulate W4A4: x is quantized per 16-block with the same recipe (global scale
            ``amax(x) / 2688`` per call) before the product; its gradient is straight-through.
        backend: "auto" | "reference" | "triton" | "cuda" (CUDA tensors default to Triton).
    Returns:
        y: (..., N) in x.dtype. Gradients flow to x and bias (q is frozen).

    Math: ``y = ((x @ (e2m1 * s).T) * g) + bias`` — the product with ``e2m1 * s`` (exact in
    bf16/fp16) accumulates in fp32 and ``g`` is applied once; ``dx = (dy @ (e2m1 * s)) * g``.
    """
    op = "nvfp4_linear"
    if not isinstance(q, NVFP4Tensor):
        raise TypeError(f"{op}: q must be an NVFP4Tensor (elastic_kernels.nvfp4.quantize), got {type(q).__name__}")
    if q.ndim != 2:
        raise ValueError(f"{op}: q must be a 2-d (N, K) weight, got shape {tuple(q.shape)}; "
                         f"index one expert of a stacked weight with q[e]")
    check_tensor(op, "x", x, dtypes=X_DTYPES, device=q.device)
    if x.dim() < 1 or x.shape[-1] != q.in_features:
        raise ValueError(f"{op}: x must have shape (..., K={q.in_features}) to match q {tuple(q.shape)}, "
                         f"got {tuple(x.shape)}")
    check_tensor(op, "bias", bias, dtypes=X_DTYPES, device=x.device, optional=True)
    if bias is not None and tuple(bias.shape) != (q.out_features,):
        raise ValueError(f"{op}: bias must have shape (N={q.out_features},), got {tuple(bias.shape)}")
    if not isinstance(act_quant, bool):
        raise TypeError(f"{op}: act_quant must be a bool, got {type(act_quant).__name__}")
    be = _resolve(op, backend, x)
    if be == "cuda" and x.dtype == torch.float32:
        raise TypeError(f"{op}: backend 'cuda' needs bf16/fp16 x (tensor-core GEMM), got float32")
    k = x.shape[-1]
    y = _linear_op(x.reshape(x.shape[:-1].numel(), k), q.data, q.scales.view(torch.uint8), q.global_scale, bias, act_quant, be)
    return y.reshape(*x.shape[:-1], q.out_features)
