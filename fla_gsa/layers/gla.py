"""Gated Linear Attention layer (Yang et al., 2024), as in flash-linear-attention.

    q, k, v = W_q x, W_k x, W_v x
    gk = logsigmoid(W_gk2 W_gk1 x + b) / τ           (low-rank forget gate on the key side, τ = 16)
    o  = GLA(q, k, v, gk)                            S_t = Diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ
    y  = W_o · (RMSNorm(o) ⊙ swish(W_g x))           (output gate, per head)
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from fla_gsa.layers.base import RecurrentLayer
from fla_gsa.layers.utils import check_mode, check_positive_int, resolve_heads
from fla_gsa.modules import FusedRMSNormGated
from fla_gsa.ops import chunk_gla, fused_recurrent_gla
from fla_gsa.ops.utils.checks import check_checkpoint_level


class GatedLinearAttention(RecurrentLayer):
    """Gated linear attention with a data-dependent, low-rank forget gate and an output gate.

    Args:
        hidden_size: ``D``.
        num_heads: query heads ``HQ``.
        num_kv_heads: key/value heads ``H`` (GQA inside the op); default ``num_heads``.
        head_dim: ``K = V`` per head; default ``hidden_size // num_heads``.
        gate_logit_normalizer: ``τ`` in ``gk = logsigmoid(·) / τ``.
        gate_low_rank_dim: rank of the forget-gate projection.
        norm_eps: epsilon of the gated output RMSNorm.
        mode: ``"chunk"`` or ``"fused_recurrent"`` (a single token always takes the recurrent step).
        checkpoint_level: of the chunked op in training: 0 (default) keeps the chunk-boundary states for
            the backward, 1 recomputes them there (less memory, a slower backward).
        scale: factor on ``q``; default ``head_dim ** -0.5``.
        attention_bias: biases on ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
        use_short_conv, conv_size, conv_bias: short convolutions on ``q``, ``k``, ``v``.
        layer_idx: the layer's index in the model's cache.

    Shapes: as :class:`fla_gsa.layers.GatedSlotAttention`.

    Example:
        >>> import torch
        >>> from fla_gsa.layers import GatedLinearAttention
        >>> GatedLinearAttention(hidden_size=64, num_heads=4)(torch.randn(2, 10, 64))[0].shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        gate_logit_normalizer: float = 16.0,
        gate_low_rank_dim: int = 16,
        norm_eps: float = 1e-6,
        mode: str = "chunk",
        checkpoint_level: int = 0,
        scale: float | None = None,
        attention_bias: bool = False,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
        **kwargs,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = resolve_heads(hidden_size, num_heads, num_kv_heads, head_dim)
        if not gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be positive, got {gate_logit_normalizer!r}")
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        check_positive_int(gate_low_rank_dim, "gate_low_rank_dim")
        self.mode = check_mode(mode)
        self.checkpoint_level = check_checkpoint_level(checkpoint_level)
        self.scale = scale
        self.layer_idx = layer_idx
        self.use_short_conv = use_short_conv

        H, HQ, K = self.num_kv_heads, self.num_heads, self.head_dim
        self.make_projections(hidden_size, attention_bias, use_short_conv, conv_size, conv_bias)
        self.g_proj = nn.Linear(hidden_size, HQ * K, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, H * K, bias=True))
        self.g_norm = FusedRMSNormGated(K, eps=norm_eps)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, gate_logit_normalizer={self.gate_logit_normalizer}")

    def project(self, x):
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gk_proj(x)]

    def mix(self, xs, initial_state, cu_seqlens, output_final_state):
        q, k, v, gk = (x.unflatten(-1, (-1, self.head_dim)) for x in xs)
        gk = F.logsigmoid(gk.float()) / self.gate_logit_normalizer
        if self.op_mode(q.shape[1]) == "fused_recurrent":
            return fused_recurrent_gla(q, k, v, gk=gk, scale=self.scale, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return chunk_gla(q, k, v, gk, scale=self.scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         checkpoint_level=self.checkpoint_level)

    def output(self, o, x):
        g = self.g_proj(x).unflatten(-1, (-1, self.head_dim))
        return self.o_proj(self.g_norm(o, g).flatten(-2))
