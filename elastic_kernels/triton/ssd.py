r"""Triton kernels of the width-masked Mamba2 SSD scan: chunked forward and backward.

The chunked SSD algorithm in four kernels. Per chunk of length ``L`` (positions ``l, s``;
``a = cumsum(dt A)`` within the chunk, ``a_L`` its last value; ``S`` the state entering the
chunk, held transposed as ``S[n, p]``)::

    decay[l, s] = exp(a_l - a_s) [s <= l] [seq_l == seq_s]
    w_off[l]    = exp(a_l) [seq_l == seq_prev]           (seq_prev: index before the chunk; 0 first)
    w_st[s]     = exp(a_L - a_s) dt_s [seq_s == seq_end]  (seq_end: index at the chunk's end)
    g           = exp(a_L) [seq_end == seq_prev]
    yraw        = (C B^T * decay * dt^T) x + w_off * (C S) + D x
    y           = yraw * silu(z) * head_scale
    S'          = g S + (B * w_st)^T x

- :func:`_ssd_state_fwd_kernel`: one program per (dstate block, head, sample) runs the cheap
  recurrence ``S' = g S + (B w_st)^T x`` over the chunks and stores every chunk's entering state.
- :func:`_ssd_chunk_fwd_kernel`: one program per (chunk, head, sample) computes y (``tl.dot``
  for ``C B^T``, ``(.) x`` and ``C S``).
- :func:`_ssd_state_bwd_kernel`: the reverse recurrence of the state gradient.
- :func:`_ssd_chunk_bwd_dx_kernel`: gradients of x, z, dt, A, D, head_scale of one chunk;
  :func:`_ssd_chunk_bwd_dbc_kernel`: gradients of B and C of one (chunk, dstate block).

Elastic heads: with an int width only active heads are launched (the launcher zeroes the
others); with per-sample widths every program first loads its sample's width and, when
inactive, only writes zeros to its outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _head_of(pid_h, ngroups, hpg, kpg, INTERLEAVED: tl.constexpr):
    """Launch index -> (head, group, rank in group). Launch index i covers the i-th active head
    (kpg active heads per group, hpg heads per group)."""
    if INTERLEAVED:
        head = pid_h
        grp = pid_h % ngroups
        rank = pid_h // ngroups
    else:
        grp = pid_h // kpg
        rank = pid_h % kpg
        head = grp * hpg + rank
    return head.to(tl.int64), grp.to(tl.int64), rank


@triton.jit
def _chunk_dt(c, b, head, A, dt_ptr, bias_ptr, seq_ptr, seqlen, chunk_size, dt_lo, dt_hi,
              sdt_b, sdt_l, sdt_h, sseq_b, sseq_l,
              HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr,
              CLAMP: tl.constexpr, BLOCK_L: tl.constexpr):
    """dt processing and decay weights of chunk ``c`` (fp32).

    Returns (t, valid, dt, fac, a, w_off, w_exp, g, seq): ``dt`` processed (bias, softplus,
    clamp; 0 outside the sequence), ``fac`` = d dt / d dt_raw, ``w_exp[s] = exp(a_L - a_s)
    [seq_s == seq_end]`` (so ``w_st = w_exp dt``), ``seq`` the sequence index (0 without seq_idx).
    """
    offs_l = tl.arange(0, BLOCK_L)
    t0 = c * chunk_size
    t = (t0 + offs_l).to(tl.int64)
    valid = (offs_l < chunk_size) & (t < seqlen)
    v = tl.load(dt_ptr + b * sdt_b + head * sdt_h + t * sdt_l, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + head).to(tl.float32)
    fac = tl.full([BLOCK_L], 1.0, tl.float32)
    if SOFTPLUS:
        e = tl.exp(tl.minimum(v, 20.0, propagate_nan=tl.PropagateNan.ALL))  # NaN stays NaN
        fac = tl.where(v > 20.0, 1.0, e / (1.0 + e))
        v = tl.where(v > 20.0, v, tl.log(1.0 + e))
    if CLAMP:
        fac = tl.where((v >= dt_lo) & (v <= dt_hi), fac, 0.0)
        v = tl.minimum(tl.maximum(v, dt_lo, propagate_nan=tl.PropagateNan.ALL), dt_hi,
                       propagate_nan=tl.PropagateNan.ALL)
    dt = tl.where(valid, v, 0.0)
    fac = tl.where(valid, fac, 0.0)
    dtA = dt * A
    a = tl.cumsum(dtA, axis=0)
    a_last = tl.sum(dtA, axis=0)
    w_off = tl.exp(a)
    w_exp = tl.exp(a_last - a)
    g = tl.exp(a_last)
    if HAS_SEQ:
        # clamp to the chunk's last valid position: padding repeats the last index
        t_last = tl.max(tl.where(valid, t, 0), axis=0)
        seq = tl.load(seq_ptr + b * sseq_b + tl.minimum(t, t_last) * sseq_l)
        seq_end = tl.max(seq, axis=0)
        t_prev = tl.maximum(t0 - 1, 0).to(tl.int64)
        seq_prev = tl.where(t0 > 0, tl.load(seq_ptr + b * sseq_b + t_prev * sseq_l), 0)
        w_off = tl.where(seq == seq_prev, w_off, 0.0)
        w_exp = tl.where(seq == seq_end, w_exp, 0.0)
        g = tl.where(seq_end == seq_prev, g, 0.0)
    else:
        seq = tl.zeros([BLOCK_L], tl.int32)
    return t, valid, dt, fac, a, w_off, w_exp, g, seq


@triton.jit
def _decay(a, seq, HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr):
    """decay[l, s] = exp(a_l - a_s) for s <= l in the same sequence, else 0."""
    offs_l = tl.arange(0, BLOCK_L)
    keep = offs_l[:, None] >= offs_l[None, :]
    if HAS_SEQ:
        keep = keep & (seq[:, None] == seq[None, :])
    return tl.exp(tl.where(keep, a[:, None] - a[None, :], float("-inf")))


@triton.jit
def _ssd_state_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, seq_ptr, act_ptr, init_ptr, st_ptr, fin_ptr,
    seqlen, nchunks, chunk_size, ngroups, hpg, kpg, headdim, dstate, dt_lo, dt_hi,
    sx_b, sx_l, sx_h, sx_p, sz_b, sz_l, sz_h, sz_p, sy_b, sy_l, sy_h, sy_p,
    sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l, shs_b, shs_h,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ACT: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    r"""State passing of one (dstate block, head, sample), grid (n-blocks, nlaunch, batch).

    Forward: ``S_0 = initial_states`` (or 0); for every chunk c, store ``S_c`` to
    ``st[b, i, c]`` (batch, nlaunch, nchunks, headdim, dstate) fp32, then
    ``S_{c+1} = g S_c + (B * w_st)^T x`` (rows n of S only need columns n of B, hence the
    dstate blocks); the last S is the final state (fp32).
    Backward: :func:`_ssd_state_bwd_kernel` runs the transposed recurrence.
    Inactive (sample, head) pairs write final state = 0.
    """
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nlaunch = tl.num_programs(1).to(tl.int64)
    head, grp, rank = _head_of(pid_h, ngroups, hpg, kpg, INTERLEAVED)
    nheads = ngroups * hpg
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mp = offs_p < headdim
    mn = offs_n < dstate
    mnp = mn[:, None] & mp[None, :]
    s_tile = offs_p[None, :] * dstate + offs_n[:, None]  # S^T[n, p] of a (.., headdim, dstate) tensor
    s_off = (b * nheads + head) * headdim * dstate + s_tile
    if HAS_ACT:
        active = rank < tl.load(act_ptr + b) // ngroups
    else:
        active = True
    if active:
        A = tl.load(A_ptr + head).to(tl.float32)
        if HAS_INIT:
            S = tl.load(init_ptr + s_off, mask=mnp, other=0.0).to(tl.float32)
        else:
            S = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
        for c in range(0, nchunks):
            t, valid, dt, fac, a, w_off, w_exp, g, seq = _chunk_dt(
                c, b, head, A, dt_ptr, bias_ptr, seq_ptr, seqlen, chunk_size, dt_lo, dt_hi,
                sdt_b, sdt_l, sdt_h, sseq_b, sseq_l, HAS_BIAS, HAS_SEQ, SOFTPLUS, CLAMP, BLOCK_L)
            x = tl.load(x_ptr + b * sx_b + head * sx_h + t[:, None] * sx_l + offs_p[None, :] * sx_p,
                        mask=valid[:, None] & mp[None, :], other=0.0).to(tl.float32)
            Bm = tl.load(B_ptr + b * sB_b + grp * sB_g + t[:, None] * sB_l + offs_n[None, :] * sB_n,
                         mask=valid[:, None] & mn[None, :], other=0.0).to(tl.float32)
            tl.store(st_ptr + ((b * nlaunch + pid_h) * nchunks + c) * headdim * dstate + s_tile, S, mask=mnp)
            S = S * g + tl.dot(tl.trans(Bm * (w_exp * dt)[:, None]), x, input_precision=DOT_PREC)
        tl.store(fin_ptr + s_off, S, mask=mnp)
    else:
        tl.store(fin_ptr + s_off, tl.zeros([BLOCK_N, BLOCK_P], tl.float32), mask=mnp)


@triton.jit
def _ssd_chunk_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, act_ptr, hs_ptr, st_ptr, y_ptr,
    seqlen, nchunks, chunk_size, ngroups, hpg, kpg, headdim, dstate, dt_lo, dt_hi,
    sx_b, sx_l, sx_h, sx_p, sz_b, sz_l, sz_h, sz_p, sy_b, sy_l, sy_h, sy_p,
    sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l, shs_b, shs_h,
    HAS_D: tl.constexpr, D_PER_CH: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_ACT: tl.constexpr, HAS_HS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    r"""Output of one (chunk, head, sample), grid (nchunks, nlaunch, batch).

    Forward, with S the chunk's entering state from :func:`_ssd_state_fwd_kernel` (``C B^T``
    and ``C S`` accumulate over dstate blocks)::

        yraw = (C B^T * decay * dt^T) x + w_off * (C S) + D x ;  y = yraw * silu(z) * hs

    Backward: :func:`_ssd_chunk_bwd_dx_kernel` and :func:`_ssd_chunk_bwd_dbc_kernel`.
    Inactive (sample, head) pairs write y = 0.
    """
    c = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nlaunch = tl.num_programs(1).to(tl.int64)
    head, grp, rank = _head_of(pid_h, ngroups, hpg, kpg, INTERLEAVED)
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < headdim
    if HAS_ACT:
        active = rank < tl.load(act_ptr + b) // ngroups
    else:
        active = True
    if active:
        A = tl.load(A_ptr + head).to(tl.float32)
        t, valid, dt, fac, a, w_off, w_exp, g, seq = _chunk_dt(
            c, b, head, A, dt_ptr, bias_ptr, seq_ptr, seqlen, chunk_size, dt_lo, dt_hi,
            sdt_b, sdt_l, sdt_h, sseq_b, sseq_l, HAS_BIAS, HAS_SEQ, SOFTPLUS, CLAMP, BLOCK_L)
        mlp = valid[:, None] & mp[None, :]
        st_base = ((b * nlaunch + pid_h) * nchunks + c) * headdim * dstate
        cb = tl.zeros([BLOCK_L, BLOCK_L], tl.float32)
        CS = tl.zeros([BLOCK_L, BLOCK_P], tl.float32)
        for n0 in range(0, dstate, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mn = offs_n < dstate
            mln = valid[:, None] & mn[None, :]
            Bm = tl.load(B_ptr + b * sB_b + grp * sB_g + t[:, None] * sB_l + offs_n[None, :] * sB_n,
                         mask=mln, other=0.0).to(tl.float32)
            Cm = tl.load(C_ptr + b * sC_b + grp * sC_g + t[:, None] * sC_l + offs_n[None, :] * sC_n,
                         mask=mln, other=0.0).to(tl.float32)
            S = tl.load(st_ptr + st_base + offs_p[None, :] * dstate + offs_n[:, None],
                        mask=mn[:, None] & mp[None, :], other=0.0)
            cb += tl.dot(Cm, tl.trans(Bm), input_precision=DOT_PREC)
            CS += tl.dot(Cm, S, input_precision=DOT_PREC)
        x = tl.load(x_ptr + b * sx_b + head * sx_h + t[:, None] * sx_l + offs_p[None, :] * sx_p,
                    mask=mlp, other=0.0).to(tl.float32)
        cb = cb * _decay(a, seq, HAS_SEQ, BLOCK_L) * dt[None, :]
        y = tl.dot(cb, x, input_precision=DOT_PREC) + w_off[:, None] * CS
        if HAS_D:
            if D_PER_CH:
                Dv = tl.load(D_ptr + head * headdim + offs_p, mask=mp, other=0.0).to(tl.float32)
                y += Dv[None, :] * x
            else:
                y += tl.load(D_ptr + head).to(tl.float32) * x
        if HAS_Z:
            zz = tl.load(z_ptr + b * sz_b + head * sz_h + t[:, None] * sz_l + offs_p[None, :] * sz_p,
                         mask=mlp, other=0.0).to(tl.float32)
            y = y * zz / (1.0 + tl.exp(-zz))
        if HAS_HS:
            y = y * tl.load(hs_ptr + b * shs_b + head * shs_h).to(tl.float32)
        tl.store(y_ptr + b * sy_b + head * sy_h + t[:, None] * sy_l + offs_p[None, :] * sy_p,
                 y.to(y_ptr.dtype.element_ty), mask=mlp)
    else:
        t = (c * chunk_size + offs_l).to(tl.int64)
        valid = (offs_l < chunk_size) & (t < seqlen)
        tl.store(y_ptr + b * sy_b + head * sy_h + t[:, None] * sy_l + offs_p[None, :] * sy_p,
                 tl.zeros([BLOCK_L, BLOCK_P], y_ptr.dtype.element_ty), mask=valid[:, None] & mp[None, :])


@triton.jit
def _gated_dy(b, head, t, mlp, offs_p, dy_ptr, z_ptr, hs_ptr, sy_b, sy_l, sy_h, sy_p,
              sz_b, sz_l, sz_h, sz_p, shs_b, shs_h, HAS_Z: tl.constexpr, HAS_HS: tl.constexpr):
    """dyr = dy * silu(z) * hs: the gradient of yraw (fp32, (BLOCK_L, BLOCK_P))."""
    dyr = tl.load(dy_ptr + b * sy_b + head * sy_h + t[:, None] * sy_l + offs_p[None, :] * sy_p,
                  mask=mlp, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + b * sz_b + head * sz_h + t[:, None] * sz_l + offs_p[None, :] * sz_p,
                     mask=mlp, other=0.0).to(tl.float32)
        dyr = dyr * zz / (1.0 + tl.exp(-zz))
    if HAS_HS:
        dyr = dyr * tl.load(hs_ptr + b * shs_b + head * shs_h).to(tl.float32)
    return dyr


@triton.jit
def _ssd_state_bwd_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, seq_ptr, act_ptr, hs_ptr, dy_ptr, dfin_ptr, dst_ptr, dinit_ptr,
    seqlen, nchunks, chunk_size, ngroups, hpg, kpg, headdim, dstate, dt_lo, dt_hi,
    sx_b, sx_l, sx_h, sx_p, sz_b, sz_l, sz_h, sz_p, sy_b, sy_l, sy_h, sy_p,
    sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l, shs_b, shs_h,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_ACT: tl.constexpr, HAS_HS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    r"""Reverse state-gradient recurrence of one (dstate block, head, sample), grid
    (n-blocks, nlaunch, batch).

    With ``dS_c = dL/dS_{c+1}`` (the gradient of the state leaving chunk c; the last one is
    grad_states) and ``dyr = dy * silu(z) * hs``, the transpose of ``S_{c+1} = g S_c + ...``
    and of ``yraw ∋ w_off (C S_c)`` gives::

        dS_{c-1} = g dS_c + (C * w_off)^T dyr

    Every ``dS_c`` is stored to ``dst[b, i, c]``; the gradient of the state entering chunk 0 is
    d initial_states. Inactive (sample, head) pairs write d initial_states = 0.
    """
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nlaunch = tl.num_programs(1).to(tl.int64)
    head, grp, rank = _head_of(pid_h, ngroups, hpg, kpg, INTERLEAVED)
    nheads = ngroups * hpg
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mp = offs_p < headdim
    mn = offs_n < dstate
    mnp = mn[:, None] & mp[None, :]
    s_tile = offs_p[None, :] * dstate + offs_n[:, None]
    s_off = (b * nheads + head) * headdim * dstate + s_tile
    if HAS_ACT:
        active = rank < tl.load(act_ptr + b) // ngroups
    else:
        active = True
    if active:
        A = tl.load(A_ptr + head).to(tl.float32)
        dS = tl.load(dfin_ptr + s_off, mask=mnp, other=0.0)
        for i in range(0, nchunks):
            c = nchunks - 1 - i
            t, valid, dt, fac, a, w_off, w_exp, g, seq = _chunk_dt(
                c, b, head, A, dt_ptr, bias_ptr, seq_ptr, seqlen, chunk_size, dt_lo, dt_hi,
                sdt_b, sdt_l, sdt_h, sseq_b, sseq_l, HAS_BIAS, HAS_SEQ, SOFTPLUS, CLAMP, BLOCK_L)
            dyr = _gated_dy(b, head, t, valid[:, None] & mp[None, :], offs_p, dy_ptr, z_ptr, hs_ptr,
                            sy_b, sy_l, sy_h, sy_p, sz_b, sz_l, sz_h, sz_p, shs_b, shs_h, HAS_Z, HAS_HS)
            Cm = tl.load(C_ptr + b * sC_b + grp * sC_g + t[:, None] * sC_l + offs_n[None, :] * sC_n,
                         mask=valid[:, None] & mn[None, :], other=0.0).to(tl.float32)
            tl.store(dst_ptr + ((b * nlaunch + pid_h) * nchunks + c) * headdim * dstate + s_tile, dS, mask=mnp)
            dS = dS * g + tl.dot(tl.trans(Cm * w_off[:, None]), dyr, input_precision=DOT_PREC)
        if HAS_INIT:
            tl.store(dinit_ptr + s_off, dS.to(dinit_ptr.dtype.element_ty), mask=mnp)
    else:
        if HAS_INIT:
            tl.store(dinit_ptr + s_off, tl.zeros([BLOCK_N, BLOCK_P], dinit_ptr.dtype.element_ty), mask=mnp)


@triton.jit
def _ssd_chunk_bwd_dx_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, act_ptr, hs_ptr, st_ptr, dst_ptr,
    dy_ptr, dx_ptr, ddt_ptr, dz_ptr, dD_ptr, dA_ptr, dhs_ptr,
    seqlen, nchunks, chunk_size, ngroups, hpg, kpg, headdim, dstate, dt_lo, dt_hi,
    sx_b, sx_l, sx_h, sx_p, sz_b, sz_l, sz_h, sz_p, sy_b, sy_l, sy_h, sy_p,
    sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l, shs_b, shs_h,
    HAS_D: tl.constexpr, D_PER_CH: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_ACT: tl.constexpr, HAS_HS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    r"""Gradients of x, z, dt, A, D, head_scale for one (chunk, head, sample), grid
    (nchunks, nlaunch, batch).

    With S (entering state, :func:`_ssd_state_fwd_kernel`), dS = dL/dS' (leaving state,
    :func:`_ssd_state_bwd_kernel`), ``CBd = C B^T * decay``, ``dyr = dy * silu(z) * hs`` and
    ``G = dyr x^T`` (L x L); ``C B^T``, ``C S``, ``B dS`` and ``<dS, S>`` accumulate over dstate
    blocks::

        dz    = dy * yraw * hs * silu'(z)            dhs += sum(dy * yraw * silu(z))
        dD   += sum_l dyr * x
        dx    = dt * (CBd^T dyr) + w_st * (B dS) + D dyr
        ddt_s = sum_l (CBd * G)[l, s] + w_exp_s x_s . (B dS)_s + A R_s
        dA   += sum_s dt_s R_s,       R_s = sum_{l >= s} da_l + da_L

    where ``da`` is the gradient w.r.t. the in-chunk cumsum ``a``: with ``T = CBd * G * dt^T``,
    ``da = rowsum(T) - colsum(T) + w_off * rowsum(dyr * (C S)) - V``,
    ``V_s = w_st_s x_s . (B dS)_s`` and ``da_L = sum(V) + g <dS, S>`` (a_L = sum of dt A).
    ddt is written in fp32 times d dt / d dt_raw (softplus' sigmoid, 0 where clamped);
    dD (batch, nheads, nchunks, headdim), dA and dhs (batch, nheads, nchunks) per program.
    Inactive (sample, head) pairs write zeros to dx, dz and ddt.
    """
    c = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nlaunch = tl.num_programs(1).to(tl.int64)
    head, grp, rank = _head_of(pid_h, ngroups, hpg, kpg, INTERLEAVED)
    nheads = ngroups * hpg
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < headdim
    if HAS_ACT:
        active = rank < tl.load(act_ptr + b) // ngroups
    else:
        active = True
    if active:
        A = tl.load(A_ptr + head).to(tl.float32)
        t, valid, dt, fac, a, w_off, w_exp, g, seq = _chunk_dt(
            c, b, head, A, dt_ptr, bias_ptr, seq_ptr, seqlen, chunk_size, dt_lo, dt_hi,
            sdt_b, sdt_l, sdt_h, sseq_b, sseq_l, HAS_BIAS, HAS_SEQ, SOFTPLUS, CLAMP, BLOCK_L)
        mlp = valid[:, None] & mp[None, :]
        bhc = (b * nheads + head) * nchunks + c
        st_base = ((b * nlaunch + pid_h) * nchunks + c) * headdim * dstate
        cb = tl.zeros([BLOCK_L, BLOCK_L], tl.float32)
        CS = tl.zeros([BLOCK_L, BLOCK_P], tl.float32)
        BdS = tl.zeros([BLOCK_L, BLOCK_P], tl.float32)
        dSS = tl.zeros([BLOCK_P], tl.float32)
        for n0 in range(0, dstate, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mn = offs_n < dstate
            mln = valid[:, None] & mn[None, :]
            mnp = mn[:, None] & mp[None, :]
            Bm = tl.load(B_ptr + b * sB_b + grp * sB_g + t[:, None] * sB_l + offs_n[None, :] * sB_n,
                         mask=mln, other=0.0).to(tl.float32)
            Cm = tl.load(C_ptr + b * sC_b + grp * sC_g + t[:, None] * sC_l + offs_n[None, :] * sC_n,
                         mask=mln, other=0.0).to(tl.float32)
            s_tile = st_base + offs_p[None, :] * dstate + offs_n[:, None]
            S = tl.load(st_ptr + s_tile, mask=mnp, other=0.0)
            dS = tl.load(dst_ptr + s_tile, mask=mnp, other=0.0)
            cb += tl.dot(Cm, tl.trans(Bm), input_precision=DOT_PREC)
            CS += tl.dot(Cm, S, input_precision=DOT_PREC)
            BdS += tl.dot(Bm, dS, input_precision=DOT_PREC)
            dSS += tl.sum(dS * S, axis=0)
        x = tl.load(x_ptr + b * sx_b + head * sx_h + t[:, None] * sx_l + offs_p[None, :] * sx_p,
                    mask=mlp, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + b * sy_b + head * sy_h + t[:, None] * sy_l + offs_p[None, :] * sy_p,
                     mask=mlp, other=0.0).to(tl.float32)
        if HAS_D:
            if D_PER_CH:
                Dv = tl.load(D_ptr + head * headdim + offs_p, mask=mp, other=0.0).to(tl.float32)
            else:
                Dv = tl.load(D_ptr + head).to(tl.float32) + tl.zeros([BLOCK_P], tl.float32)
        cbd = cb * _decay(a, seq, HAS_SEQ, BLOCK_L)
        dyr = dy
        if HAS_Z or HAS_HS:
            yraw = tl.dot(cbd * dt[None, :], x, input_precision=DOT_PREC) + w_off[:, None] * CS
            if HAS_D:
                yraw += Dv[None, :] * x
            if HAS_HS:
                hs = tl.load(hs_ptr + b * shs_b + head * shs_h).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + b * sz_b + head * sz_h + t[:, None] * sz_l + offs_p[None, :] * sz_p,
                             mask=mlp, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-zz))
                silu = zz * sig
                dzv = dy * yraw * sig * (1.0 + zz * (1.0 - sig))
                if HAS_HS:
                    dzv = dzv * hs
                tl.store(dz_ptr + ((b * seqlen + t[:, None]) * nheads + head) * headdim + offs_p[None, :],
                         dzv.to(dz_ptr.dtype.element_ty), mask=mlp)
                yraw = yraw * silu
                dyr = dyr * silu
            if HAS_HS:
                tl.store(dhs_ptr + bhc, tl.sum(tl.sum(dy * yraw, axis=1), axis=0))
                dyr = dyr * hs
        if HAS_D:
            tl.store(dD_ptr + bhc * headdim + offs_p, tl.sum(dyr * x, axis=0), mask=mp)
        w_st = w_exp * dt
        dxv = dt[:, None] * tl.dot(tl.trans(cbd), dyr, input_precision=DOT_PREC) + w_st[:, None] * BdS
        if HAS_D:
            dxv += Dv[None, :] * dyr
        tl.store(dx_ptr + ((b * seqlen + t[:, None]) * nheads + head) * headdim + offs_p[None, :],
                 dxv.to(dx_ptr.dtype.element_ty), mask=mlp)
        cbdG = cbd * tl.dot(dyr, tl.trans(x), input_precision=DOT_PREC)
        xBdS = tl.sum(x * BdS, axis=1)
        T = cbdG * dt[None, :]
        V = w_st * xBdS
        da = tl.sum(T, axis=1) - tl.sum(T, axis=0) + w_off * tl.sum(dyr * CS, axis=1) - V
        da_last = tl.sum(V, axis=0) + g * tl.sum(dSS, axis=0)
        R = tl.sum(da, axis=0) - tl.cumsum(da, axis=0) + da + da_last
        ddt_proc = tl.sum(cbdG, axis=0) + w_exp * xBdS + A * R
        tl.store(dA_ptr + bhc, tl.sum(dt * R, axis=0))
        tl.store(ddt_ptr + (b * seqlen + t) * nheads + head, ddt_proc * fac, mask=valid)
    else:
        t = (c * chunk_size + offs_l).to(tl.int64)
        valid = (offs_l < chunk_size) & (t < seqlen)
        mlp = valid[:, None] & mp[None, :]
        x_off = ((b * seqlen + t[:, None]) * nheads + head) * headdim + offs_p[None, :]
        tl.store(dx_ptr + x_off, tl.zeros([BLOCK_L, BLOCK_P], dx_ptr.dtype.element_ty), mask=mlp)
        if HAS_Z:
            tl.store(dz_ptr + x_off, tl.zeros([BLOCK_L, BLOCK_P], dz_ptr.dtype.element_ty), mask=mlp)
        tl.store(ddt_ptr + (b * seqlen + t) * nheads + head, tl.zeros([BLOCK_L], tl.float32), mask=valid)


@triton.jit
def _ssd_chunk_bwd_dbc_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, z_ptr, bias_ptr, seq_ptr, act_ptr, hs_ptr, st_ptr, dst_ptr,
    dy_ptr, dBh_ptr, dCh_ptr,
    seqlen, nchunks, chunk_size, ngroups, hpg, kpg, headdim, dstate, dt_lo, dt_hi,
    sx_b, sx_l, sx_h, sx_p, sz_b, sz_l, sz_h, sz_p, sy_b, sy_l, sy_h, sy_p,
    sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l, shs_b, shs_h,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ACT: tl.constexpr,
    HAS_HS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    r"""Gradients of B and C from one (chunk x dstate block, head, sample), grid
    (nchunks * n-blocks, nlaunch, batch).

    With ``dyr = dy * silu(z) * hs``, ``G = dyr x^T`` and ``dCB = G * decay * dt^T`` (the
    gradient of ``C B^T``), S and dS as in :func:`_ssd_chunk_bwd_dx_kernel`::

        dC = dCB B + w_off * (dyr S^T)          dB = dCB^T C + w_st * (x dS^T)

    written per launched head to (batch, seqlen, nlaunch, dstate) fp32; the launcher sums the
    heads of each group. Inactive (sample, head) pairs write zeros.
    """
    nnb = tl.cdiv(dstate, BLOCK_N)
    c = tl.program_id(0) // nnb
    pid_n = tl.program_id(0) % nnb
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nlaunch = tl.num_programs(1).to(tl.int64)
    head, grp, rank = _head_of(pid_h, ngroups, hpg, kpg, INTERLEAVED)
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mp = offs_p < headdim
    mn = offs_n < dstate
    if HAS_ACT:
        active = rank < tl.load(act_ptr + b) // ngroups
    else:
        active = True
    if active:
        A = tl.load(A_ptr + head).to(tl.float32)
        t, valid, dt, fac, a, w_off, w_exp, g, seq = _chunk_dt(
            c, b, head, A, dt_ptr, bias_ptr, seq_ptr, seqlen, chunk_size, dt_lo, dt_hi,
            sdt_b, sdt_l, sdt_h, sseq_b, sseq_l, HAS_BIAS, HAS_SEQ, SOFTPLUS, CLAMP, BLOCK_L)
        mlp = valid[:, None] & mp[None, :]
        mln = valid[:, None] & mn[None, :]
        mnp = mn[:, None] & mp[None, :]
        x = tl.load(x_ptr + b * sx_b + head * sx_h + t[:, None] * sx_l + offs_p[None, :] * sx_p,
                    mask=mlp, other=0.0).to(tl.float32)
        dyr = _gated_dy(b, head, t, mlp, offs_p, dy_ptr, z_ptr, hs_ptr, sy_b, sy_l, sy_h, sy_p,
                        sz_b, sz_l, sz_h, sz_p, shs_b, shs_h, HAS_Z, HAS_HS)
        dcb = tl.dot(dyr, tl.trans(x), input_precision=DOT_PREC) * _decay(a, seq, HAS_SEQ, BLOCK_L) * dt[None, :]
        Bm = tl.load(B_ptr + b * sB_b + grp * sB_g + t[:, None] * sB_l + offs_n[None, :] * sB_n,
                     mask=mln, other=0.0).to(tl.float32)
        Cm = tl.load(C_ptr + b * sC_b + grp * sC_g + t[:, None] * sC_l + offs_n[None, :] * sC_n,
                     mask=mln, other=0.0).to(tl.float32)
        s_tile = ((b * nlaunch + pid_h) * nchunks + c) * headdim * dstate + offs_p[None, :] * dstate + offs_n[:, None]
        S = tl.load(st_ptr + s_tile, mask=mnp, other=0.0)
        dS = tl.load(dst_ptr + s_tile, mask=mnp, other=0.0)
        dC = tl.dot(dcb, Bm, input_precision=DOT_PREC) \
            + w_off[:, None] * tl.dot(dyr, tl.trans(S), input_precision=DOT_PREC)
        dB = tl.dot(tl.trans(dcb), Cm, input_precision=DOT_PREC) \
            + (w_exp * dt)[:, None] * tl.dot(x, tl.trans(dS), input_precision=DOT_PREC)
        bc_off = ((b * seqlen + t[:, None]) * nlaunch + pid_h) * dstate + offs_n[None, :]
        tl.store(dBh_ptr + bc_off, dB, mask=mln)
        tl.store(dCh_ptr + bc_off, dC, mask=mln)
    else:
        t = (c * chunk_size + offs_l).to(tl.int64)
        valid = (offs_l < chunk_size) & (t < seqlen)
        mln = valid[:, None] & mn[None, :]
        bc_off = ((b * seqlen + t[:, None]) * nlaunch + pid_h) * dstate + offs_n[None, :]
        tl.store(dBh_ptr + bc_off, tl.zeros([BLOCK_L, BLOCK_N], tl.float32), mask=mln)
        tl.store(dCh_ptr + bc_off, tl.zeros([BLOCK_L, BLOCK_N], tl.float32), mask=mln)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

MAX_CHUNK = 64


def launch_config(dtype: torch.dtype, chunk_size: int, headdim: int, dstate: int) -> dict:
    """Chunk length, block sizes, warps, stages and dot precision of every SSD kernel: the one
    place they are chosen (the AOT report, :mod:`elastic_kernels.triton.aot`, compiles what this
    returns).

    The kernels run chunks of ``min(chunk_size, MAX_CHUNK)`` positions (the result does not depend
    on the chunk length): at 128 the backward's live fp32 tiles (``C B^T`` of L x L plus five
    L x headdim tiles) outgrow the 64K-register file of an SM and spill in any warp count. dstate
    is processed in blocks of at most 64 (64 = one warp-group MMA row block in the state
    kernels). One stage: the dstate loops run 2 iterations at dstate 128, and deeper pipelining
    only costs shared memory and registers. fp32 inputs use IEEE dots, the others TF32 on the
    widened tiles.
    """
    chunk = min(chunk_size, MAX_CHUNK)
    bl = max(16, triton.next_power_of_2(chunk))
    bp = max(16, triton.next_power_of_2(headdim))
    bn = min(max(16, triton.next_power_of_2(dstate)), 64)
    return dict(chunk=chunk, BLOCK_L=bl, BLOCK_P=bp, BLOCK_N=bn,
                DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
                num_warps=8 if bl * max(bp, bn) >= 64 * 64 else 4, num_stages=1)


def _launch_plan(x, B, chunk_size, interleaved, active_int, active_t):
    """Sizes, block sizes and the head launch plan shared by forward and backward."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    hpg = nheads // ngroups
    kpg = hpg if (active_t is not None or active_int < 0) else active_int // ngroups
    cfg = launch_config(x.dtype, chunk_size, headdim, dstate)
    return dict(batch=batch, seqlen=seqlen, nheads=nheads, headdim=headdim, ngroups=ngroups,
                dstate=dstate, hpg=hpg, kpg=kpg, nlaunch=kpg * ngroups, chunk=cfg["chunk"],
                nchunks=triton.cdiv(seqlen, cfg["chunk"]), nblocks_n=triton.cdiv(dstate, cfg["BLOCK_N"]),
                interleaved=bool(interleaved), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                const=dict(BLOCK_L=cfg["BLOCK_L"], BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"],
                           INTERLEAVED=bool(interleaved), DOT_PREC=cfg["DOT_PREC"]))


def _zero_inactive(t, dim, plan):
    """Zero the heads (dimension ``dim`` of ``t``) that an int width leaves out of the launch."""
    g, hpg, kpg = plan["ngroups"], plan["hpg"], plan["kpg"]
    if kpg == hpg:
        return
    if plan["interleaved"]:
        t.narrow(dim, kpg * g, (hpg - kpg) * g).zero_()
    else:
        t.unflatten(dim, (g, hpg)).narrow(dim + 1, kpg, hpg - kpg).zero_()


def _group_sum(t, plan):
    """(batch, seqlen, nlaunch, dstate) per launched head -> (batch, seqlen, ngroups, dstate)."""
    b, l, _, n = t.shape
    g, kpg = plan["ngroups"], plan["kpg"]
    if plan["interleaved"]:
        return t.view(b, l, kpg, g, n).sum(2)
    return t.view(b, l, g, kpg, n).sum(3)


def _strides(t, ndim):
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _or(t, dummy):
    return t if t is not None else dummy


class _Launch:
    """Scalars, strides and flags shared by the kernels of one forward or backward call."""

    def __init__(self, plan, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, active_t,
                 head_scale, y, dt_softplus, dt_lo, dt_hi):
        clamp = not (dt_lo == 0.0 and dt_hi == float("inf"))
        self.plan = plan
        self.args = (plan["seqlen"], plan["nchunks"], plan["chunk"], plan["ngroups"], plan["hpg"],
                     plan["kpg"], plan["headdim"], plan["dstate"], float(dt_lo),
                     float(dt_hi) if clamp else 0.0,
                     *_strides(x, 4), *_strides(z, 4), *_strides(y, 4), *_strides(dt, 3),
                     *_strides(B, 4), *_strides(C, 4), *_strides(seq_idx, 2), *_strides(head_scale, 2))
        self.const = dict(plan["const"], HAS_D=D is not None, D_PER_CH=D is not None and D.dim() == 2,
                          HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
                          HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None,
                          HAS_ACT=active_t is not None, HAS_HS=head_scale is not None,
                          SOFTPLUS=bool(dt_softplus), CLAMP=clamp)

    def __call__(self, kernel, over, *ptrs):
        """Launch ``kernel`` over (X, nlaunch, batch) where X is ``over``: "n" (dstate blocks),
        "chunk" (chunks) or "chunk_n" (chunks x dstate blocks)."""
        p = self.plan
        first = {"n": p["nblocks_n"], "chunk": p["nchunks"], "chunk_n": p["nchunks"] * p["nblocks_n"]}[over]
        grid = (first, p["nlaunch"], p["batch"])
        if 0 in grid:
            return
        names = kernel.arg_names
        kernel[grid](*ptrs, *self.args, num_warps=p["num_warps"], num_stages=p["num_stages"],
                     **{k: v for k, v in self.const.items() if k in names})


def _prep(A, D, dt_bias, initial_states):
    """Small per-head tensors are read as contiguous."""
    return [t.contiguous() if t is not None else None for t in (A, D, dt_bias, initial_states)]


def ssd_scan_fwd(x, dt, A, B, C, *, chunk_size, D, z, dt_bias, dt_softplus, dt_lo, dt_hi,
                 initial_states, seq_idx, interleaved, active_int, active_t, head_scale):
    """Triton forward of ``ssd_scan`` (arguments as :func:`ssd_scan_reference`, validated).

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,);
    B, C: (batch, seqlen, ngroups, dstate). Returns y (batch, seqlen, nheads, headdim) in
    x.dtype and final states (batch, nheads, headdim, dstate) fp32. With an int width only the
    active heads are launched; the others are zeroed here.
    """
    A, D, dt_bias, initial_states = _prep(A, D, dt_bias, initial_states)
    plan = _launch_plan(x, B, chunk_size, interleaved, active_int, active_t)
    b, l, h, p = x.shape
    n, nl, dev, f32 = plan["dstate"], plan["nlaunch"], x.device, torch.float32
    y = torch.empty((b, l, h, p), dtype=x.dtype, device=dev)
    fin = torch.empty((b, h, p, n), dtype=f32, device=dev)
    st = torch.empty((b, nl, plan["nchunks"], p, n), dtype=f32, device=dev)
    launch = _Launch(plan, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, active_t,
                     head_scale, y, dt_softplus, dt_lo, dt_hi)
    launch(_ssd_state_fwd_kernel, "n", x, dt, A, B, _or(dt_bias, x), _or(seq_idx, x),
           _or(active_t, x), _or(initial_states, x), st, fin)
    launch(_ssd_chunk_fwd_kernel, "chunk", x, dt, A, B, C, _or(D, x), _or(z, x), _or(dt_bias, x),
           _or(seq_idx, x), _or(active_t, x), _or(head_scale, x), st, y)
    _zero_inactive(y, 2, plan)
    _zero_inactive(fin, 1, plan)
    return y, fin


def ssd_scan_bwd(grad_y, grad_states, x, dt, A, B, C, *, D, z, dt_bias, initial_states, head_scale,
                 chunk_size, dt_softplus, dt_lo, dt_hi, seq_idx, interleaved, active_int, active_t):
    """Triton backward of ``ssd_scan``.

    grad_y: like x; grad_states: (batch, nheads, headdim, dstate). Recomputes the chunk states,
    runs the reverse state-gradient pass, then the per-chunk gradient kernels; sums dB/dC over
    the heads of a group and dA/dD/ddt_bias/dhead_scale over batch and chunks. Returns the
    gradients of (x, dt, A, B, C, D, z, dt_bias, initial_states, head_scale) in their inputs'
    dtypes, None for absent inputs.
    """
    A, D, dt_bias, initial_states = _prep(A, D, dt_bias, initial_states)
    plan = _launch_plan(x, B, chunk_size, interleaved, active_int, active_t)
    b, l, h, p = x.shape
    n, nl, nc, dev, f32 = plan["dstate"], plan["nlaunch"], plan["nchunks"], x.device, torch.float32
    launch = _Launch(plan, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, active_t,
                     head_scale, grad_y, dt_softplus, dt_lo, dt_hi)
    st = torch.empty((b, nl, nc, p, n), dtype=f32, device=dev)
    dst = torch.empty((b, nl, nc, p, n), dtype=f32, device=dev)
    fin = torch.empty((b, h, p, n), dtype=f32, device=dev)
    dx = torch.empty((b, l, h, p), dtype=x.dtype, device=dev)
    ddt = torch.empty((b, l, h), dtype=f32, device=dev)
    dz = torch.empty((b, l, h, p), dtype=z.dtype, device=dev) if z is not None else None
    dBh = torch.empty((b, l, nl, n), dtype=f32, device=dev)
    dCh = torch.empty((b, l, nl, n), dtype=f32, device=dev)
    dinit = torch.empty((b, h, p, n), dtype=initial_states.dtype, device=dev) \
        if initial_states is not None else None
    dD = torch.zeros((b, h, nc, p), dtype=f32, device=dev)
    dA = torch.zeros((b, h, nc), dtype=f32, device=dev)
    dhs = torch.zeros((b, h, nc), dtype=f32, device=dev)
    opt = dict(D=_or(D, x), z=_or(z, x), bias=_or(dt_bias, x), seq=_or(seq_idx, x),
               act=_or(active_t, x), hs=_or(head_scale, x))
    launch(_ssd_state_fwd_kernel, "n", x, dt, A, B, opt["bias"], opt["seq"], opt["act"],
           _or(initial_states, x), st, fin)
    launch(_ssd_state_bwd_kernel, "n", dt, A, C, opt["z"], opt["bias"], opt["seq"], opt["act"],
           opt["hs"], grad_y, grad_states.to(f32).contiguous(), dst, _or(dinit, x))
    launch(_ssd_chunk_bwd_dx_kernel, "chunk", x, dt, A, B, C, opt["D"], opt["z"], opt["bias"],
           opt["seq"], opt["act"], opt["hs"], st, dst, grad_y, dx, ddt, _or(dz, dx), dD, dA, dhs)
    launch(_ssd_chunk_bwd_dbc_kernel, "chunk_n", x, dt, A, B, C, opt["z"], opt["bias"], opt["seq"],
           opt["act"], opt["hs"], st, dst, grad_y, dBh, dCh)
    for t, dim in ((dx, 2), (ddt, 2), (dz, 2), (dinit, 1)):
        if t is not None:
            _zero_inactive(t, dim, plan)
    dB = _group_sum(dBh, plan).to(B.dtype) if nl else torch.zeros_like(B)
    dC = _group_sum(dCh, plan).to(C.dtype) if nl else torch.zeros_like(C)
    dD_out = None
    if D is not None:
        dD_out = dD.sum((0, 2))
        dD_out = (dD_out if D.dim() == 2 else dD_out.sum(-1)).to(D.dtype)
    return (dx, ddt.to(dt.dtype), dA.sum((0, 2)).to(A.dtype), dB, dC, dD_out, dz,
            ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None,
            dinit, dhs.sum(2).to(head_scale.dtype) if head_scale is not None else None)
