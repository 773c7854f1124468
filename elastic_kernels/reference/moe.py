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
Experts >= E' and channels >= d' take no part (zero gradients).

The reference sorts the (token, slot) pairs into width buckets (one per distinct per-token width,
widest first) and, within a bucket, by expert, and runs one grouped GEMM (``torch._grouped_mm``)
per projection and bucket on the prefix views ``w1[:E', :d]`` / ``w2[:E', :, :d]`` (no weight
copies), so per-token widths cost what their mean width costs. The backward is written by hand on
the same grouped GEMMs (no forward re-run under autograd) and writes each weight gradient's
prefix once per bucket. Float64 (which ``torch._grouped_mm`` does not take) and NVFP4 weights
(:class:`elastic_kernels.formats.NVFP4Tensor`, W4A16, frozen) use one matmul per expert; NVFP4
weights decode only their experts' prefix views, to x's dtype.
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


_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch._grouped_mm takes


def _grouped_ok(*ts) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: one of its dtypes, 16-byte aligned
    pointers, one of the last two strides 1 and every other stride a 16-byte multiple."""
    def ok(t):
        if not isinstance(t, torch.Tensor) or t.dtype not in _GROUPED_DTYPES or t.dtype != ts[0].dtype:
            return False
        es, st = t.element_size(), t.stride()
        inner = (st[-1] == 1 and st[-2] * es % 16 == 0) or (st[-2] == 1 and st[-1] * es % 16 == 0)
        return inner and t.data_ptr() % 16 == 0 and all(s * es % 16 == 0 for s in st[:-2])
    return all(ok(t) for t in ts)


def _prefix(w, n_act: int, rows: int | None, cols: int | None):
    """``w[:n_act, :rows, :cols]`` (a view; a quantized weight stays quantized)."""
    return w[:n_act, slice(None) if rows is None else slice(0, rows), slice(None) if cols is None else slice(0, cols)]


def _gmm(a: torch.Tensor, w, counts: list, offs: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Grouped GEMM over experts: rows ``[offs[e-1], offs[e])`` of ``a: (R, K)`` times ``w[e].T``
    (``transpose``, w: (E', N, K)) or ``w[e]`` (w: (E', K, N)). ``torch._grouped_mm`` for plain
    fp32/bf16/fp16 weights; otherwise one matmul per expert, decoding a quantized weight's
    expert slice to a's dtype."""
    wt = w.transpose(-2, -1) if transpose and not isinstance(w, QuantizedTensor) else w
    if _grouped_ok(a, wt):
        return torch._grouped_mm(a, wt, offs=offs)
    outs, start = [], 0
    for e, n in enumerate(counts):
        we = expert_weight(w, e, slice(None), slice(None), a.dtype)
        outs.append(a[start:start + n] @ (we.T if transpose else we))
        start += n
    return torch.cat(outs) if outs else a.new_zeros(0, w.shape[-2 if transpose else -1])


def _gmm_weight_grad(g: torch.Tensor, a: torch.Tensor, counts: list, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert ``g[rows_e].T @ a[rows_e]``: (E', N, K) from g: (R, N), a: (R, K)."""
    if _grouped_ok(g.t(), a):
        return torch._grouped_mm(g.t(), a, offs=offs)
    out, start = a.new_zeros(len(counts), g.shape[1], a.shape[1]), 0
    for e, n in enumerate(counts):
        if n:
            out[e] = g[start:start + n].T @ a[start:start + n]
        start += n
    return out


def _block_view(w, n_act: int, axis: int, c0: int, c1: int):
    """``w[:n_act]`` with its FFN axis (1 for w1/w3, 2 for w2) narrowed to ``[c0, c1)``."""
    return w[:n_act, c0:c1] if axis == 1 else w[:n_act, :, c0:c1]


class _Plan:
    """The (token, slot) pairs with a nonzero width, sorted by expert and, within an expert, by
    width (widest first), and the FFN column blocks between consecutive distinct widths.

    ``pairs``/``tokens``: the sorted pairs' flat (token * top_k + slot) indices and tokens;
    ``d``: the widest width. ``blocks``: one ``(c0, c1, rows, counts, offs)`` per block of
    columns ``[c0, c1)`` between consecutive distinct widths: the (sorted-order) rows whose width
    reaches ``c1`` (None: all rows) -- within each expert a prefix of its rows, so every block is
    one grouped GEMM (``torch._grouped_mm``) over experts with ``counts`` rows each (``offs``
    their int32 cumulative sum). Every weight column is read once per projection and every row
    computes exactly its own width: per-token widths cost what their mean width costs.
    """

    def __init__(self, topk_ids, n_act: int, ffn: int, width_int: int, width_t):
        top_k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1).long()
        if width_t is None:
            d = ffn if width_int < 0 else width_int
            order = torch.argsort(flat, stable=True) if d else flat[:0]
            widths = None
        else:
            wp = width_t.long().clamp(max=ffn).repeat_interleave(top_k)
            key = torch.where(wp > 0, flat * (ffn + 1) + (ffn - wp), n_act * (ffn + 1))
            order = torch.argsort(key, stable=True)[:int((wp > 0).sum())]
            widths = wp[order]
        self.pairs, self.tokens = order, order // top_k
        experts = flat[order]
        counts = torch.bincount(experts, minlength=n_act)
        self.blocks = []
        if not len(order):
            self.d = 0
            return
        if widths is None:
            self.d = d
            self.blocks.append((0, d, None, counts.tolist(), torch.cumsum(counts, 0).to(torch.int32)))
            return
        c0 = 0
        for j, c1 in enumerate(torch.unique(widths).tolist()):
            rows = None if j == 0 else (widths >= c1).nonzero().flatten()
            cnt = counts if rows is None else torch.bincount(experts[rows], minlength=n_act)
            self.blocks.append((c0, c1, rows, cnt.tolist(), torch.cumsum(cnt, 0).to(torch.int32)))
            c0 = c1
        self.d = c0


def _rows(t: torch.Tensor, rows, cols: slice = slice(None)):
    """``t[rows, cols]`` (rows None: all rows, a view)."""
    return t[:, cols] if rows is None else t[rows, cols]


def _up(xs, w, plan: _Plan, n_act: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[r, :width_r] = xs[r] @ w[e_r, :width_r].T`` block by block (w: (E, F, hidden));
    ``out`` None (one block only): the grouped GEMM's own result."""
    if out is None:
        _, _, _, counts, offs = plan.blocks[0]
        return _gmm(xs, _block_view(w, n_act, 1, 0, plan.d), counts, offs, True)
    for c0, c1, rows, counts, offs in plan.blocks:
        part = _gmm(_rows(xs, rows), _block_view(w, n_act, 1, c0, c1), counts, offs, True)
        if rows is None:
            out[:, c0:c1] = part
        else:
            out[rows, c0:c1] = part
    return out


def _down(a, w, plan: _Plan, n_act: int) -> torch.Tensor:
    """``a[r, :width_r] @ w[e_r, :, :width_r].T`` summed over blocks (w: (E, hidden, F))."""
    out = None
    for c0, c1, rows, counts, offs in plan.blocks:
        part = _gmm(_rows(a, rows, slice(c0, c1)), _block_view(w, n_act, 2, c0, c1), counts, offs, True)
        if rows is None:
            out = part if out is None else out.add_(part)
        else:
            out.index_add_(0, rows, part)
    return out


def _back_through(g, w, plan: _Plan, n_act: int, axis: int, width: int) -> torch.Tensor:
    """The input gradient of :func:`_up` (axis 1: ``g`` (R, d) -> (R, hidden)) or of
    :func:`_down` (axis 2: ``g`` (R, hidden) -> (R, d), zeros beyond each row's width)."""
    out = None if axis == 1 else g.new_zeros(g.shape[0], width) if len(plan.blocks) > 1 else None
    for c0, c1, rows, counts, offs in plan.blocks:
        src = _rows(g, rows, slice(c0, c1) if axis == 1 else slice(None))
        part = _gmm(src, _block_view(w, n_act, axis, c0, c1), counts, offs, False)
        if axis == 2:
            if out is None:
                out = part
            elif rows is None:
                out[:, c0:c1] = part
            else:
                out[rows, c0:c1] = part
        elif rows is None:
            out = part if out is None else out.add_(part)
        else:
            out.index_add_(0, rows, part)
    return out


def _weight_grad(g, a, w, plan: _Plan, n_act: int, axis: int) -> torch.Tensor:
    """The gradient of ``w`` (exact zeros outside ``w[:E', :d]``) from per-block GEMMs:
    axis 1 (w1/w3): ``g`` (R, d) pre-activation grads, ``a`` (R, hidden) inputs; axis 2 (w2):
    ``g`` (R, hidden) output grads, ``a`` (R, d) activations. One block covering the whole
    weight is one grouped GEMM; otherwise each expert's block is written in place, once."""
    shape = tuple(w.shape)
    if len(plan.blocks) == 1 and n_act == shape[0] and plan.d == shape[axis]:
        _, _, _, counts, offs = plan.blocks[0]
        return _gmm_weight_grad(g, a, counts, offs)
    full = g.new_empty(shape)
    full[n_act:].zero_()
    (full[:n_act, plan.d:] if axis == 1 else full[:n_act, :, plan.d:]).zero_()
    for c0, c1, rows, counts, offs in plan.blocks:
        gs = _rows(g, rows, slice(c0, c1) if axis == 1 else slice(None))
        as_ = _rows(a, rows, slice(None) if axis == 1 else slice(c0, c1))
        start = 0
        for e, n in enumerate(counts):
            dst = _block_view(full, n_act, axis, c0, c1)[e]
            if n:
                torch.mm(gs[start:start + n].T, as_[start:start + n], out=dst)
            else:
                dst.zero_()
            start += n
    return full


def _channel_scale(channel_scale, tokens, d, dtype):
    if channel_scale is None:
        return None
    cs = channel_scale[:d] if channel_scale.dim() == 1 else channel_scale[tokens, :d]
    return cs.to(dtype)


def saved_shape(tokens: int, top_k: int, ffn: int, width_int: int, per_token: bool, gated: bool) -> tuple:
    """Shape of what :func:`moe_experts_reference_fwd` saves for the backward: the pre-activation
    ``h`` (and the up projection ``u`` when gated) of every (token, slot) pair, in sorted order,
    at the widest width a call can use: (1 or 2, tokens * top_k, d)."""
    d = ffn if per_token or width_int < 0 else width_int
    return (2 if gated else 1, tokens * top_k, d)


def moe_experts_reference_fwd(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                              w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None = None, *,
                              activation: str = "relu2", num_experts_active: int | None = None,
                              width_int: int = -1, width_t: torch.Tensor | None = None,
                              channel_scale: torch.Tensor | None = None):
    """:func:`moe_experts_reference` that also returns what :func:`moe_experts_reference_bwd`
    needs: ``(y, saved)`` with ``saved`` of :func:`saved_shape` (the sorted pairs' rows first,
    each row's first ``width`` columns; zeros elsewhere for per-token widths)."""
    tokens, hidden = x.shape
    n_exp, ffn = w1.shape[0], w1.shape[1]
    n_act = n_exp if num_experts_active is None else num_experts_active
    acc_dtype = torch.promote_types(x.dtype, topk_weights.dtype)
    y = torch.zeros(tokens, hidden, dtype=acc_dtype, device=x.device)
    shape = saved_shape(tokens, topk_ids.shape[1], ffn, width_int, width_t is not None, w3 is not None)
    plan = _Plan(topk_ids, n_act, ffn, width_int, width_t) if tokens else None
    if plan is None or not plan.blocks:
        return y.to(x.dtype), x.new_zeros(shape)
    d, n = plan.d, len(plan.pairs)
    xs = x[plan.tokens]
    if width_t is None:  # one block over every pair: save the grouped GEMMs' results themselves
        h = _up(xs, w1, plan, n_act)
        u = None if w3 is None else _up(xs, w3, plan, n_act)
        saved = h[None] if u is None else torch.stack((h, u))
    else:  # per-token widths: each row fills its first `width` columns, zeros elsewhere
        saved = x.new_zeros(shape)
        h = _up(xs, w1, plan, n_act, saved[0, :n, :d])
        u = None if w3 is None else _up(xs, w3, plan, n_act, saved[1, :n, :d])
    a = activation_fn(h, activation)
    if u is not None:
        a.mul_(u)
    cs = _channel_scale(channel_scale, plan.tokens, d, a.dtype)
    if cs is not None:
        a.mul_(cs)
    out = _down(a, w2, plan, n_act)
    y.index_add_(0, plan.tokens, out.to(acc_dtype).mul_(topk_weights.reshape(-1)[plan.pairs].to(acc_dtype)[:, None]))
    return y.to(x.dtype), saved


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
    return moe_experts_reference_fwd(x, topk_weights, topk_ids, w1, w2, w3, activation=activation,
                                     num_experts_active=num_experts_active, width_int=width_int,
                                     width_t=width_t, channel_scale=channel_scale)[0]


def _activation_grad(g: torch.Tensor, v: torch.Tensor, activation: str) -> torch.Tensor:
    """``g * act'(v)``."""
    if activation == "relu2":
        return g * 2 * torch.relu(v)
    if activation == "silu":
        return torch.ops.aten.silu_backward(g, v)
    return torch.ops.aten.gelu_backward(g, v)


def moe_experts_reference_bwd(grad_y: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor,
                              topk_ids: torch.Tensor, w1, w2, w3=None, *, activation: str = "relu2",
                              num_experts_active: int | None = None, width_int: int = -1,
                              width_t: torch.Tensor | None = None, channel_scale: torch.Tensor | None = None,
                              saved: torch.Tensor | None = None):
    """Hand-written backward of :func:`moe_experts_reference_fwd` on the same grouped GEMMs
    (``grad_y: (tokens, hidden)``; ``saved`` its saved pre-activations, or None to recompute them).
    With ``a = act(h) [* u] * cs`` per pair and its output ``o = a w2^T`` weighted by ``p``:
    ``dp = a . (g w2)``, ``da = p g w2``, ``dW2 = (p g)^T a``, ``dh = da cs [u] act'(h)``,
    ``dW1 = dh^T x``, ``dx = dh w1 [+ du w3]``.

    Returns the gradients of x, topk_weights, w1, w2, w3, channel_scale (None for absent inputs
    and for quantized weights, which are frozen). Experts >= E' and channels >= d' (or >= a
    token's width) get exact zeros; every weight-gradient column block is written once.
    """
    tokens, hidden = x.shape
    n_exp, ffn = w1.shape[0], w1.shape[1]
    n_act = n_exp if num_experts_active is None else num_experts_active
    trainable = lambda w: w is not None and not isinstance(w, QuantizedTensor)  # noqa: E731
    gx = torch.zeros_like(x, memory_format=torch.contiguous_format)
    gtw = torch.zeros(topk_weights.numel(), dtype=topk_weights.dtype, device=x.device)
    gcs = None if channel_scale is None else torch.zeros_like(channel_scale, memory_format=torch.contiguous_format)
    plan = _Plan(topk_ids, n_act, ffn, width_int, width_t) if tokens else None
    zero = lambda w: torch.zeros(w.shape, dtype=w.dtype, device=x.device) if trainable(w) else None  # noqa: E731
    if plan is None or not plan.blocks:
        return [gx, gtw.reshape(topk_weights.shape), zero(w1), zero(w2), zero(w3), gcs]
    d, n, tok = plan.d, len(plan.pairs), plan.tokens
    xs = x[tok]
    if saved is None:
        per_token = width_t is not None
        buf = (x.new_zeros if per_token else x.new_empty)(saved_shape(tokens, topk_ids.shape[1], ffn, width_int,
                                                                        per_token, w3 is not None))
        h = _up(xs, w1, plan, n_act, buf[0, :n, :d])
        u = None if w3 is None else _up(xs, w3, plan, n_act, buf[1, :n, :d])
    else:
        h = saved[0, :n, :d]
        u = None if w3 is None else saved[1, :n, :d]
    act = activation_fn(h, activation)
    a_pre = act if u is None else act * u
    cs = _channel_scale(channel_scale, tok, d, a_pre.dtype)
    a = a_pre if cs is None else a_pre * cs
    g = grad_y[tok].to(x.dtype)
    p = topk_weights.reshape(-1)[plan.pairs]
    g_w2 = _back_through(g, w2, plan, n_act, 2, d)                        # g w2: (R, d)
    gtw.index_add_(0, plan.pairs, (a.to(g_w2.dtype) * g_w2).sum(-1).to(gtw.dtype))
    ga = g_w2.mul_(p.to(g_w2.dtype)[:, None])
    gw = [None, None, None]
    if trainable(w2):
        gw[1] = _weight_grad(g * p.to(g.dtype)[:, None], a, w2, plan, n_act, 2)
    if gcs is not None:
        gc = (ga * a_pre).to(gcs.dtype)
        if gcs.dim() == 1:
            gcs[:d] = gc.sum(0)
        else:
            gcs[:, :d].index_add_(0, tok, gc)
    if cs is not None:
        ga = ga * cs
    if u is not None:
        gu = ga * act
        ga = ga * u
    gh = _activation_grad(ga, h, activation)
    gxs = _back_through(gh, w1, plan, n_act, 1, d)
    if trainable(w1):
        gw[0] = _weight_grad(gh, xs, w1, plan, n_act, 1)
    if u is not None:
        gxs = gxs.add_(_back_through(gu, w3, plan, n_act, 1, d))
        if trainable(w3):
            gw[2] = _weight_grad(gu, xs, w3, plan, n_act, 1)
    gx.index_add_(0, tok, gxs.to(gx.dtype))
    return [gx, gtw.reshape(topk_weights.shape), *(None if gr is None else gr.contiguous() for gr in gw), gcs]
