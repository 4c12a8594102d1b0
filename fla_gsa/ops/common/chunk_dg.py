"""Step 4 of the chunked algorithm's backward: the gradient of one gate (key or value side), chunk by
chunk, from the four pair groups of ``chunk.py``'s docstring, in one kernel:

    dg_t = revcumsum_chunk(sum_group(a ⊙ da_nd) - b ⊙ db_nd)_t        both in the chunk / read in it
         + cumsum_chunk(b ⊙ db_state)_{<t}                             write in the chunk, read after it
         + pairs_skipping[chunk of t]                                  from ``chunk_bwd_dh``

``a`` / ``da_nd`` have the query heads (``q`` / ``dq`` without its diagonal, or ``do`` / ``o``), ``b``,
``db_nd`` (the off-diagonal intra part) and ``db_state`` (the state part) the key/value heads. The
exclusive cumsum loads the tile shifted by one row instead of subtracting ``x_t`` from the inclusive
sum, which would keep the rounding of a large ``x_t``.

Two gradients of one gate that share ``b`` are summed in one launch (:class:`GateGradTerms`): GSA's slot
gate, whose writes ``s`` are pass V's keys and pass K's values.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fla_gsa.ops.utils.index import chunk_grid
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv, chunk_bounds, load_tile, next_pow2, store_tile


class GateGradTerms(NamedTuple):
    """The inputs of one gate gradient (:func:`chunk_gate_grad`'s arguments), for a caller that sums two
    gradients of the same gate in one launch (GSA's two passes)."""

    a: torch.Tensor
    da_nd: torch.Tensor
    b: torch.Tensor
    db_nd: torch.Tensor
    db_state: torch.Tensor
    pairs_skipping: torch.Tensor


@triton.jit
def _pair_terms(a, da, b, db, bos, o_t, m_t, i_h, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, o_d, m_d,
                BT: tl.constexpr, BD: tl.constexpr):
    """``sum_group(a ⊙ da_nd) - b ⊙ db_nd`` of one chunk, ``[BT, BD]``."""
    HQ: tl.constexpr = H * G
    b_x = tl.zeros([BT, BD], dtype=tl.float32)
    for i_g in range(0, G):
        i_hq = i_h * G + i_g
        b_a = load_tile(a, bos, o_t, m_t, i_hq, HQ, D, o_d, m_d).to(tl.float32)
        b_x += b_a * load_tile(da, bos, o_t, m_t, i_hq, HQ, D, o_d, m_d).to(tl.float32)
    b_b = load_tile(b, bos, o_t, m_t, i_h, H, D, o_d, m_d).to(tl.float32)
    return b_x - b_b * load_tile(db, bos, o_t, m_t, i_h, H, D, o_d, m_d).to(tl.float32)


@triton.jit
def _partial_sums(ps, i_tg, i_h, NTT, H: tl.constexpr, D: tl.constexpr, o_d, m_d, NP: tl.constexpr,
                  BD: tl.constexpr):
    """The pairs skipping the chunk: the sum of the scan's ``NP`` partial sums over its column blocks."""
    b_ps = tl.zeros([BD], dtype=tl.float32)
    for i_p in range(0, NP):
        b_ps += tl.load(ps + ((i_p * NTT + i_tg).to(tl.int64) * H + i_h) * D + o_d, mask=m_d, other=0)
    return b_ps


@lean
@triton.jit
def chunk_gate_grad_kernel(
    a, da, b, db, dbs, ps, acc, a2, da2, db2, dbs2, ps2, dg, cu_seqlens, chunk_indices, T, NTT,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    NP: tl.constexpr, NP2: tl.constexpr, USE_ACC: tl.constexpr, PAIR: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_d, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    HQ: tl.constexpr = H * G
    i_tg = i_t  # the chunk's row in the per-chunk tensors (varlen: the program's own index)
    _, i_t, bos, T = chunk_bounds(i_b, i_t, T, cu_seqlens, chunk_indices, IS_VARLEN)
    if not IS_VARLEN:
        i_tg = i_b * tl.cdiv(T, BT) + i_t
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D

    b_x = _pair_terms(a, da, b, db, bos, o_t, m_t, i_h, H, G, D, o_d, m_d, BT, BD)
    m_s = m_t & (tl.arange(0, BT) > 0)  # row t reads row t - 1 of the same chunk
    b_bs = load_tile(b, bos, o_t - 1, m_s, i_h, H, D, o_d, m_d).to(tl.float32)
    b_ys = load_tile(dbs, bos, o_t - 1, m_s, i_h, H, D, o_d, m_d).to(tl.float32)
    b_ps = _partial_sums(ps, i_tg, i_h, NTT, H, D, o_d, m_d, NP, BD)
    if PAIR:  # a second gradient of the same gate, with the same b
        b_x += _pair_terms(a2, da2, b, db2, bos, o_t, m_t, i_h, H, G, D, o_d, m_d, BT, BD)
        b_ys += load_tile(dbs2, bos, o_t - 1, m_s, i_h, H, D, o_d, m_d).to(tl.float32)
        b_ps += _partial_sums(ps2, i_tg, i_h, NTT, H, D, o_d, m_d, NP2, BD)
    b_dg = tl.sum(b_x, axis=0)[None, :] - tl.cumsum(b_x, axis=0) + b_x  # reverse, inclusive
    b_dg += tl.cumsum(b_bs * b_ys, axis=0)
    b_dg += b_ps[None, :]
    if USE_ACC:  # another gradient of the same gate, added here instead of by a separate launch
        b_dg += load_tile(acc, bos, o_t, m_t, i_h, H, D, o_d, m_d).to(tl.float32)
    store_tile(dg, b_dg, bos, o_t, m_t, i_h, H, D, o_d, m_d)


def chunk_gate_grad(a, da_nd, b, db_nd, db_state, pairs_skipping, cu_seqlens, chunk_size,
                    out_dtype=torch.float32, acc=None):
    """``dg [B, T, H, D]`` in ``out_dtype`` (accumulated in fp32). ``a``, ``da_nd`` ``[B, T, HQ, D]``; ``b``,
    ``db_nd``, ``db_state`` ``[B, T, H, D]``; ``pairs_skipping [NP, NT_total, H, D]`` fp32 partial sums
    (``chunk_bwd_dh``'s ``hdk`` / ``hdv``). ``acc`` is added to the result: a tensor ``[B, T, H, D]``, or
    the :class:`GateGradTerms` of another gradient of the same gate with the same ``b`` (another pass's),
    summed in the same launch; or None."""
    pair = isinstance(acc, GateGradTerms)
    if pair and acc.b is not b:
        raise ValueError("chunk_gate_grad: paired terms must share b")
    a2, da2, db2, dbs2, ps2 = (acc.a, acc.da_nd, acc.db_nd, acc.db_state, acc.pairs_skipping) if pair else (None,) * 5
    B, T, H, D = b.shape
    HQ = a.shape[2]
    BT = chunk_size
    NT, indices = chunk_grid(cu_seqlens, T, BT)
    NP, NTT = pairs_skipping.shape[:2]
    dg = b.new_empty(B, T, H, D, dtype=out_dtype)
    BD = min(64 if BT <= 64 else 32, next_pow2(D))
    chunk_gate_grad_kernel[(cdiv(D, BD), NT, B * H)](
        a, da_nd, b, db_nd, db_state, pairs_skipping, None if pair else acc, a2, da2, db2, dbs2, ps2, dg,
        cu_seqlens, indices, T, NTT, H=H, G=HQ // H, D=D, BT=BT, BD=BD, NP=NP,
        NP2=ps2.shape[0] if pair else 0, USE_ACC=acc is not None and not pair, PAIR=pair,
        IS_VARLEN=cu_seqlens is not None, num_warps=4,
    )
    return dg
