"""``moe_route`` and ``moe_experts``: elastic MoE routing and the sliced grouped-GEMM experts.

Validation, dispatch, torch.library registration (fake kernels, autograd). The math lives in
:mod:`elastic_kernels.reference.moe` (reference backend, the CPU path) and
:mod:`elastic_kernels.triton.moe` (grouped GEMM forward and backward).

Expert weights enter the kernels only as strided prefix views ``w[:E', :d']`` and are read in
exactly two kinds of places: the weight-tile loads of the Triton kernels and the per-expert
prefix matmuls of the reference. Quantized experts (:class:`elastic_kernels.formats.NVFP4Tensor`
stacked as ``(E, N, K)`` with a per-expert global scale, W4A16) decode at those places: w1/w3
``(E, F, hidden)`` slice their rows (d') freely; w2 ``(E, hidden, F)`` slices its input features,
so an NVFP4 w2 needs d' (and every per-token width) to be a multiple of 16. The custom ops cannot
take an NVFP4Tensor: each weight ``w`` travels as the arguments ``w`` (plain, or the uint8 codes),
``w_scale`` (the e4m3 block scales as uint8 bytes: opcheck cannot handle float8) and ``w_scale_2``
(the float32 per-expert global scales), the format's serialization names (None for a plain weight).
:func:`_weight_args` / :func:`_weight_from_args` convert by name, the op is called by keyword,
and autograd saves inputs and returns gradients by name (:class:`~elastic_kernels.ops._autograd.OpArgs`),
so no argument position is written down twice. Both backends take either kind of weight through
one code path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import Backends, lazy
from .._validation import (FLOAT_DTYPES, INT_DTYPES, Dims, can_read_values, check_choice, check_int,
                           check_tensor, check_width)
from ..formats import NVFP4Tensor
from ..formats.nvfp4 import BLOCK
from ..reference.moe import (ACTIVATIONS, SCORES, moe_experts_reference_bwd, moe_experts_reference_fwd,
                             moe_route_reference, saved_shape)
from ._autograd import OpArgs, custom_op, fake_grads, unpack_grads

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# moe_route
# ---------------------------------------------------------------------------------------------

def moe_route(router_logits: Tensor, top_k: int, *, num_experts_active: int | None = None,
              score: str = "softmax", renormalize: bool = True,
              correction_bias: Tensor | None = None,
              selection_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
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
        selection_mask: (tokens, E) bool; experts where it is False are never chosen (their
            logits still enter the softmax): group-limited routing masks whole groups with it.
            Every row must allow at least ``top_k`` active experts.
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
    check_tensor(op, "selection_mask", selection_mask, dtypes=(torch.bool,), device=router_logits.device,
                 optional=True)
    if selection_mask is not None:
        dims.check("selection_mask", selection_mask, ("tokens", "experts"))
        if selection_mask.numel() and can_read_values(selection_mask):
            fewest = int(selection_mask[:, :n_act].sum(-1).min())
            if fewest < top_k:
                raise ValueError(f"{op}: selection_mask must allow at least top_k ({top_k}) of the "
                                 f"{n_act} active experts in every row, got a row allowing {fewest}")
    return moe_route_reference(router_logits, top_k, n_act, score, renormalize, correction_bias, selection_mask)


# ---------------------------------------------------------------------------------------------
# moe_experts
# ---------------------------------------------------------------------------------------------

_WEIGHTS = ("w1", "w2", "w3")
_GRAD_INPUTS = ("x", "topk_weights", "w1", "w2", "w3", "channel_scale")  # the backward op's outputs, in order


def _weight_args(name: str, w) -> dict[str, Optional[Tensor]]:
    """The op arguments of one expert weight, named by the format's serialization suffixes:
    ``{name: w, name_scale: None, name_scale_2: None}`` for a plain (or absent) weight; for an
    NVFP4 weight the uint8 codes, the block scales as their bytes (uint8: opcheck cannot handle
    float8) and the per-expert global scales (float32)."""
    if isinstance(w, NVFP4Tensor):
        parts = {"": w.data, "_scale": w.scales.view(torch.uint8), "_scale_2": w.matrix_scales()}
    else:
        parts = dict.fromkeys(NVFP4Tensor.PARTS)
        parts[""] = w
    return {name + sfx: t for sfx, t in parts.items()}


def _weight_from_args(args: dict, name: str):
    """Inverse of :func:`_weight_args` on the op's named arguments: a tensor or an NVFP4Tensor."""
    if args[name + "_scale"] is None:
        return args[name]
    return NVFP4Tensor.from_parts({"": args[name], "_scale": args[name + "_scale"].view(torch.float8_e4m3fn),
                                   "_scale_2": args[name + "_scale_2"]})


def _experts_reference(x, topk_weights, topk_ids, w1, w2, w3, *, activation, num_active, width_int, width_t,
                       channel_scale):
    """(y, saved): ``saved`` holds the pre-activations the reference backward reuses."""
    return moe_experts_reference_fwd(x, topk_weights, topk_ids, w1, w2, w3, activation=activation,
                                     num_experts_active=num_active, width_int=width_int, width_t=width_t,
                                     channel_scale=channel_scale)


def _experts_vjp_reference(grad_y, x, topk_weights, topk_ids, w1, w2, w3, *, activation, num_active, width_int,
                           width_t, channel_scale, saved):
    """The reference's hand-written backward, gradients in :data:`_GRAD_INPUTS` order; quantized
    weights are constants (no gradient)."""
    return moe_experts_reference_bwd(grad_y, x, topk_weights, topk_ids, w1, w2, w3, activation=activation,
                                     num_experts_active=num_active, width_int=width_int, width_t=width_t,
                                     channel_scale=channel_scale, saved=saved)


_triton_fwd, _triton_bwd = lazy("triton.moe:moe_experts_fwd"), lazy("triton.moe:moe_experts_bwd")


def _experts_triton(*args, **kw):
    """Triton forward with the reference's outputs; it saves nothing (the backward recomputes)."""
    y = _triton_fwd(*args, **kw)
    return y, y.new_empty(0)


def _experts_vjp_triton(*args, saved, **kw):
    return _triton_bwd(*args, **kw)


_EXPERTS = Backends("moe_experts", dtypes={"triton": KERNEL_DTYPES}, reference=_experts_reference,
                    triton=_experts_triton)
_EXPERTS_VJP = Backends("moe_experts", reference=_experts_vjp_reference, triton=_experts_vjp_triton)


def _run(table: Backends, args: dict, *lead: Tensor, **extra):
    """Call ``table``'s backend ``args["backend"]`` on the op's named arguments."""
    w = {n: _weight_from_args(args, n) for n in _WEIGHTS}
    return table[args["backend"]](*lead, args["x"], args["topk_weights"], args["topk_ids"], w["w1"], w["w2"],
                                  w["w3"], activation=args["activation"], num_active=args["num_active"],
                                  width_int=args["width_int"], width_t=args["width_t"],
                                  channel_scale=args["channel_scale"], **extra)


def _moe_experts(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w1: Tensor, w2: Tensor,
                 w3: Optional[Tensor], w1_scale: Optional[Tensor], w2_scale: Optional[Tensor],
                 w3_scale: Optional[Tensor], w1_scale_2: Optional[Tensor], w2_scale_2: Optional[Tensor],
                 w3_scale_2: Optional[Tensor], channel_scale: Optional[Tensor], width_t: Optional[Tensor],
                 activation: str, num_active: int, width_int: int, backend: str) -> tuple[Tensor, Tensor]:
    """``w*_scale`` / ``w*_scale_2`` are None for plain weights (see :func:`_weight_args`).
    Returns (y, saved); ``saved`` is what the reference backward reuses (empty for Triton)."""
    y, saved = _run(_EXPERTS, dict(locals()))  # the op's inputs by name
    return y, saved


def _moe_experts_backward(grad_y: Tensor, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w1: Tensor,
                          w2: Tensor, w3: Optional[Tensor], w1_scale: Optional[Tensor], w2_scale: Optional[Tensor],
                          w3_scale: Optional[Tensor], w1_scale_2: Optional[Tensor], w2_scale_2: Optional[Tensor],
                          w3_scale_2: Optional[Tensor], channel_scale: Optional[Tensor], width_t: Optional[Tensor],
                          saved: Tensor, activation: str, num_active: int, width_int: int,
                          backend: str) -> list[Tensor]:
    """Gradients of :data:`_GRAD_INPUTS` (empty for absent inputs and for NVFP4 weights, which are
    frozen: their codes are uint8); ``saved`` is the forward's second output."""
    args = dict(locals())  # the op's inputs by name
    grads = _run(_EXPERTS_VJP, args, args.pop("grad_y"), saved=args.pop("saved"))
    return [g if g is not None else torch.empty(0, device=x.device) for g in grads]


_moe_experts_op = custom_op("elastic_kernels::moe_experts", _moe_experts, mutates_args=())
_moe_experts_bwd_op = custom_op("elastic_kernels::moe_experts_backward", _moe_experts_backward,
                                              mutates_args=())
_ARGS, _BWD_ARGS = OpArgs(_moe_experts), OpArgs(_moe_experts_backward)


@_moe_experts_op.register_fake
def _(*args, **kwargs):
    a = _ARGS.bind(*args, **kwargs)
    x = a["x"]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if a["backend"] == "triton":
        return y, x.new_empty(0)
    shape = saved_shape(x.shape[0], a["topk_ids"].shape[1], a["w1"].shape[1], a["width_int"],
                        a["width_t"] is not None, a["w3"] is not None)
    return y, x.new_empty(shape)


@_moe_experts_bwd_op.register_fake
def _(*args, **kwargs):
    a = _BWD_ARGS.bind(*args, **kwargs)
    return fake_grads([a[n] for n in _GRAD_INPUTS], a["x"].device)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    named = _ARGS.bind(*inputs)
    ctx.save_for_backward(*(named[n] for n in _ARGS.tensors), output[1])
    ctx.op_scalars = {n: v for n, v in named.items() if n not in _ARGS.tensors}


def _backward(ctx, grad_y, _grad_saved):
    *inputs, saved = ctx.saved_tensors
    named = {**dict(zip(_ARGS.tensors, inputs)), **ctx.op_scalars}
    args = {n: named[n] for n in _ARGS.names}
    grads = _moe_experts_bwd_op(grad_y.contiguous(), saved=saved, **args)
    return _ARGS.grads(**dict(zip(_GRAD_INPUTS, unpack_grads(grads, [args[n] for n in _GRAD_INPUTS]))))


_moe_experts_op.register_autograd(_backward, setup_context=_setup_context)


def _check_ids(op: str, topk_ids: Tensor, n_exp: int, n_act: int) -> None:
    """Range of the expert ids (skipped where the host may not read device values)."""
    if not topk_ids.numel() or not can_read_values(topk_ids):
        return
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= n_exp:
        raise ValueError(f"{op}: topk_ids must lie in [0, E={n_exp}), got values in [{lo}, {hi}]")
    if hi >= n_act:
        raise ValueError(f"{op}: topk_ids must be < num_experts_active ({n_act}), got an id {hi}")


def moe_experts(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w1: Tensor | NVFP4Tensor,
                w2: Tensor | NVFP4Tensor, *, w3: Tensor | NVFP4Tensor | None = None, activation: str = "relu2",
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
            Each weight may instead be a stacked :class:`~elastic_kernels.formats.NVFP4Tensor` (the
            same shape, per-expert global scales; w3 quantized exactly when w1 is), W4A16: x
            stays in its dtype, products accumulate in fp32, and the Triton kernels decode the
            weight tiles inside the K loop (the reference decodes the prefix views it uses).
        activation: "relu2" (relu(v)^2), "silu" or "gelu" (exact erf form).
        num_experts_active: E' (None = E); only experts [0, E') are computed.
        ffn_width: None (F), an int d' in [0, F] (every expert keeps its first d' intermediate
            channels), or an int64 tensor (tokens,) of per-token widths; multiples of 16 when w2
            is NVFP4 (its input features slice at block boundaries).
        channel_scale: (F,) or (tokens, F) float soft scale multiplied into the intermediate
            activation; differentiable.
        backend: "auto" | "triton" | "reference" (docs/design.md §4).
    Returns:
        y: (tokens, hidden) in x's dtype.

    Weights are used through prefix views ``w[:E', :d']`` (no copies). Gradients flow to x,
    topk_weights, w1, w2, w3 and channel_scale; those of experts >= E' and of channels >= d'
    (or >= a token's width) are exactly 0. NVFP4 weights are frozen (no gradient; QAD trains
    high-precision weights through :func:`~elastic_kernels.fake_quant_nvfp4` instead). On CUDA
    the op does not synchronize with the host except for the value checks of
    ``topk_ids``/``ffn_width``, which are skipped while tracing, during CUDA graph capture and
    under ``torch.cuda.set_sync_debug_mode``.

    NaN/Inf (docs/design.md §5): a non-finite value in x[t] or topk_weights[t] makes exactly
    y[t] non-finite, one in an expert's weights the outputs that read it (of the tokens routed to
    that expert, within the width), identically on every backend (relu2 keeps NaN). Limitation: with per-token widths, a non-finite w2 channel past a
    token's own width (but below the widest token of its expert) may still reach that token,
    because the down product is shared by the expert's tokens.
    """
    op = "moe_experts"
    dims = Dims(op)
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    dev = x.device
    check_tensor(op, "topk_weights", topk_weights, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(op, "topk_ids", topk_ids, dtypes=INT_DTYPES, device=dev)
    for name, t in (("w1", w1), ("w2", w2), ("w3", w3)):
        if isinstance(t, NVFP4Tensor):
            if t.device != dev:
                raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {dev}")
        else:
            check_tensor(op, name, t, dtypes=(x.dtype,), device=dev, optional=name == "w3")
    if w3 is not None and isinstance(w3, NVFP4Tensor) != isinstance(w1, NVFP4Tensor):
        raise TypeError(f"{op}: w3 must be an NVFP4Tensor exactly when w1 is, got w1 {type(w1).__name__} "
                        f"and w3 {type(w3).__name__}")
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
    q2 = isinstance(w2, NVFP4Tensor)
    width_int, width_t = check_width(op, "ffn_width", ffn_width, full=ffn, batch=tokens, device=dev,
                                     multiple_of=BLOCK if q2 else 1,
                                     multiple_name="the NVFP4 block size of w2")
    _check_ids(op, topk_ids, n_exp, n_act)
    be = _EXPERTS.resolve(backend, dev, dtype=x.dtype)
    weights = {k: v for n, w in (("w1", w1), ("w2", w2), ("w3", w3)) for k, v in _weight_args(n, w).items()}
    y, _ = _moe_experts_op(x=x, topk_weights=topk_weights, topk_ids=topk_ids, **weights,
                           channel_scale=channel_scale, width_t=width_t, activation=activation, num_active=n_act,
                           width_int=width_int, backend=be)
    return y
