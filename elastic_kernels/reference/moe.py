r"""Pure-PyTorch reference of the elastic MoE: routing and the sliced experts (CPU path, test truth).

Routing (``router_logits: (tokens, E)``, the first ``E'`` experts active):

    softmax: p = softmax(logits masked to -inf for e >= E')      sigmoid: p = sigmoid(logits)
    selection score = p + correction_bias (bias used for selection only), -inf for e >= E'
                      and where the optional selection_mask is False
    topk_ids = top-k of the selection score;  topk_weights = p[topk_ids] (/ their sum if renormalize)

Experts (token t, slot j, expert e = topk_ids[t, j], width d'_t, first ``d'`` channels of F):

    h  = x_t . w1[e, :d']^T                      (d',)
    a  = act(h)  or  act(h) * (x_t . w3[e, :d']^T)   (gated when w3 is given)
    a  = a * channel_scale[:d'] (or channel_scale[t, :d']) * [c < d'_t]
    y_t = sum_j topk_weights[t, j] * (a . w2[e, :, :d']^T)

act: relu2 = relu(v)^2, silu = v sigmoid(v), gelu = 0.5 v (1 + erf(v / sqrt 2)).
Gradients come from autograd. Experts >= E' and channels >= d' take no part (zero gradients).

The reference sorts the (token, slot) pairs by expert and loops over the experts below E' that
received tokens, multiplying by prefix views ``w1[e, :d']`` (no weight copies). Per-token widths
compute at the largest width present and mask the intermediate. NVFP4 weights
(:class:`elastic_kernels.formats.NVFP4Tensor`, W4A16) decode only those prefix views, to x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import QuantizedTensor

ACTIVATIONS = ("relu2", "silu", "gelu")
SCORES = ("softmax", "sigmoid")


def activation_fn(v: torch.Tensor, activation: str) -> torch.Tensor:
    """The expert activation (``activation`` in :data:`ACTIVATIONS`)."""
    if activation == "relu2":
        return torch.relu(v).square()
    if activation == "silu":
        return F.silu(v)
    return F.gelu(v)


def expert_weight(w, e: int, rows: slice, cols: slice, dtype: torch.dtype) -> torch.Tensor:
    """Expert e's prefix view ``w[e, rows, cols]``; a quantized weight decodes only that view (to ``dtype``)."""
    v = w[e, rows, cols]
    return v.dequantize(dtype) if isinstance(v, QuantizedTensor) else v


def moe_route_reference(router_logits: torch.Tensor, top_k: int, num_experts_active: int,
                        score: str = "softmax", renormalize: bool = True,
                        correction_bias: torch.Tensor | None = None,
                        selection_mask: torch.Tensor | None = None):
    """Top-k routing among the first ``num_experts_active`` experts (differentiable in the logits).

    Args:
        router_logits: (tokens, E) float. correction_bias: (E,) float, selection only.
        selection_mask: (tokens, E) bool, experts that may be chosen (None: all).
    Returns:
        topk_weights: (tokens, top_k) float32 (float64 for float64 logits); topk_ids: (tokens, top_k) int64.
    """
    dtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    logits = router_logits.to(dtype)
    n_exp = logits.shape[-1]
    inactive = torch.arange(n_exp, device=logits.device) >= num_experts_active
    if score == "softmax":
        probs = torch.softmax(logits.masked_fill(inactive, float("-inf")), dim=-1)
    else:
        probs = torch.sigmoid(logits)
    select = probs.detach()
    if correction_bias is not None:
        select = select + correction_bias.to(dtype)
    select = select.masked_fill(inactive, float("-inf"))
    if selection_mask is not None:
        select = select.masked_fill(~selection_mask, float("-inf"))
    topk_ids = torch.topk(select, top_k, dim=-1).indices
    weights = probs.gather(-1, topk_ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return weights, topk_ids


def moe_experts_reference(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None = None, *,
                          activation: str = "relu2", num_experts_active: int | None = None,
                          width_int: int = -1, width_t: torch.Tensor | None = None,
                          channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The elastic experts; arguments as :func:`elastic_kernels.moe_experts` after validation.

    Args:
        x: (tokens, hidden); topk_weights: (tokens, top_k) float; topk_ids: (tokens, top_k) int,
            every id below ``num_experts_active``.
        w1: (E, F, hidden); w3: (E, F, hidden) or None; w2: (E, hidden, F); each a tensor of x's
            dtype or an :class:`~elastic_kernels.formats.NVFP4Tensor` (then d' % 16 == 0 for w2).
        width_int: d' (-1 for F); width_t: (tokens,) int64 per-token widths (then width_int is -1).
        channel_scale: (F,) or (tokens, F) float.
    Returns:
        y: (tokens, hidden) in x's dtype; the weighted sum is taken in the promoted dtype of
        x and topk_weights.
    """
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    n_exp, ffn = w1.shape[0], w1.shape[1]
    n_act = n_exp if num_experts_active is None else num_experts_active
    acc_dtype = torch.promote_types(x.dtype, topk_weights.dtype)
    y = torch.zeros(tokens, hidden, dtype=acc_dtype, device=x.device)
    if tokens == 0:
        return y.to(x.dtype)
    d = ffn if width_int < 0 else width_int
    if width_t is not None and width_t.numel():
        d = min(d, int(width_t.max()))
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    tok = order // top_k
    counts = torch.bincount(flat, minlength=n_exp)[:n_act].tolist()
    toks, rows, outs, start = [], [], [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        r = order[start:start + n]
        t = tok[start:start + n]
        start += n
        xe = x[t]
        a = activation_fn(xe @ expert_weight(w1, e, slice(0, d), slice(None), x.dtype).T, activation)
        if w3 is not None:
            a = a * (xe @ expert_weight(w3, e, slice(0, d), slice(None), x.dtype).T)
        if channel_scale is not None:
            cs = channel_scale[:d] if channel_scale.dim() == 1 else channel_scale[t, :d]
            a = a * cs.to(a.dtype)
        if width_t is not None:
            keep = torch.arange(d, device=x.device)[None, :] < width_t[t, None]
            a = a.masked_fill(~keep, 0)
        toks.append(t)
        rows.append(r)
        outs.append(a @ expert_weight(w2, e, slice(None), slice(0, d), x.dtype).T)
    if outs:
        rows_all = torch.cat(rows)
        w = topk_weights.reshape(-1)[rows_all].to(acc_dtype)
        y = y.index_add(0, torch.cat(toks), torch.cat(outs).to(acc_dtype) * w[:, None])
    return y.to(x.dtype)
