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
              dg = chunk_gate_grad(...)                       (chunk_dg.py) chunk by chunk (below)

Gate gradients. With ``S_t^- = Diag(e^{gk_t}) S_{t-1} Diag(e^{gv_t})`` (the state before step t's write)
and ``dS_t`` the gradient of ``S_t``, exactly ``dgk_t = sum_v S_t^- ⊙ dS_t`` and ``dgv_t = sum_k S_t^- ⊙ dS_t``:
a sum over the pairs (i, j), ``j < t <= i``, of a write j and a read i (or the initial / final state). For
t in chunk n they split into four groups, each computed without cancelling large terms:

    pairs skipping the chunk          <e^{Gk_L} h[n] e^{Gv_L}, dh[n]>          one value per chunk (in the dh scan)
    read in chunk, write before it    revcumsum_chunk(q ⊙ dq_state)
    write in chunk, read after it     exclusive cumsum_chunk(k ⊙ dk_state)
    both in the chunk                 revcumsum_chunk(q ⊙ dq_offdiag - k ⊙ dk_offdiag)

(value side: o, do, v, dv in place of q, dq, k, dk). The usual identity, one reverse cumsum of
``q ⊙ dq - k ⊙ dk`` over the whole sequence, is the same sum with every pair after t added and
subtracted again: thousands of weight-~1 pairs with weak gates, and the weight-1 diagonal with strong
ones, whose rounding then swamps the answer (measured: 3e-2 relative in bf16 at T=4096; garbage at
g = -20). Here the only cancellation left is among the off-diagonal pairs of one chunk.

CPU tensors run the PyTorch version of the same algorithm in ``chunk_torch.py``.
"""
from __future__ import annotations

import torch

from fla_gsa.ops.common.chunk_dg import GateGradTerms, chunk_gate_grad
from fla_gsa.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
from fla_gsa.ops.common.chunk_o import chunk_apply_lower, chunk_apply_upper, lower_fuses_scores
from fla_gsa.ops.common.chunk_scores import chunk_scores, scores_buffer
from fla_gsa.ops.utils import replay
from fla_gsa.ops.utils.backend import use_kernels
from fla_gsa.ops.utils.checks import check_checkpoint_level, check_chunk_size, check_linear_attn
from fla_gsa.ops.utils.cumsum import cumsum_fwd, decay_fwd
from fla_gsa.ops.utils.precompile import precompile

# With one gate, the state scans of the Triton path take the gated input already decayed (made by the
# gate's cumsum launch forward, by one small launch backward), as GSA's do (fla_gsa.ops.gsa.chunk). GLA
# (K = 256, V = 512) forward+backward on an H100: 2.15 / 2.12 / 2.31 ms of GPU time at 8 x 2048 / 4 x 4096
# / 1 x 16384, against 2.34 / 2.42 / 2.77 ms without.
DECAYED_SCANS = True


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Operand dtype of the kernels' products: the half-precision dtype among the inputs, if any."""
    for t in tensors:
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.dtype
    return torch.float32


def _scan_inputs(k, v, Gk, decayed_input):
    """``(k, v)`` of a state scan: with one gate, the gated one (``k`` if ``Gk`` is given, else ``v``)
    replaced by ``decayed_input``, its copy decayed to its chunk's end (None: as given)."""
    if decayed_input is None:
        return k, v
    return (decayed_input, v) if Gk is not None else (k, decayed_input)


def chunk_fwd(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens, chunk_size, output_dtype,
              need_dgv=False, G=None, softmax=False, decayed_input=None, states=None, decay_out=False):
    """Forward: ``(Gk, Gv, h, A, o, o_nd, ht, od)``. With ``need_dgv`` also ``o_nd``, ``o`` without its
    diagonal terms (fp32), for the value-side gate gradient. ``G``: the in-chunk cumsum of the one gate
    given, if the caller has it already. ``softmax``: return ``softmax(o)`` over V in place of ``o`` (the
    lower kernel takes it). ``decayed_input`` (one gate): the gated input already decayed to its chunk's
    end, in the compute dtype (``cumsum_fwd(decay=...)``), which the state scan then reads
    (``chunk_fwd_h(decayed=True)``). ``states``: ``(h, ht)`` from the caller's own scan instead.
    ``decay_out`` (a gate on the value side): also ``od = o ⊙ e^{Gv}`` in the compute dtype, the gated
    input of a decayed backward scan whose queries are ``o`` (else None)."""
    cdt = compute_dtype(k, v, q)
    Gk = (G if G is not None else cumsum_fwd(gk, chunk_size, cu_seqlens=cu_seqlens)) if gk is not None else None
    Gv = (G if G is not None else cumsum_fwd(gv, chunk_size, cu_seqlens=cu_seqlens)) if gv is not None else None
    if states is None:
        states = chunk_fwd_h(*_scan_inputs(k, v, Gk, decayed_input), Gk, Gv, initial_state, output_final_state,
                             cu_seqlens, chunk_size, cdt, cdt, decayed=decayed_input is not None)
    h, ht = states
    softmax = True if softmax else None
    # ungated scores (no key-side gate) come from the output kernel itself where it can make them
    fuse = Gk is None and lower_fuses_scores(v.shape[-1], softmax)
    A = scores_buffer(q, chunk_size) if fuse else chunk_scores(q, k, Gk, scale, cu_seqlens, chunk_size, cdt)
    o = chunk_apply_lower(q, Gk, h, v, Gv, A, scale, cu_seqlens, chunk_size, output_dtype, cdt, no_diag=need_dgv,
                          softmax=softmax, decayed_dtype=cdt if decay_out else None, scores_from=k if fuse else None)
    o, o_nd, od = _unpack(o, need_dgv, decay_out)
    return Gk, Gv, h, A, o, o_nd, ht, od


def _unpack(y, no_diag, decayed):
    """``(y, y_nd or None, yd or None)`` from what :func:`chunk_apply_lower` returned."""
    if not (no_diag or decayed):
        return y, None, None
    return y[0], y[1] if no_diag else None, y[-1] if decayed else None


def chunk_bwd(q, k, v, Gk, Gv, h, A, o_nd, do, dht, scale, initial_state, cu_seqlens, chunk_size,
              need_dgk, need_dgv, gate_dtypes=(torch.float32, torch.float32), softmax_q=None, dv_acc=None,
              dg_acc=None, decayed_input=None, decay_dh=False, dh_input=None, decay_dq=False, defer_dg=False,
              silu=None):
    """Gradients ``(dq, dk, dv, dgk, dgv, dh0, dqd)``: ``dq, dk, dv`` in the dtypes of ``q, k, v`` (written
    so by the kernels), ``dgk, dgv`` in ``gate_dtypes``, ``dh0`` fp32. Fusions for a caller that chains
    passes: ``softmax_q`` (with ``q = softmax_q``, a softmax's output) returns the gradient of that
    softmax's input in place of ``dq``; ``dv_acc`` is added to ``dv``, ``dg_acc`` to the one gate gradient
    asked for (a tensor, or another pass's ``GateGradTerms`` of the same gate and ``b``, summed in the
    same launch); ``defer_dg`` returns the gate gradient's ``GateGradTerms`` in place of it, for such a
    later pass; ``decay_dq`` (a gate on the key side) also returns ``dqd = dq ⊙ e^{Gk}`` in the compute
    dtype (else None), the input of the next pass's ``dh_input``. Decayed scans (one gate):
    ``decayed_input`` as in :func:`chunk_fwd`, for recomputing ``h``; ``decay_dh``: the state gradients'
    scan reads the gated one of ``q``, ``do`` times ``e^G`` (``chunk_bwd_dh(decayed=True)``): that is
    ``dh_input`` if the caller has it, else made here (``decay_fwd``, one launch). ``silu``: a dict
    that may map ``"q"``, ``"k"``, ``"v"`` to ``(pre, out)`` where that input is ``silu(pre)`` (``pre``
    a view of a fused projection): its gradient kernel stores the gradient of ``pre`` into the view
    ``out`` instead (returned in its place; see :func:`chunk_apply_lower`). :class:`ChunkBackward` runs
    the same steps one stage at a time."""
    b = ChunkBackward(q, k, v, Gk, Gv, h, A, o_nd, do, dht, scale, initial_state, cu_seqlens, chunk_size,
                      need_dgk, need_dgv, gate_dtypes, softmax_q, dv_acc, dg_acc, decayed_input, decay_dh, dh_input,
                      decay_dq, defer_dg, silu)
    b.states()
    b.queries()
    return b.rest()


class ChunkBackward:
    """:func:`chunk_bwd` (same arguments) in three stages, for a caller that interleaves the launches of
    two passes or runs a stage on a side stream: :meth:`states` (the state gradients' scan),
    :meth:`queries` (the score gradients and ``dq``, which do not read the state gradients) and
    :meth:`rest` (``dv``, ``dk``, the gate gradients; returns what :func:`chunk_bwd` returns).
    ``dv_acc`` and ``dg_acc`` are read by :meth:`rest` and may be set as attributes until then."""

    def __init__(self, q, k, v, Gk, Gv, h, A, o_nd, do, dht, scale, initial_state, cu_seqlens, chunk_size,
                 need_dgk, need_dgv, gate_dtypes=(torch.float32, torch.float32), softmax_q=None, dv_acc=None,
                 dg_acc=None, decayed_input=None, decay_dh=False, dh_input=None, decay_dq=False, defer_dg=False,
                 silu=None):
        if dg_acc is not None and need_dgk and need_dgv:
            raise ValueError("dg_acc goes to one gate gradient; both were asked for")
        self.q, self.k, self.v, self.Gk, self.Gv, self.h, self.A, self.o_nd, self.do = q, k, v, Gk, Gv, h, A, o_nd, do
        self.dht, self.scale, self.initial_state, self.cu_seqlens, self.chunk_size = (dht, scale, initial_state,
                                                                                      cu_seqlens, chunk_size)
        self.need_dgk, self.need_dgv, self.gate_dtypes, self.softmax_q = need_dgk, need_dgv, gate_dtypes, softmax_q
        self.dv_acc, self.dg_acc, self.decayed_input, self.decay_dh = dv_acc, dg_acc, decayed_input, decay_dh
        self.dh_input, self.decay_dq, self.defer_dg, self.silu = dh_input, decay_dq, defer_dg, silu or {}
        self.cdt = compute_dtype(k, v, q)

    def states(self):
        """The chunk-boundary states (recomputed if not kept) and the state gradients' scan."""
        q, k, v, Gk, Gv, cdt = self.q, self.k, self.v, self.Gk, self.Gv, self.cdt
        if self.h is None:  # recompute the chunk-boundary states instead of having kept them
            self.h, _ = chunk_fwd_h(*_scan_inputs(k, v, Gk, self.decayed_input), Gk, Gv, self.initial_state,
                                    False, self.cu_seqlens, self.chunk_size, cdt, cdt,
                                    decayed=self.decayed_input is not None)
        q_in, do_in = q, self.do
        if self.decay_dh:
            dh_input = self.dh_input
            if dh_input is None:
                dh_input = decay_fwd(q, Gk, cdt) if Gk is not None else decay_fwd(self.do, Gv, cdt)
            q_in, do_in = (dh_input, self.do) if Gk is not None else (q, dh_input)
        self.dh, self.dh0, self.hdk, self.hdv = chunk_bwd_dh(
            q_in, do_in, Gk, Gv, self.dht, self.scale, self.cu_seqlens, self.chunk_size, k.shape[2],
            self.initial_state is not None, cdt, cdt, self.h, self.need_dgk, self.need_dgv, decayed=self.decay_dh)

    def queries(self):
        """The score gradients (made by the dq kernel where it can: ungated, see chunk_fwd) and ``dq``."""
        do, k, v, Gk, Gv, cdt = self.do, self.k, self.v, self.Gk, self.Gv, self.cdt
        if self.h is None:
            raise RuntimeError("ChunkBackward.queries needs the states: call states() first, or pass h")
        fuse = Gv is None and lower_fuses_scores(k.shape[-1], self.softmax_q)
        self.dA = (scores_buffer(do, self.chunk_size) if fuse
                   else chunk_scores(do, v, Gv, self.scale, self.cu_seqlens, self.chunk_size, cdt))
        dq = chunk_apply_lower(do, Gv, self.h, k, Gk, self.dA, self.scale, self.cu_seqlens, self.chunk_size,
                               self.q.dtype, cdt, transpose_m=True, no_diag=self.need_dgk, softmax=self.softmax_q,
                               decayed_dtype=cdt if self.decay_dq else None, scores_from=v if fuse else None,
                               silu=self.silu.get("q"))
        self.dq, self.dq_nd, self.dqd = _unpack(dq, self.need_dgk, self.decay_dq)
        return self.dq, self.dqd

    def rest(self):
        """``dv``, ``dk`` and the gate gradients: ``(dq, dk, dv, dgk, dgv, dh0, dqd)``."""
        q, k, v, Gk, Gv, cdt, dh = self.q, self.k, self.v, self.Gk, self.Gv, self.cdt, self.dh
        cu_seqlens, chunk_size = self.cu_seqlens, self.chunk_size
        dv = chunk_apply_upper(k, Gk, dh, self.do, Gv, self.A, 1.0, cu_seqlens, chunk_size, v.dtype, cdt,
                               no_diag=self.need_dgv, acc=self.dv_acc, silu=self.silu.get("v"))
        dk = chunk_apply_upper(v, Gv, dh, q, Gk, self.dA, 1.0, cu_seqlens, chunk_size, k.dtype, cdt,
                               transpose_m=True, no_diag=self.need_dgk, silu=self.silu.get("k"))
        dgk = dgv = None
        if self.need_dgk:
            dk, dk_nd, dk_st = dk
            dgk = GateGradTerms(q, self.dq_nd, k, dk_nd, dk_st, self.hdk)
            if not self.defer_dg:
                dgk = chunk_gate_grad(*dgk, cu_seqlens, chunk_size, self.gate_dtypes[0], self.dg_acc)
        if self.need_dgv:
            dv, dv_nd, dv_st = dv
            dgv = GateGradTerms(self.do, self.o_nd, v, dv_nd, dv_st, self.hdv)
            if not self.defer_dg:
                dgv = chunk_gate_grad(*dgv, cu_seqlens, chunk_size, self.gate_dtypes[1], self.dg_acc)
        return self.dq, dk, dv, dgk, dgv, self.dh0, self.dqd


def _forward(ctx, q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
             output_dtype, checkpoint_level):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gk = gk.contiguous() if gk is not None else None
    gv = gv.contiguous() if gv is not None else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    need_dgk = gk is not None and ctx.needs_input_grad[3]
    need_dgv = gv is not None and ctx.needs_input_grad[4]
    # one gate: its cumsum launch also decays the gated input for the state scans (DECAYED_SCANS)
    decayed = DECAYED_SCANS and (gk is None) != (gv is None)
    G = xd = None
    if decayed:
        G, xd = cumsum_fwd(gk if gk is not None else gv, chunk_size, cu_seqlens=cu_seqlens,
                           decay=k if gk is not None else v, decay_dtype=compute_dtype(k, v, q))
    Gk, Gv, h, A, o, o_nd, ht, _ = chunk_fwd(q, k, v, gk, gv, scale, h0, output_final_state, cu_seqlens,
                                             chunk_size, output_dtype, need_dgv, G, decayed_input=xd)
    keep_h = checkpoint_level == 0
    ctx.save_for_backward(q, k, v, Gk, Gv, h if keep_h else None, A, o_nd, h0, cu_seqlens,
                          None if keep_h else xd)
    ctx.meta = (scale, chunk_size, need_dgk, need_dgv,
                tuple(t.dtype if t is not None else None for t in (q, k, v, gk, gv, initial_state)), decayed)
    return o, ht


def _backward(ctx, do, dht):
    q, k, v, Gk, Gv, h, A, o_nd, h0, cu_seqlens, xd = ctx.saved_tensors
    scale, chunk_size, need_dgk, need_dgv, dtypes, decayed = ctx.meta
    dq, dk, dv, dgk, dgv, dh0, _ = chunk_bwd(
        q, k, v, Gk, Gv, h, A, o_nd, do.contiguous(), dht.contiguous() if dht is not None else None,
        scale, h0, cu_seqlens, chunk_size, need_dgk, need_dgv, dtypes[3:5], decayed_input=xd,
        decay_dh=decayed)
    dh0 = dh0.to(dtypes[5]) if dh0 is not None else None
    return dq, dk, dv, dgk, dgv, None, dh0, None, None, None, None, None


# a call whose shapes, dtypes and flags were seen before replays the launches it recorded (replay.py)
ChunkLinearAttnFunction = replay.function("ChunkLinearAttnFunction", _forward, _backward)


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
    primitive that GLA, GSA and ABC are built from. Per key/value head::

        S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) + k_t v_t^T,      o_t = scale * S_t^T q_t

    Inputs may be float16, bfloat16 or float32 (float64 runs the PyTorch algorithm, a reference); the
    kernels accumulate in fp32.

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
    check_checkpoint_level(checkpoint_level)
    output_dtype = output_dtype or v.dtype
    if use_kernels(q, k, v):
        args = (q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens, chunk_size, output_dtype,
                checkpoint_level)
        precompile(ChunkLinearAttnFunction, *args)  # a new combination of shapes: kernels compile side by side
        return ChunkLinearAttnFunction.apply(*args)
    from fla_gsa.ops.common.chunk_torch import chunk_linear_attn_torch

    return chunk_linear_attn_torch(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens,
                                   chunk_size, output_dtype)
