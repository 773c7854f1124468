r"""Triton kernels of the width-masked Mamba2 SSD scan: chunked forward and backward.

Layout of the work: one program per (active head, sample) walks the chunks of its sequence in
order (forward) or in reverse (backward), carrying the ``(dstate, headdim)`` state (or its
gradient) in registers. Inside a chunk everything is the SSD "dual" form with ``tl.dot``:
intra-chunk ``C B^T`` masked by the decay, the inter-chunk term ``C S``, and the state update
``x^T (B w)``. Per chunk of length ``L`` (positions ``l, s``; ``a = cumsum(dt A)`` within the
chunk, ``a_L`` its last value; ``S`` the state entering the chunk, stored as ``S[n, p]``)::

    decay[l, s] = exp(a_l - a_s) [s <= l] [seq_l == seq_s]
    w_off[l]    = exp(a_l) [seq_l == seq_prev]            (seq_prev: last index of the chunk before, 0 first)
    w_st[s]     = exp(a_L - a_s) dt_s [seq_s == seq_end]   (seq_end: last index of this chunk)
    g           = exp(a_L) [seq_end == seq_prev]
    yraw        = (C B^T * decay * dt^T) x + w_off * (C S) + D x
    y           = yraw * silu(z) * head_scale
    S'          = g S + (B * w_st)^T x

Elastic heads: programs are launched only for active heads when the width is an int (the
launcher zeroes the rest); with per-sample widths every (head, sample) program loads its
sample's width first and, when inactive, only writes zeros to its outputs.
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
def _chunk_inputs(c, b, head, grp, A, x_ptr, dt_ptr, B_ptr, C_ptr, bias_ptr, seq_ptr,
                  seqlen, chunk_size, headdim, dstate, dt_lo, dt_hi,
                  sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n,
                  sC_b, sC_l, sC_g, sC_n, sseq_b, sseq_l,
                  HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr,
                  CLAMP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Load chunk ``c`` in fp32 and derive its decay terms.

    Returns (t, valid, x, dt, ddt_factor, B, C, a, a_last, decay, w_off, w_exp, g), where
    ``dt`` is processed (bias, softplus, clamp; 0 outside the sequence), ``ddt_factor`` =
    d dt / d dt_raw, and ``w_exp[s] = exp(a_L - a_s) [seq_s == seq_end]`` (so ``w_st = w_exp dt``).
    """
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t0 = c * chunk_size
    t = (t0 + offs_l).to(tl.int64)
    valid = (offs_l < chunk_size) & (t < seqlen)
    mp = offs_p < headdim
    mn = offs_n < dstate
    x = tl.load(x_ptr + b * sx_b + head * sx_h + t[:, None] * sx_l + offs_p[None, :] * sx_p,
                mask=valid[:, None] & mp[None, :], other=0.0).to(tl.float32)
    v = tl.load(dt_ptr + b * sdt_b + head * sdt_h + t * sdt_l, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + head).to(tl.float32)
    fac = tl.full([BLOCK_L], 1.0, tl.float32)
    if SOFTPLUS:
        e = tl.exp(tl.minimum(v, 20.0))
        fac = tl.where(v > 20.0, 1.0, e / (1.0 + e))
        v = tl.where(v > 20.0, v, tl.log(1.0 + e))
    if CLAMP:
        fac = tl.where((v >= dt_lo) & (v <= dt_hi), fac, 0.0)
        v = tl.minimum(tl.maximum(v, dt_lo), dt_hi)
    dt = tl.where(valid, v, 0.0)
    fac = tl.where(valid, fac, 0.0)
    Bm = tl.load(B_ptr + b * sB_b + grp * sB_g + t[:, None] * sB_l + offs_n[None, :] * sB_n,
                 mask=valid[:, None] & mn[None, :], other=0.0).to(tl.float32)
    Cm = tl.load(C_ptr + b * sC_b + grp * sC_g + t[:, None] * sC_l + offs_n[None, :] * sC_n,
                 mask=valid[:, None] & mn[None, :], other=0.0).to(tl.float32)
    dtA = dt * A
    a = tl.cumsum(dtA, axis=0)
    a_last = tl.sum(dtA, axis=0)
    keep = offs_l[:, None] >= offs_l[None, :]
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
        keep = keep & (seq[:, None] == seq[None, :])
        w_off = tl.where(seq == seq_prev, w_off, 0.0)
        w_exp = tl.where(seq == seq_end, w_exp, 0.0)
        g = tl.where(seq_end == seq_prev, g, 0.0)
    decay = tl.exp(tl.where(keep, a[:, None] - a[None, :], float("-inf")))
    return t, valid, x, dt, fac, Bm, Cm, a, a_last, decay, w_off, w_exp, g


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, seq_ptr, act_ptr, hs_ptr,
    y_ptr, fin_ptr, st_ptr,
    seqlen, nchunks, chunk_size, ngroups, hpg, kpg, headdim, dstate, dt_lo, dt_hi,
    sx_b, sx_l, sx_h, sx_p, sz_b, sz_l, sz_h, sz_p, sy_b, sy_l, sy_h, sy_p,
    sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l, shs_b, shs_h,
    HAS_D: tl.constexpr, D_PER_CH: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ACT: tl.constexpr, HAS_HS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr,
    STORE_STATES: tl.constexpr, WRITE_Y: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    r"""Forward of one (head, sample): y for every chunk and the final state.

    Per chunk (see the module docstring)::

        yraw = (C B^T * decay * dt^T) x + w_off * (C S) + D x ;  y = yraw * silu(z) * hs
        S   <- g S + (B * w_st)^T x            (S^T stored: (dstate, headdim))

    S starts at ``initial_states`` (or 0); the last S is the final state (fp32).
    ``STORE_STATES`` also writes the state entering every chunk to ``st`` (batch, nlaunch,
    nchunks, headdim, dstate) for the backward; ``WRITE_Y=False`` skips the output.
    Inactive (sample, head) pairs (per-sample width) write y = 0 and final state = 0.
    Backward: :func:`_ssd_bwd_kernel`.
    """
    pid_h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    head, grp, rank = _head_of(pid_h, ngroups, hpg, kpg, INTERLEAVED)
    nheads = ngroups * hpg
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp = offs_p < headdim
    mn = offs_n < dstate
    mnp = mn[:, None] & mp[None, :]
    # S^T[n, p] of (b, head) in a contiguous (batch, nheads, headdim, dstate) tensor
    s_off = (b * nheads + head) * headdim * dstate + offs_p[None, :] * dstate + offs_n[:, None]
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
        if HAS_D:
            if D_PER_CH:
                Dv = tl.load(D_ptr + head * headdim + offs_p, mask=mp, other=0.0).to(tl.float32)
            else:
                Dv = tl.load(D_ptr + head).to(tl.float32) + tl.zeros([BLOCK_P], tl.float32)
        if HAS_HS:
            hs = tl.load(hs_ptr + b * shs_b + head * shs_h).to(tl.float32)
        for c in range(0, nchunks):
            t, valid, x, dt, fac, Bm, Cm, a, a_last, decay, w_off, w_exp, g = _chunk_inputs(
                c, b, head, grp, A, x_ptr, dt_ptr, B_ptr, C_ptr, bias_ptr, seq_ptr,
                seqlen, chunk_size, headdim, dstate, dt_lo, dt_hi,
                sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n,
                sC_b, sC_l, sC_g, sC_n, sseq_b, sseq_l,
                HAS_BIAS, HAS_SEQ, SOFTPLUS, CLAMP, BLOCK_L, BLOCK_P, BLOCK_N)
            mlp = valid[:, None] & mp[None, :]
            if WRITE_Y:
                cb = tl.dot(Cm, tl.trans(Bm), input_precision=DOT_PREC)
                y = tl.dot(cb * decay * dt[None, :], x, input_precision=DOT_PREC)
                y += tl.dot(Cm * w_off[:, None], S, input_precision=DOT_PREC)
                if HAS_D:
                    y += Dv[None, :] * x
                if HAS_Z:
                    zz = tl.load(z_ptr + b * sz_b + head * sz_h + t[:, None] * sz_l + offs_p[None, :] * sz_p,
                                 mask=mlp, other=0.0).to(tl.float32)
                    y = y * zz / (1.0 + tl.exp(-zz))
                if HAS_HS:
                    y = y * hs
                tl.store(y_ptr + b * sy_b + head * sy_h + t[:, None] * sy_l + offs_p[None, :] * sy_p,
                         y.to(y_ptr.dtype.element_ty), mask=mlp)
            if STORE_STATES:
                tl.store(st_ptr + ((b * tl.num_programs(0) + pid_h) * nchunks + c) * headdim * dstate
                         + offs_p[None, :] * dstate + offs_n[:, None], S, mask=mnp)
            S = S * g + tl.dot(tl.trans(Bm * (w_exp * dt)[:, None]), x, input_precision=DOT_PREC)
        tl.store(fin_ptr + s_off, S, mask=mnp)
    else:
        if WRITE_Y:
            for c in range(0, nchunks):
                t = (c * chunk_size + offs_l).to(tl.int64)
                valid = (offs_l < chunk_size) & (t < seqlen)
                tl.store(y_ptr + b * sy_b + head * sy_h + t[:, None] * sy_l + offs_p[None, :] * sy_p,
                         tl.zeros([BLOCK_L, BLOCK_P], y_ptr.dtype.element_ty),
                         mask=valid[:, None] & mp[None, :])
        tl.store(fin_ptr + s_off, tl.zeros([BLOCK_N, BLOCK_P], tl.float32), mask=mnp)


@triton.jit
def _ssd_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, act_ptr, hs_ptr, st_ptr,
    dy_ptr, dfin_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dBh_ptr, dCh_ptr, dinit_ptr, dD_ptr, dA_ptr, dhs_ptr,
    seqlen, nchunks, chunk_size, ngroups, hpg, kpg, headdim, dstate, dt_lo, dt_hi,
    sx_b, sx_l, sx_h, sx_p, sz_b, sz_l, sz_h, sz_p, sdy_b, sdy_l, sdy_h, sdy_p,
    sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
    sseq_b, sseq_l, shs_b, shs_h,
    HAS_D: tl.constexpr, D_PER_CH: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ACT: tl.constexpr, HAS_HS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    r"""Backward of one (head, sample): walks the chunks in reverse carrying dS = dL/dS'.

    With ``S`` (state entering the chunk) from the forward's ``STORE_STATES`` pass,
    ``CBd = C B^T * decay``, ``dyr = dy * silu(z) * hs`` and ``G = dyr x^T`` (L x L)::

        dz    = dy * yraw * hs * silu'(z)            dhs += sum(dy * yraw * silu(z))
        dD   += sum_l dyr * x
        dx    = dt * (CBd^T dyr) + w_st * (B dS) + D dyr
        dC    = (G * decay * dt^T) B + w_off * (dyr S^T)
        dB    = (G * decay * dt^T)^T C + w_st * (x dS^T)
        ddt_s = sum_l (CBd * G)[l, s] + w_exp_s x_s . (B dS)_s  + A R_s
        dA   += sum_s dt_s R_s,       R_s = sum_{l >= s} da_l + da_L

    where ``da`` is the gradient w.r.t. the in-chunk cumsum ``a``: with
    ``T = CBd * G * dt^T``, ``da = rowsum(T) - colsum(T) + w_off * rowsum(dyr * (C S)) - V``,
    ``V_s = w_st_s x_s . (B dS)_s`` and ``da_L = sum(V) + g <dS, S>``. Then
    ``dS <- g dS + (C * w_off)^T dyr``; after chunk 0, dS is d initial_states. ddt is
    written in fp32 times d dt / d dt_raw (softplus' sigmoid, 0 where clamped); dB/dC are
    written per launched head (batch, seqlen, nlaunch, dstate) and summed over the group by
    the launcher; dD (batch, nheads, headdim), dA and dhs (batch, nheads) per program.
    Inactive (sample, head) pairs write zeros to dx, dz, ddt, dB/dC and d initial_states.
    """
    pid_h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    nlaunch = tl.num_programs(0).to(tl.int64)
    head, grp, rank = _head_of(pid_h, ngroups, hpg, kpg, INTERLEAVED)
    nheads = ngroups * hpg
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp = offs_p < headdim
    mn = offs_n < dstate
    mnp = mn[:, None] & mp[None, :]
    s_off = (b * nheads + head) * headdim * dstate + offs_p[None, :] * dstate + offs_n[:, None]
    bh = b * nheads + head
    if HAS_ACT:
        active = rank < tl.load(act_ptr + b) // ngroups
    else:
        active = True
    if active:
        A = tl.load(A_ptr + head).to(tl.float32)
        dS = tl.load(dfin_ptr + s_off, mask=mnp, other=0.0).to(tl.float32)
        if HAS_D:
            if D_PER_CH:
                Dv = tl.load(D_ptr + head * headdim + offs_p, mask=mp, other=0.0).to(tl.float32)
            else:
                Dv = tl.load(D_ptr + head).to(tl.float32) + tl.zeros([BLOCK_P], tl.float32)
        if HAS_HS:
            hs = tl.load(hs_ptr + b * shs_b + head * shs_h).to(tl.float32)
        dA_acc = tl.zeros([BLOCK_L], tl.float32)
        dD_acc = tl.zeros([BLOCK_P], tl.float32)
        dhs_acc = tl.zeros([BLOCK_P], tl.float32)
        for i in range(0, nchunks):
            c = nchunks - 1 - i
            t, valid, x, dt, fac, Bm, Cm, a, a_last, decay, w_off, w_exp, g = _chunk_inputs(
                c, b, head, grp, A, x_ptr, dt_ptr, B_ptr, C_ptr, bias_ptr, seq_ptr,
                seqlen, chunk_size, headdim, dstate, dt_lo, dt_hi,
                sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n,
                sC_b, sC_l, sC_g, sC_n, sseq_b, sseq_l,
                HAS_BIAS, HAS_SEQ, SOFTPLUS, CLAMP, BLOCK_L, BLOCK_P, BLOCK_N)
            mlp = valid[:, None] & mp[None, :]
            mln = valid[:, None] & mn[None, :]
            S = tl.load(st_ptr + ((b * nlaunch + pid_h) * nchunks + c) * headdim * dstate
                        + offs_p[None, :] * dstate + offs_n[:, None], mask=mnp, other=0.0)
            dy = tl.load(dy_ptr + b * sdy_b + head * sdy_h + t[:, None] * sdy_l + offs_p[None, :] * sdy_p,
                         mask=mlp, other=0.0).to(tl.float32)
            w_st = w_exp * dt
            cbd = tl.dot(Cm, tl.trans(Bm), input_precision=DOT_PREC) * decay
            CS = tl.dot(Cm, S, input_precision=DOT_PREC)
            dyr = dy
            if HAS_Z or HAS_HS:
                yraw = tl.dot(cbd * dt[None, :], x, input_precision=DOT_PREC) + w_off[:, None] * CS
                if HAS_D:
                    yraw += Dv[None, :] * x
                if HAS_Z:
                    zz = tl.load(z_ptr + b * sz_b + head * sz_h + t[:, None] * sz_l + offs_p[None, :] * sz_p,
                                 mask=mlp, other=0.0).to(tl.float32)
                    sig = 1.0 / (1.0 + tl.exp(-zz))
                    silu = zz * sig
                    dsilu = sig * (1.0 + zz * (1.0 - sig))
                    dzv = dy * yraw * dsilu
                    if HAS_HS:
                        dzv = dzv * hs
                    tl.store(dz_ptr + ((b * seqlen + t[:, None]) * nheads + head) * headdim + offs_p[None, :],
                             dzv.to(dz_ptr.dtype.element_ty), mask=mlp)
                    yraw = yraw * silu
                    dyr = dyr * silu
                if HAS_HS:
                    dhs_acc += tl.sum(dy * yraw, axis=0)
                    dyr = dyr * hs
            if HAS_D:
                dD_acc += tl.sum(dyr * x, axis=0)
            G = tl.dot(dyr, tl.trans(x), input_precision=DOT_PREC)
            dcb = G * decay * dt[None, :]
            BdS = tl.dot(Bm, dS, input_precision=DOT_PREC)
            dC = tl.dot(dcb, Bm, input_precision=DOT_PREC) \
                + w_off[:, None] * tl.dot(dyr, tl.trans(S), input_precision=DOT_PREC)
            dB = tl.dot(tl.trans(dcb), Cm, input_precision=DOT_PREC) \
                + w_st[:, None] * tl.dot(x, tl.trans(dS), input_precision=DOT_PREC)
            dxv = dt[:, None] * tl.dot(tl.trans(cbd), dyr, input_precision=DOT_PREC) + w_st[:, None] * BdS
            if HAS_D:
                dxv += Dv[None, :] * dyr
            cbdG = cbd * G
            xBdS = tl.sum(x * BdS, axis=1)
            T = cbdG * dt[None, :]
            V = w_st * xBdS
            da = tl.sum(T, axis=1) - tl.sum(T, axis=0) + w_off * tl.sum(dyr * CS, axis=1) - V
            da_last = tl.sum(V, axis=0) + g * tl.sum(tl.sum(dS * S, axis=1), axis=0)
            R = tl.sum(da, axis=0) - tl.cumsum(da, axis=0) + da + da_last
            ddt_proc = tl.sum(cbdG, axis=0) + w_exp * xBdS + A * R
            dA_acc += dt * R
            tl.store(ddt_ptr + (b * seqlen + t) * nheads + head, ddt_proc * fac, mask=valid)
            tl.store(dx_ptr + ((b * seqlen + t[:, None]) * nheads + head) * headdim + offs_p[None, :],
                     dxv.to(dx_ptr.dtype.element_ty), mask=mlp)
            bc_off = ((b * seqlen + t[:, None]) * nlaunch + pid_h) * dstate + offs_n[None, :]
            tl.store(dBh_ptr + bc_off, dB, mask=mln)
            tl.store(dCh_ptr + bc_off, dC, mask=mln)
            dS = dS * g + tl.dot(tl.trans(Cm * w_off[:, None]), dyr, input_precision=DOT_PREC)
        if HAS_INIT:
            tl.store(dinit_ptr + s_off, dS.to(dinit_ptr.dtype.element_ty), mask=mnp)
        tl.store(dA_ptr + bh, tl.sum(dA_acc, axis=0))
        if HAS_D:
            tl.store(dD_ptr + bh * headdim + offs_p, dD_acc, mask=mp)
        if HAS_HS:
            tl.store(dhs_ptr + bh, tl.sum(dhs_acc, axis=0))
    else:
        for c in range(0, nchunks):
            t = (c * chunk_size + offs_l).to(tl.int64)
            valid = (offs_l < chunk_size) & (t < seqlen)
            mlp = valid[:, None] & mp[None, :]
            x_off = ((b * seqlen + t[:, None]) * nheads + head) * headdim + offs_p[None, :]
            tl.store(dx_ptr + x_off, tl.zeros([BLOCK_L, BLOCK_P], dx_ptr.dtype.element_ty), mask=mlp)
            if HAS_Z:
                tl.store(dz_ptr + x_off, tl.zeros([BLOCK_L, BLOCK_P], dz_ptr.dtype.element_ty), mask=mlp)
            tl.store(ddt_ptr + (b * seqlen + t) * nheads + head, tl.zeros([BLOCK_L], tl.float32), mask=valid)
            bc_off = ((b * seqlen + t[:, None]) * nlaunch + pid_h) * dstate + offs_n[None, :]
            zln = tl.zeros([BLOCK_L, BLOCK_N], tl.float32)
            tl.store(dBh_ptr + bc_off, zln, mask=valid[:, None] & mn[None, :])
            tl.store(dCh_ptr + bc_off, zln, mask=valid[:, None] & mn[None, :])
        if HAS_INIT:
            tl.store(dinit_ptr + s_off, tl.zeros([BLOCK_N, BLOCK_P], dinit_ptr.dtype.element_ty), mask=mnp)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _launch_plan(x, B, chunk_size, interleaved, active_int, active_t):
    """Sizes, block sizes and the head launch plan shared by forward and backward."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    hpg = nheads // ngroups
    kpg = hpg if (active_t is not None or active_int < 0) else active_int // ngroups
    bl = max(16, triton.next_power_of_2(chunk_size))
    bp = max(16, triton.next_power_of_2(headdim))
    bn = max(16, triton.next_power_of_2(dstate))
    return dict(batch=batch, seqlen=seqlen, nheads=nheads, headdim=headdim, ngroups=ngroups,
                dstate=dstate, hpg=hpg, kpg=kpg, nlaunch=kpg * ngroups,
                nchunks=triton.cdiv(seqlen, chunk_size), interleaved=bool(interleaved),
                BLOCK_L=bl, BLOCK_P=bp, BLOCK_N=bn,
                num_warps=8 if bl * max(bp, bn) >= 64 * 64 else 4,
                DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32")


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


def _shared_args(plan, x, dt, A, B, C, D, z, dt_bias, seq_idx, active_t, head_scale, chunk_size,
                 dt_softplus, dt_lo, dt_hi):
    """Scalars, strides and constexprs common to both kernels (the pointers go separately)."""
    clamp = not (dt_lo == 0.0 and dt_hi == float("inf"))
    scalars = (plan["seqlen"], plan["nchunks"], chunk_size, plan["ngroups"], plan["hpg"], plan["kpg"],
               plan["headdim"], plan["dstate"], float(dt_lo), float(dt_hi) if clamp else 0.0)
    strides = (*_strides(x, 4), *_strides(z, 4))
    tail = (*_strides(dt, 3), *_strides(B, 4), *_strides(C, 4), *_strides(seq_idx, 2),
            *_strides(head_scale, 2))
    const = dict(HAS_D=D is not None, D_PER_CH=D is not None and D.dim() == 2, HAS_Z=z is not None,
                 HAS_BIAS=dt_bias is not None, HAS_SEQ=seq_idx is not None,
                 HAS_ACT=active_t is not None, HAS_HS=head_scale is not None,
                 SOFTPLUS=bool(dt_softplus), CLAMP=clamp, INTERLEAVED=plan["interleaved"],
                 BLOCK_L=plan["BLOCK_L"], BLOCK_P=plan["BLOCK_P"], BLOCK_N=plan["BLOCK_N"],
                 DOT_PREC=plan["DOT_PREC"])
    return scalars, strides, tail, const


def _or(t, dummy):
    return t if t is not None else dummy


def _run_fwd(plan, shared, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, active_t,
             head_scale, y, fin, st):
    scalars, strides, tail, const = shared
    write_y = y is not None
    y_arg = y if write_y else x
    grid = (plan["nlaunch"], plan["batch"])
    if grid[0] * grid[1] == 0:
        return
    _ssd_fwd_kernel[grid](
        x, dt, A, B, C, _or(D, x), _or(z, x), _or(dt_bias, x), _or(initial_states, x),
        _or(seq_idx, x), _or(active_t, x), _or(head_scale, x), y_arg, fin, _or(st, x),
        *scalars, *strides, *_strides(y, 4), *tail,
        HAS_INIT=initial_states is not None, STORE_STATES=st is not None, WRITE_Y=write_y,
        num_warps=plan["num_warps"], **const)


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
    y = torch.empty((b, l, h, p), dtype=x.dtype, device=x.device)
    fin = torch.empty((b, h, p, plan["dstate"]), dtype=torch.float32, device=x.device)
    shared = _shared_args(plan, x, dt, A, B, C, D, z, dt_bias, seq_idx, active_t, head_scale,
                          chunk_size, dt_softplus, dt_lo, dt_hi)
    _run_fwd(plan, shared, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, active_t,
             head_scale, y, fin, None)
    _zero_inactive(y, 2, plan)
    _zero_inactive(fin, 1, plan)
    return y, fin


def ssd_scan_bwd(grad_y, grad_states, x, dt, A, B, C, *, D, z, dt_bias, initial_states, head_scale,
                 chunk_size, dt_softplus, dt_lo, dt_hi, seq_idx, interleaved, active_int, active_t):
    """Triton backward of ``ssd_scan``.

    grad_y: like x; grad_states: (batch, nheads, headdim, dstate). Recomputes the states entering
    every chunk with the forward kernel, then runs :func:`_ssd_bwd_kernel`; sums dB/dC over the
    heads of a group and dA/dD/ddt_bias over the batch. Returns the gradients of
    (x, dt, A, B, C, D, z, dt_bias, initial_states, head_scale) in their inputs' dtypes, None
    for absent inputs.
    """
    A, D, dt_bias, initial_states = _prep(A, D, dt_bias, initial_states)
    plan = _launch_plan(x, B, chunk_size, interleaved, active_int, active_t)
    b, l, h, p = x.shape
    n, nl, dev, f32 = plan["dstate"], plan["nlaunch"], x.device, torch.float32
    shared = _shared_args(plan, x, dt, A, B, C, D, z, dt_bias, seq_idx, active_t, head_scale,
                          chunk_size, dt_softplus, dt_lo, dt_hi)
    st = torch.empty((b, nl, plan["nchunks"], p, n), dtype=f32, device=dev)
    fin = torch.empty((b, h, p, n), dtype=f32, device=dev)
    _run_fwd(plan, shared, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, active_t,
             head_scale, None, fin, st)

    dx = torch.empty((b, l, h, p), dtype=x.dtype, device=dev)
    ddt = torch.empty((b, l, h), dtype=f32, device=dev)
    dz = torch.empty((b, l, h, p), dtype=z.dtype, device=dev) if z is not None else None
    dBh = torch.empty((b, l, nl, n), dtype=f32, device=dev)
    dCh = torch.empty((b, l, nl, n), dtype=f32, device=dev)
    dinit = torch.empty((b, h, p, n), dtype=initial_states.dtype, device=dev) \
        if initial_states is not None else None
    dD = torch.zeros((b, h, p), dtype=f32, device=dev)
    dA = torch.zeros((b, h), dtype=f32, device=dev)
    dhs = torch.zeros((b, h), dtype=f32, device=dev)
    scalars, strides, tail, const = shared
    grid = (nl, b)
    if grid[0] * grid[1] > 0:
        _ssd_bwd_kernel[grid](
            x, dt, A, B, C, _or(D, x), _or(z, x), _or(dt_bias, x), _or(seq_idx, x),
            _or(active_t, x), _or(head_scale, x), st, grad_y, grad_states.to(f32).contiguous(),
            dx, ddt, _or(dz, dx), dBh, dCh, _or(dinit, dx), dD, dA, dhs,
            *scalars, *strides, *_strides(grad_y, 4), *tail,
            HAS_INIT=initial_states is not None, num_warps=plan["num_warps"], **const)
    for t, dim in ((dx, 2), (ddt, 2), (dz, 2), (dinit, 1)):
        if t is not None:
            _zero_inactive(t, dim, plan)
    dB = _group_sum(dBh, plan).to(B.dtype) if nl else torch.zeros_like(B)
    dC = _group_sum(dCh, plan).to(C.dtype) if nl else torch.zeros_like(C)
    dD_out = None
    if D is not None:
        dD_out = dD.sum(0)
        dD_out = (dD_out if D.dim() == 2 else dD_out.sum(-1)).to(D.dtype)
    return (dx, ddt.to(dt.dtype), dA.sum(0).to(A.dtype), dB, dC, dD_out, dz,
            ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None,
            dinit, dhs.to(head_scale.dtype) if head_scale is not None else None)
