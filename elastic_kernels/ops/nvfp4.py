"""NVFP4 ops: ``quantize`` (behind :func:`elastic_kernels.nvfp4.quantize`), ``nvfp4_linear``
(W4A16 / emulated W4A4), ``fake_quant_nvfp4``, ``fake_quant_fp8``.

Validation, the backend tables, torch.library registration (fake kernels, autograd). The math
lives in :mod:`elastic_kernels.reference.nvfp4` (reference backend, the recipe),
:mod:`elastic_kernels.triton.nvfp4` (Triton) and ``csrc/nvfp4.cu`` (CUDA quantize and tensor-core
W4A16 GEMM, launched by :mod:`elastic_kernels.cuda.nvfp4`); the format by
:mod:`elastic_kernels.formats.nvfp4`.

Stacked expert weights ``(E, N, K)`` quantize with a per-expert global scale; the grouped MoE op
:func:`elastic_kernels.moe_experts` (:mod:`elastic_kernels.ops.moe`) takes them directly (W4A16),
and ``q[e]`` gives one expert's 2-d weight for :func:`nvfp4_linear`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .._dispatch import Backends, lazy
from .._validation import can_read_values, check_tensor
from ..cuda import nvfp4 as cuda_nvfp4
from ..formats.fp8 import fp8_scale_of
from ..formats.nvfp4 import BLOCK, WEIGHT_DTYPES, NVFP4Tensor, global_scale_of, resolve_global_scale, scaled_values
from ..reference import nvfp4 as ref
from ._autograd import custom_op

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_x(op: str, name: str, x, device=None) -> None:
    check_tensor(op, name, x, dtypes=X_DTYPES, device=device)
    if x.dim() < 1 or x.shape[-1] % BLOCK:
        raise ValueError(f"{op}: {name}'s last dimension must be a multiple of 16, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# backend tables (one signature per op; the Triton and CUDA kernels work on rows)
# ---------------------------------------------------------------------------------------------

def _weights_by_rows(quantize_rows: Callable) -> Callable:
    """Quantize ``w: (..., N, K)`` with decode scales ``g: (...)`` through a row kernel
    ``(rows (R, K), g (R / rows_per_g,), rows_per_g) -> (data, scales)``."""
    def run(w: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        *lead, n, k = w.shape
        data, scales = quantize_rows(w.reshape(w.shape[:-1].numel(), k), g.reshape(-1), n)
        return data.reshape(*lead, n, k // 2), scales.reshape(*lead, n, k // BLOCK)
    return run


def _tensor_by_rows(fake_quant_rows: Callable) -> Callable:
    """Fake-quantize ``x: (..., K)`` with one decode scale ``g: ()`` through a row kernel."""
    def run(x: Tensor, g: Tensor) -> Tensor:
        return fake_quant_rows(x.reshape(x.shape[:-1].numel(), x.shape[-1]), g.reshape(1)).reshape(x.shape)
    return run


def _w4a16(scaled_activation: Callable, gemm: Callable) -> Callable:
    """``nvfp4_linear`` from a backend's GEMM (and, for W4A4, its activation quantizer)."""
    def run(x: Tensor, data: Tensor, scales: Tensor, g: Tensor, bias: Optional[Tensor], act_quant: bool) -> Tensor:
        gx = None
        if act_quant:
            gx = global_scale_of(x, (0, 1)).reshape(1)
            x = scaled_activation(x, gx)
        return gemm(x, data, scales, g, bias, gx)
    return run


_QUANTIZE = Backends("nvfp4.quantize", reference=ref.quantize_reference,
                     triton=_weights_by_rows(lazy("triton.nvfp4:quantize")),
                     cuda=_weights_by_rows(cuda_nvfp4.quantize))
_FAKE_QUANT = Backends("fake_quant_nvfp4", reference=ref.fake_quant_nvfp4_reference,
                       triton=_tensor_by_rows(lazy("triton.nvfp4:fake_quant")),
                       cuda=_tensor_by_rows(cuda_nvfp4.fake_quant))
_LINEAR = Backends("nvfp4_linear", dtypes={"cuda": (torch.bfloat16, torch.float16)},  # tensor-core GEMM
                   reference=ref.nvfp4_linear_reference,
                   triton=_w4a16(lazy("triton.nvfp4:scaled_activation"), lazy("triton.nvfp4:linear")),
                   cuda=_w4a16(cuda_nvfp4.scaled_activation, cuda_nvfp4.linear))


# ---------------------------------------------------------------------------------------------
# quantize (no gradient)
# ---------------------------------------------------------------------------------------------

@custom_op("elastic_kernels::nvfp4_quantize", mutates_args=())
def _quantize_op(w: Tensor, g: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """-> (data uint8, scale bytes uint8); custom ops carry e4m3 scales as their bytes."""
    data, scales = _QUANTIZE[backend](w, g)
    return data, scales.view(torch.uint8)


@_quantize_op.register_fake
def _(w, g, backend):
    *lead, n, k = w.shape
    return (w.new_empty((*lead, n, k // 2), dtype=torch.uint8),
            w.new_empty((*lead, n, k // BLOCK), dtype=torch.uint8))


def quantize_raw(w: Tensor, g: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Packed codes and block scales of validated ``w: (..., N, K)`` with decode scales ``g: (...)``."""
    data, scale_bytes = _quantize_op(w, g, _QUANTIZE.resolve(backend, w.device))
    return data, scale_bytes.view(torch.float8_e4m3fn)


def quantize(w: Tensor, *, global_scale: Tensor | float | None = None, backend: str = "auto") -> NVFP4Tensor:
    """Quantize ``w: (N, K)`` or stacked experts ``(E, N, K)`` (fp32/fp16/bf16, K % 16 == 0).

    Args:
        global_scale: the decode scale ``g`` (float32 ``()`` or ``(E,)``, or a float), positive and
            finite; default ``amax / 2688`` per matrix (per expert), ``1`` for an all-zero matrix.
        backend: "auto" | "reference" | "triton" | "cuda".
    Returns:
        an :class:`~elastic_kernels.formats.NVFP4Tensor` (no gradient).
    Raises:
        ValueError if ``w`` holds NaN/Inf (checked outside tracing/graph capture).
    """
    op = "nvfp4.quantize"
    check_tensor(op, "w", w, dtypes=WEIGHT_DTYPES)
    if w.dim() not in (2, 3):
        raise ValueError(f"{op}: w must have shape (N, K) or (E, N, K), got {tuple(w.shape)}")
    if w.shape[-1] % BLOCK:
        raise ValueError(f"{op}: w's last dimension K ({w.shape[-1]}) must be a multiple of 16")
    if can_read_values(w) and w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{op}: w contains NaN or Inf; NVFP4 quantization needs finite values")
    g = resolve_global_scale(op, global_scale, tuple(w.shape[:-2]), w.device)
    if g is None:
        g = global_scale_of(w.detach(), (-2, -1))
    data, scales = _quantize_op(w.detach(), g, _QUANTIZE.resolve(backend, w.device, op))
    return NVFP4Tensor(data, scales.view(torch.float8_e4m3fn), g)


# ---------------------------------------------------------------------------------------------
# fake quantization (straight-through gradient)
# ---------------------------------------------------------------------------------------------

@custom_op("elastic_kernels::fake_quant_nvfp4", mutates_args=())
def _fake_nvfp4_op(x: Tensor, g: Tensor, backend: str) -> Tensor:
    return _FAKE_QUANT[backend](x, g)


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
    Non-finite inputs are not checked (hot path); every backend propagates them the same way
    (docs/design.md §5): a NaN/Inf element makes the 16 outputs of its block NaN (the block scale
    is NaN: e4m3 has no Inf), and with the default global scale (``amax(x) / 2688``, then NaN or
    Inf) every output is NaN. Negative values that round to zero give -0.0.
    """
    op = "fake_quant_nvfp4"
    _check_x(op, "x", x)
    g = resolve_global_scale(op, global_scale, (), x.device)
    if g is None:
        g = global_scale_of(x.detach(), tuple(range(x.dim())))
    return _fake_nvfp4_op(x, g, _FAKE_QUANT.resolve(backend, x.device))


@custom_op("elastic_kernels::fake_quant_fp8", mutates_args=())
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
    A NaN element gives NaN; with the default scale (then NaN or Inf) every output is NaN.
    """
    op = "fake_quant_fp8"
    check_tensor(op, "x", x, dtypes=X_DTYPES)
    s = resolve_global_scale(op, scale, (), x.device, minimum=0.0)
    if s is None:
        s = fp8_scale_of(x.detach())
    return _fake_fp8_op(x, s)


# ---------------------------------------------------------------------------------------------
# nvfp4_linear
# ---------------------------------------------------------------------------------------------

@custom_op("elastic_kernels::nvfp4_linear", mutates_args=())
def _linear_op(x: Tensor, data: Tensor, scales: Tensor, g: Tensor, bias: Optional[Tensor],
               act_quant: bool, backend: str) -> Tensor:
    """``scales`` are the e4m3 block scales' bytes (uint8)."""
    return _LINEAR[backend](x, data, scales.view(torch.float8_e4m3fn), g, bias, act_quant)


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
        w = scaled_values(data, scales.view(torch.float8_e4m3fn))
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
        q: 2-d :class:`~elastic_kernels.formats.NVFP4Tensor` (N, K), possibly a nested slice
            ``q[:n, :k]``; for stacked experts pass ``q[e]``.
        bias: (N,) float or None.
        act_quant: emulate W4A4: x is quantized per 16-block with the same recipe (global scale
            ``amax(x) / 2688`` per call) before the product; its gradient is straight-through.
        backend: "auto" | "reference" | "triton" | "cuda" (CUDA tensors default to Triton).
    Returns:
        y: (..., N) in x.dtype. Gradients flow to x and bias (q is frozen).

    Math: ``y = ((x @ (e2m1 * s).T) * g) + bias`` — the product with ``e2m1 * s`` (exact in
    bf16/fp16) accumulates in fp32 and ``g`` is applied once; ``dx = (dy @ (e2m1 * s)) * g``.
    The CPU reference with bf16 ``x`` of more than one row instead runs bf16 ``F.linear`` on the
    weight dequantized to bf16 (the CPU's bf16 GEMM, AMX where present; bit for bit
    ``F.linear(x, q.dequantize(torch.bfloat16), bias.bfloat16())``): see
    :func:`elastic_kernels.reference.nvfp4.nvfp4_linear_reference`.
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
    be = _LINEAR.resolve(backend, x.device, dtype=x.dtype)
    k = x.shape[-1]
    y = _linear_op(x.reshape(x.shape[:-1].numel(), k), q.data, q.scales.view(torch.uint8), q.global_scale,
                   bias, act_quant, be)
    return y.reshape(*x.shape[:-1], q.out_features)
