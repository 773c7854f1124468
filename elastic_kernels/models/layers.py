"""Public elastic layers of the reference model (reusable nn.Modules; docs/design.md §2-§3).

Conventions shared by every layer:

- The input carries the active hidden prefix as its last dim: ``x: (batch, seqlen, k)`` with
  ``k <= hidden``; weights are used as prefix views (``w[:n, :k]``), so smaller widths do less work.
- Hard widths are ``None`` (full), an ``int``, or a LongTensor ``(batch,)`` of per-sample widths.
  For per-sample widths the layer computes at ``max_*`` (default: the full size; pass the host
  maximum to skip work) and masks each sample's inactive units to exactly 0.
- Soft masks are float tensors over the layer's full units, ``(units,)`` or ``(batch, units)``,
  multiplied in (differentiable), see :mod:`elastic_kernels.models`.
- Linear weights may also be quantized containers (:class:`~elastic_kernels.formats.NVFP4Tensor`,
  W4A16 serving): layers use them exactly as dense weights, through
  :func:`elastic_kernels.ops.linear` and :func:`elastic_kernels.moe_experts`.
- Every layer implements the per-layer protocol of :mod:`elastic_kernels.models.protocol`
  (sizes, ``sliced_shapes(k, sizes, active)``, ``permute_(axis, perm)``, importance, quantizable
  weights, decode caches); every parameter slices as a prefix of every dimension. The model's
  layer kinds are :data:`LAYER_KINDS`, one class per pattern letter.
"""
from __future__ import annotations

import math
from typing import Mapping
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.moe import moe_experts, moe_route
from ..ops.ssd import ssd_scan, ssd_state_update
from ..ops.weights import linear as _linear
from .cache import AttentionLayerCache, MambaLayerCache
from .protocol import ElasticLayer, LayerAxis, check_score, descending, permute_rows_, unit_weights

def _shapes_only() -> bool:
    """Whether parameters are being created on the meta device (a model built for its shapes, as
    checkpoint loading does): torch runs randn and most pointwise ops on meta tensors through
    Python reference kernels whose first call imports ``torch._dynamo`` and sympy (~1.5 s), so
    initial values are skipped there (``torch.empty``)."""
    return torch.get_default_device().type == "meta"


def _normal(*shape: int, std: float) -> Tensor:
    """Initial weights ``torch.randn(*shape) * std`` (only the shape on the meta device)."""
    return torch.empty(*shape) if _shapes_only() else torch.randn(*shape) * std


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Normalization statistics run in float32 at least (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _activation(v: Tensor, name: str) -> Tensor:
    if name == "relu2":
        return torch.relu(v).square()
    if name == "silu":
        return F.silu(v)
    return F.gelu(v)


def _per_sample(m: Tensor, batch_dims: int) -> Tensor:
    """View a ``(batch, n)`` tensor as ``(batch, 1, ..., n)`` with ``batch_dims`` leading dims."""
    return m.reshape(m.shape[0], *([1] * (batch_dims - 1)), m.shape[-1])


def balanced_chunk(seqlen: int, chunk_size: int) -> int:
    """The scan chunk length for ``seqlen`` steps: as many chunks as ``chunk_size`` gives, of equal
    length ``ceil(seqlen / nchunks)`` (<= ``chunk_size``). The scan's result does not depend on
    where its chunks end; equal chunks pad the least (seqlen 37 at chunk 32: two chunks of 19, not
    32 and 5 padded to 64), which is what a short training sequence costs on the CPU path."""
    nchunks = max(1, -(-seqlen // chunk_size))
    return max(1, -(-seqlen // nchunks))


def _hard_int(width, full: int, name: str) -> int:
    """Units to compute for a hard width (int: itself; None or per-sample tensor: ``full``)."""
    if width is None or isinstance(width, Tensor):
        return full
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(f"{name} must be None, an int or a LongTensor (batch,), got {type(width).__name__}")
    if not 0 < width <= full:
        raise ValueError(f"{name} must lie in [1, {full}], got {width}")
    return width


class _CausalConvSiLU(torch.autograd.Function):
    """See :func:`causal_conv_silu`; the backward is written out (``gp = silu'(pre) * grad``):
    ``d window[:, t + k] += w[:, k] gp[:, t]``, ``dw[:, k] = sum_{batch, t} gp[:, t] window[:, t + k]``,
    ``dbias = sum_{batch, t} gp``."""

    @staticmethod
    def forward(ctx, prev, w, bias, *parts):
        u0 = parts[0]
        b, l = u0.shape[:2]
        K, cd = w.shape[1], _compute_dtype(u0)
        widths = [t.shape[-1] for t in parts]
        window = u0.new_empty((b, K - 1 + l, sum(widths)), dtype=cd)  # (batch, K - 1 + seqlen, ch)
        if prev is None:
            window[:, :K - 1].zero_()
        else:
            window[:, :K - 1] = prev
        c = 0
        for t, n in zip(parts, widths):
            window[:, K - 1:, c:c + n] = t
            c += n
        wc = w.to(cd).t().contiguous()                                   # (K, ch): rows unit-strided
        pre = bias.to(cd).expand(b, l, -1).clone()
        for k in range(K):
            pre.addcmul_(window[:, k:k + l], wc[k])
        ctx.save_for_backward(window, wc, pre)
        ctx.meta = (widths, [t.dtype for t in parts], w.dtype, bias.dtype)
        return F.silu(pre).to(u0.dtype)

    @staticmethod
    def backward(ctx, grad):
        window, wc, pre = ctx.saved_tensors
        widths, part_dtypes, w_dtype, b_dtype = ctx.meta
        K, l = wc.shape[0], pre.shape[1]
        gp = torch.ops.aten.silu_backward(grad.to(pre.dtype), pre)
        gwin, gw, prod = torch.empty_like(window), torch.empty_like(wc), torch.empty_like(gp)
        gwin[:, :K - 1].zero_()
        torch.mul(gp, wc[K - 1], out=gwin[:, K - 1:])
        for k in range(K):
            if k < K - 1:
                gwin[:, k:k + l].addcmul_(gp, wc[k])
            torch.sum(torch.mul(gp, window[:, k:k + l], out=prod), (0, 1), out=gw[k])  # one scratch for all k
        gu, gparts, c = gwin[:, K - 1:], [], 0
        for n, dt in zip(widths, part_dtypes):
            gparts.append(gu[..., c:c + n].to(dt))
            c += n
        return (None, gw.t().to(w_dtype), gp.sum((0, 1)).to(b_dtype), *gparts)


def causal_conv_silu(prev: Tensor | None, w: Tensor, bias: Tensor, *parts: Tensor) -> Tensor:
    """Mamba2's causal depthwise convolution and SiLU over channels ``cat(parts, -1)``:
    ``silu(bias + sum_k w[:, k] * window[:, t + k])`` with ``window = cat(prev, u)`` along time,
    as ``K`` shifted multiply-adds in float32 at least (on the CPU path much cheaper than a
    grouped ``conv1d`` and its backward), with a written-out backward.

    parts: (batch, seqlen, ch_i) each; prev: (batch, K - 1, ch) the cached window (None: zeros;
    no gradient); w: (ch, K); bias: (ch,). Returns (batch, seqlen, ch) in the parts' dtype.
    """
    return _CausalConvSiLU.apply(prev, w, bias, *parts)


def _conv_window_step(window: Tensor, new: Tensor, w: Tensor, bias: Tensor) -> Tensor:
    """One decode step of :func:`causal_conv_silu` on one part: ``window: (batch, ..., K - 1)``
    the cached inputs (moved on by one, in place), ``new: (batch, ...)`` the new input, ``w:
    (..., K)``, ``bias: (...)``. The prefill's multiply-adds in its order (equal up to rounding:
    the vectorized kernels may fuse differently); no (batch, ..., K) window is built."""
    K, cd = w.shape[-1], _compute_dtype(new)
    wc = w.to(cd)
    acc = bias.to(cd).expand(new.shape).clone()
    for k in range(K - 1):
        acc.addcmul_(window[..., k], wc[..., k])
    acc.addcmul_(new, wc[..., K - 1])
    if K > 1:
        window.copy_(torch.cat([window[..., 1:], new[..., None].to(window.dtype)], -1))
    return F.silu(acc).to(new.dtype)


def _rows_by_sequence(t: Tensor, seq: Tensor, slot: Tensor, n: int, longest: int) -> Tensor:
    """Packed tokens ``t: (T, ...)`` of ``n`` sequences back to back (token i in sequence
    ``seq[i]`` at position ``slot[i]``) as one zero-padded row per sequence: (n, longest, ...)."""
    out = t.new_zeros(n, longest, *t.shape[1:])
    out[seq, slot] = t
    return out


class ElasticRMSNorm(ElasticLayer):
    """RMSNorm over the active channel prefix: with ``k`` of ``dim`` channels active it
    normalizes over those ``k`` only, ``y = x / sqrt(mean_k(x^2) + eps) * weight[:k]``.

    ``forward(x, width=None, mask=None)``: x: (batch, ..., k); width: LongTensor (batch,)
    per-sample active channels (channels beyond must already be 0 in x); mask: soft channel
    weights (dim,) or (batch, dim): the mean square becomes ``sum(m x^2) / sum(m)``.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, width: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        k = x.shape[-1]
        if k > self.dim:
            raise ValueError(f"ElasticRMSNorm: x has {k} channels, more than dim={self.dim}")
        c = unit_weights(width, mask, k, x, "ElasticRMSNorm")
        cd = _compute_dtype(x)
        xf = x.to(cd)
        if c is None:
            ms = xf.square().mean(-1, keepdim=True)
        else:
            c = (_per_sample(c, x.dim() - 1) if c.dim() == 2 else c).to(cd)
            ms = (xf.square() * c).sum(-1, keepdim=True) / c.sum(-1, keepdim=True).clamp_min(1e-30)
        return (xf * torch.rsqrt(ms + self.eps) * self.weight[:k].to(cd)).to(x.dtype)

    def sliced_shapes(self, k: int, sizes: Mapping[str, int] | None = None, active: bool = False) -> dict[str, tuple]:
        return {"weight": (k,)}

    def permute_(self, axis: str, perm: Tensor) -> None:
        _only_hidden(self, axis)
        permute_rows_(self.weight, perm)


class ElasticGatedRMSNorm(nn.Module):
    """Gated RMSNorm per group (Mamba2 ``RMSNormGated``, norm after gate), interleaved heads.

    ``g = y * silu(z)``; for every group ``G_j`` (heads ``h`` with ``h % ngroups == j``) and
    every sample: ``out = g / sqrt(sum_{h in G_j active} c_h |g_h|^2 / (headdim * sum c_h) + eps)
    * weight``, so with ``k`` heads per group active only those are normalized over.

    ``forward(y, z, head_weights=None)``: y, z: (batch, seqlen, h, headdim) with ``h`` a multiple
    of ngroups (the active prefix); head_weights: (h,) or (batch, h) (0/1 per-sample head mask
    times the soft head mask), None = all ``h`` heads with weight 1.
    """

    def __init__(self, nheads: int, head_dim: int, ngroups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.nheads, self.head_dim, self.ngroups, self.eps = nheads, head_dim, ngroups, eps
        self.weight = nn.Parameter(torch.ones(nheads, head_dim))

    def forward(self, y: Tensor, z: Tensor, head_weights: Tensor | None = None) -> Tensor:
        h, p, g = y.shape[-2], y.shape[-1], self.ngroups
        if h % g or h > self.nheads:
            raise ValueError(f"ElasticGatedRMSNorm: {h} heads must be a multiple of ngroups={g} "
                             f"and at most nheads={self.nheads}")
        cd = _compute_dtype(y)
        gated = y.to(cd) * F.silu(z.to(cd).contiguous())  # silu of a strided view runs several times slower
        lead = gated.shape[:-2]
        sq = gated.square().reshape(*lead, h // g, g, p)
        if head_weights is None:
            ms = sq.mean(dim=(-3, -1))  # (..., g)
        else:
            c = head_weights.to(cd)
            c = _per_sample(c, len(lead)) if c.dim() == 2 else c
            c = c.reshape(*c.shape[:-1], h // g, g)
            ms = (sq.sum(-1) * c).sum(-2) / (c.sum(-2) * p).clamp_min(1e-30)
        inv = torch.rsqrt(ms + self.eps)  # (..., g); head h uses group h % g
        inv = inv.unsqueeze(-2).expand(*inv.shape[:-1], h // g, g).reshape(*inv.shape[:-1], h)
        return (gated * inv[..., None] * self.weight[:h].to(cd)).to(y.dtype)


class ElasticMamba2Mixer(ElasticLayer):
    """Mamba2 mixer with elastic heads (interleaved layout: the first ``k`` heads of every group
    are the prefix ``[0, k * ngroups)``), on :func:`elastic_kernels.ssd_scan` /
    :func:`elastic_kernels.ssd_state_update`.

    in_proj per head (z, x, dt) and per group (B, C); causal depthwise conv + SiLU on (x, B, C);
    SSD with ``A = -exp(A_log)``, ``D``, ``dt_bias`` (softplus; prefill scans clamp it to
    ``dt_limit``, one-token decode steps do not, as mamba_ssm); gated per-group RMSNorm with z;
    out_proj. An int ``active_heads`` uses prefix views of every head weight (the interleaved
    layout makes "the first k heads of every group" the contiguous prefix ``[0, k)``), so the scan
    runs on ``k`` heads; per-sample widths go to the ops as ``active_heads`` LongTensors.

    ``forward(x, active_heads=None, head_mask=None, cache=None, max_active=None, seq_lens=None)``:
        x: (batch, seqlen, k). active_heads: None | int | LongTensor (batch,), total active heads
        (a multiple of ngroups). head_mask: (nheads,) or (batch, nheads) soft head scale.
        cache: a :class:`MambaLayerCache` (continues its sequence and updates it in place;
        one-token steps use ``ssd_state_update``). max_active: host upper bound of per-sample
        ``active_heads`` (heads computed). seq_lens: packed prefill of fresh sequences, x is
        ``(1, sum(seq_lens), k)`` and a per-sample ``active_heads`` has one entry per token (see
        ``_forward_packed``). Returns (batch, seqlen, k).
    """

    letter, kind_name, cache_axis, mixes_tokens = "M", "Mamba2", "mamba_heads", True
    axes = (LayerAxis("mamba_heads", "mamba_heads", width_kw="active_heads", mask_kw="head_mask",
                      max_kw="max_active", min_field="mamba_groups", multiple_field="mamba_groups"),)

    @classmethod
    def from_config(cls, c, occurrence: int) -> "ElasticMamba2Mixer":
        """The ``occurrence``-th Mamba2 layer of an :class:`~elastic_kernels.models.ElasticHybridConfig`."""
        return cls(c.hidden_size, c.full_size("mamba_heads", occurrence), c.mamba_head_dim, c.mamba_groups,
                   c.mamba_state, c.mamba_conv_kernel, c.mamba_chunk_size, c.norm_eps, c.init_std,
                   dt_limit=c.mamba_dt_limit)

    def __init__(self, hidden: int, nheads: int, head_dim: int, ngroups: int, d_state: int,
                 conv_kernel: int = 4, chunk_size: int = 64, eps: float = 1e-5, init_std: float = 0.02,
                 dt_limit: tuple[float, float] = (0.0, math.inf)) -> None:
        super().__init__()
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        if nheads % ngroups:
            raise ValueError(f"ElasticMamba2Mixer: nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
        self.hidden, self.nheads, self.head_dim, self.ngroups = hidden, nheads, head_dim, ngroups
        self.d_state, self.conv_kernel, self.chunk_size = d_state, conv_kernel, chunk_size
        P, H, GN = head_dim, nheads, ngroups * d_state
        self.in_heads = nn.Parameter(_normal(H, 2 * P + 1, hidden, std=init_std))   # z, x, dt
        self.in_bc = nn.Parameter(_normal(2 * GN, hidden, std=init_std))            # B, C
        bound = 1.0 / math.sqrt(conv_kernel)
        self.conv_x_weight = nn.Parameter(torch.empty(H, P, conv_kernel).uniform_(-bound, bound))
        self.conv_x_bias = nn.Parameter(torch.zeros(H, P))
        self.conv_bc_weight = nn.Parameter(torch.empty(2 * GN, conv_kernel).uniform_(-bound, bound))
        self.conv_bc_bias = nn.Parameter(torch.zeros(2 * GN))
        if _shapes_only():
            self.dt_bias, self.A_log = nn.Parameter(torch.empty(H)), nn.Parameter(torch.empty(H))
        else:
            dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = ElasticGatedRMSNorm(H, P, ngroups, eps)
        self.out_proj = nn.Parameter(_normal(hidden, H * P, std=init_std))

    def new_cache(self, batch: int, device=None, dtype=torch.float32) -> MambaLayerCache:
        P, K1 = self.head_dim, self.conv_kernel - 1
        return MambaLayerCache(
            conv_x=torch.zeros(batch, self.nheads, P, K1, device=device, dtype=dtype),
            conv_bc=torch.zeros(batch, 2 * self.ngroups * self.d_state, K1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.nheads, P, self.d_state, device=device,
                            dtype=torch.promote_types(dtype, torch.float32)))

    def project_in(self, x: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """In-projection of ``x: (batch, seqlen, k)`` for the first ``heads`` heads: ``z``, ``x``
        (batch, seqlen, heads, headdim), ``dt`` (batch, seqlen, heads) and ``B|C`` (batch, seqlen,
        2 * ngroups * d_state), before the convolution."""
        b, l, k = x.shape
        P = self.head_dim
        w_heads = self.in_heads[:heads, :, :k].reshape(heads * (2 * P + 1), k)
        zxdt = _linear(x, w_heads).view(b, l, heads, 2 * P + 1)
        z, xs, dt = zxdt.split([P, P, 1], dim=-1)  # one concatenation in backward, not three padded slices
        return z, xs, dt.squeeze(-1), _linear(x, self.in_bc[:, :k])

    def forward(self, x: Tensor, active_heads=None, head_mask: Tensor | None = None,
                cache: MambaLayerCache | None = None, max_active: int | None = None,
                seq_lens: list[int] | None = None) -> Tensor:
        b, l, k = x.shape
        P, G, N, K = self.head_dim, self.ngroups, self.d_state, self.conv_kernel
        if k > self.hidden:
            raise ValueError(f"ElasticMamba2Mixer: x has {k} channels, more than hidden={self.hidden}")
        hh = _hard_int(active_heads, self.nheads, "ElasticMamba2Mixer: active_heads")
        if isinstance(active_heads, Tensor) and max_active is not None:
            hh = _hard_int(max_active, self.nheads, "ElasticMamba2Mixer: max_active")
        if hh % G:
            raise ValueError(f"ElasticMamba2Mixer: active_heads ({hh}) must be a multiple of ngroups ({G})")
        per_sample = active_heads if isinstance(active_heads, Tensor) else None
        if seq_lens is not None:
            if head_mask is not None:
                raise ValueError("ElasticMamba2Mixer: a packed prefill (seq_lens) takes no head_mask")
            return self._forward_packed(x, hh, per_sample, cache, seq_lens)
        if l == 0:  # nothing to mix; the cache is unchanged
            return x.new_zeros(b, 0, k)

        z, xs, dt, bc = self.project_in(x, hh)
        if cache is not None and l == 1:
            xs, Bm, Cm = self._conv_step(xs[:, 0], bc[:, 0], hh, cache)
            return self._mix(x, z, xs, Bm, Cm, dt.contiguous(), hh, per_sample, head_mask, cache)

        # causal depthwise conv over (x heads, B, C), continuing the cached window
        xs = xs.reshape(b, l, hh * P)
        w_conv = torch.cat([self.conv_x_weight[:hh].reshape(hh * P, K), self.conv_bc_weight], 0)
        bias = torch.cat([self.conv_x_bias[:hh].reshape(hh * P), self.conv_bc_bias], 0)
        prev = None
        if cache is not None:
            prev = torch.cat([cache.conv_x[:, :hh].reshape(b, hh * P, K - 1), cache.conv_bc], 1).transpose(1, 2)
        conv = causal_conv_silu(prev, w_conv, bias, xs, bc)  # (b, l, ch)
        if cache is not None and K > 1:
            tail = torch.cat([prev.to(xs.dtype), torch.cat([xs[:, -(K - 1):], bc[:, -(K - 1):]], -1)], 1)[:, -(K - 1):]
            cache.conv_x[:, :hh] = tail[..., :hh * P].transpose(1, 2).reshape(b, hh, P, K - 1).to(cache.conv_x.dtype)
            cache.conv_bc.copy_(tail[..., hh * P:].transpose(1, 2).to(cache.conv_bc.dtype))
        xs, Bm, Cm = conv.split([hh * P, G * N, G * N], dim=-1)
        # contiguous operands: the scan's output strides then match its fake kernel under torch.compile
        xs = xs.reshape(b, l, hh, P).contiguous()
        Bm = Bm.reshape(b, l, G, N).contiguous()
        Cm = Cm.reshape(b, l, G, N).contiguous()
        return self._mix(x, z, xs, Bm, Cm, dt.contiguous(), hh, per_sample, head_mask, cache)

    def _conv_step(self, xs: Tensor, bc: Tensor, hh: int, cache: MambaLayerCache) -> tuple[Tensor, Tensor, Tensor]:
        """The causal conv + SiLU of one new token against the cached window (a decode step), each
        part (x heads, B and C) on its own, so nothing is concatenated but the window itself.
        xs: (b, hh, P); bc: (b, 2 G N). Returns xs (b, 1, hh, P), B and C (b, 1, G, N); the window
        in the cache moves on by one."""
        b, G, N = xs.shape[0], self.ngroups, self.d_state
        cx = _conv_window_step(cache.conv_x[:, :hh], xs, self.conv_x_weight[:hh], self.conv_x_bias[:hh])
        cbc = _conv_window_step(cache.conv_bc, bc, self.conv_bc_weight, self.conv_bc_bias)
        return (cx[:, None].contiguous(), cbc[:, None, :G * N].reshape(b, 1, G, N).contiguous(),
                cbc[:, None, G * N:].reshape(b, 1, G, N).contiguous())

    def _mix(self, x: Tensor, z: Tensor, xs: Tensor, Bm: Tensor, Cm: Tensor, dt: Tensor, hh: int,
             per_sample: Tensor | None, head_mask: Tensor | None, cache: MambaLayerCache | None) -> Tensor:
        """The scan (or, with a cached state and one token, the state update), gate norm and out
        projection of the conv outputs xs (b, l, hh, P), B / C (b, l, G, N) and dt (b, l, hh)."""
        b, l, k = x.shape
        P = self.head_dim
        A = -torch.exp(self.A_log[:hh].to(_compute_dtype(x)))
        scale = None
        if head_mask is not None:
            scale = unit_weights(None, head_mask, hh, x, "ElasticMamba2Mixer: head_mask")
            scale = scale.expand(b, hh) if scale.dim() == 1 else scale
        common = dict(D=self.D[:hh], dt_bias=self.dt_bias[:hh], dt_softplus=True,
                      head_layout="interleaved", active_heads=per_sample)
        if cache is not None and cache.has_state and l == 1:
            state = cache.ssm[:, :hh]
            y = ssd_state_update(state, xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], **common)[:, None]
            if scale is not None:
                y = y * scale[:, None, :, None].to(y.dtype)
        else:
            init = cache.ssm[:, :hh] if cache is not None and cache.has_state else None
            y, final = ssd_scan(xs, dt, A, Bm, Cm, chunk_size=balanced_chunk(l, self.chunk_size),
                                initial_states=init, dt_limit=self.dt_limit, head_scale=scale,
                                return_final_states=True, **common)
            if cache is not None:
                cache.ssm[:, :hh] = final.to(cache.ssm.dtype)
        if cache is not None:
            cache.has_state = True
        hw = unit_weights(per_sample, head_mask, hh, x, "ElasticMamba2Mixer: head_mask")
        y = self.norm(y, z, hw)
        return _linear(y.reshape(b, l, hh * P), self.out_proj[:k, :hh * P])

    def _forward_packed(self, x: Tensor, hh: int, per_token: Tensor | None, cache: MambaLayerCache | None,
                        seq_lens: list[int]) -> Tensor:
        """Packed prefill of fresh sequences: ``x: (1, T, k)`` holds ``len(seq_lens)`` sequences
        back to back (``T = sum(seq_lens)``); ``per_token``: None or LongTensor ``(T,)`` of each
        token's active heads (its sequence's budget). The convolution sees zeros before every
        sequence (as a fresh cache), the scan resets its state at every boundary (``seq_idx``);
        heads beyond a token's width are computed at ``hh`` and zeroed, which equals computing
        its own width (heads are independent). Cache row ``i`` (a fresh cache of batch
        ``len(seq_lens)``) receives sequence ``i``'s conv window and SSM state, zero beyond its
        heads, as a prefill of that sequence alone leaves."""
        _, T, k = x.shape
        P, G, N, K = self.head_dim, self.ngroups, self.d_state, self.conv_kernel
        n, dev = len(seq_lens), x.device
        lens = torch.tensor(seq_lens, dtype=torch.int64, device=dev)
        seq = torch.repeat_interleave(torch.arange(n, device=dev), lens)
        ends = torch.cumsum(lens, 0) - 1
        z, xs, dt, bc = self.project_in(x, hh)
        u = torch.cat([xs.reshape(1, T, hh * P), bc], dim=-1).transpose(1, 2)  # (1, ch, T)
        # every sequence preceded by K - 1 zero columns: a plain conv1d then never crosses sequences
        slot = torch.arange(T, device=dev) + (K - 1) * (seq + 1)
        gapped = u.new_zeros(1, u.shape[1], T + n * (K - 1))
        gapped[..., slot] = u
        w_conv = torch.cat([self.conv_x_weight[:hh].reshape(hh * P, K), self.conv_bc_weight], 0)
        bias = torch.cat([self.conv_x_bias[:hh].reshape(hh * P), self.conv_bc_bias], 0)
        conv = F.silu(F.conv1d(gapped, w_conv.to(u.dtype)[:, None, :], bias.to(u.dtype), groups=u.shape[1]))
        conv = conv[..., slot - (K - 1)].transpose(1, 2)  # (1, T, ch)
        width = per_token if per_token is not None else torch.full((T,), hh, dtype=torch.int64, device=dev)
        seq_width = width[ends]                                                     # (n,)
        if cache is not None:
            if cache.has_state or cache.ssm.shape[0] != n:
                raise ValueError(f"ElasticMamba2Mixer: a packed prefill needs an empty cache of batch {n}")
            if K > 1:
                tail = gapped[0][:, (slot[ends] - (K - 2))[:, None] + torch.arange(K - 1, device=dev)]  # (ch, n, K-1)
                tail = tail.transpose(0, 1)
                cx = tail[:, :hh * P].reshape(n, hh, P, K - 1)
                keep = (torch.arange(hh, device=dev)[None, :] < seq_width[:, None])
                cache.conv_x[:, :hh] = (cx * keep[:, :, None, None].to(cx.dtype)).to(cache.conv_x.dtype)
                cache.conv_bc.copy_(tail[:, hh * P:].to(cache.conv_bc.dtype))
        xs = conv[..., :hh * P].reshape(1, T, hh, P).contiguous()
        Bm = conv[..., hh * P:hh * P + G * N].reshape(1, T, G, N).contiguous()
        Cm = conv[..., hh * P + G * N:].reshape(1, T, G, N).contiguous()
        dt = dt.contiguous()
        cd = _compute_dtype(x)
        A = -torch.exp(self.A_log[:hh].to(cd))
        y = ssd_scan(xs, dt, A, Bm, Cm, chunk_size=balanced_chunk(T, self.chunk_size), D=self.D[:hh],
                     dt_bias=self.dt_bias[:hh], dt_softplus=True, dt_limit=self.dt_limit,
                     seq_idx=seq.to(torch.int32)[None], head_layout="interleaved")
        hw = (torch.arange(hh, device=dev)[None, :] < width[:, None]).to(cd)  # (T, hh)
        y = y[0] * hw[:, :, None].to(y.dtype)
        if cache is not None:
            cache.ssm[:, :hh] = self._packed_states(xs[0], dt[0], A, Bm[0], seq, ends, hw).to(cache.ssm.dtype)
            cache.has_state = True
        y = self.norm(y[:, None], z[0][:, None], hw)  # tokens as the batch: per-token head weights
        return _linear(y.reshape(1, T, hh * P), self.out_proj[:k, :hh * P])

    def _packed_states(self, xs: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, seq: Tensor, ends: Tensor,
                       hw: Tensor) -> Tensor:
        """Final SSM state of every packed sequence, ``(n, hh, headdim, d_state)``, in float64:
        ``h_i = sum_{t in i} exp(sum_{t < s <= end_i} dt_s A) dt_t x_t B_t^T`` (the scan's
        recurrence from a zero state written out; dt processed as the scan does). xs: (T, hh, P);
        dt: (T, hh) raw; Bm: (T, G, N); hw: (T, hh) 0/1 active heads of each token."""
        f64 = torch.float64
        d = dt.to(f64) + self.dt_bias[:xs.shape[1]].to(f64)
        d = F.softplus(d)
        lo, hi = self.dt_limit
        if not (lo == 0.0 and hi == math.inf):
            d = d.clamp(min=lo, max=hi)
        cum = torch.cumsum(d * A.to(f64), 0)                                       # (T, hh)
        decay = torch.exp(cum[ends][seq] - cum)                                    # to the end of each sequence
        hh, G = xs.shape[1], self.ngroups
        Bh = Bm.to(f64)[:, torch.arange(hh, device=xs.device) % G]                 # head h in group h % G
        wx = (decay * d * hw.to(f64))[..., None] * xs.to(f64)                      # (T, hh, P)
        # every sequence's tokens in one zero-padded row (n, longest, ...): one batched contraction
        # over the tokens, no (tokens, heads, headdim, d_state) intermediate
        starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
        pos = torch.arange(xs.shape[0], device=xs.device) - starts[seq]
        n, longest = ends.shape[0], int((ends - starts).max()) + 1
        return torch.einsum("slhp,slhn->shpn", _rows_by_sequence(wx, seq, pos, n, longest),
                            _rows_by_sequence(Bh, seq, pos, n, longest))

    def sizes(self) -> dict[str, int]:
        return {"mamba_heads": self.nheads}

    def sliced_shapes(self, k: int, sizes: Mapping[str, int] | None = None, active: bool = False) -> dict[str, tuple]:
        heads = (sizes or {}).get("mamba_heads", self.nheads)
        P, GN2, K = self.head_dim, 2 * self.ngroups * self.d_state, self.conv_kernel
        return {"in_heads": (heads, 2 * P + 1, k), "in_bc": (GN2, k), "conv_x_weight": (heads, P, K),
                "conv_x_bias": (heads, P), "conv_bc_weight": (GN2, K), "conv_bc_bias": (GN2,),
                "dt_bias": (heads,), "A_log": (heads,), "D": (heads,), "norm.weight": (heads, P),
                "out_proj": (k, heads * P)}

    def permute_(self, axis: str, perm: Tensor) -> None:
        """Reorder hidden channels or heads (``perm[new] = old``); every head must stay in its group."""
        if axis == "hidden":
            permute_rows_(self.in_heads, perm, 2)
            permute_rows_(self.in_bc, perm, 1)
            permute_rows_(self.out_proj, perm, 0)
            return
        _check_axis(self, axis)
        G = self.ngroups
        ar = torch.arange(self.nheads, device=perm.device)
        if not torch.equal(perm % G, ar % G) or not torch.equal(perm.sort().values, ar):
            raise ValueError("ElasticMamba2Mixer.permute_: perm must be a permutation that keeps "
                             "every head in its group (perm[h] % ngroups == h % ngroups)")
        for p in (self.in_heads, self.conv_x_weight, self.conv_x_bias, self.dt_bias, self.A_log, self.D,
                  self.norm.weight):
            permute_rows_(p, perm)
        P = self.head_dim
        self.out_proj.data = self.out_proj.data.view(self.hidden, self.nheads, P)[:, perm.to(self.out_proj.device)] \
            .reshape(self.hidden, self.nheads * P).contiguous()

    def importance(self, x: Tensor) -> dict[str, Tensor]:
        """``mamba_heads``: ``sum |X W_x,h^T|`` over the x-projection channels of each head."""
        _, xs, _, _ = self.project_in(x, self.nheads)
        return {"mamba_heads": xs.abs().double().sum(dim=(0, 1, 3))}

    def permute_by_importance_(self, scores: Mapping[str, Tensor], where: str = "") -> dict[str, Tensor]:
        """Heads ranked within their group, so the permutation keeps every head in its group."""
        if "mamba_heads" not in scores:
            return {}
        s = check_score(f"scores['mamba_heads']{where}", scores["mamba_heads"], (self.nheads,)).cpu()
        G = self.ngroups
        perm = torch.empty(self.nheads, dtype=torch.int64)
        for g in range(G):
            heads = torch.arange(g, self.nheads, G)
            perm[heads] = heads[descending(s[heads])]
        perm = perm.to(self.A_log.device)
        self.permute_("mamba_heads", perm)
        return {"mamba_heads": perm}

    def quantizable_weights(self) -> dict[str, str]:
        return {"in_heads": "flat", "in_bc": "2d", "out_proj": "2d"}


class GQAAttention(ElasticLayer):
    """Causal grouped-query attention (plain PyTorch SDPA), no positional encoding (as
    Nemotron-H: the Mamba layers carry position). Heads are not elastic; the hidden prefix is.

    ``forward(x, cache=None, seq_lens=None)``: x: (batch, seqlen, k); cache:
    :class:`AttentionLayerCache` (appended in place; with per-row ``lengths`` every row continues
    at its own length). ``seq_lens``: packed prefill, x is ``(1, sum(seq_lens), k)`` holding the
    sequences back to back, each attending within itself (block-diagonal causal mask). Returns
    (batch, seqlen, k).
    """

    letter, kind_name, mixes_tokens = "*", "attention", True

    @classmethod
    def from_config(cls, c, occurrence: int) -> "GQAAttention":
        return cls(c.hidden_size, c.attn_heads, c.attn_kv_heads, c.head_dim, c.init_std)

    def __init__(self, hidden: int, nheads: int, nkv_heads: int, head_dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        if nheads % nkv_heads:
            raise ValueError(f"GQAAttention: nheads ({nheads}) must be a multiple of nkv_heads ({nkv_heads})")
        self.hidden, self.nheads, self.nkv_heads, self.head_dim = hidden, nheads, nkv_heads, head_dim
        self.q_proj = nn.Parameter(_normal(nheads * head_dim, hidden, std=init_std))
        self.k_proj = nn.Parameter(_normal(nkv_heads * head_dim, hidden, std=init_std))
        self.v_proj = nn.Parameter(_normal(nkv_heads * head_dim, hidden, std=init_std))
        self.o_proj = nn.Parameter(_normal(hidden, nheads * head_dim, std=init_std))

    def new_cache(self, batch: int, device=None, dtype=torch.float32) -> AttentionLayerCache:
        empty = torch.zeros(batch, self.nkv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionLayerCache(k=empty, v=empty.clone())

    def forward(self, x: Tensor, cache: AttentionLayerCache | None = None,
                seq_lens: list[int] | None = None) -> Tensor:
        b, l, k = x.shape
        hd = self.head_dim
        q = _linear(x, self.q_proj[:, :k]).view(b, l, self.nheads, hd).transpose(1, 2)
        kk = _linear(x, self.k_proj[:, :k]).view(b, l, self.nkv_heads, hd).transpose(1, 2)
        vv = _linear(x, self.v_proj[:, :k]).view(b, l, self.nkv_heads, hd).transpose(1, 2)
        if seq_lens is not None:
            return self._forward_packed(q, kk, vv, cache, seq_lens, k)
        if cache is not None and cache.lengths is not None:
            return self._forward_ragged(q, kk, vv, cache, k)
        past = 0
        if cache is not None:
            past = cache.k.shape[2]
            kk = torch.cat([cache.k.to(kk.dtype), kk], 2)
            vv = torch.cat([cache.v.to(vv.dtype), vv], 2)
            cache.k, cache.v = kk, vv
        # enable_gqa: query head i reads kv head i // (nheads / nkv_heads) without copying the kv heads
        if past == 0:
            o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=True)
        elif l == 1:  # one new token attends to every cached key
            o = F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
        else:
            qpos = torch.arange(past, past + l, device=x.device)[:, None]
            mask = torch.arange(past + l, device=x.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=True)
        return self._out(o, k)

    def _out(self, o: Tensor, k: int) -> Tensor:
        b, _, l, _ = o.shape
        return _linear(o.transpose(1, 2).reshape(b, l, self.nheads * self.head_dim), self.o_proj[:k])

    def _forward_packed(self, q: Tensor, kk: Tensor, vv: Tensor, cache: AttentionLayerCache | None,
                        seq_lens: list[int], k: int) -> Tensor:
        """Packed prefill: ``q: (1, nheads, T, hd)`` etc. hold ``len(seq_lens)`` fresh sequences
        back to back; each attends causally within itself only. The cache (batch =
        ``len(seq_lens)``, empty) receives each sequence's keys/values in its own row."""
        dev, T, n = q.device, q.shape[2], len(seq_lens)
        if cache is not None and (cache.k.shape[2] or cache.k.shape[0] != n):
            raise ValueError(f"GQAAttention: a packed prefill needs an empty cache of batch {n}, "
                             f"got batch {cache.k.shape[0]} holding {cache.k.shape[2]} keys")
        lens = torch.tensor(seq_lens, dtype=torch.int64, device=dev)
        seq = torch.repeat_interleave(torch.arange(n, device=dev), lens)
        slot = torch.arange(T, device=dev) - (torch.cumsum(lens, 0) - lens)[seq]  # position within its sequence

        def padded(t: Tensor) -> Tensor:  # (1, heads, T, hd) -> (n, heads, longest, hd), zeros after each sequence
            return _rows_by_sequence(t[0].transpose(0, 1), seq, slot, n, max(seq_lens)).transpose(1, 2)
        # one padded row per sequence (causal: a real query never sees its row's padding), not a T x T mask
        qb, kb, vb = padded(q), padded(kk), padded(vv)
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        o = o.transpose(1, 2)[seq, slot].transpose(0, 1)[None]   # back to (1, nheads, T, hd)
        if cache is not None:
            cache.k, cache.v, cache.lengths = kb.to(cache.k.dtype), vb.to(cache.v.dtype), lens
        return self._out(o, k)

    def _forward_ragged(self, q: Tensor, kk: Tensor, vv: Tensor, cache: AttentionLayerCache, k: int) -> Tensor:
        """Continue rows at their own lengths: row ``r``'s ``l`` new keys go to slots
        ``lengths[r] ..``; its queries attend to its own keys only."""
        b, _, l, _ = q.shape
        dev = q.device
        lengths = cache.lengths.to(dev)
        need = int(lengths.max()) + l
        slots = cache.k.shape[2]
        if need > slots:  # grow geometrically: appends stay amortized O(1) per token
            grow = max(need, 2 * slots) - slots
            pad = cache.k.new_zeros(b, self.nkv_heads, grow, self.head_dim)
            cache.k, cache.v = torch.cat([cache.k, pad], 2), torch.cat([cache.v, pad], 2)
        rows = torch.arange(b, device=dev)[:, None]
        pos = lengths[:, None] + torch.arange(l, device=dev)[None, :]          # (b, l)
        cache.k.transpose(1, 2)[rows, pos] = kk.transpose(1, 2).to(cache.k.dtype)
        cache.v.transpose(1, 2)[rows, pos] = vv.transpose(1, 2).to(cache.v.dtype)
        cache.lengths = lengths + l
        mask = torch.arange(cache.k.shape[2], device=dev)[None, None, :] <= pos[:, :, None]  # (b, l, slots)
        o = F.scaled_dot_product_attention(q, cache.k.to(q.dtype), cache.v.to(q.dtype), attn_mask=mask[:, None],
                                           enable_gqa=True)
        return self._out(o, k)

    def sliced_shapes(self, k: int, sizes: Mapping[str, int] | None = None, active: bool = False) -> dict[str, tuple]:
        nq, nkv = self.nheads * self.head_dim, self.nkv_heads * self.head_dim
        return {"q_proj": (nq, k), "k_proj": (nkv, k), "v_proj": (nkv, k), "o_proj": (k, nq)}

    def permute_(self, axis: str, perm: Tensor) -> None:
        _only_hidden(self, axis)
        for p in (self.q_proj, self.k_proj, self.v_proj):
            permute_rows_(p, perm, 1)
        permute_rows_(self.o_proj, perm, 0)

    def quantizable_weights(self) -> dict[str, str]:
        return {n: "2d" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}


class ElasticFFN(ElasticLayer):
    """Dense (non-gated) FFN with elastic intermediate width: ``down(act(up(x)) * mask)``.

    ``forward(x, width=None, mask=None, max_width=None)``: x: (batch, ..., k); width: None | int |
    LongTensor (batch,); mask: (ffn,) or (batch, ffn) soft channel scale; max_width: host upper
    bound of per-sample widths. Returns (batch, ..., k).
    """

    letter, kind_name = "-", "dense FFN"
    axes = (LayerAxis("ffn", "ffn_size", width_kw="width", mask_kw="mask", max_kw="max_width"),)

    @classmethod
    def from_config(cls, c, occurrence: int) -> "ElasticFFN":
        return cls(c.hidden_size, c.full_size("ffn", occurrence), c.ffn_activation, c.init_std)

    def __init__(self, hidden: int, ffn: int, activation: str = "relu2", init_std: float = 0.02) -> None:
        super().__init__()
        self.hidden, self.ffn, self.activation = hidden, ffn, activation
        self.up = nn.Parameter(_normal(ffn, hidden, std=init_std))
        self.down = nn.Parameter(_normal(hidden, ffn, std=init_std))

    def forward(self, x: Tensor, width=None, mask: Tensor | None = None, max_width: int | None = None) -> Tensor:
        k = x.shape[-1]
        f = _hard_int(width, self.ffn, "ElasticFFN: width")
        if isinstance(width, Tensor) and max_width is not None:
            f = _hard_int(max_width, self.ffn, "ElasticFFN: max_width")
        a = _activation(_linear(x, self.up[:f, :k]), self.activation)
        c = unit_weights(width if isinstance(width, Tensor) else None, mask, f, x, "ElasticFFN: mask")
        if c is not None:
            a = a * (_per_sample(c, x.dim() - 1) if c.dim() == 2 else c).to(a.dtype)
        return _linear(a, self.down[:k, :f])

    def sizes(self) -> dict[str, int]:
        return {"ffn": self.ffn}

    def sliced_shapes(self, k: int, sizes: Mapping[str, int] | None = None, active: bool = False) -> dict[str, tuple]:
        width = (sizes or {}).get("ffn", self.ffn)
        return {"up": (width, k), "down": (k, width)}

    def permute_(self, axis: str, perm: Tensor) -> None:
        if axis != "hidden":
            _check_axis(self, axis)
        permute_rows_(self.up, perm, 1 if axis == "hidden" else 0)
        permute_rows_(self.down, perm, 0 if axis == "hidden" else 1)

    def importance(self, x: Tensor) -> dict[str, Tensor]:
        """``ffn``: ``sum |X W_up,i^T|`` per intermediate neuron."""
        return {"ffn": _linear(x, self.up[:, :x.shape[-1]]).abs().double().reshape(-1, self.ffn).sum(0)}

    def quantizable_weights(self) -> dict[str, str]:
        return {"up": "2d", "down": "2d"}


class ElasticEmbedding(ElasticLayer):
    """Token embedding keeping the first ``k`` channels: ``forward(ids, k=None) -> (..., k)``."""

    def __init__(self, vocab: int, hidden: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.vocab, self.hidden = vocab, hidden
        self.weight = nn.Parameter(_normal(vocab, hidden, std=init_std))

    def forward(self, ids: Tensor, k: int | None = None) -> Tensor:
        k = self.hidden if k is None else k
        return F.embedding(ids, self.weight[:, :k])

    def sliced_shapes(self, k: int, sizes: Mapping[str, int] | None = None, active: bool = False) -> dict[str, tuple]:
        return {"weight": (self.vocab, k)}

    def permute_(self, axis: str, perm: Tensor) -> None:
        _only_hidden(self, axis)
        permute_rows_(self.weight, perm, 1)


class ElasticLMHead(ElasticLayer):
    """Output projection from the first ``k`` channels: ``forward(x (..., k)) -> (..., vocab)``."""

    def __init__(self, vocab: int, hidden: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.vocab, self.hidden = vocab, hidden
        self.weight = nn.Parameter(_normal(vocab, hidden, std=init_std))

    def forward(self, x: Tensor) -> Tensor:
        return _linear(x, self.weight[:, :x.shape[-1]])

    def quantizable_weights(self) -> dict[str, str]:
        return {"weight": "2d"}

    def sliced_shapes(self, k: int, sizes: Mapping[str, int] | None = None, active: bool = False) -> dict[str, tuple]:
        return {"weight": (self.vocab, k)}

    def permute_(self, axis: str, perm: Tensor) -> None:
        _only_hidden(self, axis)
        permute_rows_(self.weight, perm, 1)


class ElasticMoE(ElasticLayer):
    """MoE block (Nemotron-style non-gated experts, or gated with ``w3``) on
    :func:`elastic_kernels.moe_route` / :func:`elastic_kernels.moe_experts`, with elastic experts
    and expert FFN width, plus an optional always-on shared expert (hidden-elastic only).

    ``forward(x, num_experts=None, ffn_width=None, expert_mask=None, channel_mask=None)``:
        x: (batch, seqlen, k) (or (batch, k)); num_experts: None | int | LongTensor (batch,) —
        the first E' experts (router logits of the rest are excluded before top-k);
        ffn_width: None | int | LongTensor (batch,) — first d' channels of every routed expert;
        expert_mask: (E,) or (batch, E) soft, added to the router logits as ``log(m)``;
        channel_mask: (F,) or (batch, F) soft, the op's ``channel_scale``. Returns like x.

    Routing options (Hugging Face NemotronH / DeepSeek-V3 style): ``n_group``/``topk_group``
    limit every token to the experts of its ``topk_group`` best groups (expert ``e`` is in group
    ``e % n_group``; a group's score is the sum of its two best selection scores, computed among
    the active experts); ``norm_topk`` renormalizes the top-k weights; ``routed_scaling``
    multiplies them; ``router_fp32`` keeps the router weight (and correction bias) in float32
    under ``.to(dtype)`` and computes the logits in float32. ``gated`` adds ``w3``.
    """

    letter, kind_name = "E", "MoE"
    axes = (LayerAxis("experts", "moe_experts", width_kw="num_experts", mask_kw="expert_mask", min_field="moe_top_k"),
            LayerAxis("expert_ffn", "moe_ffn", width_kw="ffn_width", mask_kw="channel_mask"))

    @classmethod
    def from_config(cls, c, occurrence: int) -> "ElasticMoE":
        return cls(c.hidden_size, c.full_size("experts", occurrence), c.moe_top_k, c.full_size("expert_ffn", occurrence),
                   c.moe_shared_ffn, c.moe_score, c.moe_activation, c.init_std, gated=c.moe_gated,
                   n_group=c.moe_n_group, topk_group=c.moe_topk_group, norm_topk=c.moe_norm_topk,
                   routed_scaling=c.moe_routed_scaling, router_fp32=c.moe_router_fp32)

    def __init__(self, hidden: int, num_experts: int, top_k: int, ffn: int, shared_ffn: int = 0,
                 score: str = "softmax", activation: str = "relu2", init_std: float = 0.02, *,
                 gated: bool = False, n_group: int = 1, topk_group: int = 1, norm_topk: bool = True,
                 routed_scaling: float = 1.0, router_fp32: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"ElasticMoE: top_k ({top_k}) must lie in [1, num_experts={num_experts}]")
        if n_group < 1 or num_experts % n_group or not 1 <= topk_group <= n_group:
            raise ValueError(f"ElasticMoE: n_group ({n_group}) must divide num_experts ({num_experts}) and "
                             f"topk_group ({topk_group}) must lie in [1, n_group]")
        self.hidden, self.num_experts, self.top_k, self.ffn = hidden, num_experts, top_k, ffn
        self.score, self.activation = score, activation
        self.n_group, self.topk_group, self.norm_topk = n_group, topk_group, norm_topk
        self.routed_scaling, self.router_fp32 = float(routed_scaling), router_fp32
        self.router = nn.Parameter(_normal(num_experts, hidden, std=init_std))
        self.register_buffer("correction_bias", torch.zeros(num_experts) if score == "sigmoid" else None)
        self.w1 = nn.Parameter(_normal(num_experts, ffn, hidden, std=init_std))
        self.w2 = nn.Parameter(_normal(num_experts, hidden, ffn, std=init_std))
        self.w3 = nn.Parameter(_normal(num_experts, ffn, hidden, std=init_std)) if gated else None
        self.shared = ElasticFFN(hidden, shared_ffn, activation, init_std) if shared_ffn > 0 else None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.router_fp32:  # float32 at least, as transformers' _keep_in_fp32_modules
            for t in (self.router, self.correction_bias):
                if t is not None and t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
                    t.data = t.data.float()
        return self

    def _group_mask(self, logits: Tensor, cb: Tensor | None, e: int) -> Tensor | None:
        """Selection mask (tokens, logits.shape[1]) bool of group-limited routing among the
        first ``e`` experts (None without groups)."""
        if self.n_group == 1:
            return None
        g = self.n_group
        if e % g or e // g < 2:
            raise ValueError(f"ElasticMoE: num_experts ({e}) must be a multiple of n_group ({g}) with at least "
                             f"2 experts per group")
        lg = logits[:, :e].detach()
        probs = torch.softmax(lg, -1) if self.score == "softmax" else torch.sigmoid(lg)
        sel = probs + cb[:e].to(probs.dtype) if cb is not None else probs
        group_scores = sel.view(-1, e // g, g).topk(2, dim=1).values.sum(1)           # (tokens, g)
        chosen = torch.topk(group_scores, self.topk_group, dim=-1).indices
        gmask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        member = torch.arange(logits.shape[1], device=logits.device) % g
        return gmask[:, member] & (torch.arange(logits.shape[1], device=logits.device) < e)

    def route(self, xt: Tensor, num_experts=None, expert_mask: Tensor | None = None,
              per_token: int = 1) -> tuple[Tensor, Tensor, int]:
        """Routing of flat tokens ``xt: (tokens, k)`` (``per_token`` tokens per sample): router
        logits of the first E' experts only. Returns (topk_weights, topk_ids, E' computed);
        the weights are float32 (float64 for a float64 model)."""
        values = None
        if isinstance(num_experts, Tensor):
            values = sorted(set(num_experts.tolist()))  # host read: per-sample budgets come from the host
            for v in values:
                _hard_int(v, self.num_experts, "ElasticMoE: num_experts")
            e = values[-1]
        else:
            e = _hard_int(num_experts, self.num_experts, "ElasticMoE: num_experts")
        if e < self.top_k:
            raise ValueError(f"ElasticMoE: num_experts ({e}) must be >= top_k ({self.top_k})")
        wr = self.router[:e, :xt.shape[-1]]
        if self.router_fp32:
            rd = torch.promote_types(torch.promote_types(xt.dtype, wr.dtype), torch.float32)
            logits = F.linear(xt.to(rd), wr.to(rd))
        else:
            logits = F.linear(xt, wr)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if expert_mask is not None:
            m = unit_weights(None, expert_mask, e, xt[::per_token], "ElasticMoE: expert_mask")
            logm = torch.where(m > 0, torch.log(m.clamp_min(1e-30)), torch.full_like(m, float("-inf")))
            logits = logits + (logm.repeat_interleave(per_token, 0) if logm.dim() == 2 else logm)
        cb = self.correction_bias[:e] if self.correction_bias is not None else None
        kw = dict(score=self.score, correction_bias=cb, renormalize=self.norm_topk)
        if values is None:
            w, ids = moe_route(logits, self.top_k, selection_mask=self._group_mask(logits, cb, e), **kw)
            return w * self.routed_scaling if self.routed_scaling != 1.0 else w, ids, e
        per_tok = num_experts.repeat_interleave(per_token, 0)
        w = logits.new_zeros(xt.shape[0], self.top_k)
        ids = torch.zeros(xt.shape[0], self.top_k, dtype=torch.int64, device=xt.device)
        for v in values:
            rows = (per_tok == v).nonzero().flatten()
            lv = logits[rows]
            wv, iv = moe_route(lv, self.top_k, num_experts_active=v, selection_mask=self._group_mask(lv, cb, v), **kw)
            w = w.index_copy(0, rows, wv.to(w.dtype))
            ids = ids.index_copy(0, rows, iv)
        return w * self.routed_scaling if self.routed_scaling != 1.0 else w, ids, e

    def forward(self, x: Tensor, num_experts=None, ffn_width=None, expert_mask: Tensor | None = None,
                channel_mask: Tensor | None = None) -> Tensor:
        shape = x.shape
        k = shape[-1]
        xt = x.reshape(-1, k)
        per_token = xt.shape[0] // shape[0] if shape[0] else 1
        w, ids, e = self.route(xt, num_experts, expert_mask, per_token)
        f = ffn_width
        if isinstance(ffn_width, Tensor):
            f = ffn_width.repeat_interleave(per_token, 0)
        cs = None
        if channel_mask is not None:
            cs = unit_weights(None, channel_mask, self.ffn, x, "ElasticMoE: channel_mask")
            cs = cs.repeat_interleave(per_token, 0) if cs.dim() == 2 else cs
            cs = cs.to(x.dtype)
        w3 = self.w3[:, :, :k] if self.w3 is not None else None
        y = moe_experts(xt, w if self.router_fp32 else w.to(x.dtype), ids, self.w1[:, :, :k], self.w2[:, :k, :],
                        w3=w3, activation=self.activation, num_experts_active=e, ffn_width=f, channel_scale=cs)
        if self.shared is not None:
            y = y + self.shared(xt)
        return y.reshape(shape)

    def sizes(self) -> dict[str, int]:
        return {"experts": self.num_experts, "expert_ffn": self.ffn}

    def sliced_shapes(self, k: int, sizes: Mapping[str, int] | None = None, active: bool = False) -> dict[str, tuple]:
        """``active``: the routed expert weights counted for ``top_k`` experts (what one token uses)."""
        sizes = sizes or {}
        e, f = sizes.get("experts", self.num_experts), sizes.get("expert_ffn", self.ffn)
        used = self.top_k if active else e
        out = {"router": (e, k), "w1": (used, f, k), "w2": (used, k, f)}
        if self.w3 is not None:
            out["w3"] = (used, f, k)
        if self.correction_bias is not None:
            out["correction_bias"] = (e,)
        if self.shared is not None:
            out.update({f"shared.{n}": s for n, s in self.shared.sliced_shapes(k).items()})
        return out

    def permute_(self, axis: str, perm: Tensor) -> None:
        """``perm``: (hidden,), (E,) for ``experts``, or (E, F) for ``expert_ffn`` (every expert's
        channel order, ``perm[e, new] = old``)."""
        if axis == "hidden":
            permute_rows_(self.router, perm, 1)
            permute_rows_(self.w1, perm, 2)
            permute_rows_(self.w2, perm, 1)
            if self.w3 is not None:
                permute_rows_(self.w3, perm, 2)
            if self.shared is not None:
                self.shared.permute_("hidden", perm)
            return
        _check_axis(self, axis)
        if axis == "experts":
            g = self.n_group
            ar = torch.arange(self.num_experts, device=perm.device)
            if g > 1 and not torch.equal(perm % g, ar % g):
                raise ValueError("ElasticMoE.permute_: with n_group > 1, an experts perm must keep every expert in "
                                 "its group (perm[e] % n_group == e % n_group)")
            for p in (self.router, self.w1, self.w2) + ((self.w3,) if self.w3 is not None else ()):
                permute_rows_(p, perm)
            if self.correction_bias is not None:
                permute_rows_(self.correction_bias, perm)
            return
        idx = perm.to(device=self.w1.device, dtype=torch.int64)
        self.w1.data = torch.gather(self.w1.data, 1, idx[:, :, None].expand_as(self.w1.data)).contiguous()
        self.w2.data = torch.gather(self.w2.data, 2, idx[:, None, :].expand_as(self.w2.data)).contiguous()
        if self.w3 is not None:
            self.w3.data = torch.gather(self.w3.data, 1, idx[:, :, None].expand_as(self.w3.data)).contiguous()

    def importance(self, x: Tensor) -> dict[str, Tensor]:
        """``experts``: ``sum ||w_t,e expert_e(x_t)||_2`` over the tokens routed to ``e`` (the
        layer's own routing and expert op, one top-k slot at a time); ``expert_ffn`` (E, F):
        ``sum |x_t W1[e, i]^T|`` over the tokens routed to ``e``."""
        xt = x.reshape(-1, x.shape[-1])
        w, ids, _ = self.route(xt)
        f64 = dict(dtype=torch.float64, device=x.device)
        experts, channels = torch.zeros(self.num_experts, **f64), torch.zeros(self.num_experts, self.ffn, **f64)
        for j in range(self.top_k):
            out = moe_experts(xt, w[:, j:j + 1].to(xt.dtype), ids[:, j:j + 1], self.w1, self.w2, w3=self.w3,
                              activation=self.activation)
            experts.index_add_(0, ids[:, j], out.double().norm(dim=-1))
        for e in range(self.num_experts):
            tok = (ids == e).any(1)
            if tok.any():
                channels[e] = _linear(xt[tok], self.w1[e]).abs().double().sum(0)
        return {"experts": experts, "expert_ffn": channels}

    def permute_by_importance_(self, scores: Mapping[str, Tensor], where: str = "") -> dict[str, Tensor]:
        """Expert channels first (their scores are indexed by the current expert order), then experts."""
        perms = {}
        if "expert_ffn" in scores:
            s = check_score(f"scores['expert_ffn']{where}", scores["expert_ffn"], (self.num_experts, self.ffn))
            perms["expert_ffn"] = torch.sort(s, dim=1, descending=True, stable=True).indices.to(self.w1.device)
            self.permute_("expert_ffn", perms["expert_ffn"])
        if "experts" in scores:
            s = check_score(f"scores['experts']{where}", scores["experts"], (self.num_experts,))
            perm = torch.empty(self.num_experts, dtype=torch.int64)
            for g in range(self.n_group):  # group-limited routing: experts stay in their group (e % n_group)
                members = torch.arange(g, self.num_experts, self.n_group)
                perm[members] = members[descending(s[members].cpu())]
            perms["experts"] = perm.to(self.w1.device)
            self.permute_("experts", perms["experts"])
        return perms

    def quantizable_weights(self) -> dict[str, str]:
        out = {"w1": "stacked", "w2": "stacked"}
        if self.w3 is not None:
            out["w3"] = "stacked"
        if self.shared is not None:
            out.update({f"shared.{n}": v for n, v in self.shared.quantizable_weights().items()})
        return out


def _only_hidden(layer: nn.Module, axis: str) -> None:
    if axis != "hidden":
        raise ValueError(f"{type(layer).__name__}.permute_: axis must be 'hidden', got {axis!r}")


def _check_axis(layer: ElasticLayer, axis: str) -> None:
    names = ["hidden"] + [a.name for a in layer.axes]
    if axis not in names:
        raise ValueError(f"{type(layer).__name__}.permute_: axis must be one of {names}, got {axis!r}")


#: The layer kinds of the hybrid model, one per pattern letter. A new kind is an ElasticLayer
#: subclass (docs: :mod:`elastic_kernels.models.protocol`) added here.
LAYER_KINDS: dict[str, type[ElasticLayer]] = {cls.letter: cls for cls in (ElasticMamba2Mixer, ElasticMoE,
                                                                            GQAAttention, ElasticFFN)}
