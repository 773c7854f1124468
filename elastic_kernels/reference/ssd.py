r"""Pure-PyTorch reference of the width-masked Mamba2 SSD scan (the CPU path and test truth).

Math (per batch b, head h in group g, step t; dt already biased/softplused/clamped):

    h_t = exp(dt_t A_h) h_{t-1} [seq_t == seq_{t-1}] + dt_t B_t \otimes x_t      (headdim x dstate)
    y_t = C_t \cdot h_t + D_h x_t,    then  y_t <- y_t * silu(z_t) * head_scale_{b,h}

with ``h_{-1} = initial_states`` and ``seq_{-1} = 0`` (as mamba_ssm: the initial state belongs
to sequence index 0). The chunked algorithm below splits the sequence into chunks of
``chunk_size``: an intra-chunk quadratic (attention-like) term, per-chunk states, a sequential
state passing over chunks, and an inter-chunk term. Gradients come from autograd.

Elastic heads (DESIGN §3.5): with ``k`` active heads (a multiple of ``ngroups``) the active set
is the first ``k / ngroups`` heads of every group. Inactive heads do no work: an int width computes
only the active heads, per-sample widths run one int-width pass per distinct width over its
samples (a host read of the widths, fine on the CPU path), so outputs, final states and
gradients of inactive heads are exactly 0 and cost falls with the mean width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def head_group(nheads: int, ngroups: int, interleaved: bool, device=None) -> torch.Tensor:
    """Group of every head: ``(nheads,)`` int64."""
    h = torch.arange(nheads, device=device)
    return h % ngroups if interleaved else h // (nheads // ngroups)


def head_rank(nheads: int, ngroups: int, interleaved: bool, device=None) -> torch.Tensor:
    """Index of every head within its group: ``(nheads,)`` int64."""
    h = torch.arange(nheads, device=device)
    return h // ngroups if interleaved else h % (nheads // ngroups)


def active_heads_index(nheads: int, ngroups: int, interleaved: bool, k: int, device=None) -> torch.Tensor:
    """Sorted indices of the ``k`` active heads (first ``k/ngroups`` of every group)."""
    keep = head_rank(nheads, ngroups, interleaved, device) < k // ngroups
    return keep.nonzero().flatten()


def active_heads_mask(nheads: int, ngroups: int, interleaved: bool, active: torch.Tensor) -> torch.Tensor:
    """Per-sample mask ``(batch, nheads)`` bool from per-sample totals ``active: (batch,)``."""
    rank = head_rank(nheads, ngroups, interleaved, active.device)
    return rank[None, :] < (active[:, None] // ngroups)


def process_dt(dt: torch.Tensor, dt_bias, dt_softplus: bool, dt_lo: float, dt_hi: float,
               dtype: torch.dtype) -> torch.Tensor:
    """dt -> +dt_bias -> softplus (if asked) -> clamp to (dt_lo, dt_hi) unless it is (0, inf)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if not (dt_lo == 0.0 and dt_hi == float("inf")):
        dt = dt.clamp(min=dt_lo, max=dt_hi)
    return dt


def _ssd_core(x, dt, A, B, C, group, chunk_size, initial_states, seq_idx):
    """Chunked SSD without D/z. x: (b, l, h, p) dt: (b, l, h) A: (h,) B, C: (b, l, g, n),
    group: (h,) group of each head. Returns y (b, l, h, p) and final states (b, h, p, n)."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    L = chunk_size
    nc = max(1, -(-l // L))
    pad = nc * L - l
    if pad:  # dt = 0 on padding: no decay, no input, so states are unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1) if l else \
                seq_idx.new_zeros(b, pad)
    x = x.reshape(b, nc, L, h, p)
    dt = dt.reshape(b, nc, L, h)
    Bh = B.reshape(b, nc, L, g, n)[:, :, :, group]
    Ch = C.reshape(b, nc, L, g, n)[:, :, :, group]
    acs = torch.cumsum(dt * A, dim=2)  # (b, nc, L, h)
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    same = causal[None, None]
    if seq_idx is not None:
        s = seq_idx.reshape(b, nc, L)
        same = same & (s[:, :, :, None] == s[:, :, None, :])
        seq_end = s[:, :, -1]  # (b, nc)
        seq_prev_end = torch.cat([torch.zeros_like(seq_end[:, :1]), seq_end[:, :-1]], dim=1)
    seg = acs[:, :, :, None, :] - acs[:, :, None, :, :]  # (b, nc, L_t, L_s, h)
    decay = torch.exp(seg.masked_fill(~same[..., None], float("-inf")))
    cb = torch.einsum("bclhn,bcshn->bclsh", Ch, Bh)
    y = torch.einsum("bclsh,bcsh,bcshp->bclhp", cb * decay, dt, x)
    # per-chunk states (contributions of each chunk to its end)
    w_state = torch.exp(acs[:, :, -1:, :] - acs) * dt
    if seq_idx is not None:
        w_state = w_state * (s == seq_end[:, :, None])[..., None]
    states = torch.einsum("bclhn,bclh,bclhp->bchpn", Bh, w_state, x)
    # sequential state passing over chunks
    chunk_decay = torch.exp(acs[:, :, -1, :])  # (b, nc, h)
    if seq_idx is not None:
        chunk_decay = chunk_decay * (seq_end == seq_prev_end)[..., None]
    carried = initial_states if initial_states is not None else x.new_zeros(b, h, p, n)
    prev = []
    for c in range(nc):
        prev.append(carried)
        carried = carried * chunk_decay[:, c, :, None, None] + states[:, c]
    prev = torch.stack(prev, dim=1)  # (b, nc, h, p, n): state entering each chunk
    w_off = torch.exp(acs)
    if seq_idx is not None:
        w_off = w_off * (s == seq_prev_end[:, :, None])[..., None]
    y = y + torch.einsum("bclhn,bchpn,bclh->bclhp", Ch, prev, w_off)
    return y.reshape(b, nc * L, h, p)[:, :l], carried


def ssd_scan_reference(x, dt, A, B, C, *, chunk_size=64, D=None, z=None, dt_bias=None,
                       dt_softplus=False, dt_lo=0.0, dt_hi=float("inf"), initial_states=None,
                       seq_idx=None, interleaved=False, active_int=-1, active_t=None,
                       head_scale=None):
    """Reference forward; arguments as in :func:`elastic_kernels.ssd_scan` (already validated).

    Shapes: x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,);
    B, C: (batch, seqlen, ngroups, dstate); D: (nheads,) | (nheads, headdim); z: like x;
    dt_bias: (nheads,); initial_states: (batch, nheads, headdim, dstate);
    seq_idx: (batch, seqlen) int32; active_t: (batch,) int64; head_scale: (batch, nheads).
    Returns ``y`` like x (x.dtype) and final states (batch, nheads, headdim, dstate) in fp32
    (fp64 for fp64 inputs).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if active_t is not None:  # per-sample widths: one int-width call per distinct width
        y = x.new_zeros(b, l, h, p)
        fs = x.new_zeros(b, h, p, n, dtype=cdt)
        for k in torch.unique(active_t).tolist():
            rows = (active_t == k).nonzero().flatten()
            pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
            yk, fsk = ssd_scan_reference(
                pick(x), pick(dt), A, pick(B), pick(C), chunk_size=chunk_size, D=D, z=pick(z),
                dt_bias=dt_bias, dt_softplus=dt_softplus, dt_lo=dt_lo, dt_hi=dt_hi,
                initial_states=pick(initial_states), seq_idx=pick(seq_idx), interleaved=interleaved,
                active_int=k, head_scale=pick(head_scale))
            y, fs = y.index_copy(0, rows, yk), fs.index_copy(0, rows, fsk)
        return y, fs
    k = h if active_int < 0 else active_int
    idx = None if k == h else active_heads_index(h, g, interleaved, k, x.device)

    def sel(t, dim):
        return t if (t is None or idx is None) else t.index_select(dim, idx)

    xa = sel(x, 2).to(cdt)
    dta = process_dt(sel(dt, 2), sel(dt_bias, 0), dt_softplus, dt_lo, dt_hi, cdt)
    group = head_group(h, g, interleaved, x.device)
    init = sel(initial_states, 1)
    ya, fsa = _ssd_core(xa, dta, sel(A, 0).to(cdt), B.to(cdt), C.to(cdt), sel(group, 0),
                        chunk_size, None if init is None else init.to(cdt), seq_idx)
    if D is not None:
        Da = sel(D, 0).to(cdt)
        ya = ya + (Da[:, None] if Da.dim() == 1 else Da) * xa
    if z is not None:
        ya = ya * F.silu(sel(z, 2).to(cdt))
    if head_scale is not None:
        ya = ya * sel(head_scale, 1).to(cdt)[:, None, :, None]
    if idx is None:
        return ya.to(x.dtype).contiguous(), fsa
    y = x.new_zeros(b, l, h, p)  # inactive heads are written as zeros, once
    y.index_copy_(2, idx, ya.to(x.dtype))
    fs = fsa.new_zeros(b, h, p, n)
    fs.index_copy_(1, idx, fsa)
    return y, fs


def ssd_state_update_reference(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None,
                               dt_softplus=False, interleaved=False, active_int=-1, active_t=None):
    """One decode step. state: (batch, nheads, headdim, dstate) fp32, updated in place for active
    heads (inactive heads keep their state); x: (batch, nheads, headdim); dt: (batch, nheads);
    B, C: (batch, ngroups, dstate). Returns y: (batch, nheads, headdim), 0 for inactive heads."""
    b, h, p = x.shape
    g = B.shape[1]
    cdt = state.dtype
    group = head_group(h, g, interleaved, x.device)
    dtp = process_dt(dt, dt_bias, dt_softplus, 0.0, float("inf"), cdt)  # (b, h)
    xf = x.to(cdt)
    Bh, Ch = B.to(cdt)[:, group], C.to(cdt)[:, group]  # (b, h, n)
    new = state * torch.exp(dtp * A.to(cdt))[..., None, None] + (dtp[..., None] * xf)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D).to(cdt) * xf
    if z is not None:
        y = y * F.silu(z.to(cdt))
    if active_t is not None:
        mask = active_heads_mask(h, g, interleaved, active_t)
    elif active_int >= 0:
        mask = (head_rank(h, g, interleaved, x.device) < active_int // g)[None].expand(b, h)
    else:
        mask = None
    if mask is not None:
        y = y * mask[..., None]
        new = torch.where(mask[..., None, None], new, state)
    state.copy_(new)
    return y.to(x.dtype).contiguous()
