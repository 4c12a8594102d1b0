"""Gated Slot Attention layer (Zhang et al., NeurIPS 2024, §3).

    q = swish(W_q x)   k = swish(W_k x)   v = silu(W_v x)          (per head: K = V = head_dim)
    g = logsigmoid(W_f x) / τ    s = 1 − exp(g)                      (per key/value head: M slots)
    o = GSA(q, k, v, s, g)                                          (chunk_gsa / fused_recurrent_gsa)
    y = W_o · RMSNorm(silu(o))                                      (the norm over each head's V)

The forget gate ``exp(g) = sigmoid(W_f x)^(1/τ)`` and the write ``s = 1 − exp(g)`` are tied: a slot
that forgets little also writes little. τ (``gate_logit_normalizer``, 8) keeps the gates near 1 at
initialization, so memories last for tens of tokens from the start.

Without short convolutions the four input projections run as one matrix product (their weights
concatenated); with them, the convolved parts are joined again. :func:`fla_gsa.ops.gsa.inputs.gsa_inputs`
forms ``q, k, v, s, g`` from that projection in one kernel; the chunked mode hands the projection to
:func:`fla_gsa.ops.chunk_gsa_projected` instead (the same kernel inside the op, whose backward writes the
projection's gradient directly). The output's ``silu`` runs inside the norm's kernels. Under autocast
the projections' weight gradients are formed in fp32 (:mod:`fla_gsa.modules.linear`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fla_gsa.layers.base import RecurrentLayer
from fla_gsa.layers.utils import check_mode, check_positive_int, resolve_heads
from fla_gsa.modules import RMSNorm
from fla_gsa.modules.linear import fused_linear
from fla_gsa.ops.gsa.chunk import chunk_gsa_projected
from fla_gsa.ops.gsa.inputs import gsa_inputs
from fla_gsa.ops.utils.checks import check_checkpoint_level


class GatedSlotAttention(RecurrentLayer):
    """Gated Slot Attention: a bounded memory of ``num_slots`` slots per key/value head, read with a softmax.

    Args:
        hidden_size: ``D``.
        num_heads: query heads ``HQ``.
        num_kv_heads: key/value (and slot) heads ``H``; ``HQ`` must be a multiple (GQA, handled inside
            the op). Default ``num_heads``.
        head_dim: ``K = V`` per head; default ``hidden_size // num_heads``.
        num_slots: ``M`` memory slots per key/value head.
        gate_logit_normalizer: ``τ`` in ``g = logsigmoid(W_f x) / τ``.
        norm_eps: epsilon of the output RMSNorm.
        mode: ``"chunk"`` (training, prefill) or ``"fused_recurrent"``; a single token always takes the
            fused recurrent step.
        checkpoint_level: of the chunked op in training: 0 (default) keeps the chunk-boundary states for
            the backward, 1 recomputes them there (less memory, a slower backward).
        scale: factor on the slot logits ``K̃_t q_t``; default 1, as in the paper's formula and
            flash-linear-attention's layer (``None``: ``head_dim ** -0.5``).
        attention_bias: biases on ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``.
        gate_bias: a bias on ``f_proj`` (set by the Llama conversion to place the initial gates).
        use_short_conv: causal depthwise convolutions (with SiLU) on ``q``, ``k``, ``v`` before the
            feature maps; ``conv_size`` taps, ``conv_bias``.
        layer_idx: the layer's index in the model's cache.

    Shapes:
        ``forward(hidden_states [B, T, D], attention_mask [B, S] = None, past_key_values = None,
        use_cache = False)`` returns ``(output [B, T, D], None, past_key_values)``. ``attention_mask`` is
        1 for tokens, 0 for padding; its last ``T`` columns describe this call's tokens.

    Example:
        >>> import torch
        >>> from fla_gsa.layers import GatedSlotAttention
        >>> layer = GatedSlotAttention(hidden_size=64, num_heads=4, num_kv_heads=2, num_slots=16)
        >>> layer(torch.randn(2, 10, 64))[0].shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        num_slots: int = 64,
        gate_logit_normalizer: float = 8.0,
        norm_eps: float = 1e-6,
        mode: str = "chunk",
        checkpoint_level: int = 0,
        scale: float | None = 1.0,
        attention_bias: bool = False,
        gate_bias: bool = False,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
        **kwargs,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = resolve_heads(hidden_size, num_heads, num_kv_heads, head_dim)
        self.num_slots = check_positive_int(num_slots, "num_slots")
        if not gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be positive, got {gate_logit_normalizer!r}")
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.mode = check_mode(mode)
        self.checkpoint_level = check_checkpoint_level(checkpoint_level)
        self.scale = scale
        self.layer_idx = layer_idx
        self.use_short_conv = use_short_conv

        H, K, M = self.num_kv_heads, self.head_dim, self.num_slots
        self.make_projections(hidden_size, attention_bias, use_short_conv, conv_size, conv_bias)
        self.f_proj = nn.Linear(hidden_size, H * M, bias=gate_bias)
        self.g_norm = RMSNorm(K, eps=norm_eps, activation="silu")

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, num_slots={self.num_slots}, "
                f"gate_logit_normalizer={self.gate_logit_normalizer}")

    def project(self, x):
        linears = (self.q_proj, self.k_proj, self.v_proj, self.f_proj)
        if self.convs is None:  # one product [q' | k' | v' | f], split by gsa_inputs in mix
            return [fused_linear(x, linears)]
        return [lin(x) for lin in linears]

    def mix(self, xs, initial_state, cu_seqlens, output_final_state):
        K, M = self.head_dim, self.num_slots
        # one formula for both paths: with short convolutions the four parts are joined first
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1)
        sizes = tuple(lin.out_features for lin in (self.q_proj, self.k_proj, self.v_proj, self.f_proj))
        if self.op_mode(x.shape[1]) == "chunk":  # the feature maps and gates inside the op (its backward
            # writes the projection's gradient directly)
            return chunk_gsa_projected(x, sizes, K, self.gate_logit_normalizer, scale=self.scale,
                                       initial_state=initial_state, output_final_state=output_final_state,
                                       cu_seqlens=cu_seqlens, checkpoint_level=self.checkpoint_level)
        q, k, v, s, g = gsa_inputs(x, sizes, self.gate_logit_normalizer)
        q, k, v = (t.unflatten(-1, (-1, K)) for t in (q, k, v))
        s, g = s.unflatten(-1, (-1, M)), g.unflatten(-1, (-1, M))
        return self.gsa_op(q, k, v, s, g, initial_state, cu_seqlens, output_final_state)

    def output(self, o, x):
        o = self.g_norm(o)  # RMSNorm(silu(o)), the silu inside the norm's kernels
        return fused_linear(o.flatten(-2), [self.o_proj])
