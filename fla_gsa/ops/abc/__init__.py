"""ABC (Peng et al., 2022): GSA without a learned forget gate. The slot writes are normalized by a
running softmax over time, which fixes the gates; there are no kernels of its own."""
from __future__ import annotations

import torch

from fla_gsa.ops.gsa.chunk import chunk_gsa
from fla_gsa.ops.gsa.fused_recurrent import fused_recurrent_gsa


def chunk_abc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, scale: float | None = None,
              initial_state=None, output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
              checkpoint_level: int = 1, chunk_size: int = 64):
    """Chunked ABC: :func:`fla_gsa.ops.chunk_gsa` with ``g=None``.

    ``s [B, T, H, M]`` are slot-write logits; with ``z_t = logcumsumexp_t(s)`` (per sequence) the writes
    are ``exp(s_t - z_t)`` and the forget gates ``z_{t-1} - z_t``. Shapes and returns as ``chunk_gsa``.

    Example:
        >>> import torch
        >>> from fla_gsa.ops import chunk_abc
        >>> q, k, v, s = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 8)
        >>> chunk_abc(q, k, v, s)[0].shape
        torch.Size([1, 40, 2, 16])
    """
    return chunk_gsa(q, k, v, s, None, scale, initial_state, output_final_state, cu_seqlens, checkpoint_level,
                     chunk_size)


def fused_recurrent_abc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                        scale: float | None = None, initial_state=None, output_final_state: bool = False,
                        cu_seqlens: torch.Tensor | None = None):
    """Recurrent ABC: :func:`fla_gsa.ops.fused_recurrent_gsa` with ``g=None`` (the normalizer restarts
    at each call; see there). Shapes and returns as :func:`fla_gsa.ops.chunk_abc`: ``q [B, T, HQ, K]``,
    ``k [B, T, H, K]``, ``v [B, T, H, V]``, slot-write logits ``s [B, T, H, M]``, states
    ``(hk [N, H, K, M], hv [N, H, M, V])``; returns ``(o [B, T, HQ, V], (hk, hv) or None)``.

    Example:
        >>> import torch
        >>> from fla_gsa.ops import chunk_abc, fused_recurrent_abc
        >>> q, k, v, s = (torch.randn(1, 12, 2, 16) for _ in range(4))
        >>> o, _ = fused_recurrent_abc(q, k, v, s)
        >>> torch.allclose(o, chunk_abc(q, k, v, s)[0], atol=1e-5)
        True
    """
    return fused_recurrent_gsa(q, k, v, s, None, scale, initial_state, output_final_state, cu_seqlens)


__all__ = ["chunk_abc", "fused_recurrent_abc"]
