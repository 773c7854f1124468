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
Experts >= E' and channels >= d' take no part (zero gradients). A (token, slot) pair of width 0 runs
no GEMM, but its weight still multiplies its zero output (+0, or NaN for a NaN/Inf weight, as the
Triton kernels' weighted sum has it).

The reference sorts the (token, slot) pairs by expert and, within an expert, widest first, and
cuts the FFN axis into column blocks between consecutive distinct widths (one block without
per-token widths). Each block runs on its own pairs and columns only: per projection one matmul
per expert on the prefix views ``w1[:E', c0:c1]`` / ``w2[:E', :, c0:c1]`` (no weight copies),
reading its inputs from and accumulating its outputs (``addmm_``) into contiguous row slices of
the first block's buffers, and the elementwise passes on exactly its pairs and columns, so
per-token widths cost what their mean width costs in FLOPs (experts with few pairs stay bound
by their weight reads). The GEMMs of one projection run expert by expert and, within an
expert, block by block, so an expert's pair rows stay in cache across its blocks; the forward
runs each expert's whole MLP (up projections, activation, down projections) before the next
expert's, so its pre-activations are still in cache for the activation. On the CPU
``torch._grouped_mm`` is one matmul per group as well; the reference calls them itself to write
into preallocated buffers and accumulate. The forward saves the blocks' pre-activations packed
into one buffer and writes its temporaries in place where it can. Fresh CPU buffers cost page
faults (see elastic_kernels/_memory.py), so the temporaries of both passes come from
memory each thread reuses call after call (:class:`elastic_kernels._memory.Scratch`) and the
saved buffer of 4 MB and more from a gone buffer's kept mapping or huge pages
(:func:`elastic_kernels._memory.empty`); the backward is written by hand on the same GEMMs (no
forward re-run) and writes each weight-gradient block once, into zero memory told the prefix box
it writes (:func:`elastic_kernels._memory.zeros`: a kept mapping cleared by ``memset``, else fresh
lazily zeroed pages, 4 KB ones pre-faulted for a w1/w3 prefix that covers little of each expert,
huge pages otherwise, so that the zeros of experts >= E' and channels >= d' are never written).
NVFP4 weights (:class:`elastic_kernels.formats.NVFP4Tensor`, W4A16, frozen) decode only their
experts' prefix views, to x's dtype (every block's views of a projection at once).
"""
from __future__ import annotations

from itertools import groupby
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._cpu import vendor
from .._memory import Scratch, empty, zeros
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


class _Block(NamedTuple):
    """One FFN column block ``[c0, c1)`` of a :class:`_Plan` and the (token, slot) pairs whose
    width reaches ``c1``, grouped by expert: ``tokens``/``pairs`` (R_b,) their tokens and flat
    (token * top_k + slot) indices, ``counts`` their number per expert (every one of the E'
    experts, zeros included: what ``Tensor.split`` takes to cut a (R_b, ...) buffer into the
    experts' row blocks), ``start`` the offset of the block's (R_b, c1 - c0) pre-activations in
    the saved buffer's flat rows."""
    c0: int
    c1: int
    tokens: torch.Tensor
    pairs: torch.Tensor
    counts: list
    start: int


class _Plan:
    """The (token, slot) pairs with a nonzero width, sorted by expert and, within an expert, by
    width (widest first), cut into FFN column blocks between consecutive distinct widths.

    ``blocks``: one :class:`_Block` per distinct width, narrowest first; the first holds every
    pair, and within each expert a block's pairs are the first ones of the first block's, so every
    block reads its inputs and accumulates its outputs in contiguous row slices of first-block
    buffers. ``d``: the widest width; ``used``: the elements the blocks' pre-activations fill.
    Each block runs its GEMMs and elementwise passes on its own pairs and columns only, so every
    weight column is read once per projection and per-token widths cost what their mean width
    costs. ``expert_runs``: ``(j, e, n, prefix)`` for every expert e with n > 0 pairs in block j,
    expert by expert (within an expert, block by block): the order the GEMMs run in, so an
    expert's pair rows stay in cache across its blocks (measured at four per-token widths, T512
    H512 F1024 E16 k2, one thread: fwd+bwd 5-8 % faster than block by block, full width
    unchanged); ``by_expert``: the same runs as ``(e, [(j, n, prefix), ...])`` per expert (the
    forward's loop); ``prefix``: n is fewer than the expert's first-block pairs (its rows there
    are the first n). The GEMM loops take every expert's rows of a buffer at once
    (:meth:`rows`: one ``split``), not one Python slice per GEMM.
    """

    def __init__(self, topk_ids, n_act: int, ffn: int, width_int: int, width_t):
        top_k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1).long()
        if width_t is None:
            d = ffn if width_int < 0 else width_int
            order = torch.argsort(flat, stable=True) if d else flat[:0]
            widths = None
            zero_width = torch.arange(len(flat), device=flat.device) if not d else flat[:0]
        else:
            wp = width_t.long().clamp(max=ffn).repeat_interleave(top_k)
            key = torch.where(wp > 0, flat * (ffn + 1) + (ffn - wp), n_act * (ffn + 1))
            order = torch.argsort(key, stable=True)[:int((wp > 0).sum())]
            widths = wp[order]
            zero_width = (wp == 0).nonzero().flatten()
        # pairs of width 0 take no part, but their weight still multiplies their (zero) output
        self.zero_width = zero_width
        tokens, experts = order // top_k, flat[order]
        cuts = [] if not len(order) else [d] if widths is None else torch.unique(widths).tolist()
        self.blocks, c0, start = [], 0, 0
        for j, c1 in enumerate(cuts):
            if j == 0:  # every pair reaches the narrowest width
                tk, pr, ex = tokens, order, experts
            else:  # within each expert a prefix of its pairs (widest first)
                rows = (widths >= c1).nonzero().flatten()
                tk, pr, ex = tokens[rows], order[rows], experts[rows]
            blk = _Block(c0, c1, tk, pr, torch.bincount(ex, minlength=n_act).tolist(), start)
            self.blocks.append(blk)
            start += len(blk.tokens) * (c1 - c0)
            c0 = c1
        self.d, self.used = c0, start
        first = self.blocks[0].counts if self.blocks else []
        self.expert_runs = [(j, e, n, n < first[e]) for e in range(n_act) for j, b in enumerate(self.blocks)
                            if (n := b.counts[e])]
        self.by_expert = [(e, [(j, n, prefix) for j, _, n, prefix in runs])
                          for e, runs in groupby(self.expert_runs, key=lambda r: r[1])]

    def rows(self, t: torch.Tensor, j: int = 0) -> list:
        """Every expert's rows of ``t``, a buffer in block j's row order: a list of E' views."""
        return list(t.split(self.blocks[j].counts))


def _block_view(w, n_act: int, axis: int, blk: _Block):
    """``w[:n_act]`` with its FFN axis (1 for w1/w3, 2 for w2) narrowed to the block's columns."""
    return w[:n_act, blk.c0:blk.c1] if axis == 1 else w[:n_act, :, blk.c0:blk.c1]


def _experts(w, blk: _Block, dtype: torch.dtype, transpose: bool) -> list:
    """Expert e's slice (or its transpose) of a block view of a weight at index e, for the experts
    with pairs in ``blk`` (None elsewhere); a quantized weight decodes only those, to ``dtype``."""
    if not isinstance(w, QuantizedTensor):
        return list((w.transpose(1, 2) if transpose else w).unbind(0))
    views = [None] * len(blk.counts)
    for e, n in enumerate(blk.counts):
        if n:
            v = expert_weight(w, e, slice(None), slice(None), dtype)
            views[e] = v.T if transpose else v
    return views


# ``a_e @ w[e].T`` (w[e] (N, K) with K contiguous) for an expert with few rows runs faster on
# an Intel CPU's BLAS as ``(w[e] @ a_e.T).T`` (its rows on the GEMM's inner side), written or
# accumulated into the row slice, when K is large. Measured (MKL, AVX-512 Xeon, one thread, 64
# experts' weights streamed from memory as in the op, best of 15; time of the row form over the
# pair-major one): K 1024 x N 512: 8 rows 1.0, 16 rows 1.12, 32 rows 1.23, 48 rows 1.18, 64-96
# rows 1.03; K 512 and 256: 0.66-1.1 (no gain; with the weights in cache it gains up to 1.3x at
# 16-48 rows, but the op streams them); ``a_e @ w[e]`` (w[e] (K, N), the backward's g w2 and dx)
# is slower in that form (up to 1.9x). Hence the pair-major form for at most 48 rows at K >= 1024,
# w[e].T, on Intel CPUs only: MKL picks other kernels on an AMD CPU, where the same measurement
# (AMD EPYC Zen 5, AVX-512, median of 11) has the pair-major form slower at every row count:
# K 1024 x N 512: 8 rows 1.64x the row form's time, 16 rows 1.37, 32 rows 1.01, 48 rows 1.08
# (the T512 E64 k2 forward, 16 rows an expert: 1.30x the grouped-GEMM peer with it).
_PAIR_MAJOR_ROWS, _PAIR_MAJOR_K = 48, 1024
PAIR_MAJOR = vendor() == "intel"


def _mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` (or ``out += a @ b``) for one expert: ``a`` (n, K) pair rows, ``b`` (K, N)
    (a weight slice or its transpose), ``out`` a contiguous (n, N) row slice."""
    n, k = a.shape
    if PAIR_MAJOR and n <= _PAIR_MAJOR_ROWS and k >= _PAIR_MAJOR_K and b.stride(0) == 1:
        prod = torch.mm(b.t(), a.t()).t()  # pair-major (see _PAIR_MAJOR_ROWS)
        out.add_(prod) if accumulate else out.copy_(prod)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


class _WeightGrad:
    """The gradient of one expert weight (axis 1: w1/w3 (E, F, hidden); axis 2: w2 (E, hidden, F)),
    exact zeros outside ``w[:E', :d]``, written block by block: ``g_e.T @ a_e`` per expert into a
    buffer of :func:`elastic_kernels._memory.zeros` told that prefix box (fresh memory's zeros
    are never written: a prefix costs its own pages, not the whole weight's; a kept mapping is
    cleared by one ``memset``, cheaper than those pages' faults)."""

    def __init__(self, w, plan: _Plan, n_act: int, axis: int, dtype: torch.dtype):
        self.plan, self.axis, self.n_act = plan, axis, n_act
        box = (n_act, plan.d, w.shape[2]) if axis == 1 else (n_act, w.shape[1], plan.d)
        self.full = zeros(tuple(w.shape), dtype, w.device, written=box)

    def add(self, g: list, a: list) -> None:
        """Write every block's columns, expert by expert: block j's ``g[j][e].T @ a[j][e]``, from
        per-expert row views (pairs, N) / (pairs, K) in the block's row order or the first
        block's (then the first n rows are taken)."""
        dst = [_block_view(self.full, self.n_act, self.axis, blk).unbind(0) for blk in self.plan.blocks]
        for j, e, n, prefix in self.plan.expert_runs:
            ge, ae = g[j][e], a[j][e]
            torch.mm((ge[:n] if len(ge) > n else ge).T, ae[:n] if len(ae) > n else ae, out=dst[j][e])


def _channel_scale(channel_scale, blk: _Block, dtype):
    """The block's channel scales: (c1 - c0,) or, per token, (R_b, c1 - c0); None without."""
    if channel_scale is None:
        return None
    cs = channel_scale[blk.c0:blk.c1] if channel_scale.dim() == 1 else \
        channel_scale[:, blk.c0:blk.c1].index_select(0, blk.tokens)
    return cs.to(dtype)


def saved_shape(tokens: int, top_k: int, ffn: int, width_int: int, per_token: bool, gated: bool) -> tuple:
    """Shape of what :func:`moe_experts_reference_fwd` saves for the backward: the pre-activation
    ``h`` (``relu(h)`` for relu2, all its backward needs) and the up projection ``u`` when gated
    of every (token, slot) pair, at most ``tokens * top_k * d`` elements each, for the widest
    width ``d`` a call can use: (1 or 2, tokens * top_k, d)."""
    d = ffn if per_token or width_int < 0 else width_int
    return (2 if gated else 1, tokens * top_k, d)


def _saved_views(saved: torch.Tensor, blk: _Block):
    """The block's (R_b, c1 - c0) pre-activations ``h`` and (gated) ``u`` in ``saved``: rows of
    the block packed one after another in each projection's flattened buffer."""
    n = len(blk.tokens) * (blk.c1 - blk.c0)
    flat = saved.view(saved.shape[0], -1)[:, blk.start:blk.start + n].view(saved.shape[0], -1, blk.c1 - blk.c0)
    return flat[0], (flat[1] if saved.shape[0] == 2 else None)


def _activate(h: torch.Tensor, activation: str, relu_in_place: bool, out: torch.Tensor) -> torch.Tensor:
    """``act(h)`` into ``out``; relu2 with ``relu_in_place`` first replaces ``h`` by
    ``relu(h)`` (what the backward then reads: relu(relu(h)) = relu(h))."""
    if activation == "relu2":
        return torch.square(h.relu_() if relu_in_place else h, out=out)
    op = torch.ops.aten.silu if activation == "silu" else torch.ops.aten.gelu
    return op.out(h, out=out)


def moe_experts_reference_fwd(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                              w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None = None, *,
                              activation: str = "relu2", num_experts_active: int | None = None,
                              width_int: int = -1, width_t: torch.Tensor | None = None,
                              channel_scale: torch.Tensor | None = None):
    """:func:`moe_experts_reference` that also returns what :func:`moe_experts_reference_bwd`
    needs: ``(y, saved)`` with ``saved`` of :func:`saved_shape` (each block's pre-activations
    packed from the start of each projection's flattened buffer, zeros after them)."""
    tokens, hidden = x.shape
    n_exp, ffn = w1.shape[0], w1.shape[1]
    n_act = n_exp if num_experts_active is None else num_experts_active
    acc_dtype = torch.promote_types(x.dtype, topk_weights.dtype)
    y = zeros((tokens, hidden), acc_dtype, x.device)
    shape = saved_shape(tokens, topk_ids.shape[1], ffn, width_int, width_t is not None, w3 is not None)
    plan = _Plan(topk_ids, n_act, ffn, width_int, width_t) if tokens else None
    if plan is not None and len(plan.zero_width):
        _zero_width_products(y, topk_weights, plan.zero_width, topk_ids.shape[1])
    if plan is None or not plan.blocks:
        return y.to(x.dtype), x.new_zeros(shape)
    saved = empty(shape, x.dtype, x.device)
    saved.view(shape[0], -1)[:, plan.used:].zero_()
    first = plan.blocks[0]
    with Scratch(x.device) as scratch:
        xs = torch.index_select(x, 0, first.tokens, out=scratch.empty((len(first.tokens), hidden), x.dtype))
        xs_e = plan.rows(xs)  # (pairs, hidden) per expert, first-block order
        views = [_saved_views(saved, blk) for blk in plan.blocks]
        hs = [plan.rows(h, j) for j, (h, _) in enumerate(views)]
        us = [plan.rows(u, j) for j, (_, u) in enumerate(views)] if w3 is not None else None
        acts = [plan.rows(scratch.empty(h.shape, h.dtype), j) for j, (h, _) in enumerate(views)]
        css = [_channel_scale(channel_scale, blk, x.dtype) for blk in plan.blocks]
        css = [cs if cs is None or cs.dim() == 1 else plan.rows(cs, j) for j, cs in enumerate(css)]
        w1s, w2s = ([_experts(_block_view(w, n_act, axis, blk), blk, x.dtype, True) for blk in plan.blocks]
                    for w, axis in ((w1, 1), (w2, 2)))
        w3s = [_experts(_block_view(w3, n_act, 1, blk), blk, x.dtype, True) for blk in plan.blocks] \
            if w3 is not None else None
        out = xs_e  # an expert's rows of xs are spent once its up projections are done: they take its output
        for e, runs in plan.by_expert:  # each expert's MLP at once, so its rows stay in cache
            for j, n, prefix in runs:  # up projections and activations, block by block
                xe = xs_e[e][:n] if prefix else xs_e[e]
                _mm(hs[j][e], xe, w1s[j][e], False)
                if us is not None:
                    _mm(us[j][e], xe, w3s[j][e], False)
                a = _activate(hs[j][e], activation, True, acts[j][e])
                if us is not None:
                    a.mul_(us[j][e])
                if css[j] is not None:
                    a.mul_(css[j] if isinstance(css[j], torch.Tensor) else css[j][e])
            for j, n, prefix in runs:  # block 0 writes the expert's output rows, the others accumulate
                _mm(out[e][:n] if prefix else out[e], acts[j][e], w2s[j][e], j > 0)
        p = topk_weights.reshape(-1)[first.pairs].to(acc_dtype)[:, None]
        y.index_add_(0, first.tokens, xs.to(acc_dtype).mul_(p))
    return y.to(x.dtype), saved


def _zero_width_products(y: torch.Tensor, topk_weights: torch.Tensor, pairs: torch.Tensor, top_k: int) -> None:
    """Add ``topk_weights[pair] * 0`` to the rows of the (token, slot) ``pairs`` of width 0, whose
    expert output is exactly 0: +0 for a finite weight, NaN for a NaN or Inf one, so a non-finite
    routing weight reaches its token's output at every width, as the Triton kernels' weighted sum
    (and IEEE arithmetic) has it (docs/design.md §5)."""
    zero = topk_weights.reshape(-1)[pairs].to(y.dtype).mul(0)
    y.index_add_(0, pairs // top_k, zero[:, None].expand(-1, y.shape[1]))


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


def _activation_grad_(g: torch.Tensor, v: torch.Tensor, activation: str) -> torch.Tensor:
    """``g * act'(h)`` from what the forward saved (``v = relu(h)`` for relu2, else ``h``), in
    ``g``'s memory."""
    if activation == "relu2":
        return g.mul_(v).mul_(2)
    if activation == "silu":
        return torch.ops.aten.silu_backward.grad_input(g, v, grad_input=g)
    return torch.ops.aten.gelu_backward.grad_input(g, v, grad_input=g)


def moe_experts_reference_bwd(grad_y: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor,
                              topk_ids: torch.Tensor, w1, w2, w3=None, *, activation: str = "relu2",
                              num_experts_active: int | None = None, width_int: int = -1,
                              width_t: torch.Tensor | None = None, channel_scale: torch.Tensor | None = None,
                              saved: torch.Tensor | None = None):
    """Hand-written backward of :func:`moe_experts_reference_fwd` on the same per-expert GEMMs
    (``grad_y: (tokens, hidden)``; ``saved`` the forward's saved pre-activations, or None to
    recompute them), block by block of its plan. With ``a = act(h) [* u] * cs`` per pair and its
    output ``o = a w2^T`` weighted by ``p``: ``dp = a . (g w2)``, ``da = p g w2``,
    ``dW2 = (p g)^T a``, ``dh = da cs [u] act'(h)``, ``dW1 = dh^T x``, ``dx = dh w1 [+ du w3]``.

    Returns the gradients of x, topk_weights, w1, w2, w3, channel_scale (None for absent inputs
    and for quantized weights, which are frozen). Experts >= E' and channels >= d' (or >= a
    token's width) get exact zeros; every weight-gradient column block is written once.
    """
    tokens, hidden = x.shape
    n_exp, ffn = w1.shape[0], w1.shape[1]
    n_act = n_exp if num_experts_active is None else num_experts_active
    trainable = lambda w: w is not None and not isinstance(w, QuantizedTensor)  # noqa: E731
    gx = zeros(x.shape, x.dtype, x.device)
    gtw = torch.zeros(topk_weights.numel(), dtype=topk_weights.dtype, device=x.device)
    gcs = None if channel_scale is None else torch.zeros_like(channel_scale, memory_format=torch.contiguous_format)
    plan = _Plan(topk_ids, n_act, ffn, width_int, width_t) if tokens else None
    zero = lambda w: zeros(w.shape, w.dtype, x.device) if trainable(w) else None  # noqa: E731
    if plan is None or not plan.blocks:
        return [gx, gtw.reshape(topk_weights.shape), zero(w1), zero(w2), zero(w3), gcs]
    if saved is None:
        saved = moe_experts_reference_fwd(x, topk_weights, topk_ids, w1, w2, w3, activation=activation,
                                          num_experts_active=n_act, width_int=width_int, width_t=width_t,
                                          channel_scale=channel_scale)[1]
    gw = [_WeightGrad(w, plan, n_act, axis, x.dtype) if trainable(w) else None
          for w, axis in ((w1, 1), (w2, 2), (w3, 1))]
    first = plan.blocks[0]
    p = topk_weights.reshape(-1)
    n_pairs = len(first.tokens)
    with Scratch(x.device) as scratch:
        new = lambda t: scratch.empty(t.shape, t.dtype)  # noqa: E731
        xs = torch.index_select(x, 0, first.tokens, out=scratch.empty((n_pairs, hidden), x.dtype))
        g = torch.index_select(grad_y.to(x.dtype), 0, first.tokens, out=scratch.empty((n_pairs, hidden), x.dtype))
        blocks, acts, g_w2s = [], [], []
        for blk in plan.blocks:
            h, u = _saved_views(saved, blk)
            act = _activate(h, activation, False, new(h))
            a_pre = act if u is None else torch.mul(act, u, out=new(act))
            cs = _channel_scale(channel_scale, blk, a_pre.dtype)
            a = a_pre if cs is None else torch.mul(a_pre, cs, out=new(a_pre))
            blocks.append((blk, h, u, act, a_pre, cs))
            acts.append(a)
            g_w2s.append(new(a))                                              # g w2: (R_b, c1 - c0)
        g_e = plan.rows(g)
        ws = [_experts(_block_view(w2, n_act, 2, blk), blk, x.dtype, False) for blk in plan.blocks]
        outs = [plan.rows(t, j) for j, t in enumerate(g_w2s)]
        for j, e, n, prefix in plan.expert_runs:  # g w2 of every block while g is unweighted
            _mm(outs[j][e], g_e[e][:n] if prefix else g_e[e], ws[j][e], False)
        g.mul_(p[first.pairs].to(g.dtype)[:, None])                           # p g, in place
        if gw[1] is not None:                                                 # (p g)^T a
            gw[1].add([g_e] * len(blocks), [plan.rows(a, j) for j, a in enumerate(acts)])
        grads_h = []
        for (blk, h, u, act, a_pre, cs), a, g_w2 in zip(blocks, acts, g_w2s):
            gtw.index_add_(0, blk.pairs, a.mul_(g_w2).sum(-1).to(gtw.dtype))    # a is spent
            ga = g_w2.mul_(p[blk.pairs].to(g_w2.dtype)[:, None])
            if gcs is not None:
                gc = (ga * a_pre).to(gcs.dtype)
                if gcs.dim() == 1:
                    gcs[blk.c0:blk.c1] = gc.sum(0)
                else:
                    gcs[:, blk.c0:blk.c1].index_add_(0, blk.tokens, gc)
                ga.mul_(cs)
            gu = None
            if u is not None:
                gu = torch.mul(ga, act, out=new(ga))
                ga.mul_(u)
            grads_h.append((_activation_grad_(ga, h, activation), gu))
        gxs_e = g_e  # p g is spent: its memory takes dx of each pair
        gated = w3 is not None
        ws1 = [_experts(_block_view(w1, n_act, 1, blk), blk, x.dtype, False) for blk in plan.blocks]
        ws3 = [_experts(_block_view(w3, n_act, 1, blk), blk, x.dtype, False) for blk in plan.blocks] if gated else None
        gh_e = [plan.rows(gh, j) for j, (gh, _) in enumerate(grads_h)]
        gu_e = [plan.rows(gu, j) for j, (_, gu) in enumerate(grads_h)] if gated else None
        for j, e, n, prefix in plan.expert_runs:  # block 0 writes an expert's rows, the others accumulate
            dst = gxs_e[e][:n] if prefix else gxs_e[e]
            _mm(dst, gh_e[j][e], ws1[j][e], j > 0)
            if gated:
                _mm(dst, gu_e[j][e], ws3[j][e], True)
        xs_all = [plan.rows(xs)] * len(blocks)
        if gw[0] is not None:
            gw[0].add(gh_e, xs_all)
        if gated and gw[2] is not None:
            gw[2].add(gu_e, xs_all)
        gx.index_add_(0, first.tokens, g.to(gx.dtype))
    return [gx, gtw.reshape(topk_weights.shape), *(None if gr is None else gr.full.contiguous() for gr in gw), gcs]
