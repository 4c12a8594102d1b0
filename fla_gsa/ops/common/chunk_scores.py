"""Step 2 of the chunked algorithm: the intra-chunk score matrix with gate ratios,

    A[i, j] = scale * sum_d Q_i[d] K_j[d] exp(G_i[d] - G_j[d])      for j <= i in the same chunk, else 0

stored as ``A [B, T, HQ, BT]`` in fp32 (row ``i``, column ``j - chunk start``). The forward uses it with
``(q, k, Gk)``; the backward with ``(do, v, Gv)`` gives the score gradient ``dA``.

Numerics: the rows of a chunk are split into blocks of ``BC = GATED_BLOCK`` (16). For columns ``j`` of earlier
blocks the ratio is factored through the block's first row ``r``:
``exp(G_i - G_j) = exp(G_i - G_r) * exp(G_r - G_j)``, both factors ``<= 1`` (cumsums decrease), so the
block is one matrix product and nothing overflows however strong the gates. The diagonal block takes the same
product when the gates decay by at most ``DIAG_MAX`` across the block (``G_r - G_last``, every column
``d``): its factors ``e^{G_r - G_j}`` are then bounded, and the causal mask is applied to the result.
Past that (strong gates) the ratio is formed exactly, one column at a time, with the causal mask applied
to the exponent. Without a gate the whole chunk is one masked product.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import diag_dot_limit, dot_precision
from fla_gsa.ops.utils.index import chunk_grid
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import chunk_bounds, load_row, load_tile, next_pow2, tl_dtype


# rows per program when the summed side is gated (the diagonal block: one product, or row by row)
GATED_BLOCK = 16

@triton.jit
def ungated_scores(q, k, scale, p_row, t0, bos, o_i, m_i, i_hq, HQ: tl.constexpr, o_j, m_j, i_h, H: tl.constexpr,
                   D: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, DT: tl.constexpr,
                   PREC: tl.constexpr):
    """Rows ``o_i`` of the ungated scores ``A = scale * q k^T`` over the chunk's columns ``o_j`` (reading
    the rows of ``k`` in ``m_j``; zero for ``j > i``), stored from ``p_row`` (the rows' starts in ``A``)
    and returned, ``[BC, BT]``."""
    b_A = tl.zeros([BC, BT], dtype=tl.float32)
    for i_d in range(0, tl.cdiv(D, BD)):
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        b_q = load_tile(q, bos, o_i, m_i, i_hq, HQ, D, o_d, m_d)
        b_k = load_tile(k, bos, o_j, m_j, i_h, H, D, o_d, m_d)
        b_A += tl.dot(b_q.to(DT), tl.trans(b_k.to(DT)), input_precision=PREC)
    return store_scores(b_A, scale, p_row, t0, o_i, m_i, o_j)


@triton.jit
def store_scores(b_A, scale, p_row, t0, o_i, m_i, o_j):
    """``scale * b_A`` with the columns ``j > i`` zeroed, stored from ``p_row`` and returned."""
    b_A = tl.where(o_i[:, None] >= o_j[None, :], b_A * scale, 0)
    tl.store(p_row[:, None] + (o_j - t0)[None, :], b_A, mask=m_i[:, None])
    return b_A


@lean
@triton.jit
def chunk_scores_kernel(
    q, k, g, A, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BD: tl.constexpr, USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    DIAG_MAX: tl.constexpr,
):
    i_tc, i_bhq = tl.program_id(0), tl.program_id(1)
    NC: tl.constexpr = BT // BC
    HQ: tl.constexpr = H * G
    i_t, i_c = i_tc // NC, i_tc % NC
    i_b, i_hq = i_bhq // HQ, i_bhq % HQ
    i_h = i_hq // G
    _, i_t, bos, T = chunk_bounds(i_b, i_t, T, cu_seqlens, chunk_indices, IS_VARLEN)
    t0 = i_t * BT
    r = t0 + i_c * BC  # first row of this program's block
    o_i = r + tl.arange(0, BC)
    m_i = o_i < T
    o_j = t0 + tl.arange(0, BT)
    p_row = A + ((bos + o_i) * HQ + i_hq).to(tl.int64) * BT  # [BC] row starts

    b_A = tl.zeros([BC, BT], dtype=tl.float32)
    if USE_G:
        o_c = tl.arange(0, BC)
        rc = tl.minimum(r, T - 1)
        # the gates' decay across the block, over every column d: small enough for one product?
        decay = tl.zeros([BD], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(D, BD)):
            o_d = i_d * BD + tl.arange(0, BD)
            m_d = o_d < D
            b_gr = load_row(g, bos, rc, i_h, H, D, o_d, m_d).to(tl.float32)
            b_gl = load_row(g, bos, tl.minimum(r + BC, T) - 1, i_h, H, D, o_d, m_d).to(tl.float32)
            decay = tl.maximum(decay, b_gr - b_gl)
        fast = tl.max(decay, axis=0) <= DIAG_MAX
        # columns taken by the product: the earlier blocks, and this one when fast (r may lie past the end)
        m_off = (o_j < r + BC * fast.to(tl.int32)) & (o_j < T)
        b_Ad = tl.zeros([BC, BC], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(D, BD)):
            o_d = i_d * BD + tl.arange(0, BD)
            m_d = o_d < D
            b_q = load_tile(q, bos, o_i, m_i, i_hq, HQ, D, o_d, m_d).to(tl.float32)  # [BC, BD]
            b_gq = load_tile(g, bos, o_i, m_i, i_h, H, D, o_d, m_d).to(tl.float32)  # [BC, BD]
            b_gr = load_row(g, bos, rc, i_h, H, D, o_d, m_d).to(tl.float32)  # [BD]
            b_k = load_tile(k, bos, o_j, m_off, i_h, H, D, o_d, m_d).to(tl.float32)  # [BT, BD]
            b_gk = load_tile(g, bos, o_j, m_off, i_h, H, D, o_d, m_d).to(tl.float32)
            b_qg = b_q * tl.exp(tl.where(m_i[:, None], b_gq - b_gr[None, :], float("-inf")))
            b_kg = b_k * tl.where(m_off[:, None], tl.exp(b_gr[None, :] - b_gk), 0)
            b_A += tl.dot(b_qg.to(DT), tl.trans(b_kg.to(DT)), input_precision=PREC)
            if not fast:
                for jj in range(0, BC):
                    j = r + jj
                    jc = tl.minimum(j, T - 1)  # rows past the end are masked below (i >= j, i < T)
                    b_kj = load_row(k, bos, jc, i_h, H, D, o_d, m_d).to(tl.float32)
                    b_gj = load_row(g, bos, jc, i_h, H, D, o_d, m_d).to(tl.float32)
                    m_e = m_i[:, None] & (o_i[:, None] >= j)
                    b_e = tl.exp(tl.where(m_e, b_gq - b_gj[None, :], float("-inf")))
                    b_a = tl.sum(b_q * b_kj[None, :] * b_e, axis=1)  # [BC]: column jj of the block
                    b_Ad += tl.where(o_c[None, :] == jj, b_a[:, None], 0)
        if fast:
            # the product holds the diagonal block too: keep j <= i, zeros after the block
            b_A = tl.where(o_j[None, :] <= o_i[:, None], b_A * scale, 0)
            tl.store(p_row[:, None] + (o_j - t0)[None, :], b_A, mask=m_i[:, None])
        else:
            # Disjoint stores: earlier columns and the zeros after the block, then the diagonal block.
            m_rest = (o_j < r) | (o_j >= r + BC)
            tl.store(p_row[:, None] + (o_j - t0)[None, :], b_A * scale, mask=m_i[:, None] & m_rest[None, :])
            tl.store(p_row[:, None] + (r - t0 + o_c)[None, :], b_Ad * scale, mask=m_i[:, None])
    else:
        ungated_scores(q, k, scale, p_row, t0, bos, o_i, m_i, i_hq, HQ, o_j, o_j < T, i_h, H, D, BC, BT, BD, DT,
                       PREC)


def scores_buffer(q, chunk_size):
    """An empty ``A [B, T, HQ, BT]`` (fp32) for a kernel that makes the scores of ``q`` itself."""
    return q.new_empty(*q.shape[:3], chunk_size, dtype=torch.float32)


def chunk_scores(q, k, g, scale, cu_seqlens, chunk_size, compute_dtype):
    """``A [B, T, HQ, BT]`` fp32 for ``q [B, T, HQ, D]``, ``k [B, T, H, D]`` and in-chunk gate cumsums
    ``g [B, T, H, D]`` (or None)."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    BT = chunk_size
    BC = min(GATED_BLOCK, BT) if g is not None else BT
    NT, indices = chunk_grid(cu_seqlens, T, BT)
    A = scores_buffer(q, BT)
    BD = min(64, next_pow2(D))
    grid = (NT * (BT // BC), B * HQ)
    chunk_scores_kernel[grid](
        q, k, g, A, cu_seqlens, indices, scale, T,
        H=H, G=HQ // H, D=D, BT=BT, BC=BC, BD=BD, USE_G=g is not None, IS_VARLEN=cu_seqlens is not None,
        DT=tl_dtype(compute_dtype), PREC=dot_precision(compute_dtype), DIAG_MAX=diag_dot_limit(compute_dtype),
        num_warps=4,
    )
    return A
