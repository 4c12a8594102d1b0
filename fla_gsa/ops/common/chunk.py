"""The generic chunked gated-linear-attention op (gate on the key side, the value side, or both).

    S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) + k_t v_t^T,     o_t = scale * S_t^T q_t

CUDA tensors (or any tensor under ``TRITON_INTERPRET=1``) run the Triton kernels composed in
``chunk_fwd`` / ``chunk_bwd`` below; CPU tensors run the PyTorch version in ``chunk_torch``.
"""
from __future__ import annotations

import torch

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_chunk_size, check_linear_attn


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
):
    """Chunked gated linear attention, the primitive GLA, GSA and ABC are built from."""
    _, _, _, _, _, _, _, scale = check_linear_attn(q, k, v, gk, gv, scale, initial_state, cu_seqlens)
    check_chunk_size(chunk_size)
    output_dtype = output_dtype or v.dtype
    if use_triton(q):
        raise NotImplementedError("Triton chunk path: in progress")
    from fla_gsa.ops.common.chunk_torch import chunk_linear_attn_torch

    return chunk_linear_attn_torch(q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens,
                                   chunk_size, output_dtype)
