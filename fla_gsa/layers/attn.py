"""Softmax attention with rotary embeddings, GQA and a key/value cache, through PyTorch's
``scaled_dot_product_attention`` (no flash-attn dependency): the baseline, and the layer a hybrid
model mixes with the recurrent ones.

Padding: cached keys carry a mask (``LayerState.kv_mask``), so padded positions are never attended to,
and rotary positions count real tokens only (a left-padded prompt starts at position 0), which makes
a padded sequence give the same outputs as the same sequence alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla_gsa.layers.cache import Cache, LayerState
from fla_gsa.layers.utils import check_layer_input, require_layer_idx, resolve_heads, rotate, token_positions
from fla_gsa.modules import RotaryEmbedding

# enable_gqa arrived in PyTorch 2.5; before it, repeat the key/value heads
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa(q, k, v, mask, is_causal, scale):
    """``q [B, HQ, T, D]``, ``k``/``v`` ``[B, H, S, D]`` with ``HQ = G·H``."""
    G = q.shape[1] // k.shape[1]
    if G > 1 and _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    if G > 1:
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


class Attention(nn.Module):
    """Multi-head softmax attention (causal) with RoPE, grouped-query heads and a KV cache.

    Args:
        hidden_size: ``D``.
        num_heads: query heads ``HQ``.
        num_kv_heads: key/value heads ``H`` (``HQ`` a multiple); default ``num_heads``.
        head_dim: per head; default ``hidden_size // num_heads``.
        rope_theta: rotary base (``None``: no rotary embedding).
        attention_bias: biases on ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``.
        scale: default ``head_dim ** -0.5``.
        layer_idx: the layer's index in the model's cache.

    Shapes: as :class:`fla_gsa.layers.GatedSlotAttention`: ``forward(hidden_states [B, T, D],
    attention_mask [B, S] = None, past_key_values = None, use_cache = False)`` returns
    ``(output [B, T, D], None, past_key_values)``.

    Example:
        >>> import torch
        >>> from fla_gsa.layers import Attention
        >>> Attention(hidden_size=64, num_heads=4, num_kv_heads=2)(torch.randn(2, 10, 64))[0].shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float | None = 10000.0,
        attention_bias: bool = False,
        scale: float | None = None,
        layer_idx: int | None = None,
        **kwargs,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = resolve_heads(hidden_size, num_heads, num_kv_heads, head_dim)
        self.scale = scale
        self.layer_idx = layer_idx
        H, HQ, K = self.num_kv_heads, self.num_heads, self.head_dim
        self.q_proj = nn.Linear(hidden_size, HQ * K, bias=attention_bias)
        self.k_proj = nn.Linear(hidden_size, H * K, bias=attention_bias)
        self.v_proj = nn.Linear(hidden_size, H * K, bias=attention_bias)
        self.o_proj = nn.Linear(HQ * K, hidden_size, bias=attention_bias)
        self.rotary = RotaryEmbedding(K, base=rope_theta) if rope_theta is not None else None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool = False, **kwargs):
        mask = check_layer_input(hidden_states, attention_mask, self.hidden_size)
        require_layer_idx(self, past_key_values, use_cache)
        if use_cache and past_key_values is None:
            past_key_values = Cache()
        state = past_key_values[self.layer_idx] if past_key_values is not None else None
        B, T, _ = hidden_states.shape
        if mask is not None and bool(mask.all()):
            mask = None
        positions, new_positions = token_positions(state, mask, B, T, hidden_states.device)

        K = self.head_dim
        q = self.q_proj(hidden_states).unflatten(-1, (-1, K))
        k = self.k_proj(hidden_states).unflatten(-1, (-1, K))
        v = self.v_proj(hidden_states).unflatten(-1, (-1, K))
        if self.rotary is not None:
            q, k = rotate(self.rotary, q, k, positions)

        past = 0
        kv_mask = None
        if state is not None and state.attn_state is not None:
            past = state.attn_state[0].shape[1]
            k = torch.cat([state.attn_state[0], k], dim=1)
            v = torch.cat([state.attn_state[1], v], dim=1)
            kv_mask = state.kv_mask
        if kv_mask is not None or mask is not None:
            kv_mask = torch.cat([
                kv_mask if kv_mask is not None else hidden_states.new_ones(B, past, dtype=torch.bool),
                mask if mask is not None else hidden_states.new_ones(B, T, dtype=torch.bool)], dim=1)
        S = past + T

        # [B, 1, T, S] boolean mask (True: attend), or SDPA's own causal mask when there is no padding
        attn_mask, is_causal = None, False
        if kv_mask is not None or (past > 0 and T > 1):
            t = torch.arange(T, device=q.device)[:, None] + past
            s = torch.arange(S, device=q.device)[None, :]
            allowed = s <= t  # [T, S]
            if kv_mask is not None:
                # a padded query keeps its own position so that no row is empty; its output is dropped
                allowed = (allowed & kv_mask[:, None, :]) | (s == t)
            attn_mask = allowed if allowed.ndim == 3 else allowed[None]
            attn_mask = attn_mask[:, None]
        elif T > 1:
            is_causal = True
        o = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, is_causal, self.scale)
        o = o.transpose(1, 2)  # [B, T, HQ, K]
        if mask is not None:
            o = o * mask[:, :, None, None]
        out = self.o_proj(o.flatten(-2))

        if use_cache:
            past_key_values[self.layer_idx] = LayerState(
                seen_tokens=(state.seen_tokens if state is not None else 0) + T,
                positions=new_positions, attn_state=(k, v), kv_mask=kv_mask)
        return out, None, past_key_values
