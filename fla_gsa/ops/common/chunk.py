"""The generic chunked gated-linear-attention op: the gate on the key side, the value side, or both.

    S_t = Diag(e^{gk_t}) S_{t-1} Diag(e^{gv_t}) + k_t v_t^T,     o_t = scale * S_t^T q_t

The Triton path composes the steps of the chunked algorithm (one file each):

    forward:  G = chunk_local_cumsum(g)                      (utils/cumsum.py)
              h = chunk_fwd_h(k, v, Gk, Gv)                   (chunk_h.py)     states at chunk starts
              A = chunk_scores(q, k, Gk)                      (chunk_scores.py) intra-chunk scores
              o = chunk_apply_lower(q, h, v, A)               (chunk_o.py)
    backward: dh = chunk_bwd_dh(q, do)                        states' gradients at chunk ends
              dA = chunk_scores(do, v, Gv)
              dv = upper(k, dh, do, A)     dq = lower(do, h^T, k, dA)     dk = upper(v, dh^T, q, dA)
              dgk = revcumsum(q ⊙ dq' - k ⊙ dk') + <S_T^-, dS_T>_V    dgv = revcumsum(o' ⊙ do - v ⊙ dv') + <S_T^-, dS_T>_K

Gate gradients. ``G`` enters only through ``q e^{G}``, ``k e^{-G}`` (``o``, ``v`` for the value side) and
the final state, so ``dg_t`` is a reverse cumsum of ``q ⊙ dq - k ⊙ dk``: no kernel of its own. Read as a
sum over pairs (i, j) of the terms of the recurrence, that cumsum leaves exactly the pairs with
``j < t <= i``; every other pair enters twice and cancels. The pairs of weight ``e^0 = 1`` — the diagonal
``i == j`` and (final state, last step) — are O(1) while, with strong gates, the true ``dg`` is tiny
(~e^{-20} for g = -20), so their cancellation in fp32 would leave pure rounding noise. They are therefore
left out of both sides: the kernels also emit ``dq'``, ``dk'``, ``dv'``, ``o'`` without them, and the
scan emits ``S_T^-`` (the final state without ``k_T v_T^T``). Every remaining term has its true size.

CPU tensors run the PyTorch version of the same algorithm in ``chunk_torch.py``.
"""
from __future__ import annotations

import torch

from fla_gsa.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
from fla_gsa.ops.common.chunk_o import chunk_apply_lower, chunk_apply_upper
from fla_gsa.ops.common.chunk_scores import chunk_scores
from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_chunk_size, check_linear_attn
from fla_gsa.ops.utils.cumsum import cumsum_fwd
from fla_gsa.ops.utils.index import prepare_lens


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Operand dtype of the kernels' products: the half-precision dtype among the inputs, if any."""
    for t in tensors:
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.dtype
    return torch.float32


def chunk_fwd(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens, chunk_size, output_dtype,
              gate_grads=False):
    """Forward; with ``gate_grads`` also ``o'`` (o without the diagonal, if there is a value-side gate)
    and ``S_T^-`` (if the final state is returned), which the gate gradients need."""
    cdt = compute_dtype(k, v, q)
    Gk = cumsum_fwd(gk, chunk_size, cu_seqlens=cu_seqlens) if gk is not None else None
    Gv = cumsum_fwd(gv, chunk_size, cu_seqlens=cu_seqlens) if gv is not None else None
    h, ht, ht_minus = chunk_fwd_h(k, v, Gk, Gv, initial_state, output_final_state, cu_seqlens, chunk_size, cdt, cdt,
                                  final_state_minus=gate_grads and output_final_state)
    A = chunk_scores(q, k, Gk, scale, cu_seqlens, chunk_size, cdt)
    o_nd = None
    if gate_grads and gv is not None:
        o, o_nd = chunk_apply_lower(q, Gk, h, v, Gv, A, scale, cu_seqlens, chunk_size, output_dtype, cdt,
                                    no_diag=True)
    else:
        o = chunk_apply_lower(q, Gk, h, v, Gv, A, scale, cu_seqlens, chunk_size, output_dtype, cdt)
    return Gk, Gv, h, A, o, o_nd, ht, ht_minus


def _add_final_state_term(dg, term, cu_seqlens):
    """Add the final-state contribution ``term [N, H, D]`` to every step of its sequence."""
    if cu_seqlens is None:
        return dg + term[:, None]
    return dg + term.repeat_interleave(prepare_lens(cu_seqlens), dim=0)[None]


def _gate_grad(a, da, b, db, ht, dht, reduce_dim, cu_seqlens):
    """``revcumsum(sum_group a ⊙ da - b ⊙ db) + <S_T^-, dS_T>`` for one gate; ``a``/``da`` have the
    query heads, ``b``/``db`` the key/value heads; ``da``/``db`` without the weight-1 pairs."""
    B, T, H, D = b.shape
    x = (a.float() * da.float()).view(B, T, H, -1, D).sum(3) - b.float() * db.float()
    dg = cumsum_fwd(x, None, reverse=True, cu_seqlens=cu_seqlens)
    if dht is not None:
        dg = _add_final_state_term(dg, (ht * dht.float()).sum(reduce_dim), cu_seqlens)
    return dg


def chunk_bwd(q, k, v, Gk, Gv, h, A, o_nd, do, dht, ht_minus, scale, initial_state, cu_seqlens, chunk_size,
              need_dgk, need_dgv):
    H = k.shape[2]
    cdt = compute_dtype(k, v, q)
    if h is None:  # recompute the chunk-boundary states instead of having kept them
        h, _, _ = chunk_fwd_h(k, v, Gk, Gv, initial_state, False, cu_seqlens, chunk_size, cdt, cdt)
    dh, dh0 = chunk_bwd_dh(q, do, Gk, Gv, dht, scale, cu_seqlens, chunk_size, H, initial_state is not None,
                           cdt, cdt)
    dA = chunk_scores(do, v, Gv, scale, cu_seqlens, chunk_size, cdt)
    f32 = torch.float32
    dv = chunk_apply_upper(k, Gk, dh, do, Gv, A, 1.0, cu_seqlens, chunk_size, f32, cdt, no_diag=need_dgv)
    dq = chunk_apply_lower(do, Gv, h, k, Gk, dA, scale, cu_seqlens, chunk_size, f32, cdt, transpose_m=True,
                           no_diag=need_dgk)
    dk = chunk_apply_upper(v, Gv, dh, q, Gk, dA, 1.0, cu_seqlens, chunk_size, f32, cdt, transpose_m=True,
                           no_diag=need_dgk)
    dgk = dgv = None
    if need_dgk:
        (dq, dq_nd), (dk, dk_nd) = dq, dk
        dgk = _gate_grad(q, dq_nd, k, dk_nd, ht_minus, dht, -1, cu_seqlens)
    if need_dgv:
        dv, dv_nd = dv
        dgv = _gate_grad(o_nd, do, v, dv_nd, ht_minus, dht, -2, cu_seqlens)
    return dq, dk, dv, dgk, dgv, dh0


class ChunkLinearAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                output_dtype, checkpoint_level):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        gk = gk.contiguous() if gk is not None else None
        gv = gv.contiguous() if gv is not None else None
        h0 = initial_state.contiguous() if initial_state is not None else None
        need_dgk = gk is not None and ctx.needs_input_grad[3]
        need_dgv = gv is not None and ctx.needs_input_grad[4]
        Gk, Gv, h, A, o, o_nd, ht, ht_minus = chunk_fwd(q, k, v, gk, gv, scale, h0, output_final_state, cu_seqlens,
                                                        chunk_size, output_dtype, need_dgk or need_dgv)
        keep_h = checkpoint_level == 0
        ctx.save_for_backward(q, k, v, Gk, Gv, h if keep_h else None, A, o_nd, ht_minus, h0, cu_seqlens)
        ctx.meta = (scale, chunk_size, need_dgk, need_dgv,
                    [t.dtype if t is not None else None for t in (q, k, v, gk, gv, initial_state)])
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, Gk, Gv, h, A, o_nd, ht_minus, h0, cu_seqlens = ctx.saved_tensors
        scale, chunk_size, need_dgk, need_dgv, dtypes = ctx.meta
        dq, dk, dv, dgk, dgv, dh0 = chunk_bwd(
            q, k, v, Gk, Gv, h, A, o_nd, do.contiguous(), dht.contiguous() if dht is not None else None, ht_minus,
            scale, h0, cu_seqlens, chunk_size, need_dgk, need_dgv)
        grads = [g.to(dt) if g is not None else None for g, dt in zip((dq, dk, dv, dgk, dgv, dh0), dtypes)]
        dq, dk, dv, dgk, dgv, dh0 = grads
        return dq, dk, dv, dgk, dgv, None, dh0, None, None, None, None, None


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    output_dtype: torch.dtype | None = None,
    checkpoint_level: int = 1,
):
    r"""Chunked gated linear attention with the gate on the key side, the value side, or both; the
    primitive that GLA, GSA and ABC are built from.

    .. math::
        S_t = \mathrm{Diag}(e^{gk_t})\, S_{t-1}\, \mathrm{Diag}(e^{gv_t}) + k_t v_t^\top, \qquad
        o_t = \text{scale} \cdot S_t^\top q_t

    Args:
        q: queries ``[B, T, HQ, K]``; ``HQ`` may be a multiple ``G * H`` of the key/value heads (GQA:
            query head ``i`` reads key/value head ``i // G``; nothing is repeated in memory).
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, H, V]``.
        gk: log forget gates on the key side ``[B, T, H, K]`` (``<= 0``), or None.
        gv: log forget gates on the value side ``[B, T, H, V]`` (``<= 0``), or None.
        scale: factor on ``q``; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` state before the first step of each sequence (fp32 advised).
        output_final_state: also return the state after the last step of each sequence.
        cu_seqlens: ``[N + 1]`` int offsets of sequences packed along ``T`` (then ``B == 1``); each
            sequence starts from its own initial state.
        chunk_size: chunk length of the algorithm (a power of two ``>= 16``).
        output_dtype: dtype of ``o``; default ``v.dtype``.
        checkpoint_level: 0 keeps the chunk-boundary states for the backward; 1 (default) recomputes
            them there, saving ``B * ceil(T / chunk_size) * H * K * V`` elements of memory.

    Returns:
        ``(o [B, T, HQ, V], final_state [N, H, K, V] fp32 or None)``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from fla_gsa.ops import chunk_linear_attn
        >>> q, k = torch.randn(2, 100, 4, 32), torch.randn(2, 100, 4, 32)
        >>> v = torch.randn(2, 100, 4, 48)
        >>> gk = F.logsigmoid(torch.randn(2, 100, 4, 32))
        >>> o, ht = chunk_linear_attn(q, k, v, gk=gk, output_final_state=True)
        >>> o.shape, ht.shape
        (torch.Size([2, 100, 4, 48]), torch.Size([2, 4, 32, 48]))
    """
    _, _, _, _, _, _, _, scale = check_linear_attn(q, k, v, gk, gv, scale, initial_state, cu_seqlens)
    return chunk_linear_attn_unchecked(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens,
                                       chunk_size, output_dtype, checkpoint_level)


def chunk_linear_attn_unchecked(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens,
                                chunk_size=64, output_dtype=None, checkpoint_level=1):
    """:func:`chunk_linear_attn` for callers that validated the tensors already (``scale`` resolved)."""
    check_chunk_size(chunk_size)
    if checkpoint_level not in (0, 1):
        raise ValueError(f"checkpoint_level must be 0 or 1, got {checkpoint_level!r}")
    output_dtype = output_dtype or v.dtype
    if use_triton(q):
        return ChunkLinearAttnFunction.apply(q, k, v, gk, gv, scale, initial_state, output_final_state,
                                             cu_seqlens, chunk_size, output_dtype, checkpoint_level)
    from fla_gsa.ops.common.chunk_torch import chunk_linear_attn_torch

    return chunk_linear_attn_torch(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens,
                                   chunk_size, output_dtype)
