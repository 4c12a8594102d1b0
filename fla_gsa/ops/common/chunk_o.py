"""Step 3 of the chunked algorithm: apply the chunk-boundary states and the intra-chunk scores.

Two kernels, each other's transpose, cover the output and all four input gradients:

lower (row i reads the state entering its chunk and the rows j <= i):

    Y_i = scale * ((P_i ⊙ e^{Gp_i}) @ M) ⊙ e^{Gy_i}  +  sum_{j <= i} A_ij X_j ⊙ e^{Gy_i - Gy_j}

    o  = lower(P=q,  Gp=Gk, M=h,   X=v, Gy=Gv, A=A)      (forward)
    dq = lower(P=do, Gp=Gv, M=h^T, X=k, Gy=Gk, A=dA)     (backward)

upper (row j feeds the state leaving its chunk and the rows i >= j):

    Y_j = scale * ((P_j ⊙ e^{Gp_L - Gp_j}) @ M) ⊙ e^{Gy_L - Gy_j}  +  sum_{i >= j} A_ij X_i ⊙ e^{Gy_i - Gy_j}

    dv = upper(P=k, Gp=Gk, M=dh,   X=do, Gy=Gv, A=A)
    dk = upper(P=v, Gp=Gv, M=dh^T, X=q,  Gy=Gk, A=dA)

``M`` is read through strides, so ``h^T`` costs nothing. ``P`` and ``M`` of the lower kernel and ``X``
and ``A`` of the upper one have the query heads (``HQ = G * H``); the upper kernel sums a group's query
heads, so GQA never materializes repeated tensors.

Numerics of the gated sum over rows (``Gy``): the rows are split into blocks of ``BC = GATED_BLOCK`` (32) and the
block-to-block part is factored through a reference row between the two blocks (both factors ``<= 1``);
the diagonal block joins that product when ``Gy`` decays by at most ``DIAG_MAX`` across the block (its
factors are then bounded; see ``backend.DIAG_DOT_MAX_DECAY``), and otherwise (strong gates) forms
``e^{Gy_i - Gy_j}`` exactly, one row or column at a time (a runtime loop: unrolled, it compiled ~4 s slower
and ran 10% slower for GLA on an H100), masked in the exponent. Without ``Gy`` a chunk is one product, and
a program may take every block of ``Y`` columns of its chunk (``WIDE_MIN_PROGRAMS``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_gsa.ops.common.chunk_scores import store_scores
from fla_gsa.ops.utils.backend import diag_dot_limit, dot_precision
from fla_gsa.ops.utils.index import chunk_grid
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import (broadcast_lt, cdiv, chunk_bounds, load_row, load_tile, next_pow2, silu_grad,
                                            store_rows, store_tile, tl_dtype)


# rows per program when the summed side is gated (the diagonal block: one product, or row by row). GSA
# forward+backward on an H100 (as below), GPU ms at 8 x 2048 / 4 x 4096 / 1 x 16384: 1.438 / 1.502 / 1.631
# with 16 rows, 1.373 / 1.443 / 1.568 with 32 (fewer programs re-read the chunk's states and keys); GLA
# (K = 256, V = 512) 0.01 ms faster or the same. Strong gates take the diagonal block row by row past a
# decay of DIAG_MAX across it, which 32 rows reach sooner.
GATED_BLOCK = 32
# Ungated rows with a narrow P (DP <= 64) and several blocks of Y columns (GSA's pass V forward, both dk
# kernels, pass K's dq: DY = 512) take a whole chunk and every column block per program ("wide") where
# that leaves at least this many programs: the gated P, the scores and their diagonal are then read once
# per chunk instead of once per column block. GSA forward+backward on an H100 (bf16, H = 4, K = V = 512,
# M = 64), GPU ms at 8 x 2048 / 4 x 4096 / 1 x 16384: 1.547 / 1.617 / 1.738 without, 1.431 / 1.503 / 1.628
# with (4 warps; 8 were 0.01 ms slower). Taking a whole chunk of *gated* rows per program too (its blocks
# of GATED_BLOCK rows in turn, masked over the chunk's tiles) was slower: GSA 1.474 / 1.543 / 1.674 (8
# warps; 4: 1.516 / 1.578 / 1.713), GLA +0.17 ms.
WIDE_MIN_PROGRAMS = 512
# Warps of a launch that stores the gradient of a silu's input (``silu``: one more tile read per block of
# columns, 181-185 registers a thread in the wide form, against 109-136). GSA's three such launches in
# chunk_gsa_projected on an H100 (bf16, 4 x 4096, H = 4, K = V = 512, M = 64), wide, us each: 4 warps
# 165 / 198 / 165, 8 warps 136 / 136 / 136, 16 warps 216-223; one column block per program 135-204. The
# wide ones take 4 warps and 2 pipeline stages instead (SILU_WIDE_OPTIONS, below).
SILU_WARPS = 8
# Launch options by variant, from a sweep of num_warps (2, 4, 8) and num_stages (1, 2, default) of each
# apply launch of chunk_gsa_projected's forward+backward on an H100 (bf16, H = 4, K = V = 512, M = 64), the
# sum of the launches' GPU times against the options before, us at 8 x 2048 / 4 x 4096 / 1 x 16384:
# the wide silu launches (pass V's dv, pass K's dk; pass K's dq) with 4 warps and 2 stages instead of 8
# warps -26 / -26 / -26 and -4 / -3 / -4; pass K's gated dv, which adds pass V's ds (``acc``), with 2
# warps -9 / -10 / -8 (pass V's gated dk with 2 warps: +5 / +1 / +1, kept at 4). No other option took more
# than 2 us off any launch; the 255-register softmax launches lost most (8 warps +43 to +52 us).
SILU_WIDE_OPTIONS = dict(num_warps=4, num_stages=2)
ACC_GATED_UPPER_WARPS = 2
# Columns of P per step of the loop that makes both the state product and the fused scores (``scores_from``)
# with half-precision operands. GSA's two such launches (pass K's output with its softmax, pass V's dq with
# the softmax's gradient; 255 registers a thread) on an H100 at 8 x 2048, us: one loop per product 148 /
# 152, one loop for both 135 / 136 with 64 columns a step, 130 / 133 with 128 (2 warps or 2 stages:
# slower). fp32 operands take 64 (128 would need about twice the shared memory a stage).
FUSED_BLOCK_P = 128

@triton.jit
def _gated_rows(p, gp, bos, o_r, m_r, i_hp, NHP: tl.constexpr, i_h, H: tl.constexpr, DP: tl.constexpr, o_p, m_p,
                USE_GP: tl.constexpr, FROM_END: tl.constexpr, last):
    """``P_r ⊙ gate`` for rows ``o_r`` and columns ``o_p`` (fp32): gate ``e^{Gp_r}`` (lower) or
    ``e^{Gp_L - Gp_r}`` (upper, ``FROM_END``)."""
    b_p = load_tile(p, bos, o_r, m_r, i_hp, NHP, DP, o_p, m_p).to(tl.float32)
    if USE_GP:
        b_g = load_tile(gp, bos, o_r, m_r, i_h, H, DP, o_p, m_p).to(tl.float32)
        if FROM_END:
            b_g = load_row(gp, bos, last, i_h, H, DP, o_p, m_p).to(tl.float32)[None, :] - b_g
        b_p = b_p * tl.where(m_r[:, None], tl.exp(b_g), 0)
    return b_p


@triton.jit
def _state_tile(hm, o_p, m_p, o_y, m_y, S_P: tl.constexpr, S_Y: tl.constexpr):
    """Rows ``o_p`` and columns ``o_y`` of a chunk's state ``M``, read through its strides."""
    return tl.load(hm + o_p[:, None] * S_P + o_y[None, :] * S_Y, mask=m_p[:, None] & m_y[None, :], other=0)


@triton.jit
def _state_product(p, gp, hm, bos, o_r, m_r, i_hp, NHP: tl.constexpr, i_h, H: tl.constexpr, DP: tl.constexpr, DY: tl.constexpr, S_P: tl.constexpr, S_Y: tl.constexpr,
                   o_y, m_y, BC: tl.constexpr, BP: tl.constexpr, BY: tl.constexpr, USE_GP: tl.constexpr,
                   FROM_END: tl.constexpr, last, DT: tl.constexpr, PREC: tl.constexpr):
    """``(P_r ⊙ gate) @ M`` for rows ``o_r`` (see ``_gated_rows``)."""
    b_y = tl.zeros([BC, BY], dtype=tl.float32)
    for i_p in range(0, tl.cdiv(DP, BP)):
        o_p = i_p * BP + tl.arange(0, BP)
        m_p = o_p < DP
        b_p = _gated_rows(p, gp, bos, o_r, m_r, i_hp, NHP, i_h, H, DP, o_p, m_p, USE_GP, FROM_END, last)  # [BC, BP]
        b_m = _state_tile(hm, o_p, m_p, o_y, m_y, S_P, S_Y)
        b_y += tl.dot(b_p.to(DT), b_m.to(DT), input_precision=PREC)
    return b_y


@triton.jit
def _product_and_scores(p, hm, ka, bos, o_i, m_i, i_hq, HQ: tl.constexpr, o_j, m_j, i_h, H: tl.constexpr,
                        DP: tl.constexpr, S_P: tl.constexpr, S_Y: tl.constexpr, o_y, m_y, BC: tl.constexpr,
                        BT: tl.constexpr, BP: tl.constexpr, BY: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``(P_i @ M, P_i ka^T)`` for rows ``o_i`` of an ungated ``P`` (the second over the chunk's rows ``o_j`` of
    ``ka``, read where ``m_j``), unscaled: one pass over ``P``'s columns for both products."""
    b_y = tl.zeros([BC, BY], dtype=tl.float32)
    b_A = tl.zeros([BC, BT], dtype=tl.float32)
    for i_p in range(0, tl.cdiv(DP, BP)):
        o_p = i_p * BP + tl.arange(0, BP)
        m_p = o_p < DP
        b_p = load_tile(p, bos, o_i, m_i, i_hq, HQ, DP, o_p, m_p).to(DT)
        b_m = _state_tile(hm, o_p, m_p, o_y, m_y, S_P, S_Y)
        b_k = load_tile(ka, bos, o_j, m_j, i_h, H, DP, o_p, m_p)
        b_y += tl.dot(b_p, b_m.to(DT), input_precision=PREC)
        b_A += tl.dot(b_p, tl.trans(b_k.to(DT)), input_precision=PREC)
    return b_y, b_A


@triton.jit
def _store_y(y, pre, b_y, bos, o_r, m_r, head, SR: tl.constexpr, DY: tl.constexpr, o_y, m_y, DACT: tl.constexpr):
    """Store rows ``o_r`` of ``y`` (rows ``SR`` elements apart): as they are, or (``DACT``: ``y`` is the
    gradient of ``silu(x)``) times ``silu'(x)``, ``x`` read from ``pre`` (same layout), the gradient of
    the activation's input."""
    if DACT:
        b_y = silu_grad(b_y, pre, bos, o_r, m_r, head, SR, DY, o_y, m_y)
    store_rows(y, b_y, bos, o_r, m_r, head, SR, DY, o_y, m_y)


@triton.jit
def _lower_wide(p, gp, hm, x, A, y, y_nd, pre, bos, t0, o_i, m_i, i_hq, HQ: tl.constexpr, i_h, H: tl.constexpr,
                scale, DP: tl.constexpr, DY: tl.constexpr, S_P: tl.constexpr, S_Y: tl.constexpr, BT: tl.constexpr,
                BP: tl.constexpr, BY: tl.constexpr, USE_GP: tl.constexpr, STORE_ND: tl.constexpr, DT: tl.constexpr,
                PREC: tl.constexpr, SR: tl.constexpr, DACT: tl.constexpr):
    """The lower kernel on a whole chunk of ungated rows (``BC == BT``, ``DP <= BP``) and every block of
    ``Y`` columns: the gated ``P``, the scores and their diagonal are loaded once for all blocks."""
    o_p = tl.arange(0, BP)
    m_p = o_p < DP
    b_p = _gated_rows(p, gp, bos, o_i, m_i, i_hq, HQ, i_h, H, DP, o_p, m_p, USE_GP, False, 0).to(DT)
    p_row = A + ((bos + o_i) * HQ + i_hq).to(tl.int64) * BT
    b_a = tl.load(p_row[:, None] + (o_i - t0)[None, :], mask=m_i[:, None] & (o_i[None, :] < o_i[:, None]), other=0)
    b_a = b_a.to(DT)
    b_aii = tl.load(p_row + (o_i - t0), mask=m_i, other=0)
    for i_y in range(0, tl.cdiv(DY, BY)):
        o_y = i_y * BY + tl.arange(0, BY)
        m_y = o_y < DY
        b_m = _state_tile(hm, o_p, m_p, o_y, m_y, S_P, S_Y)
        b_x = load_tile(x, bos, o_i, m_i, i_h, H, DY, o_y, m_y)
        b_y = scale * tl.dot(b_p, b_m.to(DT), input_precision=PREC)
        b_y += tl.dot(b_a, b_x.to(DT), input_precision=PREC)
        if STORE_ND:
            store_tile(y_nd, b_y, bos, o_i, m_i, i_hq, HQ, DY, o_y, m_y)
        b_y += b_aii[:, None] * b_x.to(tl.float32)
        _store_y(y, pre, b_y, bos, o_i, m_i, i_hq, SR, DY, o_y, m_y, DACT)


@triton.jit
def _upper_wide(p, gp, hm, x, A, y, y_nd, y_st, acc, pre, bos, t0, o_j, m_j, last, i_h, H: tl.constexpr,
                G: tl.constexpr, scale, DP: tl.constexpr, DY: tl.constexpr, S_P: tl.constexpr, S_Y: tl.constexpr,
                BT: tl.constexpr, BP: tl.constexpr, BY: tl.constexpr, USE_GP: tl.constexpr, STORE_ND: tl.constexpr,
                USE_ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SR: tl.constexpr, DACT: tl.constexpr):
    """The upper kernel on a whole chunk of ungated rows (``BC == BT``, ``DP <= BP``) and every block of
    ``Y`` columns: the gated ``P`` (and, without GQA, the scores) are loaded once for all blocks."""
    HQ: tl.constexpr = H * G
    o_p = tl.arange(0, BP)
    m_p = o_p < DP
    b_p = _gated_rows(p, gp, bos, o_j, m_j, i_h, H, i_h, H, DP, o_p, m_p, USE_GP, True, last).to(DT)
    m_a = m_j[:, None] & m_j[None, :] & (o_j[:, None] > o_j[None, :])  # [rows i, rows j]: i > j
    if G == 1:  # one query head: its scores serve every column block
        p_col = A + ((bos + o_j) * H + i_h).to(tl.int64) * BT
        b_a1 = tl.trans(tl.load(p_col[:, None] + (o_j - t0)[None, :], mask=m_a, other=0).to(DT))
        b_ajj1 = tl.load(p_col + (o_j - t0), mask=m_j, other=0)
    for i_y in range(0, tl.cdiv(DY, BY)):
        o_y = i_y * BY + tl.arange(0, BY)
        m_y = o_y < DY
        b_m = _state_tile(hm, o_p, m_p, o_y, m_y, S_P, S_Y)
        b_s = scale * tl.dot(b_p, b_m.to(DT), input_precision=PREC)
        b_y = tl.zeros([BT, BY], dtype=tl.float32)
        b_diag = tl.zeros([BT, BY], dtype=tl.float32)
        for i_g in range(0, G):
            i_hq = i_h * G + i_g
            b_x = load_tile(x, bos, o_j, m_j, i_hq, HQ, DY, o_y, m_y)
            if G == 1:
                b_a, b_ajj = b_a1, b_ajj1
            else:
                p_col = A + ((bos + o_j) * HQ + i_hq).to(tl.int64) * BT
                b_a = tl.trans(tl.load(p_col[:, None] + (o_j - t0)[None, :], mask=m_a, other=0).to(DT))
                b_ajj = tl.load(p_col + (o_j - t0), mask=m_j, other=0)
            b_y += tl.dot(b_a, b_x.to(DT), input_precision=PREC)
            b_diag += b_ajj[:, None] * b_x.to(tl.float32)
        if STORE_ND:
            store_tile(y_nd, b_y, bos, o_j, m_j, i_h, H, DY, o_y, m_y)
            store_tile(y_st, b_s, bos, o_j, m_j, i_h, H, DY, o_y, m_y)
        b_y += b_s + b_diag
        if USE_ACC:
            b_y += load_tile(acc, bos, o_j, m_j, i_h, H, DY, o_y, m_y).to(tl.float32)
        _store_y(y, pre, b_y, bos, o_j, m_j, i_h, SR, DY, o_y, m_y, DACT)


@lean
@triton.jit
def chunk_apply_lower_kernel(
    p, gp, hm, x, gy, A, ka, y, y_nd, sp, yd, pre, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, G: tl.constexpr, DP: tl.constexpr, DY: tl.constexpr, S_P: tl.constexpr,
    S_Y: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr, BY: tl.constexpr,
    USE_GP: tl.constexpr, USE_GY: tl.constexpr, STORE_ND: tl.constexpr, IS_VARLEN: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, DIAG_MAX: tl.constexpr, SOFTMAX: tl.constexpr,
    STORE_DECAYED: tl.constexpr, FUSE_A: tl.constexpr, WIDE: tl.constexpr, SR: tl.constexpr, DACT: tl.constexpr,
):
    i_y, i_tc, i_bhq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    HQ: tl.constexpr = H * G
    i_t, i_c = i_tc // NC, i_tc % NC
    i_b, i_hq = i_bhq // HQ, i_bhq % HQ
    i_h = i_hq // G
    i_tg = i_t
    _, i_t, bos, T = chunk_bounds(i_b, i_t, T, cu_seqlens, chunk_indices, IS_VARLEN)
    if not IS_VARLEN:
        i_tg = i_b * tl.cdiv(T, BT) + i_t
    t0 = i_t * BT
    r = t0 + i_c * BC
    o_i = r + tl.arange(0, BC)
    m_i = o_i < T
    o_y = i_y * BY + tl.arange(0, BY)
    m_y = o_y < DY
    o_j = t0 + tl.arange(0, BT)
    p_row = A + ((bos + o_i) * HQ + i_hq).to(tl.int64) * BT  # [BC]

    p_m = hm + (i_tg.to(tl.int64) * H + i_h) * DP * DY
    if WIDE:
        _lower_wide(p, gp, p_m, x, A, y, y_nd, pre, bos, t0, o_i, m_i, i_hq, HQ, i_h, H, scale, DP, DY, S_P, S_Y, BT,
                    BP, BY, USE_GP, STORE_ND, DT, PREC, SR, DACT)
        return
    if FUSE_A:
        # the ungated scores of these rows, A = scale * P ka^T (j <= i), made here, in the state product's
        # loop over P's columns, and stored for later launches instead of by chunk_scores (the launch has
        # one block of Y columns: no repeated work)
        m_jt = (o_j < T) & (o_j < r + BC)  # the columns j <= i of these rows: fewer loads for early blocks
        b_y, b_A = _product_and_scores(p, p_m, ka, bos, o_i, m_i, i_hq, HQ, o_j, m_jt, i_h, H, DP, S_P, S_Y, o_y, m_y,
                                       BC, BT, BP, BY, DT, PREC)
        b_y = scale * b_y
        b_A = store_scores(b_A, scale, p_row, t0, o_i, m_i, o_j)
    else:
        b_y = scale * _state_product(p, gp, p_m, bos, o_i, m_i, i_hq, HQ, i_h, H, DP, DY, S_P, S_Y, o_y, m_y,
                                     BC, BP, BY, USE_GP, False, 0, DT, PREC)
    if USE_GY:
        b_gy = load_tile(gy, bos, o_i, m_i, i_h, H, DY, o_y, m_y).to(tl.float32)  # [BC, BY]
        b_gr = load_row(gy, bos, tl.minimum(r, T - 1), i_h, H, DY, o_y, m_y).to(tl.float32)  # reference: row r
        b_y = b_y * tl.where(m_i[:, None], tl.exp(b_gy), 0)
        # rows j of earlier blocks: e^{Gy_i - Gy_j} = e^{Gy_i - Gy_r} e^{Gy_r - Gy_j}; the rows j < i of
        # this block too when the gates decay little across it (then e^{Gy_r - Gy_j} <= e^DIAG_MAX)
        fast = tl.max(tl.where(m_i[:, None] & m_y[None, :], b_gr[None, :] - b_gy, 0)) <= DIAG_MAX
        m_off = (o_j < r + BC * fast.to(tl.int32)) & (o_j < T)  # r may lie past the end of the sequence
        m_a = m_i[:, None] & m_off[None, :] & (o_j[None, :] < o_i[:, None])
        if FUSE_A:
            b_a = tl.where(m_a, b_A, 0)
        else:
            b_a = tl.load(p_row[:, None] + (o_j - t0)[None, :], mask=m_a, other=0)
        b_x = load_tile(x, bos, o_j, m_off, i_h, H, DY, o_y, m_y).to(tl.float32)  # [BT, BY]
        b_gx = load_tile(gy, bos, o_j, m_off, i_h, H, DY, o_y, m_y).to(tl.float32)
        b_x = b_x * tl.where(m_off[:, None], tl.exp(b_gr[None, :] - b_gx), 0)
        b_o = tl.dot(b_a.to(DT), b_x.to(DT), input_precision=PREC)
        b_y += b_o * tl.exp(tl.where(m_i[:, None], b_gy - b_gr[None, :], float("-inf")))
        if not fast:
            # the diagonal block, one column j at a time
            for jj in range(0, BC):
                j = r + jj
                jc = tl.minimum(j, T - 1)  # rows past the end are masked below (i >= j, i < T)
                if FUSE_A:
                    b_aj = tl.sum(tl.where(o_j[None, :] == j, b_A, 0), axis=1)
                else:
                    b_aj = tl.load(p_row + (j - t0), mask=m_i, other=0)  # [BC]
                b_xj = load_row(x, bos, jc, i_h, H, DY, o_y, m_y).to(tl.float32)
                b_gj = load_row(gy, bos, jc, i_h, H, DY, o_y, m_y).to(tl.float32)
                m_e = m_i[:, None] & (o_i[:, None] > j)
                b_y += b_aj[:, None] * b_xj[None, :] * tl.exp(tl.where(m_e, b_gy - b_gj[None, :], float("-inf")))
    else:
        m_j = (o_j < T)[None, :] & (o_j[None, :] < o_i[:, None])
        if FUSE_A:
            b_a = tl.where(m_i[:, None] & m_j, b_A, 0)
        else:
            b_a = tl.load(p_row[:, None] + (o_j - t0)[None, :], mask=m_i[:, None] & m_j, other=0)  # [BC, BT]
        b_x = load_tile(x, bos, o_j, o_j < T, i_h, H, DY, o_y, m_y)
        b_y += tl.dot(b_a.to(DT), b_x.to(DT), input_precision=PREC)
    # The diagonal (j == i, gate ratio 1) separately: the gate gradients need Y without it (see chunk.py).
    if FUSE_A:
        b_aii = tl.sum(tl.where(o_j[None, :] == o_i[:, None], b_A, 0), axis=1)
    else:
        b_aii = tl.load(p_row + (o_i - t0), mask=m_i, other=0)  # [BC]
    b_xi = load_tile(x, bos, o_i, m_i, i_h, H, DY, o_y, m_y).to(tl.float32)
    if STORE_ND:
        store_tile(y_nd, b_y, bos, o_i, m_i, i_hq, HQ, DY, o_y, m_y)
    b_y += b_aii[:, None] * b_xi
    if SOFTMAX == 1:  # store softmax(Y) over the DY <= BY columns of each row
        b_y = tl.where(m_y[None, :], b_y, float("-inf"))
        b_y = tl.exp(b_y - tl.max(b_y, axis=1)[:, None])
        b_y = b_y / tl.sum(b_y, axis=1)[:, None]
    if SOFTMAX == 2:  # Y is the gradient of a softmax's output sp: store the gradient of its input
        b_sp = load_tile(sp, bos, o_i, m_i, i_hq, HQ, DY, o_y, m_y).to(tl.float32)
        b_y = b_sp * (b_y - tl.sum(b_sp * b_y, axis=1)[:, None])
    _store_y(y, pre, b_y, bos, o_i, m_i, i_hq, SR, DY, o_y, m_y, DACT)
    if STORE_DECAYED:  # also Y ⊙ e^{Gy} (USE_GY): the gated input of a decayed backward scan (chunk_bwd_dh)
        store_tile(yd, b_y.to(y.dtype.element_ty).to(tl.float32) * tl.exp(b_gy), bos, o_i, m_i, i_hq, HQ, DY, o_y,
                   m_y)


@lean
@triton.jit
def chunk_apply_upper_kernel(
    p, gp, hm, x, gy, A, y, y_nd, y_st, acc, pre, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, G: tl.constexpr, DP: tl.constexpr, DY: tl.constexpr, S_P: tl.constexpr,
    S_Y: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr, BY: tl.constexpr,
    USE_GP: tl.constexpr, USE_GY: tl.constexpr, STORE_ND: tl.constexpr, IS_VARLEN: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, DIAG_MAX: tl.constexpr, USE_ACC: tl.constexpr, WIDE: tl.constexpr,
    SR: tl.constexpr, DACT: tl.constexpr,
):
    i_y, i_tc, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    HQ: tl.constexpr = H * G
    i_t, i_c = i_tc // NC, i_tc % NC
    i_b, i_h = i_bh // H, i_bh % H
    i_tg = i_t
    _, i_t, bos, T = chunk_bounds(i_b, i_t, T, cu_seqlens, chunk_indices, IS_VARLEN)
    if not IS_VARLEN:
        i_tg = i_b * tl.cdiv(T, BT) + i_t
    t0 = i_t * BT
    r0 = t0 + i_c * BC
    o_j = r0 + tl.arange(0, BC)
    m_j = o_j < T
    last = tl.minimum(t0 + BT, T) - 1
    o_y = i_y * BY + tl.arange(0, BY)
    m_y = o_y < DY
    o_i = t0 + tl.arange(0, BT)

    p_m = hm + (i_tg.to(tl.int64) * H + i_h) * DP * DY
    if WIDE:
        _upper_wide(p, gp, p_m, x, A, y, y_nd, y_st, acc, pre, bos, t0, o_j, m_j, last, i_h, H, G, scale, DP, DY,
                    S_P, S_Y, BT, BP, BY, USE_GP, STORE_ND, USE_ACC, DT, PREC, SR, DACT)
        return
    b_s = scale * _state_product(p, gp, p_m, bos, o_j, m_j, i_h, H, i_h, H, DP, DY, S_P, S_Y, o_y, m_y,
                                 BC, BP, BY, USE_GP, True, last, DT, PREC)
    b_y = tl.zeros([BC, BY], dtype=tl.float32)
    b_diag = tl.zeros([BC, BY], dtype=tl.float32)
    if USE_GY:
        b_gy = load_tile(gy, bos, o_j, m_j, i_h, H, DY, o_y, m_y).to(tl.float32)  # [BC, BY]
        b_gl = load_row(gy, bos, last, i_h, H, DY, o_y, m_y).to(tl.float32)
        b_s = b_s * tl.where(m_j[:, None], tl.exp(b_gl[None, :] - b_gy), 0)
        # reference: the block's last row; rows i of later blocks see e^{Gy_i - Gy_ref} e^{Gy_ref - Gy_j},
        # and so do the rows i > j of this block when the gates decay little across it (fast)
        ref = tl.minimum(r0 + BC, T) - 1
        b_gr = load_row(gy, bos, ref, i_h, H, DY, o_y, m_y).to(tl.float32)
        fast = tl.max(tl.where(m_j[:, None] & m_y[None, :], b_gy - b_gr[None, :], 0)) <= DIAG_MAX
        lo = ref + 1 - (ref + 1 - r0) * fast.to(tl.int32)  # first row i taken by the product
        m_off = (o_i >= lo) & (o_i < T)
        b_gx = load_tile(gy, bos, o_i, m_off, i_h, H, DY, o_y, m_y).to(tl.float32)  # [BT, BY]
        b_e = tl.exp(tl.where(m_off[:, None], b_gx - b_gr[None, :], float("-inf")))
        m_a = m_off[:, None] & m_j[None, :] & (o_i[:, None] > o_j[None, :])
        b_acc = tl.zeros([BC, BY], dtype=tl.float32)
        for i_g in range(0, G):
            i_hq = i_h * G + i_g
            p_col = A + ((bos + o_i) * HQ + i_hq).to(tl.int64) * BT  # [BT] row starts of rows i
            b_a = tl.load(p_col[:, None] + (o_j - t0)[None, :], mask=m_a, other=0)
            b_x = load_tile(x, bos, o_i, m_off, i_hq, HQ, DY, o_y, m_y).to(tl.float32) * b_e  # [BT, BY]
            b_acc += tl.dot(tl.trans(b_a.to(DT)), b_x.to(DT), input_precision=PREC)
            if not fast:
                # the diagonal block, one row i at a time
                for ii in range(0, BC):
                    i = r0 + ii
                    ic = tl.minimum(i, T - 1)  # a row past the end adds zero: its score is masked to 0
                    m_ai = m_j & broadcast_lt(o_j, i, T)
                    b_ai = tl.load(A + ((bos + ic) * HQ + i_hq).to(tl.int64) * BT + (o_j - t0), mask=m_ai,
                                   other=0)
                    b_xi = load_row(x, bos, ic, i_hq, HQ, DY, o_y, m_y).to(tl.float32)
                    b_gi = load_row(gy, bos, ic, i_h, H, DY, o_y, m_y).to(tl.float32)
                    m_e = m_j[:, None] & (o_j[:, None] < ic)
                    b_y += b_ai[:, None] * b_xi[None, :] * tl.exp(tl.where(m_e, b_gi[None, :] - b_gy,
                                                                            float("-inf")))
            b_ajj = tl.load(A + ((bos + o_j) * HQ + i_hq).to(tl.int64) * BT + (o_j - t0), mask=m_j, other=0)
            b_diag += b_ajj[:, None] * load_tile(x, bos, o_j, m_j, i_hq, HQ, DY, o_y, m_y).to(tl.float32)
        b_y += b_acc * tl.where(m_j[:, None], tl.exp(b_gr[None, :] - b_gy), 0)
    else:
        m_i = o_i < T
        m_a = m_i[:, None] & m_j[None, :] & (o_i[:, None] > o_j[None, :])
        for i_g in range(0, G):
            i_hq = i_h * G + i_g
            p_col = A + ((bos + o_i) * HQ + i_hq).to(tl.int64) * BT
            b_a = tl.load(p_col[:, None] + (o_j - t0)[None, :], mask=m_a, other=0)  # [BT, BC]
            b_x = load_tile(x, bos, o_i, m_i, i_hq, HQ, DY, o_y, m_y)
            b_y += tl.dot(tl.trans(b_a.to(DT)), b_x.to(DT), input_precision=PREC)
            b_ajj = tl.load(p_col + (o_i - t0), mask=m_i, other=0)  # here rows i are rows j
            b_diag += b_ajj[:, None] * b_x.to(tl.float32)
    if STORE_ND:
        # the gate gradients need the state part and the off-diagonal part apart (see chunk.py)
        store_tile(y_nd, b_y, bos, o_j, m_j, i_h, H, DY, o_y, m_y)
        store_tile(y_st, b_s, bos, o_j, m_j, i_h, H, DY, o_y, m_y)
    b_y += b_s + b_diag
    if USE_ACC:  # another gradient of the same input, added here instead of by a separate launch
        b_y += load_tile(acc, bos, o_j, m_j, i_h, H, DY, o_y, m_y).to(tl.float32)
    _store_y(y, pre, b_y, bos, o_j, m_j, i_h, SR, DY, o_y, m_y, DACT)


def _apply(kernel, heads, H, p, gp, m, transpose_m, x, gy, A, scale, cu_seqlens, chunk_size, out_dtype,
           compute_dtype, no_diag, softmax=None, acc=None, decayed_dtype=None, scores_from=None, silu=None):
    B, T, _, DP = p.shape
    DY = x.shape[-1]
    HQ = A.shape[2]
    BT = chunk_size
    BC = min(GATED_BLOCK, BT) if gy is not None else BT
    NT, indices = chunk_grid(cu_seqlens, T, BT)
    # m is [NT, H, K, V]; lower/upper read it as [DP, DY] through strides
    S_P, S_Y = (1, m.shape[-1]) if transpose_m else (m.shape[-1], 1)
    if silu is None:
        y, pre, SR = p.new_empty(B, T, heads, DY, dtype=out_dtype), None, heads * DY
    else:  # y is the gradient of silu(pre): store the gradient of pre, into the view given
        pre, y = silu
        SR = _silu_row_stride(pre, y, (B, T, heads, DY))
    y_nd = p.new_empty(B, T, heads, DY, dtype=torch.float32) if no_diag else None
    upper = kernel is chunk_apply_upper_kernel
    y_st = p.new_empty(B, T, heads, DY, dtype=torch.float32) if no_diag and upper else None
    yd = p.new_empty(B, T, heads, DY, dtype=decayed_dtype) if decayed_dtype is not None else None
    wide_p = scores_from is not None and compute_dtype in (torch.bfloat16, torch.float16)
    BP, BY = min(FUSED_BLOCK_P if wide_p else 64, next_pow2(DP)), _block_y(DY, softmax)
    wide = _wide(DP, BP, DY, BY, NT * B * heads, gy is None and softmax is None and decayed_dtype is None
                 and scores_from is None)
    grid = (1 if wide else cdiv(DY, BY), NT * (BT // BC), B * heads)
    if upper:
        extra = dict(USE_ACC=acc is not None)
        pointers = (y, y_nd, y_st, acc, pre)
    else:
        extra = dict(SOFTMAX=0 if softmax is None else 1 if softmax is True else 2,
                     STORE_DECAYED=yd is not None, FUSE_A=scores_from is not None)
        pointers = (scores_from, y, y_nd, softmax if isinstance(softmax, torch.Tensor) else None, yd, pre)
    kernel[grid](
        p, gp, m, x, gy, A, *pointers, cu_seqlens, indices, scale, T,
        H=H, G=HQ // H, DP=DP, DY=DY, S_P=S_P, S_Y=S_Y, BT=BT, BC=BC, BP=BP, BY=BY,
        USE_GP=gp is not None, USE_GY=gy is not None, STORE_ND=no_diag, IS_VARLEN=cu_seqlens is not None,
        DT=tl_dtype(compute_dtype), PREC=dot_precision(compute_dtype), DIAG_MAX=diag_dot_limit(compute_dtype),
        WIDE=wide, SR=SR, DACT=silu is not None, **extra,
        **launch_options(kernel, wide, gy is not None, silu is not None, extra),
    )
    out = (y, y_nd, y_st) if upper else (y, y_nd)
    out = out if no_diag else out[:1]
    out = out + (yd,) if yd is not None else out
    return out if len(out) > 1 else y


def launch_options(kernel, wide, gated, dact, extra) -> dict:
    """``num_warps`` (and ``num_stages``) of a launch, by its variant (see SILU_WIDE_OPTIONS)."""
    if dact:
        return SILU_WIDE_OPTIONS if wide else dict(num_warps=SILU_WARPS)
    if kernel is chunk_apply_upper_kernel and gated and extra.get("USE_ACC"):
        return dict(num_warps=ACC_GATED_UPPER_WARPS)
    return dict(num_warps=4)


def _silu_row_stride(pre, y, shape) -> int:
    """The row stride shared by ``pre`` and ``y`` (views ``[B, T, heads, D]`` of wider rows, ``silu`` of
    :func:`chunk_apply_lower` / :func:`chunk_apply_upper`), checked."""
    B, T, heads, D = shape
    SR = pre.stride(1)
    want = (T * SR, SR, D, 1)
    for name, t in (("pre", pre), ("out", y)):
        if tuple(t.shape) != shape or any(n > 1 and st != w for n, st, w in zip(shape, t.stride(), want)):
            raise ValueError(f"silu: {name} must be a [{B}, {T}, {heads}, {D}] view with strides {want}, got shape "
                             f"{tuple(t.shape)} and strides {t.stride()}")
    return SR


def _wide(DP, BP, DY, BY, programs, plain) -> bool:
    """Whether a launch takes whole chunks and every column block per program (see WIDE_MIN_PROGRAMS):
    ``plain`` rows (ungated ``y``, no softmax, decayed copy or fused scores), one block of ``P`` columns,
    several of ``Y``."""
    return plain and DP <= BP and DY > BY and programs >= WIDE_MIN_PROGRAMS


def _block_y(DY, softmax):
    """Columns of ``y`` per program (a fused softmax needs whole rows)."""
    return next_pow2(DY) if softmax is not None else min(64, next_pow2(DY))


def lower_fuses_scores(DY, softmax=None) -> bool:
    """Whether a lower launch can make its own ungated scores (``scores_from``): one block of ``y``
    columns per row block, so no program repeats another's scores."""
    return cdiv(DY, _block_y(DY, softmax)) == 1


def chunk_apply_lower(p, gp, m, x, gy, A, scale, cu_seqlens, chunk_size, out_dtype, compute_dtype,
                      transpose_m=False, no_diag=False, softmax=None, decayed_dtype=None, scores_from=None, silu=None):
    """Lower apply: ``y [B, T, HQ, DY]`` from ``p [B, T, HQ, DP]``, states ``m [NT, H, ., .]``,
    ``x [B, T, H, DY]``, scores ``A [B, T, HQ, BT]`` and optional gate cumsums ``gp``/``gy``.
    ``no_diag``: also return ``y`` without the ``j == i`` terms (fp32). ``softmax``: True stores
    ``softmax(y)`` over the last dimension; a tensor ``sp`` (a softmax's output, ``y``'s shape) stores
    ``sp ⊙ (y - sum(sp ⊙ y))``, the gradient through that softmax when ``y`` is the gradient of ``sp``
    (``y_nd`` stays as it was). ``decayed_dtype`` (with ``gy``): also return ``y ⊙ e^{gy}`` of the stored
    ``y``, in that dtype, last: the gated input of a decayed backward scan (``chunk_bwd_dh(decayed=True)``).
    ``scores_from`` (``[B, T, H, DP]``, with ``gp`` None and :func:`lower_fuses_scores`): the kernel makes
    the ungated scores ``A = scale * p scores_from^T`` itself (``chunk_scores``' values) and writes them
    into ``A``, an empty ``[B, T, HQ, BT]`` fp32 buffer, for later launches. ``silu = (pre, out)``: ``y``
    is the gradient of ``silu(pre)``; the kernel stores ``y ⊙ silu'(pre)`` into ``out`` (returned as
    ``y``), both ``[B, T, HQ, DY]`` views of rows wider than ``HQ * DY`` (parts of a fused projection and
    its gradient); not with ``softmax`` or ``decayed_dtype``."""
    if decayed_dtype is not None and gy is None:
        raise ValueError("chunk_apply_lower: decayed_dtype needs gy")
    if silu is not None and (softmax is not None or decayed_dtype is not None):
        raise ValueError("chunk_apply_lower: silu goes with neither softmax nor decayed_dtype")
    if scores_from is not None and (gp is not None or not lower_fuses_scores(x.shape[-1], softmax)):
        raise ValueError("chunk_apply_lower: scores_from needs gp None and one block of y columns")
    return _apply(chunk_apply_lower_kernel, p.shape[2], x.shape[2], p, gp, m, transpose_m, x, gy, A, scale,
                  cu_seqlens, chunk_size, out_dtype, compute_dtype, no_diag, softmax=softmax,
                  decayed_dtype=decayed_dtype, scores_from=scores_from, silu=silu)


def chunk_apply_upper(p, gp, m, x, gy, A, scale, cu_seqlens, chunk_size, out_dtype, compute_dtype,
                      transpose_m=False, no_diag=False, acc=None, silu=None):
    """Upper apply: ``y [B, T, H, DY]`` from ``p [B, T, H, DP]``, state gradients ``m [NT, H, ., .]``,
    ``x [B, T, HQ, DY]``, scores ``A [B, T, HQ, BT]`` and optional gate cumsums ``gp``/``gy``.
    ``no_diag``: also return the intra-chunk part without the ``i == j`` terms and the state part
    (``scale * (P ⊙ gate) @ M ⊙ gate``), both fp32: ``y = y_st + y_nd + diagonal``. ``acc`` (``y``'s
    shape, or None) is added to ``y`` (not to the parts). ``silu = (pre, out)``: as in
    :func:`chunk_apply_lower` (``[B, T, H, DY]`` views)."""
    return _apply(chunk_apply_upper_kernel, p.shape[2], p.shape[2], p, gp, m, transpose_m, x, gy, A, scale,
                  cu_seqlens, chunk_size, out_dtype, compute_dtype, no_diag, acc=acc, silu=silu)
