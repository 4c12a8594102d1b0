"""GLA (Yang et al., 2024): gated linear attention with a forget gate on the key side."""
from __future__ import annotations

import torch

from fla_gsa.ops.common.chunk import chunk_linear_attn_unchecked
from fla_gsa.ops.utils.checks import check_linear_attn


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    checkpoint_level: int = 1,
):
    r"""Chunked GLA: ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``.

    Args:
        q: ``[B, T, HQ, K]`` (``HQ`` a multiple of ``H`` for GQA).
        k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        g: log forget gates ``[B, T, H, K]`` (``<= 0``, e.g. ``F.logsigmoid(x) / 16``).
        scale: default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``.
        output_final_state: also return the final state ``[N, H, K, V]`` (fp32).
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1).
        chunk_size: chunk length (power of two ``>= 16``).
        checkpoint_level: 1 recomputes chunk states in the backward (less memory), 0 keeps them.

    Returns:
        ``(o [B, T, HQ, V] in v's dtype, final_state or None)``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from fla_gsa.ops import chunk_gla
        >>> q, k, v = torch.randn(1, 50, 2, 16), torch.randn(1, 50, 2, 16), torch.randn(1, 50, 2, 32)
        >>> g = F.logsigmoid(torch.randn(1, 50, 2, 16))
        >>> o, ht = chunk_gla(q, k, v, g, output_final_state=True)
        >>> o.shape, ht.shape
        (torch.Size([1, 50, 2, 32]), torch.Size([1, 2, 16, 32]))
    """
    if g is None:
        raise TypeError("g (the log forget gate [B, T, H, K]) is required for chunk_gla")
    _, _, _, _, _, _, _, scale = check_linear_attn(q, k, v, g, None, scale, initial_state, cu_seqlens, gk_name="g")
    return chunk_linear_attn_unchecked(q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens,
                                       chunk_size, None, checkpoint_level)
