"""GLA in recurrent form: one step at a time with the state in registers (decoding, short inputs)."""
from __future__ import annotations

import torch

from fla_gsa.ops.common.fused_recurrent import fused_recurrent_linear_attn


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    r"""Recurrent GLA with a gate on the key side (``gk``), the value side (``gv``), both or neither.

    Same shapes and returns as :func:`fla_gsa.ops.chunk_gla` (``gk [B, T, H, K]``, ``gv [B, T, H, V]``);
    the two agree to rounding, so a sequence can be prefilled with one and continued with the other.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from fla_gsa.ops import fused_recurrent_gla
        >>> q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 32)
        >>> o, ht = fused_recurrent_gla(q, k, v, gk=F.logsigmoid(torch.randn(1, 8, 2, 16)), output_final_state=True)
        >>> o.shape
        torch.Size([1, 8, 2, 32])
    """
    return fused_recurrent_linear_attn(q, k, v, gk=gk, gv=gv, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens)
