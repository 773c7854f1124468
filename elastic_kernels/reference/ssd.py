r"""Pure-PyTorch reference of the width-masked Mamba2 SSD scan (the CPU path and test truth).

Math (per batch b, head h in group g, step t; dt already biased/softplused/clamped):

    h_t = exp(dt_t A_h) h_{t-1} [seq_t == seq_{t-1}] + dt_t B_t \otimes x_t      (headdim x dstate)
    y_t = C_t \cdot h_t + D_h x_t,    then  y_t <- y_t * silu(z_t) * head_scale_{b,h}

with ``h_{-1} = initial_states`` and ``seq_{-1} = 0`` (as mamba_ssm: the initial state belongs
to sequence index 0).

Chunked algorithm (chunks of ``L = chunk_size`` steps; within a chunk ``a_t = cumsum(dt A)``):

    intra-chunk:  y_t  = sum_{s<=t} (C_t . B_s) exp(a_t - a_s) dt_s x_s            (L x L per head)
    chunk states: S_c  = sum_s exp(a_L - a_s) dt_s x_s \otimes B_s
    state passing: P_{c+1} = exp(a_L) P_c + S_c,  P_0 = initial_states,  final = P_nc
    inter-chunk:  y_t += exp(a_t) C_t . P_c

(seq_idx resets zero the terms that cross a sequence boundary). The backward is written by hand,
in the same chunks, from the saved chunk-entry states ``P_c`` and the pre-gate output
``u = y + D x``: with ``G = dL/dy`` (after the gate and the head scale),

    dP_c    = sum_t exp(a_t) G_t \otimes C_t + exp(a_L) dP_{c+1}       (reverse pass over chunks,
              dP_nc = dL/dfinal, dS_c = dP_{c+1}, d initial_states = dP_0)
    dx_s    = sum_t M_ts G_t + exp(a_L - a_s) dt_s dS_c B_s + D dU_s,   M_ts = (C_t.B_s) e^{a_t-a_s} dt_s
    dC_t    = sum_s (G_t . x_s) e^{a_t-a_s} dt_s B_s + exp(a_t) P_c G_t
    dB_s    = sum_t (G_t . x_s) e^{a_t-a_s} dt_s C_t + exp(a_L - a_s) dt_s dS_c^T x_s
    da_t    (from every exponent), dt_s and A by the chain rule through a = cumsum(dt A),

so it costs one forward's worth of matmuls twice and is linear in seqlen (the pass over chunks
writes each chunk's gradient once). B and C are shared by the heads of a group: ``C . B`` is
computed once per group, not per head.

Elastic heads (docs/design.md §3): with ``k`` active heads (a multiple of ``ngroups``) the active
set is the first ``k / ngroups`` heads of every group. Heads are viewed as (group, rank in group)
-- a free view for both layouts -- so the active heads are a prefix of the rank axis. Inactive
heads do no work: an int width computes only the active heads, per-sample widths run one
int-width pass per distinct width over its samples (a host read of the widths, fine on the CPU
path), so outputs, final states and gradients of inactive heads are exactly 0 and cost falls with
the mean width.
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


def _process_dt_backward(grad: torch.Tensor, v: torch.Tensor, dt_softplus: bool, dt_lo: float,
                         dt_hi: float) -> torch.Tensor:
    """Gradient of :func:`process_dt` w.r.t. the biased dt ``v`` (torch's own softplus/clamp rules)."""
    if not (dt_lo == 0.0 and dt_hi == float("inf")):
        sp = F.softplus(v) if dt_softplus else v
        grad = torch.where((sp >= dt_lo) & (sp <= dt_hi), grad, 0.0)
    if dt_softplus:
        grad = torch.ops.aten.softplus_backward(grad, v, 1.0, 20.0)
    return grad


def _by_group(t, ngroups: int, interleaved: bool, dim: int):
    """View the head axis ``dim`` of ``t`` as (group, rank within group); free for both layouts."""
    if t is None:
        return None
    h = t.shape[dim]
    if interleaved:
        return t.unflatten(dim, (h // ngroups, ngroups)).transpose(dim, dim + 1)
    return t.unflatten(dim, (ngroups, h // ngroups))


# Chunks are processed in blocks of about this many bytes per x-sized tensor, so that every
# intermediate of a block stays in cache and the cost per token does not grow with seqlen: the
# inputs are moved into the chunk layout and the outputs out of it block by block as well (whole-
# tensor layout copies made the fwd+bwd cost per token at seqlen 8192 1.16-1.35x that at 512 (b1
# h16 p64 n64 g8), block by block 1.01-1.10x; fwd+bwd at b4 l512 h16 g4 106-120 ms against 145-153).
_BLOCK_BYTES = 1 << 20


class _Seq:
    """The chunking of a scan of ``l`` steps into ``nc`` chunks of ``L = chunk_size`` steps and
    the seq_idx masks of every chunk. Tensors are moved, a block of chunks at a time
    (:class:`_Lazy`, :meth:`unchunk_into`), into the *chunk layout*, contiguous
    with time next to the feature axis, in which every elementwise op and matmul of the scan runs
    on dense operands: x-like (b, l, G, R, p) -> (b, nc, G, R, L, p); dt-like (b, l, G, R) ->
    (b, nc, G, R, L); B/C-like (b, l, G, n) -> (b, nc, G, L, n). Padding is zero (dt = 0 on
    padding: no decay, no input, states unchanged).
    """

    def __init__(self, b: int, l: int, chunk_size: int, seq_idx, device):
        L = chunk_size
        self.l, self.L = l, L
        self.nc = nc = max(1, -(-l // L))
        self.full = l // L  # chunks without padding
        pad = nc * L - l
        self.masks = None
        if seq_idx is not None:
            if pad:
                tail = seq_idx[:, -1:].expand(b, pad) if l else seq_idx.new_zeros(b, pad)
                seq_idx = torch.cat([seq_idx, tail], dim=1)
            s = seq_idx.reshape(b, nc, L)
            seq_end = s[:, :, -1]
            seq_prev_end = torch.cat([torch.zeros_like(seq_end[:, :1]), seq_end[:, :-1]], dim=1)
            causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
            self.masks = ((causal & (s[:, :, :, None] == s[:, :, None, :]))[:, :, None, None],
                          (s == seq_end[:, :, None])[:, :, None, None],      # (b, nc, 1, 1, L)
                          (s == seq_prev_end[:, :, None])[:, :, None, None],
                          (seq_end == seq_prev_end)[:, :, None, None])       # (b, nc, 1, 1)

    def _time_view(self, t, time_last: bool):
        """The chunk-layout tensor ``t`` viewed as (b, nc, L, ...) (time at dim 2)."""
        return t.movedim(t.dim() - 1 if time_last else t.dim() - 2, 2)

    def chunk(self, t, dtype, time_last: bool = False, c0: int = 0, c1: int | None = None):
        """(b, l, ...) of any strides -> its chunks [c0, c1) (default: all) in the chunk layout in
        ``dtype``, zero padded: one copy."""
        c1 = self.nc if c1 is None else c1
        b, l, *rest = t.shape
        L, full = self.L, self.full
        shape = (b, c1 - c0, *rest, L) if time_last else (b, c1 - c0, *rest[:-1], L, rest[-1])
        out = t.new_empty(shape, dtype=dtype)
        view = self._time_view(out, time_last)                           # (b, k, L, ...)
        f1 = min(c1, full)  # the chunks without padding in the range: [c0, f1)
        if f1 > c0:
            view[:, :f1 - c0].copy_(t[:, c0 * L:f1 * L].unflatten(1, (f1 - c0, L)))
        if c0 <= full < c1:  # the padded last chunk
            rem = l - full * L
            view[:, full - c0, :rem].copy_(t[:, full * L:])
            view[:, full - c0, rem:].zero_()
        return out

    def unchunk_into(self, dest, t, time_last: bool = False, c0: int = 0):
        """Copy the chunk-layout ``t`` (chunks c0 onward) into ``dest`` (b, l, ...) of any strides and dtype."""
        view = self._time_view(t, time_last)
        c1 = c0 + view.shape[1]
        L, full, l = self.L, self.full, self.l
        f1 = min(c1, full)
        if f1 > c0:
            dest[:, c0 * L:f1 * L].unflatten(1, (f1 - c0, L)).copy_(view[:, :f1 - c0])
        if c0 <= full < c1:
            dest[:, full * L:].copy_(view[:, full - c0, :l - full * L])
        return dest

    def blocks(self, per_chunk: int):
        """Chunk ranges [c0, c1) of about _BLOCK_BYTES, for x-like chunks of ``per_chunk`` bytes."""
        k = max(1, _BLOCK_BYTES // max(per_chunk, 1))
        return [(c0, min(c0 + k, self.nc)) for c0 in range(0, self.nc, k)]


class _Lazy:
    """A (b, l, ...) tensor read in the chunk layout of ``seq`` one block of chunks at a time
    (:meth:`_Seq.chunk`), so that the copy is consumed while it is in cache."""

    def __init__(self, seq: _Seq, t: torch.Tensor, dtype: torch.dtype, time_last: bool = False):
        self.seq, self.t, self.dtype, self.time_last = seq, t, dtype, time_last

    def block(self, c0: int, c1: int) -> torch.Tensor:
        return self.seq.chunk(self.t, self.dtype, self.time_last, c0, c1)


class _Block:
    """Chunks [c0, c1) of the :class:`_Lazy` inputs in the chunk layout: xt (b, k, G, R, L, p),
    dt (b, k, G, R, L), Bt/Ct (b, k, G, L, n), a = cumsum(dt A) within each chunk, masks."""

    def __init__(self, seq: _Seq, x: _Lazy, dt: _Lazy, B: _Lazy, C: _Lazy, A, c0, c1):
        self.xt, self.dt, self.Bt, self.Ct = (t.block(c0, c1) for t in (x, dt, B, C))
        self.acs = torch.cumsum(self.dt * A[:, :, None], dim=-1)            # (b, k, G, R, L)
        L = seq.L
        self.resets = seq.masks is not None  # seq_idx given
        if not self.resets:
            self.same = torch.ones(L, L, dtype=torch.bool, device=A.device).tril()
            self.end_mask = self.prev_mask = self.chunk_mask = None
        else:
            self.same, self.end_mask, self.prev_mask, self.chunk_mask = (m[:, c0:c1] for m in seq.masks)

    @staticmethod
    def _masked(v, mask):
        return v if mask is None else v * mask

    def decay(self):
        """exp(a_t - a_s) on the causal same-sequence triangle, 0 elsewhere: (b, k, G, R, L, L)."""
        seg = self.acs[..., :, None] - self.acs[..., None, :]
        # zero outside before the exp, and again after it: the same result as exp(-inf) there,
        # without the exp of -inf or of a large exponent, which x86 CPUs run many times slower
        if not self.resets:
            return seg.tril_().exp_().tril_()
        outside = ~self.same
        return seg.masked_fill_(outside, 0.0).exp_().masked_fill_(outside, 0.0)

    @staticmethod
    def per_head(v, w):
        """A group's B or C ``v: (b, k, G, L, n)`` weighted per head and step by ``w: (b, k, G, R, L)``:
        (b, k, G, R, L, n)."""
        return v[:, :, :, None] * w[..., None]

    def cb(self):
        """C_t . B_s per group: (b, k, G, L, L)."""
        return self.Ct @ self.Bt.transpose(-1, -2)

    def e_state(self):
        """exp(a_L - a_s), 0 for steps of an earlier sequence than the chunk's end: (b, k, G, R, L)."""
        return self._masked(torch.exp(self.acs[..., -1:] - self.acs), self.end_mask)

    def e_off(self):
        """exp(a_t), 0 for steps of a later sequence than the one entering the chunk."""
        return self._masked(torch.exp(self.acs), self.prev_mask)

    def chunk_decay(self):
        """exp(a_L) of every chunk, 0 where a sequence starts inside it: (b, k, G, R)."""
        return self._masked(torch.exp(self.acs[..., -1]), self.chunk_mask)


def _core_fwd(seq: _Seq, x: _Lazy, dt: _Lazy, A, B: _Lazy, C: _Lazy, initial_states, emit):
    """Chunked SSD without D/z on grouped heads, block of chunks by block (:class:`_Seq`), the
    inputs read in the chunk layout as each block needs them: x (b, l, G, R, p); dt (b, l, G, R)
    processed; A: (G, R); B, C: (b, l, G, n); initial_states: (b, G, R, p, n) or None. Every
    block's output y (b, k, G, R, L, p), a fresh tensor, goes to ``emit(c0, c1, y, blk)`` in
    order (blk: its :class:`_Block`). Returns P: (b, nc + 1, G, R, p, n), the state entering
    every chunk (P[:, nc] is the final state)."""
    b, _, G, R, p = x.t.shape
    n, nc = B.t.shape[-1], seq.nc
    P = x.t.new_empty(b, nc + 1, G, R, p, n, dtype=x.dtype)
    if initial_states is None:
        P[:, 0].zero_()
    else:
        P[:, 0].copy_(initial_states)
    for c0, c1 in seq.blocks(b * G * R * seq.L * p * P.element_size()):
        blk = _Block(seq, x, dt, B, C, A, c0, c1)
        xd = blk.xt * blk.dt[..., None]                                   # dt_s x_s
        yb = blk.decay().mul_(blk.cb()[:, :, :, None]) @ xd               # (b, k, G, R, L, p)
        # S_c = (dt x)^T (exp(a_L - a_s) B_s): the head's decay goes into B (b, k, G, R, L, n)
        states = xd.transpose(-1, -2) @ blk.per_head(blk.Bt, blk.e_state())
        del xd
        cd = blk.chunk_decay()[..., None, None]
        for c in range(c1 - c0):
            torch.addcmul(states[:, c], P[:, c0 + c], cd[:, c], out=P[:, c0 + c + 1])
        yb += blk.per_head(blk.Ct, blk.e_off()) @ P[:, c0:c1].transpose(-1, -2)
        emit(c0, c1, yb, blk)
    return P


def _core_bwd(seq: _Seq, gy, g_final, x: _Lazy, dt: _Lazy, A, B: _Lazy, C: _Lazy, P, emit):
    """Backward of :func:`_core_fwd` from its saved chunk-entry states ``P: (b, nc, G, R, p, n)``.

    ``gy(c0, c1, blk)``: the gradient of a block's output (b, k, G, R, L, p); g_final:
    (b, G, R, p, n) or None. Blocks of chunks run last to first, carrying dL/dP across block
    boundaries; each block's gradients of x, dt (processed), B, C in the chunk layout go to
    ``emit(c0, c1, gx, gdt, gB, gC, g, blk)`` (g: what ``gy`` gave). Returns the gradients of
    A (G, R) and of initial_states.
    """
    gA = A.new_zeros(A.shape)
    run = g_final if g_final is not None else P.new_zeros(P[:, 0].shape)
    b, _, G, R, p = x.t.shape
    for c0, c1 in reversed(seq.blocks(b * G * R * seq.L * p * P.element_size())):
        blk = _Block(seq, x, dt, B, C, A, c0, c1)
        gt = gy(c0, c1, blk)                                              # (b, k, G, R, L, p)
        Pb = P[:, c0:c1]
        # inter-chunk term y_t += exp(a_t) C_t . P_c, through gtP = G_t P_c (b, k, G, R, L, n)
        e_off = blk.e_off()
        gtP = gt @ Pb
        g_acs = (gtP * blk.Ct[:, :, :, None]).sum(-1).mul_(e_off)
        gC = (gtP * e_off[..., None]).sum(3)
        del gtP
        gP = gt.transpose(-1, -2) @ blk.per_head(blk.Ct, e_off)
        # state passing, in reverse: gS[c] = dL/dP_{c+1}
        cd = blk.chunk_decay()
        cdx = cd[..., None, None]
        gS = torch.empty_like(gP)
        for c in range(c1 - c0 - 1, -1, -1):
            gS[:, c] = run
            run = torch.addcmul(gP[:, c], run, cdx[:, c])
        del gP
        g_acs[..., -1] += (gS * Pb).sum((-1, -2)) * cd
        # chunk states S_c = sum_s exp(a_L - a_s) dt_s x_s (x) B_s
        # through xgS = x_s dS_c (b, k, G, R, L, n)
        e_state = blk.e_state()
        w_state = e_state * blk.dt
        gx = blk.per_head(blk.Bt, w_state) @ gS.transpose(-1, -2)
        xgS = blk.xt @ gS
        del gS
        g_ws = (xgS * blk.Bt[:, :, :, None]).sum(-1)
        gB = (xgS * w_state[..., None]).sum(3)
        del xgS
        g_dt = g_ws * e_state
        ge = g_ws * w_state
        g_acs -= ge
        g_acs[..., -1] += ge.sum(-1)
        # intra-chunk term y_t = sum_s W_ts (dt_s x_s),  W = exp(a_t - a_s) (C_t . B_s)
        xd = blk.xt * blk.dt[..., None]
        q = gt @ xd.transpose(-1, -2)                                     # dL/dW
        del xd
        decay = blk.decay()
        cb = blk.cb()[:, :, :, None]
        q.mul_(decay)
        g_cb = q.sum(3)                                                   # (b, k, G, L, L)
        q.mul_(cb)                                                        # dL/d(a_t - a_s)
        g_acs += q.sum(-1) - q.sum(-2)
        del q
        gxd = decay.mul_(cb).transpose(-1, -2) @ gt                       # dL/d(dt_s x_s)
        del decay
        gx.addcmul_(gxd, blk.dt[..., None])
        g_dt += (gxd * blk.xt).sum(-1)
        del gxd
        gC += g_cb @ blk.Bt
        gB += g_cb.transpose(-1, -2) @ blk.Ct
        # a = cumsum(dt A) over the chunk
        g_a = g_acs.flip(-1).cumsum(-1).flip(-1)
        g_dt += g_a * A[:, :, None]
        gA += (g_a * blk.dt).sum((0, 1, 4))
        emit(c0, c1, gx, g_dt, gB, gC, gt, blk)
    return gA, run


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _saved_heads(t, dim: int, G: int, ra: int, interleaved: bool, nheads: int) -> torch.Tensor:
    """The (group, first ``ra`` ranks) view of a saved state's head axis ``dim``: a saved state
    holds all ``nheads`` heads (layout order, inactive heads 0) or, for an int width below full,
    only the ``G * ra`` active ones, group-major (see :func:`saved_heads`)."""
    if t.shape[dim] != nheads:
        return t.unflatten(dim, (G, ra))
    return _by_group(t, G, interleaved, dim).narrow(dim + 1, 0, ra)


def saved_heads(nheads: int, active_int: int, per_sample: bool) -> int:
    """Heads of the saved ``u`` and ``chunk_states`` of :func:`ssd_scan_reference_fwd`: the
    active ones for an int width below ``nheads``, else all."""
    return active_int if not per_sample and 0 <= active_int < nheads else nheads


def _heads_out(shape, dim: int, G: int, interleaved: bool, ra: int, dtype, device) -> torch.Tensor:
    """A new tensor whose head axis ``dim`` the caller fills for the first ``ra`` heads of every
    group: only the other heads are zeroed (the active ones are written once, not zeroed first)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    R = shape[dim] // G
    if ra < R:
        _by_group(t, G, interleaved, dim).narrow(dim + 1, ra, R - ra).zero_()
    return t


def _fwd_int(x, dt, A, B, C, *, chunk_size, D, z, dt_bias, dt_softplus, dt_lo, dt_hi,
             initial_states, seq_idx, interleaved, active_int, head_scale, compact=False):
    """One int width over the whole batch. Returns y (x.dtype) and, in the compute dtype, the
    final states, the pre-gate output u = y_core + D x (an empty tensor when no gate and no head
    scale need it) and the chunk-entry states (b, nc, heads, headdim, dstate): all heads, or with
    ``compact`` and a width below full only the active ones (see :func:`saved_heads`)."""
    b, l, h, p = x.shape
    G, n = B.shape[2], B.shape[3]
    R = h // G
    ra = R if active_int < 0 else active_int // G
    cdt = _compute_dtype(x)
    nc = max(1, -(-l // chunk_size))
    alloc = lambda shape, dim, dtype: _heads_out(shape, dim, G, interleaved, ra, dtype, x.device)  # noqa: E731
    y = alloc((b, l, h, p), 2, x.dtype)
    fs = alloc((b, h, p, n), 1, cdt)
    keep_u = z is not None or head_scale is not None
    compact = compact and ra < R  # saved states of the active heads only (see _saved_heads)
    if compact:
        u_res = x.new_empty((b, l, G * ra, p) if keep_u else (0,), dtype=cdt)
        p_res = x.new_empty(b, nc, G * ra, p, n, dtype=cdt)
    else:
        u_res = alloc((b, l, h, p), 2, cdt) if keep_u else x.new_empty(0, dtype=cdt)
        p_res = alloc((b, nc, h, p, n), 2, cdt)
    if ra == 0:
        return y, fs, u_res, p_res

    def grp(t, dim):
        v = _by_group(t, G, interleaved, dim)
        return None if v is None else v.narrow(dim + 1, 0, ra)

    seq = _Seq(b, l, chunk_size, seq_idx, x.device)
    dtp = process_dt(grp(dt, 2), grp(dt_bias, 0), dt_softplus, dt_lo, dt_hi, cdt)
    init = grp(initial_states, 1)
    d_skip = None if D is None else _d_chunked(grp(D, 0), cdt)
    u_out = _saved_heads(u_res, 2, G, ra, interleaved, h) if keep_u else None
    zg, y_out = grp(z, 2), grp(y, 2)
    hs = None if head_scale is None else grp(head_scale, 1).to(cdt)[:, None, :, :, None, None]

    def epilogue(c0, c1, yc, blk):  # yc, a block's output (b, k, G, ra, L, p), is fresh: in place
        if d_skip is not None:
            yc.addcmul_(d_skip, blk.xt)
        if u_out is not None:
            seq.unchunk_into(u_out, yc, c0=c0)
        if zg is not None:
            yc.mul_(F.silu(seq.chunk(zg, cdt, c0=c0, c1=c1)))
        if hs is not None:
            yc.mul_(hs)
        seq.unchunk_into(y_out, yc, c0=c0)

    P = _core_fwd(seq, _Lazy(seq, grp(x, 2), cdt), _Lazy(seq, dtp, cdt, time_last=True), grp(A, 0).to(cdt),
                  _Lazy(seq, B, cdt), _Lazy(seq, C, cdt), None if init is None else init.to(cdt), epilogue)
    grp(fs, 1).copy_(P[:, nc])
    _saved_heads(p_res, 2, G, ra, interleaved, h).copy_(P[:, :nc])
    return y, fs, u_res, p_res


def _d_chunked(Dg, cdt):
    """The skip weight D: (G, R) or (G, R, p) of grouped heads, broadcast over the chunk layout."""
    Dg = Dg.to(cdt)
    return Dg[:, :, None, None] if Dg.dim() == 2 else Dg[:, :, None, :]


def _bwd_int(gy, g_fs, x, dt, A, B, C, *, chunk_size, D, z, dt_bias, dt_softplus, dt_lo, dt_hi,
             initial_states, seq_idx, interleaved, active_int, head_scale, u_res, p_res):
    """Gradients (compute dtype, full shapes, exact zeros for inactive heads) of one int width:
    x, dt, A, B, C, D, z, dt_bias, initial_states, head_scale (None for absent inputs)."""
    b, l, h, _ = x.shape
    G = B.shape[2]
    R = h // G
    ra = R if active_int < 0 else active_int // G
    cdt = _compute_dtype(x)
    # head axis of every gradient (None: B and C, written whole); only inactive heads are zeroed
    head_dims = (2, 2, 0, None, None, 0, 2, 0, 1, 1)
    grads = [None if t is None else
             torch.zeros(t.shape, dtype=cdt, device=x.device) if ra == 0 else
             torch.empty(t.shape, dtype=cdt, device=x.device) if dim is None else
             _heads_out(t.shape, dim, G, interleaved, ra, cdt, x.device)
             for t, dim in zip((x, dt, A, B, C, D, z, dt_bias, initial_states, head_scale), head_dims)]
    gx, gdt, gA, gB, gC, gD, gz, gbias, ginit, ghs = grads
    if ra == 0:
        return grads

    def grp(t, dim):
        v = _by_group(t, G, interleaved, dim)
        return None if v is None else v.narrow(dim + 1, 0, ra)

    seq = _Seq(b, l, chunk_size, seq_idx, x.device)
    gyg, zg = grp(gy, 2), grp(z, 2)
    u_in = _saved_heads(u_res, 2, G, ra, interleaved, h) if head_scale is not None or z is not None else None
    hs = None if head_scale is None else grp(head_scale, 1).to(cdt)[:, None, :, :, None, None]
    ghs_acc = None if head_scale is None else torch.zeros(b, G, ra, dtype=cdt, device=x.device)
    gz_out = grp(gz, 2)

    def grad_out(c0, c1, blk):
        """A block's gradient at the scan's output: through the head scale and the gate."""
        g = seq.chunk(gyg, cdt, c0=c0, c1=c1)
        if u_in is None:
            return g
        uc = seq.chunk(u_in, cdt, c0=c0, c1=c1)
        zc = None if zg is None else seq.chunk(zg, cdt, c0=c0, c1=c1)
        gate = None if zc is None else F.silu(zc)
        if hs is not None:
            ghs_acc.add_((g * (uc if gate is None else uc * gate)).sum((1, 4, 5)))
            g = g * hs
        if zc is not None:
            seq.unchunk_into(gz_out, torch.ops.aten.silu_backward(g * uc, zc), c0=c0)
            g = g * gate
        return g

    v = grp(dt, 2).to(cdt)
    if dt_bias is not None:
        v = v + grp(dt_bias, 0).to(cdt)
    dtp = process_dt(v, None, dt_softplus, dt_lo, dt_hi, cdt)
    gfs = None if g_fs is None else grp(g_fs, 1).to(cdt)
    d_skip = None if D is None else _d_chunked(grp(D, 0), cdt)
    gd_acc = None if D is None else torch.zeros(grp(D, 0).shape, dtype=cdt, device=x.device)
    gx_out, gdtp = grp(gx, 2), torch.empty_like(v)

    def epilogue(c0, c1, cx, cdtp, cB, cC, g, blk):
        if d_skip is not None:
            gDg = g * blk.xt
            gd_acc.add_(gDg.sum((0, 1, 4, 5)) if D.dim() == 1 else gDg.sum((0, 1, 4)))
            cx.addcmul_(g, d_skip)
        seq.unchunk_into(gx_out, cx, c0=c0)
        seq.unchunk_into(gdtp, cdtp, time_last=True, c0=c0)
        seq.unchunk_into(gB, cB, c0=c0)
        seq.unchunk_into(gC, cC, c0=c0)

    cA, cinit = _core_bwd(seq, grad_out, gfs, _Lazy(seq, grp(x, 2), cdt), _Lazy(seq, dtp, cdt, time_last=True),
                          grp(A, 0).to(cdt), _Lazy(seq, B, cdt), _Lazy(seq, C, cdt),
                          _saved_heads(p_res, 2, G, ra, interleaved, h), epilogue)
    if ghs_acc is not None:
        grp(ghs, 1).copy_(ghs_acc)
    if gd_acc is not None:
        grp(gD, 0).copy_(gd_acc)
    graw = _process_dt_backward(gdtp, v, dt_softplus, dt_lo, dt_hi)
    grp(gdt, 2).copy_(graw)
    if dt_bias is not None:
        grp(gbias, 0).copy_(graw.sum((0, 1)))
    grp(gA, 0).copy_(cA)
    if ginit is not None:
        grp(ginit, 1).copy_(cinit)
    return grads


def _pick(t, rows):
    return None if t is None else t.index_select(0, rows)


_PER_SAMPLE = ("x", "dt", "B", "C", "z", "initial_states", "seq_idx", "head_scale")


def ssd_scan_reference_fwd(x, dt, A, B, C, *, chunk_size=64, D=None, z=None, dt_bias=None,
                           dt_softplus=False, dt_lo=0.0, dt_hi=float("inf"), initial_states=None,
                           seq_idx=None, interleaved=False, active_int=-1, active_t=None,
                           head_scale=None):
    """Reference forward that also returns what :func:`ssd_scan_reference_bwd` needs.

    Arguments as :func:`ssd_scan_reference`. Returns ``(y, final_states, u, chunk_states)``:
    y like x; final_states (batch, nheads, headdim, dstate); u (batch, seqlen, nheads, headdim),
    the output before gate and head scale (empty when neither is given); chunk_states
    (batch, nchunks, nheads, headdim, dstate), the state entering every chunk. All but y are in
    fp32 (fp64 for fp64 x); inactive heads hold zeros. For an int width below nheads, ``u`` and
    ``chunk_states`` hold only the active heads (:func:`saved_heads` of them, group-major): the
    backward reads nothing else.
    """
    kw = dict(chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_lo=dt_lo,
              dt_hi=dt_hi, interleaved=interleaved)
    per = dict(x=x, dt=dt, B=B, C=C, z=z, initial_states=initial_states, seq_idx=seq_idx,
               head_scale=head_scale)
    if active_t is None:
        return _fwd_int(A=A, active_int=active_int, compact=True, **per, **kw)
    b, l, h, p = x.shape
    n, cdt = B.shape[3], _compute_dtype(x)
    nc = max(1, -(-l // chunk_size))
    y = x.new_zeros(b, l, h, p)
    fs = x.new_zeros(b, h, p, n, dtype=cdt)
    keep_u = z is not None or head_scale is not None
    u = x.new_zeros(b, l, h, p, dtype=cdt) if keep_u else x.new_empty(0, dtype=cdt)
    cs = x.new_zeros(b, nc, h, p, n, dtype=cdt)
    for k in torch.unique(active_t).tolist():
        if k == 0:
            continue
        rows = (active_t == k).nonzero().flatten()
        outs = _fwd_int(A=A, active_int=k, **{name: _pick(t, rows) for name, t in per.items()}, **kw)
        for full, part in zip((y, fs, u, cs), outs):
            if part.numel():
                full.index_copy_(0, rows, part)
    return y, fs, u, cs


def ssd_scan_reference_bwd(grad_y, grad_states, x, dt, A, B, C, *, u, chunk_states, chunk_size=64,
                           D=None, z=None, dt_bias=None, dt_softplus=False, dt_lo=0.0,
                           dt_hi=float("inf"), initial_states=None, seq_idx=None, interleaved=False,
                           active_int=-1, active_t=None, head_scale=None):
    """Hand-written backward of :func:`ssd_scan_reference_fwd` from its saved ``u`` and
    ``chunk_states``; ``grad_y`` like x, ``grad_states`` (batch, nheads, headdim, dstate) or None.

    Returns the gradients of x, dt, A, B, C, D, z, dt_bias, initial_states, head_scale, each in
    its input's dtype (None for absent inputs); those of inactive heads are exactly 0.
    """
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states, head_scale)
    kw = dict(chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_lo=dt_lo,
              dt_hi=dt_hi, interleaved=interleaved)
    per = dict(gy=grad_y, g_fs=grad_states, x=x, dt=dt, B=B, C=C, z=z, initial_states=initial_states,
               seq_idx=seq_idx, head_scale=head_scale, u_res=u if u.numel() else None,
               p_res=chunk_states)
    if active_t is None:
        grads = _bwd_int(A=A, active_int=active_int, **per, **kw)
    else:
        cdt = _compute_dtype(x)
        grads = [None if t is None else torch.zeros(t.shape, dtype=cdt, device=x.device) for t in inputs]
        shared = {2, 5, 7}  # A, D, dt_bias: summed over the width groups; the rest are per sample
        for k in torch.unique(active_t).tolist():
            if k == 0:
                continue
            rows = (active_t == k).nonzero().flatten()
            part = _bwd_int(A=A, active_int=k, **{name: _pick(t, rows) for name, t in per.items()}, **kw)
            for i, gp in enumerate(part):
                if gp is None:
                    continue
                if i in shared:
                    grads[i] += gp
                else:
                    grads[i].index_copy_(0, rows, gp)
    return [None if gr is None else gr.to(t.dtype) for gr, t in zip(grads, inputs)]


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
    y, fs, _, _ = ssd_scan_reference_fwd(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_lo=dt_lo, dt_hi=dt_hi, initial_states=initial_states, seq_idx=seq_idx,
        interleaved=interleaved, active_int=active_int, active_t=active_t, head_scale=head_scale)
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
    decay = torch.exp(dtp * A.to(cdt))[..., None, None]
    dx, Bn = (dtp[..., None] * xf)[..., None], Bh[:, :, None, :]  # (b, h, p, 1), (b, h, 1, n)
    if active_t is not None:
        mask = active_heads_mask(h, g, interleaved, active_t)
    elif active_int >= 0:
        mask = (head_rank(h, g, interleaved, x.device) < active_int // g)[None].expand(b, h)
    else:
        mask = None
    if mask is None:  # every head: one pass over the state, in place
        state.mul_(decay).addcmul_(dx, Bn)
        new = state
    else:
        new = (state * decay).addcmul_(dx, Bn)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D).to(cdt) * xf
    if z is not None:
        y = y * F.silu(z.to(cdt))
    if mask is not None:
        y = y * mask[..., None]
        state.copy_(torch.where(mask[..., None, None], new, state))
    return y.to(x.dtype).contiguous()
