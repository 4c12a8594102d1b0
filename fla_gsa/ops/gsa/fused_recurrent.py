"""Gated Slot Attention, recurrent: the two passes step by step, and a fused one-token decode."""
from __future__ import annotations

import torch

from fla_gsa.ops.common.fused_recurrent import fused_recurrent_linear_attn
from fla_gsa.ops.gsa.decode import gsa_decode_unchecked, plain_decode_args
from fla_gsa.ops.gsa.utils import abc_slot_gates, check_gsa


def fused_recurrent_gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    r"""Gated Slot Attention in recurrent form, for decoding and short inputs.

    Same arguments, shapes and returns as :func:`fla_gsa.ops.chunk_gsa` (without the chunking
    options); the two agree to rounding, so a prompt can be prefilled with ``chunk_gsa`` and continued
    here from its final state. With one token (``T == 1``), a forget gate ``g``, no ``cu_seqlens`` and no
    gradient needed, both passes and the softmax run as one fused kernel
    (:func:`fla_gsa.ops.gsa.decode.fused_gsa_decode`) that never writes into ``initial_state``.

    ABC (``g=None``) normalizes the slot writes over the tokens of *this call*: the running normalizer is
    not part of ``(hk, hv)``, so ABC decoding token by token must go through the chunked op on the whole
    prefix, or keep its own normalizer.

    Args:
        q: queries ``[B, T, HQ, K]`` (``HQ`` a multiple of ``H``: GQA).
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, H, V]``.
        s: slot write weights ``[B, T, H, M]``.
        g: log forget gates of the slots ``[B, T, H, M]`` (``<= 0``), or None for ABC.
        scale: factor on the slot logits; default ``K ** -0.5``.
        initial_state: ``(hk [N, H, K, M], hv [N, H, M, V])`` (fp32), N = B or the number of sequences.
        output_final_state: also return the final ``(hk, hv)`` (fp32).
        cu_seqlens: ``[N + 1]`` int offsets of sequences packed along T (B must be 1).

    Returns:
        ``(o [B, T, HQ, V] in v's dtype, (hk, hv) or None)``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from fla_gsa.ops import chunk_gsa, fused_recurrent_gsa
        >>> B, T, H, K, V, M = 1, 33, 2, 16, 16, 8
        >>> q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
        >>> g = F.logsigmoid(torch.randn(B, T, H, M))
        >>> o, state = chunk_gsa(q[:, :32], k[:, :32], v[:, :32], 1 - g[:, :32].exp(), g[:, :32], output_final_state=True)
        >>> o_last, state = fused_recurrent_gsa(q[:, 32:], k[:, 32:], v[:, 32:], 1 - g[:, 32:].exp(), g[:, 32:],
        ...                                     initial_state=state, output_final_state=True)
        >>> o_last.shape
        torch.Size([1, 1, 2, 16])
    """
    if g is not None and cu_seqlens is None:  # a plain decoding step: checked in a few comparisons
        plain = plain_decode_args(q, k, v, s, g, scale, initial_state)
        if plain is not None:
            o, state = gsa_decode_unchecked(q, k, v, s, g, *plain)
            return o, (state if output_final_state else None)
    _, scale, hk0, hv0 = check_gsa(q, k, v, s, g, scale, initial_state, cu_seqlens)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, s, g, hk0, hv0))
    if q.shape[1] == 1 and g is not None and cu_seqlens is None and not needs_grad:
        o, state = gsa_decode_unchecked(q, k, v, s, g, scale, hk0, hv0)
        return o, (state if output_final_state else None)
    if g is None:
        s, g = abc_slot_gates(s, cu_seqlens)
    ok, hk = fused_recurrent_linear_attn(q, k, s, gv=g, scale=scale, initial_state=hk0,
                                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                         output_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    p = ok.softmax(dim=-1)
    o, hv = fused_recurrent_linear_attn(p, s, v, gk=g, scale=1.0, initial_state=hv0,
                                        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                        output_dtype=v.dtype)
    return o, ((hk, hv) if output_final_state else None)
