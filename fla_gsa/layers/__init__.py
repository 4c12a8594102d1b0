"""Token mixers with one interface, so a model can put any of them at any depth:

    forward(hidden_states [B, T, D], attention_mask [B, S] = None, past_key_values = None,
            use_cache = False) -> (output [B, T, D], None, past_key_values)

:class:`GatedSlotAttention` (GSA), :class:`GatedLinearAttention` (GLA), :class:`ABCAttention` (ABC) and
softmax :class:`Attention`. Padding (mask 0) never enters a recurrent state: the real tokens are packed
and run through the ops' varlen mode. :class:`Cache` holds every layer's decoding state.
"""
from fla_gsa.layers.abc import ABCAttention
from fla_gsa.layers.attn import Attention
from fla_gsa.layers.cache import Cache, LayerState
from fla_gsa.layers.gla import GatedLinearAttention
from fla_gsa.layers.gsa import GatedSlotAttention

__all__ = ["GatedSlotAttention", "GatedLinearAttention", "ABCAttention", "Attention", "Cache", "LayerState"]
