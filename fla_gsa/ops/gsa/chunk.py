"""Gated Slot Attention, chunked: two gated-linear-attention passes joined by a softmax over slots.

    pass K:  ok = GLA(q, k, s; gate g on the state's value side)     state hk [K, M]
             p  = softmax(ok) over the M slots (fp32)
    pass V:  o  = GLA(p, s, v; gate g on the state's key side, scale 1)   state hv [M, V]

Nothing GSA-specific runs below the softmax: both passes are the generic chunked op, and autograd
joins their backward passes through the softmax.
"""
from __future__ import annotations

import torch

from fla_gsa.ops.common.chunk import chunk_linear_attn_unchecked
from fla_gsa.ops.gsa.utils import abc_slot_gates, check_gsa
from fla_gsa.ops.utils.backend import use_kernels
from fla_gsa.ops.utils.checks import check_chunk_size
from fla_gsa.ops.utils.cumsum import cumsum_fwd


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
    # the slot logits stay in fp32 for the softmax (float64 inputs: a float64 reference run)
    logit_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    check_chunk_size(chunk_size)
    # both passes gate with g (value side, then key side): its in-chunk cumsum is taken once
    G = cumsum_fwd(g, chunk_size, cu_seqlens=cu_seqlens) if use_kernels(q, k, v, s, g) else None
    ok, hk = chunk_linear_attn_unchecked(q, k, s, None, g, scale, hk0, output_final_state, cu_seqlens,
                                         chunk_size, logit_dtype, checkpoint_level, G)
    p = ok.softmax(dim=-1)
    o, hv = chunk_linear_attn_unchecked(p, s, v, g, None, 1.0, hv0, output_final_state, cu_seqlens,
                                        chunk_size, v.dtype, checkpoint_level, G)
    return o, ((hk, hv) if output_final_state else None)
