"""Gated Slot Attention, chunked: two gated-linear-attention passes joined by a softmax over slots.

    pass K:  ok = GLA(q, k, s; gate g on the state's value side)     state hk [K, M]
             p  = softmax(ok) over the M slots (fp32)
    pass V:  o  = GLA(p, s, v; gate g on the state's key side, scale 1)   state hv [M, V]

Both passes are the generic chunked algorithm (``fla_gsa.ops.common.chunk``). On the kernel path one
autograd function runs them and fuses their joints: pass K's output kernel stores the softmax of each
row (``M <= FUSED_SOFTMAX_MAX_SLOTS``), pass V's ``dq`` kernel stores the gradient through it, and pass
K's backward adds pass V's gradient of ``s`` into its own kernel's store and sums both passes' gradients
of ``g`` in one launch. With decayed scans (below) both passes' state scans also run as one launch
(``chunk_fwd_h_slots``), and the kernels that make ``p`` and ``dok`` also store them times ``e^G``, the
backward scans' inputs. CPU tensors and float64 compose the PyTorch ops instead.
"""
from __future__ import annotations

import contextlib

import torch

from fla_gsa.ops.common.chunk import ChunkBackward, chunk_fwd, chunk_linear_attn_unchecked, compute_dtype
from fla_gsa.ops.common.chunk_h import chunk_fwd_h_slots
from fla_gsa.ops.gsa.inputs import check_sizes, gsa_gates_bwd, gsa_inputs, gsa_inputs_fwd
from fla_gsa.ops.gsa.utils import abc_slot_gates, check_gsa
from fla_gsa.ops.utils import replay
from fla_gsa.ops.utils.backend import use_kernels
from fla_gsa.ops.utils.checks import check_checkpoint_level, check_chunk_size, check_tensor
from fla_gsa.ops.utils.cumsum import cumsum_fwd
from fla_gsa.ops.utils.launch import join_side_stream, on_side_stream
from fla_gsa.ops.utils.precompile import precompile


# slots up to which one program holds a whole row of slot logits (the fused softmax); more: PyTorch's softmax
FUSED_SOFTMAX_MAX_SLOTS = 256
# The state scans read their gated inputs already decayed, in the compute dtype: s * e^{G_L - G} for
# both passes' forward scans (made by the cumsum launch, one tensor for both), p * e^G and dok * e^G
# for the backward ones (stored beside p and dok by the kernels that make them). Each of the 8-16
# programs that share a chunk's slot columns then reads a half-precision tile instead of that tile and
# its fp32 gates, and takes no exponentials.
# The products are the same: the kernels round the decayed tiles to the compute dtype either way. With
# the scan plan and accumulation that suit such scans (chunk_h), one forward+backward on an H100 (bf16,
# H = 4, K = V = 512, M = 64) took 1.60 / 1.75 / 1.81 ms of GPU time at 8 x 2048 / 4 x 4096 / 1 x 16384,
# against 1.69 / 1.97 / 2.2 ms without.
DECAYED_SCANS = True
# The backward's two state-gradient scans (few programs, latency-bound) run on a side stream beside the
# launches that do not read them (see _gsa_backward).
SIDE_STREAM_SCANS = True


def _forward(ctx, q, k, v, s, g, scale, hk0, hv0, output_final_state, cu_seqlens, chunk_size, checkpoint_level):
    o, hkt, hvt, saved, ctx.meta = _gsa_forward(q, k, v, s, g, scale, hk0, hv0, output_final_state, cu_seqlens,
                                                chunk_size, checkpoint_level, ctx.needs_input_grad[4])
    ctx.save_for_backward(*saved)
    return o, hkt, hvt


def _backward(ctx, do, dhkt, dhvt):
    dq, dk, dv, ds, dg, dhk0, dhv0 = _gsa_backward(ctx.saved_tensors, ctx.meta, do, dhkt, dhvt)
    return dq, dk, dv, ds, dg, None, dhk0, dhv0, None, None, None, None


# a call whose shapes, dtypes and flags were seen before replays the launches it recorded (replay.py)
ChunkGSAFunction = replay.function("ChunkGSAFunction", _forward, _backward)


def _gsa_forward(q, k, v, s, g, scale, hk0, hv0, output_final_state, cu_seqlens, chunk_size, checkpoint_level,
                 need_dg):
    """Both passes forward: ``(o, hkt, hvt, tensors to save, meta)``."""
    q, k, v, s, g = (x.contiguous() for x in (q, k, v, s, g))
    hk0 = hk0.contiguous() if hk0 is not None else None
    hv0 = hv0.contiguous() if hv0 is not None else None
    fuse = s.shape[-1] <= FUSED_SOFTMAX_MAX_SLOTS
    cdt = compute_dtype(k, s, q)
    decayed = DECAYED_SCANS and compute_dtype(s, v) == cdt  # one decayed s serves both passes
    states_k = states_v = pd = None
    if decayed:  # both passes gate with G: taken once, with s decayed to its chunk's end
        G, sd = cumsum_fwd(g, chunk_size, cu_seqlens=cu_seqlens, decay=s, decay_dtype=cdt)
        # both passes' state scans in one launch
        hk, hv, hkt, hvt = chunk_fwd_h_slots(k, v, sd, G, hk0, hv0, output_final_state, cu_seqlens, chunk_size,
                                             cdt)
        states_k, states_v = (hk, hkt), (hv, hvt)
    else:
        G, sd = cumsum_fwd(g, chunk_size, cu_seqlens=cu_seqlens), None
    # pass K, the gate on the value side (the slots); the slot logits and their softmax in fp32, and
    # (decayed) p * e^G for pass V's backward scan
    _, _, hk, Ak, p, ok_nd, hkt, pd = chunk_fwd(q, k, s, None, g, scale, hk0, output_final_state, cu_seqlens,
                                                chunk_size, torch.float32, need_dg, G, softmax=fuse,
                                                decayed_input=sd, states=states_k, decay_out=decayed and fuse)
    if not fuse:
        p = p.softmax(dim=-1)
    # pass V, the gate on the key side
    _, _, hv, Av, o, _, hvt, _ = chunk_fwd(p, s, v, g, None, 1.0, hv0, output_final_state, cu_seqlens,
                                           chunk_size, v.dtype, False, G, decayed_input=sd, states=states_v)
    keep = checkpoint_level == 0
    saved = (q, k, v, s, G, p, hk if keep else None, hv if keep else None, Ak, Av, ok_nd, hk0, hv0, cu_seqlens,
             None if keep else sd, pd)
    return o, hkt, hvt, saved, (scale, chunk_size, fuse, need_dg, g.dtype, decayed, cdt)


def _gsa_backward(saved, meta, do, dhkt, dhvt, silu=None):
    """Both passes backward: ``(dq, dk, dv, ds, dg, dhk0, dhv0)``. ``silu``: where ``q``, ``k``, ``v``
    are ``silu`` of a fused projection's parts, ``{"q": (pre, out), "k": ..., "v": ...}``: their kernels
    store the gradients of those parts into the views ``out`` instead (see ``chunk_bwd``).

    The launches interleave the passes (``ChunkBackward``'s stages): each pass's state-gradient scan runs
    on a side stream (``SIDE_STREAM_SCANS``) beside the launches that do not read it, pass V's ``dq`` (the
    gradient through the softmax, which pass K's scan then reads) and pass K's score gradients and
    ``dq``; the ``dv`` and ``dk`` launches of both passes follow the join."""
    q, k, v, s, G, p, hk, hv, Ak, Av, ok_nd, hk0, hv0, cu_seqlens, sd, pd = saved
    scale, chunk_size, fuse, need_dg, g_dtype, decayed, cdt = meta
    silu = silu or {}
    do = do.contiguous()
    if decayed and hk is None:  # recompute both passes' states, in one launch
        hk, hv, _, _ = chunk_fwd_h_slots(k, v, sd, G, hk0, hv0, False, cu_seqlens, chunk_size, cdt)
    # pass V: gradients of p (through the softmax when fused), s (as keys), v; decayed with a fused
    # softmax also dok * e^G for pass K's backward scan; the terms of g's gradient (key side), which
    # pass K's gate-gradient launch sums with its own
    bv = ChunkBackward(
        p, s, v, G, None, hv, Av, None, do, dhvt.contiguous() if dhvt is not None else None, 1.0, hv0,
        cu_seqlens, chunk_size, need_dg, False, (torch.float32, torch.float32), softmax_q=p if fuse else None,
        decayed_input=sd, decay_dh=decayed, dh_input=pd, decay_dq=decayed and fuse, defer_dg=True,
        silu={"v": silu["v"]} if "v" in silu else None)
    # a scan goes to the side stream only where its stage is the scan alone: the states given (a
    # recomputation there would be read by queries() before the join) and the scan's gated input too
    side = SIDE_STREAM_SCANS and hv is not None and hk is not None and (not decayed or pd is not None)
    with on_side_stream(do) if side else contextlib.nullcontext():
        bv.states()
    dok, dokd = bv.queries()
    if not fuse:
        dok = p * (dok - (p * dok).sum(-1, keepdim=True))
    # pass K: gradients of q, k, s (as values, plus pass V's), g (value side, plus pass V's)
    bk = ChunkBackward(
        q, k, s, None, G, hk, Ak, ok_nd, dok, dhkt.contiguous() if dhkt is not None else None, scale, hk0,
        cu_seqlens, chunk_size, False, need_dg, (g_dtype, g_dtype), decayed_input=sd, decay_dh=decayed,
        dh_input=dokd, silu={n: silu[n] for n in ("q", "k") if n in silu})
    side = side and (not decayed or dokd is not None)
    with on_side_stream(do) if side else contextlib.nullcontext():
        bk.states()
    bk.queries()
    join_side_stream(do)
    _, ds, dv, dg, _, dhv0, _ = bv.rest()
    del hv, bv  # a recomputed hv is freed before pass K's dv and dk
    bk.dv_acc, bk.dg_acc = ds, dg
    dq, dk, ds, _, dg, dhk0, _ = bk.rest()
    dhk0 = dhk0.to(hk0.dtype) if dhk0 is not None else None
    dhv0 = dhv0.to(hv0.dtype) if dhv0 is not None else None
    return dq, dk, dv, ds, dg, dhk0, dhv0


def chunk_gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    checkpoint_level: int = 1,
    chunk_size: int = 64,
):
    r"""Gated Slot Attention (Zhang et al., 2024), chunked form for training and prefill.

    Per key/value head, with ``M`` memory slots and ``α_t = exp(g_t)``::

        K̃_t = Diag(α_t) K̃_{t-1} + s_t k_t^T        Ṽ_t = Diag(α_t) Ṽ_{t-1} + s_t v_t^T
        o_t = Ṽ_t^T softmax(scale * K̃_t q_t)

    Args:
        q: queries ``[B, T, HQ, K]``; ``HQ = G * H`` query heads may share each key/value head (GQA,
            handled inside the op without repeating tensors).
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, H, V]``.
        s: slot write weights ``[B, T, H, M]`` (the GSA layer uses ``1 - exp(g)``).
        g: log forget gates of the slots ``[B, T, H, M]`` (``<= 0``). None means ABC: the writes are
            normalized by a running softmax over time (see :func:`fla_gsa.ops.chunk_abc`).
        scale: factor on the slot logits; default ``K ** -0.5``.
        initial_state: ``(hk [N, H, K, M], hv [N, H, M, V])`` (fp32), N = B or the number of sequences.
        output_final_state: also return the final ``(hk, hv)`` (fp32).
        cu_seqlens: ``[N + 1]`` int offsets of sequences packed along T (B must be 1).
        checkpoint_level: 1 (default) recomputes the chunk-boundary states in the backward, 0 keeps them
            (faster backward, ``2 * B * T / chunk_size * H * M * (K + V)`` more elements of memory).
        chunk_size: chunk length (power of two ``>= 16``).

    Dtypes: ``q, k, v, s, g`` float16, bfloat16 or float32 (float64 runs the PyTorch algorithm, as a
    reference); the kernels accumulate in fp32, the slot softmax is taken in fp32, and the states are fp32.

    Returns:
        ``(o [B, T, HQ, V] in v's dtype, (hk, hv) or None)``.

    Examples:
        Varlen with an initial state per sequence, and GQA (4 query heads on 2 key/value heads):

        >>> import torch, torch.nn.functional as F
        >>> from fla_gsa.ops import chunk_gsa
        >>> cu_seqlens = torch.tensor([0, 30, 100])   # two sequences packed along T, B = 1
        >>> q, k, v = torch.randn(1, 100, 4, 16), torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 16)
        >>> g = F.logsigmoid(torch.randn(1, 100, 2, 8)) / 8
        >>> h0 = (torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 8, 16))   # (hk, hv), one per sequence
        >>> o, (hk, hv) = chunk_gsa(q, k, v, 1 - g.exp(), g, initial_state=h0, output_final_state=True,
        ...                         cu_seqlens=cu_seqlens)
        >>> o.shape, hk.shape
        (torch.Size([1, 100, 4, 16]), torch.Size([2, 2, 16, 8]))

        Batched, with the final states:

        >>> import torch, torch.nn.functional as F
        >>> from fla_gsa.ops import chunk_gsa
        >>> B, T, H, K, V, M = 2, 100, 2, 32, 32, 16
        >>> q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
        >>> g = F.logsigmoid(torch.randn(B, T, H, M)) / 8
        >>> o, (hk, hv) = chunk_gsa(q, k, v, 1 - g.exp(), g, output_final_state=True)
        >>> o.shape, hk.shape, hv.shape
        (torch.Size([2, 100, 2, 32]), torch.Size([2, 2, 32, 16]), torch.Size([2, 2, 16, 32]))
    """
    _, scale, hk0, hv0 = check_gsa(q, k, v, s, g, scale, initial_state, cu_seqlens)
    if g is None:
        s, g = abc_slot_gates(s, cu_seqlens)
    check_chunk_size(chunk_size)
    check_checkpoint_level(checkpoint_level)
    if use_kernels(q, k, v, s, g):
        args = (q, k, v, s, g, scale, hk0, hv0, output_final_state, cu_seqlens, chunk_size, checkpoint_level)
        precompile(ChunkGSAFunction, *args)  # a new combination of shapes: its kernels compile side by side
        o, hk, hv = ChunkGSAFunction.apply(*args)
        return o, ((hk, hv) if output_final_state else None)
    # the slot logits stay in fp32 for the softmax (float64 inputs: a float64 reference run)
    logit_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    ok, hk = chunk_linear_attn_unchecked(q, k, s, None, g, scale, hk0, output_final_state, cu_seqlens,
                                         chunk_size, logit_dtype, checkpoint_level)
    p = ok.softmax(dim=-1)
    o, hv = chunk_linear_attn_unchecked(p, s, v, g, None, 1.0, hv0, output_final_state, cu_seqlens,
                                        chunk_size, v.dtype, checkpoint_level)
    return o, ((hk, hv) if output_final_state else None)


def _parts(x, sizes, heads):
    """``x``'s four parts ``[q' | k' | v' | f]`` as ``[B, T, heads, D]`` views (no copies)."""
    out, start = [], 0
    for d, n in zip(sizes, heads):
        out.append(x[..., start:start + d].unflatten(-1, (n, d // n)))
        start += d
    return out


def _projected_forward(ctx, x, DQ, DK, DV, DF, HQ, H, tau, scale, hk0, hv0, output_final_state, cu_seqlens,
                       chunk_size, checkpoint_level):
    x = x.contiguous()
    B, T, W = x.shape
    sizes, heads = (DQ, DK, DV, DF), (HQ, H, H, H)
    q, k, v, s, g = (t.view(B, T, n, -1) for t, n in zip(gsa_inputs_fwd(x.view(B * T, W), sizes, tau), heads + (H,)))
    o, hkt, hvt, saved, meta = _gsa_forward(q, k, v, s, g, scale, hk0, hv0, output_final_state, cu_seqlens,
                                            chunk_size, checkpoint_level, ctx.needs_input_grad[0])
    ctx.save_for_backward(x, *saved)
    ctx.meta = (meta, tau, sizes, heads)
    return o, hkt, hvt


def _projected_backward(ctx, do, dhkt, dhvt):
    x, *saved = ctx.saved_tensors
    meta, tau, sizes, heads = ctx.meta
    B, T, W = x.shape
    dx = torch.empty_like(x)
    pre, out = _parts(x, sizes, heads), _parts(dx, sizes, heads)
    # the gradient kernels of q, k, v store the gradients of their projections' parts into dx
    _, _, _, ds, dg, dhk0, dhv0 = _gsa_backward(saved, meta, do, dhkt, dhvt,
                                                silu={n: (pre[i], out[i]) for i, n in enumerate("qkv")})
    if dg is None:  # only the initial states need gradients (dx was written, but is not wanted)
        dx = None
    else:
        gsa_gates_bwd(x.view(B * T, W), ds.view(B * T, -1), dg.view(B * T, -1), dx.view(B * T, W), sizes, tau)
    return dx, None, None, None, None, None, None, None, None, dhk0, dhv0, None, None, None, None, None


ChunkGSAProjectedFunction = replay.function("ChunkGSAProjectedFunction", _projected_forward, _projected_backward)


def chunk_gsa_projected(
    x: torch.Tensor,
    sizes: tuple[int, int, int, int],
    head_dim: int,
    gate_logit_normalizer: float = 8.0,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    checkpoint_level: int = 1,
    chunk_size: int = 64,
):
    r"""A GSA layer's token mixing from its fused input projection: :func:`gsa_inputs` then :func:`chunk_gsa`
    as one op.

    The result is ``chunk_gsa(q, k, v, s, g, ...)`` with ``q, k, v, s, g = gsa_inputs(x, sizes, τ)``
    (``q, k, v`` split into heads of ``head_dim``, ``s, g`` into the key/value heads). On the kernel
    path the backward's kernels that make the gradients of ``q``, ``k`` and ``v`` apply ``silu'`` and
    write straight into the projection's gradient, so neither those three gradients nor a second pass
    over ``x`` are made; one small launch adds the gate part.

    Args:
        x: ``[B, T, DQ + DK + DV + DF]``, the projection ``[q' | k' | v' | f]``.
        sizes: ``(DQ, DK, DV, DF)`` = ``(HQ * K, H * K, H * V, H * M)``.
        head_dim: ``K``, the width of a query or key head (``DQ`` and ``DK`` multiples of it).
        gate_logit_normalizer: ``τ`` in ``g = logsigmoid(f) / τ``.
        scale, initial_state, output_final_state, cu_seqlens, checkpoint_level, chunk_size: as in
            :func:`chunk_gsa`.

    Returns:
        ``(o [B, T, HQ, V], (hk, hv) or None)``, as :func:`chunk_gsa`.

    Example:
        >>> import torch
        >>> from fla_gsa.ops import chunk_gsa, chunk_gsa_projected, gsa_inputs
        >>> sizes = (4 * 16, 2 * 16, 2 * 16, 2 * 8)     # HQ = 4, H = 2, K = V = 16, M = 8
        >>> x = torch.randn(2, 50, sum(sizes))
        >>> o, _ = chunk_gsa_projected(x, sizes, head_dim=16)
        >>> q, k, v, s, g = gsa_inputs(x, sizes)
        >>> ref, _ = chunk_gsa(q.unflatten(-1, (4, 16)), k.unflatten(-1, (2, 16)), v.unflatten(-1, (2, 16)),
        ...                    s.unflatten(-1, (2, 8)), g.unflatten(-1, (2, 8)))
        >>> o.shape, bool(torch.allclose(o, ref, atol=1e-5))
        (torch.Size([2, 50, 4, 16]), True)
    """
    sizes, HQ, H = _projected_heads(x, sizes, head_dim)
    q, k, v, f = _parts(x, sizes, (HQ, H, H, H))
    # the checks of chunk_gsa on views of x's parts (the shapes, device and states it will get; f for s and g)
    _, scale, hk0, hv0 = check_gsa(q, k, v, f, f, scale, initial_state, cu_seqlens)
    check_chunk_size(chunk_size)
    check_checkpoint_level(checkpoint_level)
    if use_kernels(x) and x.dtype != torch.float64:
        args = (x, *sizes, HQ, H, float(gate_logit_normalizer), scale, hk0, hv0, output_final_state, cu_seqlens,
                chunk_size, checkpoint_level)
        precompile(ChunkGSAProjectedFunction, *args)
        o, hk, hv = ChunkGSAProjectedFunction.apply(*args)
        return o, ((hk, hv) if output_final_state else None)
    q, k, v, s, g = (t.unflatten(-1, (n, -1)) for t, n in zip(gsa_inputs(x, sizes, gate_logit_normalizer),
                                                               (HQ, H, H, H, H)))
    return chunk_gsa(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens, checkpoint_level,
                     chunk_size)


def _projected_heads(x, sizes, head_dim):
    """``(sizes, HQ, H)`` of :func:`chunk_gsa_projected`'s arguments, checked."""
    check_tensor(x, "x", 3, "[B, T, DQ + DK + DV + DF]")
    sizes = check_sizes(x, sizes, "B, T")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    DQ, DK, DV, DF = sizes
    if DQ % head_dim or DK % head_dim:
        raise ValueError(f"sizes: DQ = {DQ} and DK = {DK} must be multiples of head_dim = {head_dim}")
    HQ, H = DQ // head_dim, DK // head_dim
    if DV % H or DF % H:
        raise ValueError(f"sizes: DV = {DV} and DF = {DF} must be multiples of the key/value heads H = DK / "
                         f"head_dim = {H}")
    return sizes, HQ, H
