"""Reference GSA: the recurrence of the paper, one step at a time, in float."""
from __future__ import annotations

import torch

from fla_gsa.ops.gsa.utils import abc_slot_gates
from fla_gsa.ops.utils.index import seq_bounds


def naive_recurrent_gsa(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Step-by-step GSA in the inputs' dtype promoted to at least float32 (pass float64 tensors for a
    float64 reference). Same arguments and returns as :func:`fla_gsa.ops.chunk_gsa`.

    Per step and key/value head: ``K̃ = Diag(α) K̃ + s k^T``, ``Ṽ = Diag(α) Ṽ + s v^T``,
    ``o = Ṽ^T softmax(scale K̃ q)`` (one softmax per query head). Shapes: ``q [B, T, HQ, K]``,
    ``k [B, T, H, K]``, ``v [B, T, H, V]``, ``s`` and ``g`` ``[B, T, H, M]``, states
    ``(hk [N, H, K, M], hv [N, H, M, V])``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from fla_gsa.ops import chunk_gsa, naive_recurrent_gsa
        >>> q, k, v = (torch.randn(1, 40, 2, 16, dtype=torch.float64) for _ in range(3))
        >>> g = F.logsigmoid(torch.randn(1, 40, 2, 8, dtype=torch.float64))
        >>> ref, _ = naive_recurrent_gsa(q, k, v, 1 - g.exp(), g)
        >>> o, _ = chunk_gsa(q, k, v, 1 - g.exp(), g)
        >>> torch.allclose(o, ref)
        True
    """
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    G = HQ // H
    scale = K ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    if g is None:
        s, g = abc_slot_gates(s.to(dtype), cu_seqlens)
    o = torch.zeros(B, T, HQ, V, dtype=dtype, device=q.device)
    hks, hvs = [], []
    for n, (b, bos, eos) in enumerate(seq_bounds(cu_seqlens, B, T)):
        hk = torch.zeros(H, K, M, dtype=dtype, device=q.device)  # K̃^T per head
        hv = torch.zeros(H, M, V, dtype=dtype, device=q.device)
        if initial_state is not None:
            hk, hv = initial_state[0][n].to(dtype), initial_state[1][n].to(dtype)
        for t in range(bos, eos):
            a = g[b, t].to(dtype).exp()  # [H, M]
            st = s[b, t].to(dtype)
            hk = hk * a[:, None, :] + k[b, t].to(dtype)[:, :, None] * st[:, None, :]
            hv = hv * a[:, :, None] + st[:, :, None] * v[b, t].to(dtype)[:, None, :]
            ok = scale * torch.einsum("hk,hkm->hm", q[b, t].to(dtype), hk.repeat_interleave(G, 0))
            o[b, t] = torch.einsum("hm,hmv->hv", ok.softmax(-1), hv.repeat_interleave(G, 0))
        hks.append(hk)
        hvs.append(hv)
    final = (torch.stack(hks), torch.stack(hvs)) if output_final_state else None
    return o.to(v.dtype), final
