"""Triton kernels for gated linear attention, and GLA, GSA and ABC composed from them.

``from fla_gsa.ops import chunk_gsa`` is the front door."""
from fla_gsa.ops.abc import chunk_abc, fused_recurrent_abc
from fla_gsa.ops.common.chunk import chunk_linear_attn
from fla_gsa.ops.common.fused_recurrent import fused_recurrent_linear_attn
from fla_gsa.ops.common.naive import naive_recurrent_linear_attn
from fla_gsa.ops.gla import chunk_gla, fused_recurrent_gla, naive_recurrent_gla
from fla_gsa.ops.gsa import (chunk_gsa, chunk_gsa_projected, fused_gsa_decode, fused_recurrent_gsa, gsa_inputs,
                             naive_recurrent_gsa)
from fla_gsa.ops.utils import chunk_global_cumsum, chunk_local_cumsum

__all__ = [
    "chunk_linear_attn", "fused_recurrent_linear_attn", "naive_recurrent_linear_attn",
    "chunk_gla", "fused_recurrent_gla", "naive_recurrent_gla",
    "chunk_gsa", "chunk_gsa_projected", "fused_recurrent_gsa", "fused_gsa_decode", "naive_recurrent_gsa",
    "gsa_inputs",
    "chunk_abc", "fused_recurrent_abc",
    "chunk_local_cumsum", "chunk_global_cumsum",
]
