"""Reference GLA: the generic step-by-step loop with the gate on the key side."""
from __future__ import annotations

from fla_gsa.ops.common.naive import naive_recurrent_linear_attn


def naive_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Float reference loop of GLA (pass float64 tensors for a float64 reference); same arguments and
    returns as :func:`fla_gsa.ops.fused_recurrent_gla`: ``q [B, T, HQ, K]``, ``k [B, T, H, K]``,
    ``v [B, T, H, V]``, ``gk [B, T, H, K]`` / ``gv [B, T, H, V]`` log-gates, state ``[N, H, K, V]``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from fla_gsa.ops import chunk_gla, naive_recurrent_gla
        >>> q, k, v = (torch.randn(1, 30, 2, 16, dtype=torch.float64) for _ in range(3))
        >>> g = F.logsigmoid(torch.randn(1, 30, 2, 16, dtype=torch.float64))
        >>> ref, ref_ht = naive_recurrent_gla(q, k, v, gk=g, output_final_state=True)
        >>> o, ht = chunk_gla(q, k, v, g, output_final_state=True)
        >>> torch.allclose(o, ref), torch.allclose(ht, ref_ht)
        (True, True)
    """
    return naive_recurrent_linear_attn(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens)
