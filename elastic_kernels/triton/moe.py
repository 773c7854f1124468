r"""Triton grouped-GEMM kernels of the sliced MoE experts, forward and backward.

Notation: the ``n = tokens * top_k`` (token, slot) pairs are sorted by expert on the device
("rows"; row r holds token ``tok[r]``, expert ``e[r]``, routing weight ``w[r]``, width
``d_r`` = the token's ffn width, or d'). Rows of expert e are ``offs[e]:offs[e+1]``; rows whose id
is outside [0, E') sort last and take no part. Row tiles of ``BM`` rows never straddle experts;
a tile table (expert, first row) built with torch ops (sort, scatter-add histogram, cumsum,
searchsorted: no host synchronization, static shapes) drives the row-tiled kernels, whose spare
programs exit at once. Only prefix views ``w[:E', :d']`` of the weights are read (strided, no
copies); tiles past a tile's largest width do no work.

Forward (``_moe_up_kernel`` then ``_moe_down_kernel`` then ``_moe_unpermute_kernel``):

    h1 = x[tok] w1[e, :d']^T,  h3 = x[tok] w3[e, :d']^T           (rows, d')
    a  = act(h1) (* h3 when gated) * s * [c < d_r]                  s = channel_scale
    o  = a w2[e, :, :d']^T                                          (rows, hidden)
    y[t] = sum_j w[t, j] o[row(t, j)]

Backward (``_moe_bwd_act_kernel`` recomputes h1, h3 and g = dy[tok] w2[e, :, :d'] in one pass):

    a_raw = act(h1) (* h3);  da = w[r] g [c < d_r];  dw[t, j] = sum_c a g
    ds   = sum over rows of da a_raw  (per token for a (tokens, F) scale)
    dh1  = da s act'(h1) (* h3);  dh3 = da s act(h1);  aw = w[r] a
    dx[t] = sum_j (dh1 w1[e, :d'] + dh3 w3[e, :d'])[row(t, j)]      (``_moe_down_kernel``)
    dw1[e, :d'] = dh1[rows_e]^T x[tok_e],  dw3 likewise,  dw2[e, :, :d'] = dy[tok_e]^T aw[rows_e]
                                                    (``_moe_dw_kernel``: grouped GEMM, K = rows_e)

act: relu2 = relu(v)^2 (act' = 2 relu(v)); silu = v sig(v) (act' = sig(v)(1 + v(1 - sig(v))));
gelu = v Phi(v) (act' = Phi(v) + v phi(v)). Accumulation is fp32; fp32 inputs use IEEE dots.

NVFP4 experts (W4A16): every weight tile goes through ``_w_tile``, which for an NVFP4 weight
(codes packed along its input dim, per-expert global scale g[e]) decodes ``e2m1 * s`` in registers
inside the K loop (``nvfp4_tile`` of :mod:`elastic_kernels.triton.nvfp4`; exact in bf16/fp16) for
a dot in x's dtype; g[e] multiplies each fp32 accumulator once after the loop. The same kernels
serve both layouts: tiles are packed along their k index (w1/w3 forward, w2 forward) or their n
index (w2 in ``_moe_bwd_act_kernel``, w1/w3 for dx). NVFP4 weights are frozen: no dW kernel runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.nvfp4 import NVFP4Tensor
from .nvfp4 import nvfp4_tile

ACT_CODES = {"relu2": 0, "silu": 1, "gelu": 2}


@triton.jit
def _act(h, ACT: tl.constexpr):
    """The activation; NaN propagates (relu(NaN) = NaN, as torch.relu)."""
    if ACT == 0:
        r = tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)
        return r * r
    elif ACT == 1:
        return h * tl.sigmoid(h)
    else:
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        return 2.0 * tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 1:
        sg = tl.sigmoid(h)
        return sg * (1.0 + h * (1.0 - sg))
    else:
        return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """acc + a b in fp32 ("upcast": bf16 tiles widened first, exact products, for the interpreter)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _w_tile(w, e, k0, k_lim, n0, n_lim, Q: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Tile T[k, n] (BK, BN) of expert e's weight: k in k0 + [0, BK), n in n0 + [0, BN), 0 outside
    k < k_lim, n < n_lim. ``w`` = (ptr, scale bytes ptr, global scales ptr, s_e, s_k, s_n, ss_e, ss_k,
    ss_n) (see ``_weight_operand``). Q = 0: a plain weight, element (k, n) at ptr + e s_e + k s_k +
    n s_n, as stored. Q = 1 / 2: NVFP4 packed along k / along n (the other index walks the rows),
    decoded to float32 ``e2m1 * s`` (exact in bf16/fp16); the caller applies g[e] (``_w_scale``)."""
    if Q == 0:
        ks = k0 + tl.arange(0, BK).to(tl.int64)
        ns = n0 + tl.arange(0, BN).to(tl.int64)
        return tl.load(w[0] + e * w[3] + ks[:, None] * w[4] + ns[None, :] * w[5],
                       mask=(ks < k_lim)[:, None] & (ns < n_lim)[None, :], other=0.0)
    elif Q == 1:
        return tl.trans(nvfp4_tile(w[0] + e * w[3], w[1] + e * w[6], n0, n_lim, w[5], w[8], k0, k_lim, BN, BK))
    else:
        return nvfp4_tile(w[0] + e * w[3], w[1] + e * w[6], k0, k_lim, w[4], w[7], n0, n_lim, BK, BN)


@triton.jit
def _w_scale(w, e, Q: tl.constexpr):
    """The per-expert global scale g[e] of an NVFP4 weight (1 for a plain weight)."""
    if Q == 0:
        return 1.0
    else:
        return tl.load(w[2] + e)


@triton.jit
def _tile_rows(tile_e_ptr, tile_row_ptr, offs_ptr, row_tok_ptr, row_width_ptr, F_act, pid_m,
               HAS_WT: tl.constexpr, BM: tl.constexpr):
    """Expert, rows, row mask, tokens and widths of one row tile (e < 0: a spare program)."""
    e = tl.load(tile_e_ptr + pid_m).to(tl.int64)
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offs_ptr + tl.maximum(e, 0) + 1)
    rows = row0 + tl.arange(0, BM).to(tl.int64)
    rmask = rows < tl.where(e >= 0, row_end, 0)
    tok = tl.load(row_tok_ptr + rows, mask=rmask, other=0)
    if HAS_WT:
        wid = tl.load(row_width_ptr + rows, mask=rmask, other=0)
    else:
        wid = tl.where(rmask, F_act, 0).to(tl.int64)
    return e, rows, rmask, tok, wid


@triton.jit
def _moe_up_kernel(x_ptr, w1, w3, cs_ptr, a_ptr,
                   tile_e_ptr, tile_row_ptr, offs_ptr, row_tok_ptr, row_width_ptr,
                   H, F_act, s_xt, s_xh, s_cst, s_csf, s_ar,
                   ACT: tl.constexpr, GATED: tl.constexpr, HAS_WT: tl.constexpr, CS_MODE: tl.constexpr,
                   Q1: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """a[rows, cols] = act(x[tok] w1[e, cols]^T) (* x[tok] w3[e, cols]^T) * s * [c < d_r].

    w1, w3: weight operands with tiles T[k = hidden, n = F] (Q1: NVFP4, g[e] applied per accumulator)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rows, rmask, tok, wid = _tile_rows(tile_e_ptr, tile_row_ptr, offs_ptr, row_tok_ptr, row_width_ptr,
                                          F_act, pid_m, HAS_WT, BM)
    n0 = pid_n * BN
    if e < 0:
        return
    if n0 >= tl.max(wid):
        return
    cols = n0 + tl.arange(0, BN).to(tl.int64)
    cmask = cols < F_act
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK).to(tl.int64)
        kmask = ks < H
        xt = tl.load(x_ptr + tok[:, None] * s_xt + ks[None, :] * s_xh, mask=rmask[:, None] & kmask[None, :],
                     other=0.0)
        acc1 = _mma(xt, _w_tile(w1, e, k0, H, n0, F_act, Q1, BK, BN).to(xt.dtype), acc1, PREC)
        if GATED:
            acc3 = _mma(xt, _w_tile(w3, e, k0, H, n0, F_act, Q1, BK, BN).to(xt.dtype), acc3, PREC)
    acc1 = acc1 * _w_scale(w1, e, Q1)
    if GATED:
        acc3 = acc3 * _w_scale(w3, e, Q1)
    a = _act(acc1, ACT)
    if GATED:
        a = a * acc3
    if CS_MODE == 1:
        a = a * tl.load(cs_ptr + cols * s_csf, mask=cmask, other=0.0).to(tl.float32)[None, :]
    elif CS_MODE == 2:
        a = a * tl.load(cs_ptr + tok[:, None] * s_cst + cols[None, :] * s_csf,
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    a = tl.where(cols[None, :] < wid[:, None], a, 0.0)
    tl.store(a_ptr + rows[:, None] * s_ar + cols[None, :], a.to(a_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _moe_down_kernel(a_ptr, wa, a2_ptr, wb, o_ptr,
                     tile_e_ptr, tile_row_ptr, offs_ptr, row_tok_ptr, row_width_ptr,
                     H, F_act, s_ar, s_or,
                     TWO: tl.constexpr, Q: tl.constexpr, HAS_WT: tl.constexpr, PREC: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """o[rows, hs] = sum_{c < d_r} a[rows, c] Wa[c, hs] (+ a2[rows, c] Wb[c, hs] when TWO), where
    wa / wb are weight operands with tiles T[k = c, n = hs] (Q: NVFP4, g[e] applied per accumulator).

    Columns of a / a2 at or past a row's width are never read (they may be unwritten)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rows, rmask, tok, wid = _tile_rows(tile_e_ptr, tile_row_ptr, offs_ptr, row_tok_ptr, row_width_ptr,
                                          F_act, pid_m, HAS_WT, BM)
    if e < 0:
        return
    n0 = pid_n * BN
    hs = n0 + tl.arange(0, BN).to(tl.int64)
    hmask = hs < H
    tile_w = tl.max(wid)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, tile_w, BK):
        cs = k0 + tl.arange(0, BK).to(tl.int64)
        amask = cs[None, :] < wid[:, None]
        at = tl.load(a_ptr + rows[:, None] * s_ar + cs[None, :], mask=amask, other=0.0)
        acc = _mma(at, _w_tile(wa, e, k0, tile_w, n0, H, Q, BK, BN).to(at.dtype), acc, PREC)
        if TWO:
            at2 = tl.load(a2_ptr + rows[:, None] * s_ar + cs[None, :], mask=amask, other=0.0)
            acc2 = _mma(at2, _w_tile(wb, e, k0, tile_w, n0, H, Q, BK, BN).to(at2.dtype), acc2, PREC)
    acc = acc * _w_scale(wa, e, Q)
    if TWO:
        acc += acc2 * _w_scale(wb, e, Q)
    tl.store(o_ptr + rows[:, None] * s_or + hs[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & hmask[None, :])


@triton.jit
def _moe_unpermute_kernel(o_ptr, w_ptr, inv_ptr, offs_ptr, y_ptr, H, TOP_K, n_act,
                          s_or, s_yt, s_wt, s_wk, HAS_W: tl.constexpr, BH: tl.constexpr):
    """y[t, hs] = sum_j w[t, j] o[inv[t * top_k + j], hs] over rows of valid ids (fp32 sum);
    w[t, j] is read at ``w_ptr + t s_wt + j s_wk`` (any strides, stride 0 included)."""
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BH + tl.arange(0, BH).to(tl.int64)
    hmask = hs < H
    n_valid = tl.load(offs_ptr + n_act)
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in range(0, TOP_K):
        p = t * TOP_K + j
        r = tl.load(inv_ptr + p)
        v = tl.load(o_ptr + r * s_or + hs, mask=hs < tl.where(r < n_valid, H, 0), other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * s_wt + j * s_wk).to(tl.float32)
        acc += v
    tl.store(y_ptr + t * s_yt + hs, acc.to(y_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _moe_bwd_act_kernel(x_ptr, dy_ptr, w1, w3, w2, cs_ptr, row_w_ptr,
                        dh1_ptr, dh3_ptr, aw_ptr, dwt_ptr, dcs_ptr,
                        tile_e_ptr, tile_row_ptr, offs_ptr, row_tok_ptr, row_width_ptr,
                        H, F_act, n_nblk, s_xt, s_xh, s_dyt, s_dyh, s_cst, s_csf, s_hr,
                        ACT: tl.constexpr, GATED: tl.constexpr, HAS_WT: tl.constexpr, CS_MODE: tl.constexpr,
                        Q1: tl.constexpr, Q2: tl.constexpr, NEED_AW: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Recompute h1, h3, g = dy[tok] w2[e, :, cols]; write dh1, dh3, aw (rows, cols), the partial
    dw[row, pid_n] = sum_c a g, and ds (per tile for an (F,) scale, per row for (tokens, F)).

    Weight operands: w1, w3 with tiles T[k = hidden, n = F] (Q1), w2 with T[k = hidden, n = F] (Q2).
    aw (only read by dw2) is written when NEED_AW."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rows, rmask, tok, wid = _tile_rows(tile_e_ptr, tile_row_ptr, offs_ptr, row_tok_ptr, row_width_ptr,
                                          F_act, pid_m, HAS_WT, BM)
    n0 = pid_n * BN
    if e < 0:
        return
    if n0 >= tl.max(wid):
        return
    cols = n0 + tl.arange(0, BN).to(tl.int64)
    cmask = cols < F_act
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    accg = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK).to(tl.int64)
        kmask = ks < H
        lmask = rmask[:, None] & kmask[None, :]
        xt = tl.load(x_ptr + tok[:, None] * s_xt + ks[None, :] * s_xh, mask=lmask, other=0.0)
        acc1 = _mma(xt, _w_tile(w1, e, k0, H, n0, F_act, Q1, BK, BN).to(xt.dtype), acc1, PREC)
        if GATED:
            acc3 = _mma(xt, _w_tile(w3, e, k0, H, n0, F_act, Q1, BK, BN).to(xt.dtype), acc3, PREC)
        dyt = tl.load(dy_ptr + tok[:, None] * s_dyt + ks[None, :] * s_dyh, mask=lmask, other=0.0)
        accg = _mma(dyt, _w_tile(w2, e, k0, H, n0, F_act, Q2, BK, BN).to(dyt.dtype), accg, PREC)
    acc1 = acc1 * _w_scale(w1, e, Q1)
    if GATED:
        acc3 = acc3 * _w_scale(w3, e, Q1)
    accg = accg * _w_scale(w2, e, Q2)
    keep = (cols[None, :] < wid[:, None]) & cmask[None, :]
    f = _act(acc1, ACT)
    if GATED:
        a_raw = f * acc3
    else:
        a_raw = f
    if CS_MODE == 1:
        s = tl.load(cs_ptr + cols * s_csf, mask=cmask, other=0.0).to(tl.float32)[None, :]
    elif CS_MODE == 2:
        s = tl.load(cs_ptr + tok[:, None] * s_cst + cols[None, :] * s_csf, mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
    else:
        s = 1.0
    a = tl.where(keep, a_raw * s, 0.0)
    wr = tl.load(row_w_ptr + rows, mask=rmask, other=0.0)
    tl.store(dwt_ptr + rows * n_nblk + pid_n, tl.sum(a * accg, axis=1), mask=rmask)
    da = tl.where(keep, wr[:, None] * accg, 0.0)
    if CS_MODE == 1:
        tl.store(dcs_ptr + pid_m.to(tl.int64) * F_act + cols, tl.sum(da * a_raw, axis=0), mask=cmask)
    elif CS_MODE == 2:
        tl.store(dcs_ptr + rows[:, None] * F_act + cols[None, :], da * a_raw, mask=rmask[:, None] & cmask[None, :])
    dar = da * s
    smask = rmask[:, None] & cmask[None, :]
    hoffs = rows[:, None] * s_hr + cols[None, :]
    if GATED:
        tl.store(dh1_ptr + hoffs, (dar * _act_grad(acc1, ACT) * acc3).to(dh1_ptr.dtype.element_ty), mask=smask)
        tl.store(dh3_ptr + hoffs, (dar * f).to(dh3_ptr.dtype.element_ty), mask=smask)
    else:
        tl.store(dh1_ptr + hoffs, (dar * _act_grad(acc1, ACT)).to(dh1_ptr.dtype.element_ty), mask=smask)
    if NEED_AW:
        tl.store(aw_ptr + hoffs, (wr[:, None] * a).to(aw_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _moe_dw_kernel(l_ptr, l2_ptr, r_ptr, dw_ptr, dw2_ptr, offs_ptr, row_tok_ptr, row_width_ptr, exp_w_ptr,
                   P, Q, s_lr, s_lp, s_rr, s_rq, s_de, s_dp, s_dq, s_d2e, s_d2p, s_d2q,
                   L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, WIDTH_ON_P: tl.constexpr,
                   HAS_WT: tl.constexpr, TWO: tl.constexpr, PREC: tl.constexpr,
                   BP: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr):
    """Grouped GEMM with a variable K (the rows of expert e):
    dw[e, ps, qs] = sum_{r in rows_e} l[r, ps] r[r, qs] (and dw2 from l2 when TWO), where an
    operand indexed by the token (``*_GATHER``) reads row tok[r], and the F-side operand (p when
    WIDTH_ON_P, else q) reads only channels below the row's width. dw is pre-zeroed."""
    e = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1) * BP + tl.arange(0, BP).to(tl.int64)
    qs = tl.program_id(2) * BQ + tl.arange(0, BQ).to(tl.int64)
    if HAS_WT:
        maxw = tl.load(exp_w_ptr + e)
        if WIDTH_ON_P:
            if tl.program_id(1) * BP >= maxw:
                return
        else:
            if tl.program_id(2) * BQ >= maxw:
                return
    pmask = ps < P
    qmask = qs < Q
    r0 = tl.load(offs_ptr + e)
    r1 = tl.load(offs_ptr + e + 1)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    acc2 = tl.zeros((BP, BQ), dtype=tl.float32)
    for rb in range(r0, r1, BR):
        rows = rb + tl.arange(0, BR).to(tl.int64)
        rmask = rows < r1
        tok = tl.load(row_tok_ptr + rows, mask=rmask, other=0)
        if HAS_WT:
            wid = tl.load(row_width_ptr + rows, mask=rmask, other=0)
        elif WIDTH_ON_P:
            wid = tl.where(rmask, P, 0).to(tl.int64)
        else:
            wid = tl.where(rmask, Q, 0).to(tl.int64)
        if L_GATHER:
            lidx = tok
        else:
            lidx = rows
        if R_GATHER:
            ridx = tok
        else:
            ridx = rows
        if WIDTH_ON_P:
            lmask = (ps[:, None] < wid[None, :]) & pmask[:, None]
            rmask2 = rmask[:, None] & qmask[None, :]
        else:
            lmask = rmask[None, :] & pmask[:, None]
            rmask2 = (qs[None, :] < wid[:, None]) & qmask[None, :]
        lt = tl.load(l_ptr + lidx[None, :] * s_lr + ps[:, None] * s_lp, mask=lmask, other=0.0)
        rt = tl.load(r_ptr + ridx[:, None] * s_rr + qs[None, :] * s_rq, mask=rmask2, other=0.0)
        acc = _mma(lt, rt, acc, PREC)
        if TWO:
            lt2 = tl.load(l2_ptr + lidx[None, :] * s_lr + ps[:, None] * s_lp, mask=lmask, other=0.0)
            acc2 = _mma(lt2, rt, acc2, PREC)
    omask = pmask[:, None] & qmask[None, :]
    tl.store(dw_ptr + e * s_de + ps[:, None] * s_dp + qs[None, :] * s_dq, acc.to(dw_ptr.dtype.element_ty),
             mask=omask)
    if TWO:
        tl.store(dw2_ptr + e * s_d2e + ps[:, None] * s_d2p + qs[None, :] * s_d2q,
                 acc2.to(dw2_ptr.dtype.element_ty), mask=omask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def launch_config(x: torch.Tensor, rows: int, num_active: int) -> dict:
    """Tiles, warps and stages of every MoE kernel for inputs like ``x`` with ``rows`` (token,
    slot) pairs over ``num_active`` experts: the one place they are chosen (the AOT report,
    :mod:`elastic_kernels.triton.aot`, compiles what this returns for GPU inputs).

    Returns ``{"BM": rows per tile of the tile table, "up" / "down" / "bwd_act" / "dx": (BM, BN,
    BK, warps, stages), "dw": (BP, BQ, BR, warps, stages), "unpermute": (BH, warps)}`` as launch
    kwargs ("dx" is ``_moe_down_kernel`` in the backward, two accumulators when gated).
    CPU (the interpreter): small tiles, one warp. GPU: a static choice by dtype and rows per
    expert (the tile table is built for one BM before any kernel runs, so BM cannot be autotuned).
    """
    if x.device.type == "cpu":
        t = dict(BM=16, BN=32, BK=32, num_warps=1, num_stages=1)
        return dict(BM=16, up=t, down=t, bwd_act=t, dx=t, dw=dict(BP=32, BQ=32, BR=32, num_warps=1, num_stages=1),
                    unpermute=dict(BH=64, num_warps=1))
    unpermute = dict(BH=256, num_warps=4)
    if x.dtype == torch.float32:  # IEEE fp32 dots are FMA loops: small tiles keep them in registers
        t = dict(BM=32, BN=64, BK=32, num_warps=4, num_stages=2)
        return dict(BM=32, up=t, down=t, bwd_act=dict(t, BN=32), dx=t,
                    dw=dict(BP=64, BQ=64, BR=16, num_warps=4, num_stages=2), unpermute=unpermute)
    if rows >= 128 * num_active:  # >= 128 rows per expert on average (training, prefill)
        # 128-row tiles on two warp groups; three accumulators (bwd_act) or two (dx, gated dw) take
        # 64-column tiles to stay in registers
        t = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
        t64 = dict(t, BN=64)
        return dict(BM=128, up=t, down=t, bwd_act=t64, dx=t64,
                    dw=dict(BP=128, BQ=64, BR=64, num_warps=8, num_stages=3), unpermute=unpermute)
    # few rows per expert (decode): the weight bytes bound the time; 64-row tiles (one warp group)
    t = dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3)
    return dict(BM=64, up=t, down=t, bwd_act=t, dx=t, dw=dict(BP=64, BQ=64, BR=64, num_warps=4, num_stages=3),
                unpermute=unpermute)


def _prec(x: torch.Tensor) -> str:
    """Dot precision: IEEE for fp32; bf16 on CPU (the interpreter's bf16 dot is wrong) is widened."""
    if x.dtype == torch.float32:
        return "ieee"
    return "upcast" if (x.dtype == torch.bfloat16 and x.device.type == "cpu") else "tf32"


def _plan(topk_ids, topk_weights, width_t, num_active: int, block_m: int):
    """Rows sorted by expert and the row-tile table, with torch ops only (no host sync)."""
    dev = topk_ids.device
    tokens, top_k = topk_ids.shape
    n = tokens * top_k
    flat = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where((flat >= 0) & (flat < num_active), flat, num_active)
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.zeros(num_active + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    offs = torch.zeros(num_active + 1, dtype=torch.int64, device=dev)
    offs[1:] = counts[:num_active].cumsum(0)
    tiles = (counts[:num_active] + block_m - 1) // block_m
    tile_end = tiles.cumsum(0)
    max_tiles = triton.cdiv(n, block_m) + min(num_active, n)
    tid = torch.arange(max_tiles, device=dev)
    te = torch.searchsorted(tile_end, tid, right=True)
    te_c = te.clamp(max=num_active - 1)
    tile_row = offs[te_c] + (tid - (tile_end - tiles)[te_c]) * block_m
    tile_e = torch.where(te < num_active, te, -1).to(torch.int32)
    row_tok = order // top_k
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=dev))
    row_w = topk_weights.reshape(-1)[order].to(torch.float32)
    row_width = exp_w = None
    if width_t is not None:
        row_width = width_t[row_tok]
        exp_w = torch.zeros(num_active + 1, dtype=torch.int64, device=dev).scatter_reduce_(
            0, sorted_key, row_width, "amax")
    return dict(order=order, offs=offs, tile_e=tile_e, tile_row=tile_row, max_tiles=max_tiles, row_tok=row_tok,
                inv=inv, row_w=row_w, row_width=row_width, exp_w=exp_w, n=n)


def _weight_operand(w, k_dim: int):
    """Kernel operand for tiles T[k, n] of ``w: (E, ., .)`` with k along dim ``k_dim`` (1 or 2) and
    n along the other: ``((ptr, scale bytes, global scales, s_e, s_k, s_n, ss_e, ss_k, ss_n), Q)``.
    NVFP4 weights (packed along dim 2) give Q = 1 when k walks the packed dim, else 2; their code and
    scale strides along the packed dim are never used. Plain weights give Q = 0 (unused slots: w, 0)."""
    n_dim = 3 - k_dim
    if isinstance(w, NVFP4Tensor):
        d, sc = w.data, w.scales.view(torch.uint8)
        return ((d, sc, w.matrix_scales().contiguous(), d.stride(0), d.stride(k_dim), d.stride(n_dim),
                 sc.stride(0), sc.stride(k_dim), sc.stride(n_dim)), 1 if k_dim == 2 else 2)
    return (w, w, w, w.stride(0), w.stride(k_dim), w.stride(n_dim), 0, 0, 0), 0


def _cs_args(channel_scale):
    if channel_scale is None:
        return 0, 0, 0
    if channel_scale.dim() == 1:
        return 1, 0, channel_scale.stride(0)
    return 2, channel_scale.stride(0), channel_scale.stride(1)


def _unpermute(o, plan, topk_weights, tokens, top_k, hidden, num_active, out_dtype, cfg):
    y = torch.empty(tokens, hidden, dtype=out_dtype, device=o.device)
    w, s_wt, s_wk = (topk_weights, *topk_weights.stride()) if topk_weights is not None else (o, 0, 0)
    _moe_unpermute_kernel[(tokens, triton.cdiv(hidden, cfg["BH"]))](
        o, w, plan["inv"], plan["offs"], y, hidden, top_k, num_active, o.stride(0), y.stride(0), s_wt, s_wk,
        HAS_W=topk_weights is not None, **cfg)
    return y


def moe_experts_fwd(x, topk_weights, topk_ids, w1, w2, w3=None, *, activation: str, num_active: int,
                    width_int: int, width_t=None, channel_scale=None) -> torch.Tensor:
    """Forward launcher; arguments as :func:`elastic_kernels.reference.moe.moe_experts_reference`
    (w1, w2, w3 plain tensors or :class:`~elastic_kernels.formats.NVFP4Tensor`; w1 and w3 alike)."""
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    f_act = w1.shape[1] if width_int < 0 else width_int
    if tokens * top_k == 0 or f_act == 0 or hidden == 0:
        y = torch.zeros_like(x, memory_format=torch.contiguous_format)
        if f_act == 0 and tokens * top_k and hidden:  # every output is 0 times its weight: NaN for a non-finite one
            y += topk_weights.to(torch.float32).mul(0).sum(1, keepdim=True).to(x.dtype)
        return y
    cfg = launch_config(x, tokens * top_k, num_active)
    plan = _plan(topk_ids, topk_weights, width_t, num_active, cfg["BM"])
    n, tiles = plan["n"], plan["max_tiles"]
    gated = w3 is not None
    w1_op, q1 = _weight_operand(w1, 2)
    w3_op = _weight_operand(w3, 2)[0] if gated else w1_op
    w2_op, q2 = _weight_operand(w2, 2)
    cs_mode, s_cst, s_csf = _cs_args(channel_scale)
    cs = channel_scale if channel_scale is not None else x
    rw = plan["row_width"] if width_t is not None else plan["row_tok"]
    meta = (plan["tile_e"], plan["tile_row"], plan["offs"], plan["row_tok"], rw)
    a = torch.empty(n, f_act, dtype=x.dtype, device=x.device)
    _moe_up_kernel[(tiles, triton.cdiv(f_act, cfg["up"]["BN"]))](
        x, w1_op, w3_op, cs, a, *meta, hidden, f_act, *x.stride(), s_cst, s_csf, a.stride(0),
        ACT=ACT_CODES[activation], GATED=gated, HAS_WT=width_t is not None, CS_MODE=cs_mode, Q1=q1,
        PREC=_prec(x), **cfg["up"])
    o = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
    _moe_down_kernel[(tiles, triton.cdiv(hidden, cfg["down"]["BN"]))](
        a, w2_op, a, w2_op, o, *meta, hidden, f_act, a.stride(0), o.stride(0),
        TWO=False, Q=q2, HAS_WT=width_t is not None, PREC=_prec(x), **cfg["down"])
    return _unpermute(o, plan, topk_weights, tokens, top_k, hidden, num_active, x.dtype, cfg["unpermute"])


def moe_experts_bwd(grad_y, x, topk_weights, topk_ids, w1, w2, w3=None, *, activation: str, num_active: int,
                    width_int: int, width_t=None, channel_scale=None):
    """Backward launcher: returns [dx, dtopk_weights, dw1, dw2, dw3, dchannel_scale]; None for an
    absent w3 / channel_scale and for NVFP4 weights (frozen: no weight gradient)."""
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    ffn = w1.shape[1]
    f_act = ffn if width_int < 0 else width_int
    gated = w3 is not None
    quant1, quant2 = isinstance(w1, NVFP4Tensor), isinstance(w2, NVFP4Tensor)
    dx = torch.zeros_like(x)
    dwt = torch.zeros_like(topk_weights)
    dw1 = None if quant1 else torch.zeros_like(w1)
    dw2 = None if quant2 else torch.zeros_like(w2)
    dw3 = torch.zeros_like(w3) if gated and not quant1 else None
    dcs = torch.zeros_like(channel_scale) if channel_scale is not None else None
    if tokens * top_k == 0 or f_act == 0 or hidden == 0:
        return [dx, dwt, dw1, dw2, dw3, dcs]
    cfg = launch_config(x, tokens * top_k, num_active)
    plan = _plan(topk_ids, topk_weights, width_t, num_active, cfg["BM"])
    n, tiles = plan["n"], plan["max_tiles"]
    has_wt = width_t is not None
    w1_op, q1 = _weight_operand(w1, 2)
    w3_op = _weight_operand(w3, 2)[0] if gated else w1_op
    w2_op, q2 = _weight_operand(w2, 1)
    cs_mode, s_cst, s_csf = _cs_args(channel_scale)
    cs = channel_scale if channel_scale is not None else x
    rw = plan["row_width"] if has_wt else plan["row_tok"]
    meta = (plan["tile_e"], plan["tile_row"], plan["offs"], plan["row_tok"], rw)
    n_nblk = triton.cdiv(f_act, cfg["bwd_act"]["BN"])
    dh1 = torch.empty(n, f_act, dtype=x.dtype, device=x.device)
    dh3 = torch.empty_like(dh1) if gated else dh1
    aw = dh1 if quant2 else torch.empty_like(dh1)
    dwt_part = torch.zeros(n, n_nblk, dtype=torch.float32, device=x.device)
    if cs_mode == 1:
        dcs_part = torch.zeros(tiles, f_act, dtype=torch.float32, device=x.device)
    elif cs_mode == 2:
        dcs_part = torch.zeros(n, f_act, dtype=torch.float32, device=x.device)
    else:
        dcs_part = dwt_part
    _moe_bwd_act_kernel[(tiles, n_nblk)](
        x, grad_y, w1_op, w3_op, w2_op, cs, plan["row_w"], dh1, dh3, aw, dwt_part, dcs_part, *meta, hidden, f_act,
        n_nblk, *x.stride(), *grad_y.stride(), s_cst, s_csf, dh1.stride(0),
        ACT=ACT_CODES[activation], GATED=gated, HAS_WT=has_wt, CS_MODE=cs_mode, Q1=q1, Q2=q2, NEED_AW=not quant2,
        PREC=_prec(x), **cfg["bwd_act"])
    # dtopk_weights and dchannel_scale: reduce the partials, back to (token, slot) order
    dwt.copy_(dwt_part.sum(1)[plan["inv"]].view(tokens, top_k))
    if cs_mode == 1:
        dcs[:f_act] = dcs_part.sum(0)
    elif cs_mode == 2:
        dcs[:, :f_act] = dcs_part[plan["inv"]].view(tokens, top_k, f_act).sum(1)
    # dx: rows of dh1 w1 (+ dh3 w3), summed back per token
    dx_rows = torch.empty(n, hidden, dtype=torch.float32, device=x.device)
    w1_t, _ = _weight_operand(w1, 1)
    w3_t = _weight_operand(w3, 1)[0] if gated else w1_t
    _moe_down_kernel[(tiles, triton.cdiv(hidden, cfg["dx"]["BN"]))](
        dh1, w1_t, dh3, w3_t, dx_rows, *meta, hidden, f_act, dh1.stride(0), dx_rows.stride(0),
        TWO=gated, Q=2 if quant1 else 0, HAS_WT=has_wt, PREC=_prec(x), **cfg["dx"])
    dx.copy_(_unpermute(dx_rows, plan, None, tokens, top_k, hidden, num_active, x.dtype, cfg["unpermute"]))
    # dw1 (and dw3): (E', d', hidden) = dh^T x[tok];  dw2: (E', hidden, d') = dy[tok]^T aw
    rw_dw = plan["row_width"] if has_wt else plan["row_tok"]
    ew = plan["exp_w"] if has_wt else plan["offs"]
    if not quant1:
        dw3_ = dw3 if gated else dw1
        dw = cfg["dw"]
        _moe_dw_kernel[(num_active, triton.cdiv(f_act, dw["BP"]), triton.cdiv(hidden, dw["BQ"]))](
            dh1, dh3, x, dw1, dw3_, plan["offs"], plan["row_tok"], rw_dw, ew, f_act, hidden,
            dh1.stride(0), dh1.stride(1), *x.stride(), *dw1.stride(), *dw3_.stride(),
            L_GATHER=False, R_GATHER=True, WIDTH_ON_P=True, HAS_WT=has_wt, TWO=gated, PREC=_prec(x), **dw)
    if not quant2:
        dw = cfg["dw"]
        _moe_dw_kernel[(num_active, triton.cdiv(hidden, dw["BP"]), triton.cdiv(f_act, dw["BQ"]))](
            grad_y, grad_y, aw, dw2, dw2, plan["offs"], plan["row_tok"], rw_dw, ew, hidden, f_act,
            *grad_y.stride(), aw.stride(0), aw.stride(1), *dw2.stride(), *dw2.stride(),
            L_GATHER=True, R_GATHER=False, WIDTH_ON_P=False, HAS_WT=has_wt, TWO=False, PREC=_prec(x), **dw)
    return [dx, dwt, dw1, dw2, dw3, dcs]
