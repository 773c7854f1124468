"""``moe_route`` and ``moe_experts``: elastic MoE routing and the sliced grouped-GEMM experts.

Validation, dispatch, torch.library registration (fake kernels, autograd). The math lives in
:mod:`elastic_kernels.reference.moe` (reference backend, the CPU path) and
:mod:`elastic_kernels.triton.moe` (grouped GEMM forward and backward).

Expert weights enter the kernels only as strided prefix views ``w[:E', :d']`` and are read in
exactly two kinds of places: the weight-tile loads of the Triton kernels and the per-expert
prefix matmuls of the reference. Quantized experts (:class:`elastic_kernels.nvfp4.NVFP4Tensor`
stacked as ``(E, N, K)`` with a per-expert global scale) fit behind the same op by decoding at
those places: w1/w3 ``(E, F, hidden)`` slice their rows (d') freely; w2 ``(E, hidden, F)`` slices
its input features, so NVFP4 w2 needs d' (and per-token widths) rounded up to multiples of 16.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import resolve_backend
from .._validation import (FLOAT_DTYPES, INT_DTYPES, Dims, _can_read_values, check_choice, check_int,
                           check_tensor, check_width)
from ..reference.moe import ACTIVATIONS, SCORES, moe_experts_reference, moe_route_reference
from ._autograd import fake_grads, reference_vjp, unpack_grads

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# moe_route
# ---------------------------------------------------------------------------------------------

def moe_route(router_logits: Tensor, top_k: int, *, num_experts_active: int | None = None,
              score: str = "softmax", renormalize: bool = True,
              correction_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k routing among the first ``num_experts_active`` experts (plain differentiable PyTorch).

    Args:
        router_logits: (tokens, E) float.
        top_k: experts per token, 1 <= top_k <= num_experts_active.
        num_experts_active: E' (None = E); experts >= E' are masked to -inf before top-k and
            are never chosen (and take no part in the softmax).
        score: "softmax" or "sigmoid".
        renormalize: divide the chosen weights by their sum.
        correction_bias: (E,) float added to the scores for the selection only
            (DeepSeek/Nemotron style); the weights are the unbiased scores.
    Returns:
        topk_weights: (tokens, top_k) float32 (float64 for float64 logits), differentiable in
        router_logits; topk_ids: (tokens, top_k) int64, all < E'.
    """
    op = "moe_route"
    dims = Dims(op)
    check_tensor(op, "router_logits", router_logits, dtypes=FLOAT_DTYPES)
    dims.check("router_logits", router_logits, ("tokens", "experts"))
    n_exp = dims["experts"]
    n_act = n_exp if num_experts_active is None else check_int(
        op, "num_experts_active", num_experts_active, min_value=1, max_value=n_exp)
    check_int(op, "top_k", top_k, min_value=1, max_value=n_act)
    check_choice(op, "score", score, SCORES)
    if not isinstance(renormalize, bool):
        raise TypeError(f"{op}: renormalize must be a bool, got {type(renormalize).__name__}")
    check_tensor(op, "correction_bias", correction_bias, dtypes=FLOAT_DTYPES, device=router_logits.device,
                 optional=True)
    if correction_bias is not None:
        dims.check("correction_bias", correction_bias, ("experts",))
    return moe_route_reference(router_logits, top_k, n_act, score, renormalize, correction_bias)


# ---------------------------------------------------------------------------------------------
# moe_experts
# ---------------------------------------------------------------------------------------------

def _experts_impl(x, topk_weights, topk_ids, w1, w2, w3, channel_scale, width_t, activation,
                  num_active, width_int, backend):
    if backend == "triton":
        from ..triton import moe as tmoe
        return tmoe.moe_experts_fwd(x, topk_weights, topk_ids, w1, w2, w3, activation=activation,
                                    num_active=num_active, width_int=width_int, width_t=width_t,
                                    channel_scale=channel_scale)
    return moe_experts_reference(x, topk_weights, topk_ids, w1, w2, w3, activation=activation,
                                 num_experts_active=num_active, width_int=width_int, width_t=width_t,
                                 channel_scale=channel_scale)


@torch.library.custom_op("elastic_kernels::moe_experts", mutates_args=())
def _moe_experts_op(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w1: Tensor, w2: Tensor,
                    w3: Optional[Tensor], channel_scale: Optional[Tensor], width_t: Optional[Tensor],
                    activation: str, num_active: int, width_int: int, backend: str) -> Tensor:
    return _experts_impl(x, topk_weights, topk_ids, w1, w2, w3, channel_scale, width_t, activation,
                         num_active, width_int, backend)


@_moe_experts_op.register_fake
def _(x, topk_weights, topk_ids, w1, w2, w3, channel_scale, width_t, activation, num_active, width_int,
      backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("elastic_kernels::moe_experts_backward", mutates_args=())
def _moe_experts_bwd_op(grad_y: Tensor, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w1: Tensor,
                        w2: Tensor, w3: Optional[Tensor], channel_scale: Optional[Tensor],
                        width_t: Optional[Tensor], activation: str, num_active: int, width_int: int,
                        backend: str) -> list[Tensor]:
    inputs = [x, topk_weights, w1, w2, w3, channel_scale]
    if backend == "triton":
        from ..triton import moe as tmoe
        grads = tmoe.moe_experts_bwd(grad_y, x, topk_weights, topk_ids, w1, w2, w3, activation=activation,
                                     num_active=num_active, width_int=width_int, width_t=width_t,
                                     channel_scale=channel_scale)
        return [g if g is not None else torch.empty(0, device=x.device) for g in grads]

    def fn(x, topk_weights, w1, w2, w3, channel_scale):
        return moe_experts_reference(x, topk_weights, topk_ids, w1, w2, w3, activation=activation,
                                     num_experts_active=num_active, width_int=width_int, width_t=width_t,
                                     channel_scale=channel_scale)
    return reference_vjp(fn, inputs, [grad_y])


@_moe_experts_bwd_op.register_fake
def _(grad_y, x, topk_weights, topk_ids, w1, w2, w3, channel_scale, *args):
    return fake_grads([x, topk_weights, w1, w2, w3, channel_scale], x.device)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.scalars = inputs[8:]


def _backward(ctx, grad_y):
    x, topk_weights, topk_ids, w1, w2, w3, channel_scale, width_t = ctx.saved_tensors
    grads = _moe_experts_bwd_op(grad_y.contiguous(), x, topk_weights, topk_ids, w1, w2, w3, channel_scale,
                                width_t, *ctx.scalars)
    gx, gw, g1, g2, g3, gs = unpack_grads(grads, [x, topk_weights, w1, w2, w3, channel_scale])
    return (gx, gw, None, g1, g2, g3, gs, None) + (None,) * len(ctx.scalars)


_moe_experts_op.register_autograd(_backward, setup_context=_setup_context)


def _check_ids(op: str, topk_ids: Tensor, n_exp: int, n_act: int) -> None:
    """Range of the expert ids (skipped where the host may not read device values)."""
    if not topk_ids.numel() or not _can_read_values(topk_ids):
        return
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= n_exp:
        raise ValueError(f"{op}: topk_ids must lie in [0, E={n_exp}), got values in [{lo}, {hi}]")
    if hi >= n_act:
        raise ValueError(f"{op}: topk_ids must be < num_experts_active ({n_act}), got an id {hi}")


def moe_experts(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w1: Tensor, w2: Tensor, *,
                w3: Tensor | None = None, activation: str = "relu2",
                num_experts_active: int | None = None, ffn_width: int | Tensor | None = None,
                channel_scale: Tensor | None = None, backend: str = "auto") -> Tensor:
    r"""Sliced MoE experts: ``y_t = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x_t)``.

    Args:
        x: (tokens, hidden) fp32/fp16/bf16 (fp64 on the reference backend).
        topk_weights: (tokens, top_k) float. topk_ids: (tokens, top_k) int32/int64, each in
            [0, num_experts_active) (see :func:`moe_route`).
        w1: (E, F, hidden), x's dtype: the up projection (the gate projection when w3 is given).
        w2: (E, hidden, F), x's dtype: the down projection.
        w3: (E, F, hidden) optional up projection of gated experts: a = act(x w1^T) * (x w3^T).
        activation: "relu2" (relu(v)^2), "silu" or "gelu" (exact erf form).
        num_experts_active: E' (None = E); only experts [0, E') are computed.
        ffn_width: None (F), an int d' in [0, F] (every expert keeps its first d' intermediate
            channels), or an int64 tensor (tokens,) of per-token widths.
        channel_scale: (F,) or (tokens, F) float soft scale multiplied into the intermediate
            activation; differentiable.
        backend: "auto" | "triton" | "reference" (DESIGN §4).
    Returns:
        y: (tokens, hidden) in x's dtype.

    Weights are used through prefix views ``w[:E', :d']`` (no copies). Gradients flow to x,
    topk_weights, w1, w2, w3 and channel_scale; those of experts >= E' and of channels >= d'
    (or >= a token's width) are exactly 0. On CUDA the op does not synchronize with the host
    except for the value checks of ``topk_ids``/``ffn_width``, which are skipped while tracing,
    during CUDA graph capture and under ``torch.cuda.set_sync_debug_mode``.
    """
    op = "moe_experts"
    dims = Dims(op)
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    dev = x.device
    check_tensor(op, "topk_weights", topk_weights, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(op, "topk_ids", topk_ids, dtypes=INT_DTYPES, device=dev)
    for name, t in (("w1", w1), ("w2", w2)):
        check_tensor(op, name, t, dtypes=(x.dtype,), device=dev)
    check_tensor(op, "w3", w3, dtypes=(x.dtype,), device=dev, optional=True)
    check_tensor(op, "channel_scale", channel_scale, dtypes=FLOAT_DTYPES, device=dev, optional=True)
    dims.check("x", x, ("tokens", "hidden"))
    dims.check("topk_weights", topk_weights, ("tokens", "top_k"))
    dims.check("topk_ids", topk_ids, ("tokens", "top_k"))
    dims.check("w1", w1, ("E", "F", "hidden"))
    dims.check("w2", w2, ("E", "hidden", "F"))
    if w3 is not None:
        dims.check("w3", w3, ("E", "F", "hidden"))
    if channel_scale is not None:
        dims.check("channel_scale", channel_scale, ("F",) if channel_scale.dim() == 1 else ("tokens", "F"))
    check_choice(op, "activation", activation, ACTIVATIONS)
    n_exp, ffn, tokens = dims["E"], dims["F"], dims["tokens"]
    if n_exp == 0:
        raise ValueError(f"{op}: w1 must hold at least one expert, got shape {tuple(w1.shape)}")
    n_act = n_exp if num_experts_active is None else check_int(
        op, "num_experts_active", num_experts_active, min_value=1, max_value=n_exp)
    width_int, width_t = check_width(op, "ffn_width", ffn_width, full=ffn, batch=tokens, device=dev)
    _check_ids(op, topk_ids, n_exp, n_act)
    be = resolve_backend(op, backend, dev, ("reference", "triton"))
    if be == "triton" and x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: backend 'triton' supports fp32/fp16/bf16 x, got {x.dtype}")
    return _moe_experts_op(x, topk_weights, topk_ids, w1, w2, w3, channel_scale, width_t, activation,
                           n_act, width_int, be)
