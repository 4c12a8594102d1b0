"""Step-by-step reference of generic gated linear attention: the ground truth of the tests.

    S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) + k_t v_t^T        S_t in R^{K x V}, per key/value head
    o_t = scale * S_t^T q_t                                           per query head (GQA: head // G)
"""
from __future__ import annotations

import torch

from fla_gsa.ops.utils.index import seq_bounds


def naive_recurrent_linear_attn(
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
    """Reference loop over time, computed in the inputs' dtype promoted to at least float32 (pass
    float64 tensors for a float64 reference).

    Args:
        q: ``[B, T, HQ, K]``; k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; ``HQ`` a multiple of ``H``.
        gk: ``[B, T, H, K]`` log-gates on the key side (``<= 0``), or None.
        gv: ``[B, T, H, V]`` log-gates on the value side, or None.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``, N = B, or the number of sequences with ``cu_seqlens``.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1).

    Returns:
        ``(o [B, T, HQ, V], final_state [N, H, K, V] or None)``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from fla_gsa.ops import chunk_linear_attn, naive_recurrent_linear_attn
        >>> q, k, v = (torch.randn(1, 20, 2, 8, dtype=torch.float64) for _ in range(3))
        >>> gk = F.logsigmoid(torch.randn(1, 20, 2, 8, dtype=torch.float64))
        >>> ref, _ = naive_recurrent_linear_attn(q, k, v, gk=gk)
        >>> o, _ = chunk_linear_attn(q, k, v, gk=gk)
        >>> torch.allclose(o, ref)
        True
    """
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    G = HQ // H
    scale = K ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    o = torch.zeros(B, T, HQ, V, dtype=dtype, device=q.device)
    finals = []
    for n, (b, bos, eos) in enumerate(seq_bounds(cu_seqlens, B, T)):
        if initial_state is not None:
            S = initial_state[n].to(dtype)
        else:
            S = torch.zeros(H, K, V, dtype=dtype, device=q.device)
        for t in range(bos, eos):
            if gk is not None:
                S = S * gk[b, t].to(dtype).exp()[:, :, None]
            if gv is not None:
                S = S * gv[b, t].to(dtype).exp()[:, None, :]
            S = S + k[b, t].to(dtype)[:, :, None] * v[b, t].to(dtype)[:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t].to(dtype), S.repeat_interleave(G, 0))
        finals.append(S)
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)
