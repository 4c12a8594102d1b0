"""Fused recurrent gated linear attention: one time step after another, the state tile kept in registers.

    S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) + k_t v_t^T        S_t in R^{K x V}, per key/value head
    o_t = scale * S_t^T q_t                                           per query head (GQA: head // G)

Backward, with dS_t = dL/dS_t carried in reverse time from the final-state gradient dht:

    dq_t = scale * S_t do_t                     (forward-time loop, the state recomputed)
    dS_t = scale * sum_group q_t do_t^T + Diag(a_{t+1}) dS_{t+1} Diag(b_{t+1}),   dS_T starts at dht
    dk_t = dS_t v_t,   dv_t = dS_t^T k_t,   dh0 = Diag(a_1) dS_1 Diag(b_1)

and the gate gradients follow from the others, per sequence (revcumsum = reverse cumulative sum in time):

    dgk_t = revcumsum_t(sum_group q * dq - k * dk) + sum_v (S_T * dht)      (last term at every t)
    dgv_t = revcumsum_t(sum_group o * do - v * dv) + sum_k (S_T * dht)

The kernels evaluate it without each step's own write k_t v_t^T (in dq, o, S_T) and without the step's
own terms scale * q_t do_t^T and dht (in dk, dv): those parts cancel exactly, and with strong gates they
dominate, so subtracting them in fp32 would lose the small remainder. The reverse cumulative sum runs
inside the reverse-time kernel.

Every program owns one (key block, value block) tile of one key/value head and walks all ``G`` query heads
of its group at each step, so GQA never materializes repeated k/v/gates and dk/dv come out summed over
the group. Gates enter only as ``exp(g)`` with ``g <= 0`` per step, so nothing can overflow.

CUDA tensors (or any tensor under ``TRITON_INTERPRET=1``) run the Triton kernels; CPU tensors run the same
recurrence in PyTorch, differentiated by autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_kernels
from fla_gsa.ops.utils.checks import check_linear_attn
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv, next_pow2, seq_bounds

# Largest state tile per dimension. Wider K or V is split over programs and the partial sums are
# reduced afterwards (the tests lower it to exercise that path at small sizes).
MAX_BLOCK = 64


@lean
@triton.jit
def fused_recurrent_fwd_kernel(
    q, k, v, gk, gv, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
    USE_GK: tl.constexpr, USE_GV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # o: [B*T, HQ, NK, V] fp32 partial outputs, one per key block.
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    HQ: tl.constexpr = H * G
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    p_q = q + bos * HQ * K + i_h * G * K + o_k
    p_k = k + bos * H * K + i_h * K + o_k
    p_v = v + bos * H * V + i_h * V + o_v
    if USE_GK:
        p_gk = gk + bos * H * K + i_h * K + o_k
    if USE_GV:
        p_gv = gv + bos * H * V + i_h * V + o_v
    p_o = o + (bos * HQ + i_h * G) * NK * V + i_k * V + o_v

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o_h, mask=m_h, other=0).to(tl.float32)
    for _ in range(0, T):
        b_k = tl.load(p_k, mask=m_k, other=0).to(tl.float32)  # [BK]
        b_v = tl.load(p_v, mask=m_v, other=0).to(tl.float32)  # [BV]
        if USE_GK:
            b_h = b_h * tl.exp(tl.load(p_gk, mask=m_k, other=0).to(tl.float32))[:, None]
        if USE_GV:
            b_h = b_h * tl.exp(tl.load(p_gv, mask=m_v, other=0).to(tl.float32))[None, :]
        b_h += b_k[:, None] * b_v[None, :]  # [BK, BV]
        for i_g in tl.static_range(G):
            b_q = tl.load(p_q + i_g * K, mask=m_k, other=0).to(tl.float32) * scale
            tl.store(p_o + i_g * NK * V, tl.sum(b_h * b_q[:, None], 0), mask=m_v)
        p_q += HQ * K
        p_k += H * K
        p_v += H * V
        if USE_GK:
            p_gk += H * K
        if USE_GV:
            p_gv += H * V
        p_o += HQ * NK * V
    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h, mask=m_h)


@lean
@triton.jit
def fused_recurrent_bwd_dq_kernel(
    q, k, v, gk, gv, do, dq, dgk, dgv, h0, dht, cu_seqlens, scale, T,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr,
    USE_GK: tl.constexpr, USE_GV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # Recomputes the state forward in time. dq: [B*T, HQ, NV, K] partials per value block.
    # dgk [B*T, H, NV, K] / dgv [B*T, H, NK, V]: the query-side terms of the gate gradients,
    # sum_group q * dq' and sum_group o' * do, where ' drops the step's own write k_t v_t^T (it cancels
    # against the same term of k * dk and v * dv exactly; leaving it out keeps strong gates accurate).
    # At the last step they also get the final-state term, S'_T * dht summed over the other dimension.
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    HQ: tl.constexpr = H * G
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    p_q = q + bos * HQ * K + i_h * G * K + o_k
    p_k = k + bos * H * K + i_h * K + o_k
    p_v = v + bos * H * V + i_h * V + o_v
    p_do = do + bos * HQ * V + i_h * G * V + o_v
    p_dq = dq + (bos * HQ + i_h * G) * NV * K + i_v * K + o_k
    if USE_GK:
        p_gk = gk + bos * H * K + i_h * K + o_k
        p_dgk = dgk + (bos * H + i_h) * NV * K + i_v * K + o_k
    if USE_GV:
        p_gv = gv + bos * H * V + i_h * V + o_v
        p_dgv = dgv + (bos * H + i_h) * NK * V + i_k * V + o_v
    if USE_FINAL_STATE_GRADIENT:
        b_dht = tl.load(dht + o_h, mask=m_h, other=0).to(tl.float32)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o_h, mask=m_h, other=0).to(tl.float32)
    for i_t in range(0, T):
        b_k = tl.load(p_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0).to(tl.float32)
        if USE_GK:
            b_h = b_h * tl.exp(tl.load(p_gk, mask=m_k, other=0).to(tl.float32))[:, None]
        if USE_GV:
            b_h = b_h * tl.exp(tl.load(p_gv, mask=m_v, other=0).to(tl.float32))[None, :]
        # b_h is S'_t, the state before this step's write
        b_dgk = tl.zeros([BK], dtype=tl.float32)
        b_dgv = tl.zeros([BV], dtype=tl.float32)
        for i_g in tl.static_range(G):
            b_do = tl.load(p_do + i_g * V, mask=m_v, other=0).to(tl.float32)  # [BV]
            b_dqp = tl.sum(b_h * b_do[None, :], 1) * scale  # [BK]
            tl.store(p_dq + i_g * NV * K, b_dqp + b_k * (tl.sum(b_v * b_do) * scale), mask=m_k)
            if USE_GK or USE_GV:
                b_q = tl.load(p_q + i_g * K, mask=m_k, other=0).to(tl.float32)
                if USE_GK:
                    b_dgk += b_q * b_dqp
                if USE_GV:
                    b_dgv += tl.sum(b_h * b_q[:, None], 0) * scale * b_do
        if USE_FINAL_STATE_GRADIENT:
            if i_t == T - 1:
                b_dgk += tl.sum(b_h * b_dht, 1)
                b_dgv += tl.sum(b_h * b_dht, 0)
        if USE_GK:
            tl.store(p_dgk, b_dgk, mask=m_k)
            p_gk += H * K
            p_dgk += H * NV * K
        if USE_GV:
            tl.store(p_dgv, b_dgv, mask=m_v)
            p_gv += H * V
            p_dgv += H * NK * V
        b_h += b_k[:, None] * b_v[None, :]
        p_q += HQ * K
        p_k += H * K
        p_v += H * V
        p_do += HQ * V
        p_dq += HQ * NV * K


@lean
@triton.jit
def fused_recurrent_bwd_dkv_kernel(
    q, k, v, gk, gv, do, dk, dv, dgk, dgv, dht, dh0, cu_seqlens, scale, T,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr,
    USE_GK: tl.constexpr, USE_GV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # Carries dS backwards in time. dk: [B*T, H, NV, K] and dv: [B*T, H, NK, V] partials.
    # dgk / dgv hold the dq kernel's query-side terms; each is replaced by the reverse cumulative sum
    # (over this sequence) of itself minus k * dk' (v * dv'), dk' = dS'_t v_t from the carried part
    # of dS only: the partial gate gradients of this program's tile.
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    HQ: tl.constexpr = H * G
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    eos = bos + T - 1  # last row of the sequence
    p_q = q + eos * HQ * K + i_h * G * K + o_k
    p_k = k + eos * H * K + i_h * K + o_k
    p_v = v + eos * H * V + i_h * V + o_v
    p_do = do + eos * HQ * V + i_h * G * V + o_v
    p_dk = dk + (eos * H + i_h) * NV * K + i_v * K + o_k
    p_dv = dv + (eos * H + i_h) * NK * V + i_k * V + o_v
    if USE_GK:
        p_gk = gk + eos * H * K + i_h * K + o_k
        p_dgk = dgk + (eos * H + i_h) * NV * K + i_v * K + o_k
        b_cgk = tl.zeros([BK], dtype=tl.float32)
    if USE_GV:
        p_gv = gv + eos * H * V + i_h * V + o_v
        p_dgv = dgv + (eos * H + i_h) * NK * V + i_k * V + o_v
        b_cgv = tl.zeros([BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dht = tl.load(dht + o_h, mask=m_h, other=0).to(tl.float32)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)  # dS'_t: the gradient carried from later steps
    for i_t in range(0, T):
        b_k = tl.load(p_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0).to(tl.float32)
        b_dk = tl.sum(b_dh * b_v[None, :], 1)  # [BK]
        b_dv = tl.sum(b_dh * b_k[:, None], 0)  # [BV]
        if USE_GK:
            b_cgk += tl.load(p_dgk, mask=m_k, other=0) - b_k * b_dk
            tl.store(p_dgk, b_cgk, mask=m_k)
        if USE_GV:
            b_cgv += tl.load(p_dgv, mask=m_v, other=0) - b_v * b_dv
            tl.store(p_dgv, b_cgv, mask=m_v)
        # this step's own terms of dS_t: dht (last step only) and scale * q_t do_t^T per query head
        if USE_FINAL_STATE_GRADIENT:
            if i_t == 0:
                b_dh += b_dht
                b_dk += tl.sum(b_dht * b_v[None, :], 1)
                b_dv += tl.sum(b_dht * b_k[:, None], 0)
        for i_g in tl.static_range(G):
            b_q = tl.load(p_q + i_g * K, mask=m_k, other=0).to(tl.float32) * scale
            b_do = tl.load(p_do + i_g * V, mask=m_v, other=0).to(tl.float32)
            b_dh += b_q[:, None] * b_do[None, :]
            b_dk += b_q * tl.sum(b_do * b_v)
            b_dv += b_do * tl.sum(b_q * b_k)
        tl.store(p_dk, b_dk, mask=m_k)
        tl.store(p_dv, b_dv, mask=m_v)
        # Diag(a_t) dS_t Diag(b_t): the gradient carried into step t - 1
        if USE_GK:
            b_dh = b_dh * tl.exp(tl.load(p_gk, mask=m_k, other=0).to(tl.float32))[:, None]
            p_gk -= H * K
            p_dgk -= H * NV * K
        if USE_GV:
            b_dh = b_dh * tl.exp(tl.load(p_gv, mask=m_v, other=0).to(tl.float32))[None, :]
            p_gv -= H * V
            p_dgv -= H * NK * V
        p_q -= HQ * K
        p_k -= H * K
        p_v -= H * V
        p_do -= HQ * V
        p_dk -= H * NV * K
        p_dv -= H * NK * V
    if USE_INITIAL_STATE:
        tl.store(dh0 + o_h, b_dh, mask=m_h)


def _tiles(K: int, V: int) -> dict:
    """State tile sizes, block counts and warps: one warp holds a tile of up to 32 x 32 fp32 values
    (32 per thread), wider tiles get two, so the per-step reductions stay within few warps."""
    BK, BV = min(next_pow2(K), MAX_BLOCK), min(next_pow2(V), MAX_BLOCK)
    return dict(BK=BK, BV=BV, NK=cdiv(K, BK), NV=cdiv(V, BV), num_warps=1 if BK * BV <= 1024 else 2)


def _num_sequences(q, cu_seqlens) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def fused_recurrent_fwd(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens, output_dtype):
    """Launch the forward kernel. Inputs contiguous. Returns ``(o, final_state or None)``."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    N = _num_sequences(q, cu_seqlens)
    tiles = _tiles(K, V)
    NK, NV = tiles.pop("NK"), tiles.pop("NV")
    o = q.new_empty(B, T, HQ, NK, V, dtype=torch.float32)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    fused_recurrent_fwd_kernel[(NV, NK, N * H)](
        q, k, v, gk, gv, o, initial_state, ht, cu_seqlens, scale, T, H=H, G=HQ // H, K=K, V=V, NK=NK,
        USE_GK=gk is not None, USE_GV=gv is not None, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state, IS_VARLEN=cu_seqlens is not None, **tiles,
    )
    return o.sum(3).to(output_dtype), ht


def fused_recurrent_bwd(q, k, v, gk, gv, do, dht, scale, initial_state, cu_seqlens):
    """Launch the backward kernels. Inputs contiguous. Returns fp32 ``(dq, dk, dv, dgk, dgv, dh0)``
    (gate and initial-state gradients None where those inputs are None)."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    N = _num_sequences(q, cu_seqlens)
    tiles = _tiles(K, V)
    NK, NV = tiles["NK"], tiles["NV"]
    flags = dict(H=H, G=HQ // H, K=K, V=V, USE_GK=gk is not None, USE_GV=gv is not None,
                 USE_INITIAL_STATE=initial_state is not None, USE_FINAL_STATE_GRADIENT=dht is not None,
                 IS_VARLEN=cu_seqlens is not None, **tiles)
    grid = (NV, NK, N * H)

    dq = q.new_empty(B, T, HQ, NV, K, dtype=torch.float32)
    dgk = q.new_empty(B, T, H, NV, K, dtype=torch.float32) if gk is not None else None
    dgv = q.new_empty(B, T, H, NK, V, dtype=torch.float32) if gv is not None else None
    # the dq kernel needs dht only for the gate gradients' final-state term
    dq_flags = dict(flags, USE_FINAL_STATE_GRADIENT=dht is not None and (gk is not None or gv is not None))
    fused_recurrent_bwd_dq_kernel[grid](q, k, v, gk, gv, do, dq, dgk, dgv, initial_state, dht, cu_seqlens, scale, T,
                                        **dq_flags)
    dk = q.new_empty(B, T, H, NV, K, dtype=torch.float32)
    dv = q.new_empty(B, T, H, NK, V, dtype=torch.float32)
    dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
    fused_recurrent_bwd_dkv_kernel[grid](q, k, v, gk, gv, do, dk, dv, dgk, dgv, dht, dh0, cu_seqlens, scale, T,
                                         **flags)
    return (dq.sum(3), dk.sum(3), dv.sum(3), dgk.sum(3) if dgk is not None else None,
            dgv.sum(3) if dgv is not None else None, dh0)


class FusedRecurrentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens, output_dtype):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        gk = gk.contiguous() if gk is not None else None
        gv = gv.contiguous() if gv is not None else None
        h0 = initial_state.contiguous() if initial_state is not None else None
        o, ht = fused_recurrent_fwd(q, k, v, gk, gv, scale, h0, output_final_state, cu_seqlens, output_dtype)
        ctx.save_for_backward(q, k, v, gk, gv, h0, cu_seqlens)
        ctx.scale = scale
        ctx.o_shape, ctx.o_dtype = o.shape, o.dtype
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gk, gv, h0, cu_seqlens = ctx.saved_tensors
        if do is None:
            do = q.new_zeros(ctx.o_shape, dtype=ctx.o_dtype)
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dgk, dgv, dh0 = fused_recurrent_bwd(q, k, v, gk, gv, do.contiguous(), dht, ctx.scale, h0,
                                                         cu_seqlens)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                dgk.to(gk.dtype) if gk is not None else None, dgv.to(gv.dtype) if gv is not None else None,
                None, dh0.to(h0.dtype) if h0 is not None else None, None, None, None)


def fused_recurrent_torch(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens, output_dtype):
    """The recurrence in PyTorch (CPU backend): a loop over time, vectorized over sequences and heads,
    differentiated by autograd. Packed sequences are padded at the end with zero inputs and zero
    log-gates, which leave the state unchanged, and unpadded afterwards."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    G = HQ // H
    dtype = torch.promote_types(q.dtype, torch.float32)
    xs = [x.to(dtype) if x is not None else None for x in (q, k, v, gk, gv)]
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        xs = [torch.nn.utils.rnn.pad_sequence([x[0, a:b] for a, b in zip(bounds[:-1], bounds[1:])], batch_first=True)
              if x is not None else None for x in xs]
    q, k, v, gk, gv = xs
    N, L = q.shape[:2]
    S = initial_state.to(dtype) if initial_state is not None else q.new_zeros(N, H, K, V)
    q = q.view(N, L, H, G, K)
    outs = []
    for t in range(L):
        if gk is not None:
            S = S * gk[:, t].exp()[..., :, None]
        if gv is not None:
            S = S * gv[:, t].exp()[..., None, :]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("nhgk,nhkv->nhgv", q[:, t], S))
    o = torch.stack(outs, 1).reshape(N, L, HQ, V) * scale
    if cu_seqlens is not None:
        o = torch.cat([o[n, :b - a] for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]).unsqueeze(0)
    return o.to(output_dtype), (S.to(torch.promote_types(dtype, torch.float32)) if output_final_state else None)


def fused_recurrent_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Gated linear attention computed step by step (the fused recurrent form), gate on the key side,
    the value side, or both. Per key/value head::

        S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) + k_t v_t^T,      o_t = scale * S_t^T q_t

    Differentiable with respect to ``q, k, v, gk, gv`` and ``initial_state``. Best for short sequences
    and decoding; for training on long sequences use the chunked op.

    Args:
        q: queries ``[B, T, HQ, K]``, float16 / bfloat16 / float32 (float64 on CPU).
        k: keys ``[B, T, H, K]``; ``HQ`` must be a multiple of ``H`` (GQA: query head ``i`` reads
            key/value head ``i // (HQ // H)``).
        v: values ``[B, T, H, V]``.
        gk: log forget gates on the key side ``[B, T, H, K]`` (``<= 0``), or None.
        gv: log forget gates on the value side ``[B, T, H, V]`` (``<= 0``), or None.
        scale: factor on the output, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` state before the first step (``N = B``, or the number of
            sequences with ``cu_seqlens``); None means zeros. Never modified.
        output_final_state: also return the state after the last step.
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of sequences packed along T (``B`` must be 1); each
            sequence starts from its own initial state.
        output_dtype: dtype of ``o``, default ``v.dtype``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, HQ, V]`` in ``output_dtype``; ``final_state``
        ``[N, H, K, V]`` float32, or None when ``output_final_state`` is False.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from fla_gsa.ops.common.fused_recurrent import fused_recurrent_linear_attn
        >>> B, T, HQ, H, K, V = 2, 7, 4, 2, 16, 32
        >>> q, k = torch.randn(B, T, HQ, K), torch.randn(B, T, H, K)
        >>> v = torch.randn(B, T, H, V)
        >>> gk = F.logsigmoid(torch.randn(B, T, H, K))
        >>> o, ht = fused_recurrent_linear_attn(q, k, v, gk=gk, output_final_state=True)
        >>> o.shape, ht.shape
        (torch.Size([2, 7, 4, 32]), torch.Size([2, 2, 16, 32]))
    """
    _, _, _, _, _, _, _, scale = check_linear_attn(q, k, v, gk, gv, scale, initial_state, cu_seqlens)
    if output_dtype is None:
        output_dtype = v.dtype
    elif not (isinstance(output_dtype, torch.dtype) and output_dtype.is_floating_point):
        raise TypeError(f"output_dtype must be a floating torch.dtype or None, got {output_dtype!r}")
    if use_kernels(q, k, v):
        return FusedRecurrentFunction.apply(q, k, v, gk, gv, scale, initial_state, bool(output_final_state),
                                            cu_seqlens, output_dtype)
    return fused_recurrent_torch(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens, output_dtype)
