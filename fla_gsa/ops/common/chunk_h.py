"""Step 1 of the chunked algorithm: the state at every chunk boundary (forward), and the gradient of
the state at every chunk boundary (backward). Both are sequential scans over chunks; the work inside a
chunk is one ``[K, BT] x [BT, V]`` product.

Forward, for chunk n with in-chunk gate cumsums ``Gk``, ``Gv`` and last row ``L``:

    h[n+1] = Diag(e^{Gk_L}) h[n] Diag(e^{Gv_L}) + (k ⊙ e^{Gk_L - Gk})^T (v ⊙ e^{Gv_L - Gv})

Backward (reverse), ``dh[n]`` is the gradient of the state at the *end* of chunk n:

    dh[n-1] = Diag(e^{Gk_L}) dh[n] Diag(e^{Gv_L}) + scale * sum_{query heads of the group} (q ⊙ e^{Gk})^T (do ⊙ e^{Gv})

Every exponent is ``<= 0`` (cumsums of log-gates decrease), so nothing can overflow however strong the
gates are.

Gated Slot Attention's two forward scans, ``k^T s`` and ``s^T v`` against the same decayed slot writes
``s``, also run as one launch (:func:`chunk_fwd_h_slots`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import dot_precision
from fla_gsa.ops.utils.index import prepare_chunk_offsets
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv, load_row, load_tile, next_pow2, seq_bounds, tl_dtype


@triton.jit
def _carry(b, seg, seg_gk, seg_gv, p_seg, o_k, o_v, m_k, m_v, m_kv, o_kv, K: tl.constexpr, V: tl.constexpr,
           USE_GK: tl.constexpr, USE_GV: tl.constexpr):
    """Carry ``b`` over one segment: decay it by the segment's total log-gates, add its own result."""
    if USE_GK:
        b = b * tl.exp(tl.load(seg_gk + p_seg * K + o_k, mask=m_k, other=0))[:, None]
    if USE_GV:
        b = b * tl.exp(tl.load(seg_gv + p_seg * V + o_v, mask=m_v, other=0))[None, :]
    return b + tl.load(seg + p_seg * K * V + o_kv, mask=m_kv, other=0)


@triton.jit
def _store_segment(b, b_tk, b_tv, seg, seg_gk, seg_gv, p_seg, i_k, i_v, o_k, o_v, m_k, m_v, m_kv, o_kv,
                   K: tl.constexpr, V: tl.constexpr, USE_GK: tl.constexpr, USE_GV: tl.constexpr):
    """A REDUCE program's results: the segment's state and its total log-gates (each written once)."""
    tl.store(seg + p_seg * K * V + o_kv, b, mask=m_kv)
    if USE_GK:
        tl.store(seg_gk + p_seg * K + o_k, b_tk, mask=m_k & (o_k * 0 + i_v == 0))
    if USE_GV:
        tl.store(seg_gv + p_seg * V + o_v, b_tv, mask=m_v & (o_v * 0 + i_k == 0))


@triton.jit
def _scan_program(i_nhs, NS, T, cu_seqlens, chunk_offsets, H: tl.constexpr, BT: tl.constexpr,
                  REDUCE: tl.constexpr, FIRST_REDUCED: tl.constexpr, IS_VARLEN: tl.constexpr):
    """A scan program's (sequence-head, segment) from its index along the launch's last axis, and its
    sequence: ``(i_nh, i_s, i_h, bos, T, NT, boh)``, ``boh`` the row of its first chunk in the
    per-chunk tensors. A REDUCE launch covers segments ``FIRST_REDUCED .. FIRST_REDUCED + NS - 2``."""
    if REDUCE:
        i_nh, i_s = i_nhs // (NS - 1), i_nhs % (NS - 1) + FIRST_REDUCED
    else:
        i_nh, i_s = i_nhs // NS, i_nhs % NS
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    NT = tl.cdiv(T, BT)
    if IS_VARLEN:
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        boh = (i_n * NT).to(tl.int64)
    return i_nh, i_s, i_h, bos, T, NT, boh


@lean
@triton.jit
def chunk_fwd_h_kernel(
    k, v, gk, gv, h, h0, ht, seg, seg_gk, seg_gv, cu_seqlens, chunk_offsets, T, NS, L,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, USE_GK: tl.constexpr, USE_GV: tl.constexpr, USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr, SPLIT: tl.constexpr, REDUCE: tl.constexpr, IS_VARLEN: tl.constexpr,
    DECAYED: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    # Program (i_k, i_v, sequence-head, segment i_s) walks chunks [i_s * L, (i_s + 1) * L) of its
    # sequence. REDUCE (segments 0 .. NS-2): from a zero state, keep only the segment's end state and
    # its total log-gates. Otherwise: enter the segment with the state carried over the segments before
    # it (from the REDUCE launch's results), then store the state entering each chunk. One segment
    # (NS = 1, L >= NT): a plain sequential scan.
    i_k, i_v, i_nhs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_nh, i_s, i_h, bos, T, NT, boh = _scan_program(i_nhs, NS, T, cu_seqlens, chunk_offsets, H, BT, REDUCE,
                                                    0, IS_VARLEN)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    b_tk = tl.zeros([BK], dtype=tl.float32)
    b_tv = tl.zeros([BV], dtype=tl.float32)
    if not REDUCE:
        if USE_H0:
            b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0).to(tl.float32)
        if SPLIT:
            for i_p in range(0, i_s):  # the segments before this one: h <- decay * h + their end state
                b_h = _carry(b_h, seg, seg_gk, seg_gv, i_nh.to(tl.int64) * NS + i_p, o_k, o_v, m_k, m_v, m_kv,
                             o_kv, K, V, USE_GK, USE_GV)

    for i_t in range(i_s * L, tl.minimum(i_s * L + L, NT)):
        if not REDUCE:
            tl.store(h + ((boh + i_t) * H + i_h) * K * V + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        last = tl.minimum(i_t * BT + BT, T) - 1
        b_k = load_tile(k, bos, o_t, m_t, i_h, H, K, o_k, m_k).to(tl.float32)  # [BT, BK]
        b_v = load_tile(v, bos, o_t, m_t, i_h, H, V, o_v, m_v).to(tl.float32)  # [BT, BV]
        if USE_GK:
            b_gl = load_row(gk, bos, last, i_h, H, K, o_k, m_k)  # [BK]
            if not DECAYED:
                b_g = load_tile(gk, bos, o_t, m_t, i_h, H, K, o_k, m_k)  # [BT, BK]
                b_k = b_k * tl.where(m_t[:, None], tl.exp(b_gl[None, :] - b_g), 0)
            b_h = b_h * tl.exp(b_gl)[:, None]
            b_tk += b_gl
        if USE_GV:
            b_gl = load_row(gv, bos, last, i_h, H, V, o_v, m_v)  # [BV]
            if not DECAYED:
                b_g = load_tile(gv, bos, o_t, m_t, i_h, H, V, o_v, m_v)  # [BT, BV]
                b_v = b_v * tl.where(m_t[:, None], tl.exp(b_gl[None, :] - b_g), 0)
            b_h = b_h * tl.exp(b_gl)[None, :]
            b_tv += b_gl
        if DECAYED:
            # the chunk's product into a fresh accumulator, then added: written as `b_h += dot`, the
            # compiler makes the running state the product's accumulator, which chains each step's product
            # to the one before. With decayed inputs this form made GSA's forward scans 10-14% faster on an H100
            # (8 x 2048, 4 x 4096, 1 x 16384); with the gates applied here it made GLA's slower.
            b_h = tl.fma(tl.dot(tl.trans(b_k.to(DT)), b_v.to(DT), input_precision=PREC), 1.0, b_h)
        else:
            b_h += tl.dot(tl.trans(b_k.to(DT)), b_v.to(DT), input_precision=PREC)

    if REDUCE:
        _store_segment(b_h, b_tk, b_tv, seg, seg_gk, seg_gv, i_nh.to(tl.int64) * NS + i_s, i_k, i_v, o_k, o_v, m_k,
                       m_v, m_kv, o_kv, K, V, USE_GK, USE_GV)
    elif STORE_HT:
        if i_s == NS - 1:
            tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, b_h.to(ht.dtype.element_ty), mask=m_kv)


@lean
@triton.jit
def chunk_bwd_dh_kernel(
    q, do, gk, gv, dh, dht, dh0, h, hdk, hdv, seg, seg_gk, seg_gv, cu_seqlens, chunk_offsets, scale,
    T, NTT, NS, L,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_GK: tl.constexpr, USE_GV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, STORE_HDK: tl.constexpr, STORE_HDV: tl.constexpr,
    SPLIT: tl.constexpr, REDUCE: tl.constexpr, IS_VARLEN: tl.constexpr, DECAYED: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    # Segments as in chunk_fwd_h_kernel, walked in reverse. REDUCE (segments 1 .. NS-1): the gradient
    # that the segment's chunks alone send to the state entering it, and the segment's total
    # log-gates. Otherwise: enter from the end with what the later segments send, then store each
    # chunk's dh.
    i_k, i_v, i_nhs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_nh, i_s, i_h, bos, T, NT, boh = _scan_program(i_nhs, NS, T, cu_seqlens, chunk_offsets, H, BT, REDUCE,
                                                    1, IS_VARLEN)
    HQ: tl.constexpr = H * G

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    b_tk = tl.zeros([BK], dtype=tl.float32)
    b_tv = tl.zeros([BV], dtype=tl.float32)
    if not REDUCE:
        if USE_DHT:
            b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0).to(tl.float32)
        if SPLIT:
            for i_p in range(0, NS - 1 - i_s):  # the segments after this one, last first
                b_dh = _carry(b_dh, seg, seg_gk, seg_gv, i_nh.to(tl.int64) * NS + NS - 1 - i_p, o_k, o_v, m_k,
                              m_v, m_kv, o_kv, K, V, USE_GK, USE_GV)

    t_end = tl.minimum(i_s * L + L, NT)
    for i in range(0, t_end - i_s * L):
        i_t = t_end - 1 - i
        if not REDUCE:
            tl.store(dh + ((boh + i_t) * H + i_h) * K * V + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        last = tl.minimum(i_t * BT + BT, T) - 1
        if USE_GK:
            if not DECAYED:
                b_gk = load_tile(gk, bos, o_t, m_t, i_h, H, K, o_k, m_k)  # [BT, BK]
            b_gl = load_row(gk, bos, last, i_h, H, K, o_k, m_k)
            b_dh = b_dh * tl.exp(b_gl)[:, None]
            b_tk += b_gl
        if USE_GV:
            if not DECAYED:
                b_gv = load_tile(gv, bos, o_t, m_t, i_h, H, V, o_v, m_v)  # [BT, BV]
            b_gl = load_row(gv, bos, last, i_h, H, V, o_v, m_v)
            b_dh = b_dh * tl.exp(b_gl)[None, :]
            b_tv += b_gl
        if not REDUCE and (STORE_HDK or STORE_HDV):
            # the gate gradients' pairs skipping chunk n: <e^{Gk_L} h[n] e^{Gv_L}, dh[n]>, here the decayed
            # dh[n] times h[n], summed over this program's V block (dgk) or K block (dgv)
            p_hd = (boh + i_t) * H + i_h
            b_hd = tl.load(h + p_hd * K * V + o_kv, mask=m_kv, other=0).to(tl.float32) * b_dh
            if STORE_HDK:
                tl.store(hdk + (i_v * NTT * H + p_hd) * K + o_k, tl.sum(b_hd, 1), mask=m_k)
            if STORE_HDV:
                tl.store(hdv + (i_k * NTT * H + p_hd) * V + o_v, tl.sum(b_hd, 0), mask=m_v)
        b_acc = tl.zeros([BK, BV], dtype=tl.float32)
        for i_g in range(0, G):
            i_hq = i_h * G + i_g
            b_q = load_tile(q, bos, o_t, m_t, i_hq, HQ, K, o_k, m_k).to(tl.float32)  # [BT, BK]
            b_do = load_tile(do, bos, o_t, m_t, i_hq, HQ, V, o_v, m_v).to(tl.float32)  # [BT, BV]
            if USE_GK and not DECAYED:
                b_q = b_q * tl.exp(b_gk)
            if USE_GV and not DECAYED:
                b_do = b_do * tl.exp(b_gv)
            b_acc += tl.dot(tl.trans(b_q.to(DT)), b_do.to(DT), input_precision=PREC)
        b_dh += scale * b_acc

    if REDUCE:
        _store_segment(b_dh, b_tk, b_tv, seg, seg_gk, seg_gv, i_nh.to(tl.int64) * NS + i_s, i_k, i_v, o_k, o_v, m_k,
                       m_v, m_kv, o_kv, K, V, USE_GK, USE_GV)
    elif STORE_DH0:
        if i_s == 0:
            tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_kv, b_dh.to(dh0.dtype.element_ty), mask=m_kv)


@triton.jit
def _slot_scan(x, s, g, h, h0, ht, seg, seg_g, i_f, i_m, i_nh, i_h, i_s, bos, T, NT, boh, NS, L,
               H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, ROW0: tl.constexpr, DKV: tl.constexpr,
               BT: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, SLOTS_FIRST: tl.constexpr,
               USE_H0: tl.constexpr, STORE_HT: tl.constexpr, SPLIT: tl.constexpr, REDUCE: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr):
    """One program of :func:`chunk_fwd_h_slots_kernel`: the ``[BD, BM]`` tile ``x^T s`` of one pass's
    state, held as (feature, slot) and stored as ``[D, M]`` or, ``SLOTS_FIRST``, as ``[M, D]``."""
    o_f = i_f * BD + tl.arange(0, BD)
    o_m = i_m * BM + tl.arange(0, BM)
    m_f, m_m = o_f < D, o_m < M
    m_fm = m_f[:, None] & m_m[None, :]
    if SLOTS_FIRST:
        o_h = o_m[None, :] * D + o_f[:, None]
    else:
        o_h = o_f[:, None] * M + o_m[None, :]
    o_seg = (ROW0 + o_f)[:, None] * M + o_m[None, :]  # this pass's rows of a segment's [K + V, M] result

    b_h = tl.zeros([BD, BM], dtype=tl.float32)
    b_t = tl.zeros([BM], dtype=tl.float32)
    if not REDUCE:
        if USE_H0:
            b_h += tl.load(h0 + i_nh.to(tl.int64) * D * M + o_h, mask=m_fm, other=0).to(tl.float32)
        if SPLIT:
            for i_p in range(0, i_s):  # the segments before this one: h <- decay * h + their end state
                b_h = _carry(b_h, seg, None, seg_g, i_nh.to(tl.int64) * NS + i_p, ROW0 + o_f, o_m, m_f, m_m, m_fm,
                             o_seg, DKV, M, False, True)

    for i_t in range(i_s * L, tl.minimum(i_s * L + L, NT)):
        if not REDUCE:
            tl.store(h + ((boh + i_t) * H + i_h) * D * M + o_h, b_h.to(h.dtype.element_ty), mask=m_fm)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_x = load_tile(x, bos, o_t, m_t, i_h, H, D, o_f, m_f)  # [BT, BD]
        b_s = load_tile(s, bos, o_t, m_t, i_h, H, M, o_m, m_m)  # [BT, BM], decayed to the chunk's end
        b_gl = load_row(g, bos, tl.minimum(i_t * BT + BT, T) - 1, i_h, H, M, o_m, m_m)  # [BM]
        b_h = b_h * tl.exp(b_gl)[None, :]
        b_t += b_gl
        # a fresh accumulator, then added (as chunk_fwd_h_kernel's decayed scans)
        b_h = tl.fma(tl.dot(tl.trans(b_x.to(DT)), b_s.to(DT), input_precision=PREC), 1.0, b_h)

    if REDUCE:
        # the segment's total log-gates are stored once, by the first feature block of the first pass
        _store_segment(b_h, b_t, b_t, seg, None, seg_g, i_nh.to(tl.int64) * NS + i_s, ROW0 + i_f, 0, ROW0 + o_f,
                       o_m, m_f, m_m, m_fm, o_seg, DKV, M, False, True)
    elif STORE_HT:
        if i_s == NS - 1:
            tl.store(ht + i_nh.to(tl.int64) * D * M + o_h, b_h.to(ht.dtype.element_ty), mask=m_fm)


@lean
@triton.jit
def chunk_fwd_h_slots_kernel(
    k, v, s, g, hk, hv, hk0, hv0, hkt, hvt, seg, seg_g, cu_seqlens, chunk_offsets, T, NS, L,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, NDK: tl.constexpr, USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr, SPLIT: tl.constexpr, REDUCE: tl.constexpr, IS_VARLEN: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    # GSA's two forward scans in one launch. Programs (i_f < NDK) take feature block i_f of pass K's
    # state k^T s ([K, M]); the others block i_f - NDK of pass V's s^T v ([M, V]), held transposed as
    # v^T s. Both read the same decayed slot writes s and slot-gate rows, so the programs of one chunk
    # (adjacent along axis 0) share those tiles in L2. Segments as in chunk_fwd_h_kernel.
    i_f, i_m, i_nhs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_nh, i_s, i_h, bos, T, NT, boh = _scan_program(i_nhs, NS, T, cu_seqlens, chunk_offsets, H, BT, REDUCE,
                                                    0, IS_VARLEN)
    if i_f < NDK:
        _slot_scan(k, s, g, hk, hk0, hkt, seg, seg_g, i_f, i_m, i_nh, i_h, i_s, bos, T, NT, boh, NS, L, H, K, M,
                   0, K + V, BT, BDK, BM, False, USE_H0, STORE_HT, SPLIT, REDUCE, DT, PREC)
    else:
        _slot_scan(v, s, g, hv, hv0, hvt, seg, seg_g, i_f - NDK, i_m, i_nh, i_h, i_s, bos, T, NT, boh, NS, L, H,
                   V, M, K, K + V, BT, BDV, BM, True, USE_H0, STORE_HT, SPLIT, REDUCE, DT, PREC)


# A scan program walks its chunks one after another, so a launch with few programs is bound by the
# latency of each step. With 64 x 64 state tiles, fixed-length inputs that give fewer than
# SEGMENT_BELOW programs split each sequence into segments of at least MIN_SEGMENT_CHUNKS chunks (two
# launches: each segment's own end state, then every segment's scan from the carried state), up to
# about MIN_SCAN_PROGRAMS programs. The extra launch reads the inputs once more, which pays only while
# the scan is latency-bound: on an H100, GSA's passes at 1 x 16384 (32 programs; 8 segments made the
# forward 25% faster) but not GLA's (K = 256, V = 512) at 1 x 16384 (128 programs; 2 or 4 segments
# were 15% slower than smaller tiles). Otherwise, and for varlen inputs, the state tiles shrink from
# 64 toward 32 until there are MIN_SCAN_PROGRAMS programs (about two per SM).
MIN_SCAN_PROGRAMS = 256
SEGMENT_BELOW = 128
MIN_SEGMENT_CHUNKS = 8
MAX_SEGMENTS = 16
# Launch settings by the number of scan programs. Few programs (about two per SM or fewer): deep
# prefetch of the next chunks' tiles, and 8 warps forward. Many: fewer pipeline stages, so more programs
# fit on an SM. Measured on an H100 in bf16, GPU ms of the scans in one forward+backward, by
# (warps, stages): GLA (K=256, V=512) at 8 x 2048, 1024 programs: fwd 0.56 (4, 3), 0.41 (4, 2); bwd
# 0.54 (4, 3), 0.43 (4, 1). At 4 x 4096, 512 programs: fwd 0.47 (8, 3), 0.40 (4, 2); bwd 0.54 (4, 3),
# 0.51 (4, 2). GSA, 256 programs: fwd 0.32 (4, 3), 0.30 (8, 3) at 8 x 2048 and 0.69, 0.60 at 1 x 16384;
# its bwd is best at (4, 3) of the 6 settings tried.
MANY_SCAN_PROGRAMS = 512


# GSA's paired forward scans (chunk_fwd_h_slots_kernel), GPU ms of the launch per forward on an H100 by
# (warps, stages): 8 x 2048 (512 programs) 0.134 (4, 2), 0.116 (8, 3), 0.114 (4, 3), 0.104 (4, 1); 4 x 4096
# (256) 0.132 (4, 2), 0.116 (8, 3), 0.114 (4, 3), 0.129 (4, 1); 1 x 16384 (8 segments of 64 programs, both
# launches alike) 0.196 (4, 2), 0.176 (8, 3), 0.170 (4, 3), 0.162 (4, 1).
def slot_scan_launch(programs: int) -> dict:
    """``num_warps`` and ``num_stages`` of a ``chunk_fwd_h_slots_kernel`` launch of ``programs`` programs."""
    return dict(num_warps=4, num_stages=1 if programs >= MANY_SCAN_PROGRAMS else 3)


def scan_launch(programs: int, forward: bool) -> dict:
    """``num_warps`` and ``num_stages`` of a scan launch of ``programs`` programs."""
    if programs >= 2 * MANY_SCAN_PROGRAMS:
        return dict(num_warps=4, num_stages=2 if forward else 1)
    if programs >= MANY_SCAN_PROGRAMS:
        return dict(num_warps=4, num_stages=2)
    return dict(num_warps=8 if forward else 4, num_stages=3)


# Scans whose gated inputs come decayed (``decayed=True``) read one half-precision tile per input and
# take no exponentials, so a program's step is shorter and its pipeline stages smaller. They keep 64 x 64
# tiles (smaller ones made every GSA shape slower: more programs re-read the shared slot columns) and
# split into NS >= 4 segments where that leaves at most DECAYED_SCAN_PROGRAMS programs. Two segments never
# pay: the two launches walk NT / NS chunks each, as long as one unsplit scan. Measured on an H100, GSA
# (K = V = 512, M = 64) scans in one forward+backward, GPU ms: 8 x 2048 (256 programs) 0.40 unsplit, 0.50
# with 2 segments, 0.62 with 4; 4 x 4096 (128 programs) 0.57 unsplit, 0.59 with 2, 0.54 with 4, 0.66 with
# 8, and 0.68 with 32-wide tiles; 1 x 16384 (32 programs) 0.63 with 8 segments, 0.91 with 4.
DECAYED_SCAN_PROGRAMS = 512


def scan_plan(K: int, V: int, NH: int, NT: int | None, decayed: bool = False) -> tuple[int, int, int, int]:
    """``(BK, BV, NS, L)`` for a scan over ``NH`` (sequence, head) pairs of ``NT`` chunks each (None:
    varlen, no segments): state tiles ``BK x BV`` and ``NS`` segments of ``L`` chunks. ``decayed``:
    the scan reads pre-decayed inputs (see ``DECAYED_SCAN_PROGRAMS``)."""
    BK, BV = min(64, next_pow2(K)), min(64, next_pow2(V))

    def programs():
        return cdiv(K, BK) * cdiv(V, BV) * NH

    if decayed:
        return (BK, BV, *_decayed_segments(programs(), NT))
    if NT is not None and programs() < SEGMENT_BELOW:
        NS = min(cdiv(MIN_SCAN_PROGRAMS, programs()), NT // MIN_SEGMENT_CHUNKS, MAX_SEGMENTS)
        if NS > 1:
            L = cdiv(NT, NS)
            return BK, BV, cdiv(NT, L), L
    while programs() < MIN_SCAN_PROGRAMS and max(BK, BV) > 32:
        if BK >= BV:
            BK //= 2
        else:
            BV //= 2
    return BK, BV, 1, 1 << 30


def _decayed_segments(programs: int, NT: int | None) -> tuple[int, int]:
    """``(NS, L)`` of a decayed scan of ``programs`` programs per segment (see DECAYED_SCAN_PROGRAMS)."""
    NS = 1
    if NT is not None:
        while programs * NS * 2 <= DECAYED_SCAN_PROGRAMS and NS * 2 <= min(NT // MIN_SEGMENT_CHUNKS, MAX_SEGMENTS):
            NS *= 2
    if NS < 4:
        return 1, 1 << 30
    L = cdiv(NT, NS)
    return cdiv(NT, L), L


def _scan_setup(x, cu_seqlens, chunk_size):
    """``(N, NT_total, chunk_offsets, chunks per sequence or None for varlen)``."""
    B, T = x.shape[:2]
    if cu_seqlens is None:
        return B, B * cdiv(T, chunk_size), None, cdiv(T, chunk_size)
    offsets = prepare_chunk_offsets(cu_seqlens, chunk_size)
    return len(cu_seqlens) - 1, int(offsets[-1].item()), offsets, None


def _segment_buffers(x, NH, NS, K, V, gk, gv):
    """fp32 per-segment results of a REDUCE launch: states ``[NH, NS, K, V]`` and total log-gates (all
    None for one segment)."""
    if NS == 1:
        return None, None, None
    seg = x.new_empty(NH, NS, K, V, dtype=torch.float32)
    seg_gk = x.new_empty(NH, NS, K, dtype=torch.float32) if gk is not None else None
    seg_gv = x.new_empty(NH, NS, V, dtype=torch.float32) if gv is not None else None
    return seg, seg_gk, seg_gv


def _launch_scan(kernel, NK, NV, NH, NS, args, meta):
    """The REDUCE launch over segments 0 .. NS-2 (fwd) / 1 .. NS-1 (bwd) if there are several, then the scan."""
    if NS > 1:
        kernel[(NK, NV, NH * (NS - 1))](*args, REDUCE=True, **meta, **_settings(kernel, NK * NV * NH * (NS - 1)))
    kernel[(NK, NV, NH * NS)](*args, REDUCE=False, **meta, **_settings(kernel, NK * NV * NH * NS))


def _settings(kernel, programs):
    if kernel is chunk_fwd_h_slots_kernel:
        return slot_scan_launch(programs)
    return scan_launch(programs, kernel is chunk_fwd_h_kernel)


def chunk_fwd_h(k, v, gk, gv, initial_state, output_final_state, cu_seqlens, chunk_size, compute_dtype,
                states_dtype=None, decayed=False):
    """States entering every chunk, ``h [NT_total, H, K, V]`` (``states_dtype``, default k's dtype;
    chunk ``c`` of sequence ``n`` at row ``chunk_offsets[n] + c``), and the final states ``[N, H, K, V]``
    in fp32 if asked. ``gk``/``gv`` are in-chunk cumsums (``chunk_local_cumsum``) or None.

    ``decayed``: the gated inputs come already multiplied by their decay to the chunk's end (``k ⊙
    e^{Gk_L - Gk}`` for ``gk``, ``v ⊙ e^{Gv_L - Gv}`` for ``gv``, see ``cumsum_fwd(decay=...)``); the
    kernel then reads only the gates' last rows."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N, NT, offsets, NT_seq = _scan_setup(k, cu_seqlens, chunk_size)
    h = k.new_empty(NT, H, K, V, dtype=states_dtype or k.dtype)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    BK, BV, NS, L = scan_plan(K, V, N * H, NT_seq, decayed)
    seg, seg_gk, seg_gv = _segment_buffers(k, N * H, NS, K, V, gk, gv)
    meta = dict(H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, USE_GK=gk is not None, USE_GV=gv is not None,
                USE_H0=initial_state is not None, STORE_HT=output_final_state, SPLIT=NS > 1,
                IS_VARLEN=cu_seqlens is not None, DECAYED=decayed, DT=tl_dtype(compute_dtype),
                PREC=dot_precision(compute_dtype))
    NK, NV = cdiv(K, BK), cdiv(V, BV)
    args = (k, v, gk, gv, h, initial_state, ht, seg, seg_gk, seg_gv, cu_seqlens, offsets, T, NS, L)
    _launch_scan(chunk_fwd_h_kernel, NK, NV, N * H, NS, args, meta)
    return h, ht


def chunk_fwd_h_slots(k, v, s, g, hk0, hv0, output_final_state, cu_seqlens, chunk_size, compute_dtype):
    """Both forward state scans of Gated Slot Attention in one launch (``chunk_fwd_h_slots_kernel``):

        hk[n+1] = hk[n] Diag(e^{G_L}) + k^T sd        hv[n+1] = Diag(e^{G_L}) hv[n] + sd^T v

    for ``k [B, T, H, K]``, ``v [B, T, H, V]``, the slot writes decayed to their chunk's end ``sd [B, T,
    H, M]`` (``cumsum_fwd(g, decay=s)``) and the in-chunk cumsums of the slot gates ``g [B, T, H, M]``
    (only the chunks' last rows are read). Returns the states entering every chunk, ``hk [NT_total, H, K,
    M]`` and ``hv [NT_total, H, M, V]`` in ``compute_dtype``, and the final states (fp32) if asked."""
    B, T, H, K = k.shape
    V, M = v.shape[-1], s.shape[-1]
    N, NT, offsets, NT_seq = _scan_setup(k, cu_seqlens, chunk_size)
    hk = k.new_empty(NT, H, K, M, dtype=compute_dtype)
    hv = k.new_empty(NT, H, M, V, dtype=compute_dtype)
    hkt = k.new_empty(N, H, K, M, dtype=torch.float32) if output_final_state else None
    hvt = k.new_empty(N, H, M, V, dtype=torch.float32) if output_final_state else None
    BDK, BDV, BM = min(64, next_pow2(K)), min(64, next_pow2(V)), min(64, next_pow2(M))
    NDK, NM = cdiv(K, BDK), cdiv(M, BM)
    ND = NDK + cdiv(V, BDV)
    NS, L = _decayed_segments(ND * NM * N * H, NT_seq)
    seg = k.new_empty(N * H, NS, K + V, M, dtype=torch.float32) if NS > 1 else None
    seg_g = k.new_empty(N * H, NS, M, dtype=torch.float32) if NS > 1 else None
    meta = dict(H=H, K=K, V=V, M=M, BT=chunk_size, BDK=BDK, BDV=BDV, BM=BM, NDK=NDK,
                USE_H0=hk0 is not None, STORE_HT=output_final_state, SPLIT=NS > 1,
                IS_VARLEN=cu_seqlens is not None, DT=tl_dtype(compute_dtype), PREC=dot_precision(compute_dtype))
    args = (k, v, s, g, hk, hv, hk0, hv0, hkt, hvt, seg, seg_g, cu_seqlens, offsets, T, NS, L)
    _launch_scan(chunk_fwd_h_slots_kernel, ND, NM, N * H, NS, args, meta)
    return hk, hv, hkt, hvt


def chunk_bwd_dh(q, do, gk, gv, dht, scale, cu_seqlens, chunk_size, H, need_dh0, compute_dtype,
                 states_dtype=None, h=None, need_hdk=False, need_hdv=False, decayed=False):
    """Gradients of the state at the end of every chunk, ``dh [NT_total, H, K, V]``, and of the initial
    state ``dh0 [N, H, K, V]`` (fp32) if ``need_dh0``. ``q``/``do`` have ``HQ = G * H`` heads; the
    group's contributions are summed inside the kernel; products run in ``compute_dtype``.

    With the forward states ``h`` and ``need_hdk`` / ``need_hdv``, also the gate gradients' per-chunk
    term ``<e^{Gk_L} h[n] e^{Gv_L}, dh[n]>`` summed over V (``hdk [NV, NT_total, H, K]``) or over K
    (``hdv [NK, NT_total, H, V]``), fp32, as partial sums over the ``NV`` / ``NK`` column blocks of the
    launch (the gate-gradient kernel adds them up). ``decayed``: the gated inputs come already multiplied
    by their decay from the chunk's start (``q ⊙ e^{Gk}``, ``do ⊙ e^{Gv}``, see ``decay_fwd``); the kernel
    then reads only the gates' last rows. Returns ``(dh, dh0, hdk, hdv)``."""
    B, T, HQ, K = q.shape
    V = do.shape[-1]
    N, NT, offsets, NT_seq = _scan_setup(q, cu_seqlens, chunk_size)
    dh = q.new_empty(NT, H, K, V, dtype=states_dtype or torch.float32)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    BK, BV, NS, L = scan_plan(K, V, N * H, NT_seq, decayed)
    NK, NV = cdiv(K, BK), cdiv(V, BV)
    hdk = q.new_empty(NV, NT, H, K, dtype=torch.float32) if need_hdk else None
    hdv = q.new_empty(NK, NT, H, V, dtype=torch.float32) if need_hdv else None
    seg, seg_gk, seg_gv = _segment_buffers(q, N * H, NS, K, V, gk, gv)
    meta = dict(H=H, G=HQ // H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, USE_GK=gk is not None,
                USE_GV=gv is not None, USE_DHT=dht is not None, STORE_DH0=need_dh0, STORE_HDK=need_hdk,
                STORE_HDV=need_hdv, SPLIT=NS > 1, IS_VARLEN=cu_seqlens is not None, DECAYED=decayed,
                DT=tl_dtype(compute_dtype), PREC=dot_precision(compute_dtype))
    args = (q, do, gk, gv, dh, dht, dh0, h, hdk, hdv, seg, seg_gk, seg_gv, cu_seqlens, offsets, scale, T, NT, NS, L)
    _launch_scan(chunk_bwd_dh_kernel, NK, NV, N * H, NS, args, meta)
    return dh, dh0, hdk, hdv
