"""The shell every recurrent layer shares: mask → packing → (short convolutions) → op → unpacking →
new cache entry. A layer fills in its projections (:meth:`RecurrentLayer.project`), its op call
(:meth:`RecurrentLayer.mix`) and its output head (:meth:`RecurrentLayer.output`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from fla_gsa.layers.cache import Cache, LayerState
from fla_gsa.layers.utils import (
    check_layer_input,
    gather_rows,
    pack,
    pack_mask,
    require_layer_idx,
    scatter_rows,
    token_positions,
    unpack,
)
from fla_gsa.modules import ShortConvolution
from fla_gsa.ops import chunk_gsa, fused_recurrent_gsa


class RecurrentLayer(nn.Module):
    """Base of the GSA, GLA and ABC layers.

    ``forward(hidden_states [B, T, D], attention_mask [B, S] = None, past_key_values = None,
    use_cache = False)`` returns ``(output [B, T, D], None, past_key_values)``: the same interface as
    :class:`fla_gsa.layers.Attention`, so any layer kind can stand at any depth of a model.

    Subclasses set ``self.hidden_size``, ``self.layer_idx``, ``self.mode`` and, with short
    convolutions, ``self.convs`` (a ModuleList applied to the tensors :meth:`project` returns first).
    """

    # whether prepare() or mix() reads the token positions (rotary); without a cache they are not made
    uses_positions = False

    def __init__(self):
        super().__init__()
        self.convs: nn.ModuleList | None = None  # an instance attribute: a class one would hide the module

    def make_projections(self, hidden_size: int, bias: bool, use_short_conv: bool, conv_size: int,
                         conv_bias: bool) -> None:
        """The projections every recurrent layer shares, each head ``head_dim`` wide: q to the query
        heads, k and v to the key/value heads, o back to ``hidden_size``; and, if asked, the short
        causal convolutions of q, k and v."""
        H, HQ, K = self.num_kv_heads, self.num_heads, self.head_dim
        self.q_proj = nn.Linear(hidden_size, HQ * K, bias=bias)
        self.k_proj = nn.Linear(hidden_size, H * K, bias=bias)
        self.v_proj = nn.Linear(hidden_size, H * K, bias=bias)
        self.o_proj = nn.Linear(HQ * K, hidden_size, bias=bias)
        if use_short_conv:
            self.convs = nn.ModuleList(ShortConvolution(d, kernel_size=conv_size, bias=conv_bias, activation="silu")
                                       for d in (HQ * K, H * K, H * K))

    @property
    def o_shape(self):
        """Per-token shape of the token mixer's output before ``o_proj``: (query heads, head dim)."""
        return (self.num_heads, self.head_dim)

    # -- what a subclass provides ------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The flat projections of ``x [B, T, D]``; the first ``len(self.convs)`` go through the short
        convolutions."""
        raise NotImplementedError

    def prepare(self, xs, state, mask, positions):
        """Per-token transforms that need the padded layout (ABC's slot normalization) or the token
        positions (rotary); returns the tensors to pack and anything :meth:`mix` needs to store."""
        return xs, {}

    def mix(self, xs, initial_state, cu_seqlens, output_final_state: bool):
        """Run the op on packed inputs; returns ``(o [1 or B, T, HQ, V], final_state or None)``."""
        raise NotImplementedError

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """From the op's output ``o [B, T, HQ, V]`` (zeros at padding) to ``[B, T, D]``."""
        raise NotImplementedError

    def finish_extra(self, extra: dict, old: LayerState | None, p) -> dict:
        return {}

    # -- the shared flow ---------------------------------------------------------------------------
    def op_mode(self, T: int) -> str:
        # one token: the fused recurrent step (a single kernel for GSA); otherwise the configured mode
        return "fused_recurrent" if T == 1 else self.mode

    def gsa_op(self, q, k, v, s, g, initial_state, cu_seqlens, output_final_state: bool):
        """The GSA op of the GSA and ABC layers: the fused recurrent step or the chunked op (with the
        layer's ``scale`` and ``checkpoint_level``)."""
        if self.op_mode(q.shape[1]) == "fused_recurrent":
            return fused_recurrent_gsa(q, k, v, s, g, scale=self.scale, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return chunk_gsa(q, k, v, s, g, scale=self.scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         checkpoint_level=self.checkpoint_level)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool = False, **kwargs):
        mask = check_layer_input(hidden_states, attention_mask, self.hidden_size)
        require_layer_idx(self, past_key_values, use_cache)
        if use_cache and past_key_values is None:
            past_key_values = Cache()
        state = past_key_values[self.layer_idx] if past_key_values is not None else None
        B, T, _ = hidden_states.shape
        p = pack_mask(mask)
        positions = new_positions = None  # a few small launches per layer: only when read or cached
        if use_cache or self.uses_positions:
            positions, new_positions = token_positions(state, mask, B, T, hidden_states.device)

        xs = self.project(hidden_states)
        xs, extra = self.prepare(xs, state, mask, positions)
        if p is not None and p.empty:  # nothing but padding in this call: the state does not move
            o = hidden_states.new_zeros(B, T, *self.o_shape)
            final = state.recurrent_state if state is not None else None
            conv_final = state.conv_state if state is not None else None
        else:
            xs = [pack(x, p) for x in xs]
            cu_seqlens = p.cu_seqlens if p is not None else None
            conv_final = None
            if self.convs is not None:
                old = gather_rows(state.conv_state, p) if state is not None else None
                old = old if old is not None else (None,) * len(self.convs)
                outs = [conv(x, cache=c, output_final_state=use_cache, cu_seqlens=cu_seqlens)
                        for conv, x, c in zip(self.convs, xs, old)]
                xs = [y for y, _ in outs] + list(xs[len(self.convs):])
                conv_final = tuple(c for _, c in outs) if use_cache else None
            h0 = gather_rows(state.recurrent_state, p) if state is not None else None
            o, final = self.mix(xs, h0, cu_seqlens, use_cache)
            o = unpack(o, p)
            if use_cache:
                final = scatter_rows(state.recurrent_state if state is not None else None, final, p)
                if conv_final is not None:
                    conv_final = scatter_rows(state.conv_state if state is not None else None, conv_final, p)
        out = self.output(o, hidden_states)
        if use_cache:
            past_key_values[self.layer_idx] = LayerState(
                seen_tokens=(state.seen_tokens if state is not None else 0) + T,
                positions=new_positions, recurrent_state=final, conv_state=conv_final,
                extra=self.finish_extra(extra, state, p))
        return out, None, past_key_values
