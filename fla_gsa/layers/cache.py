"""The decoding cache shared by every layer kind: one :class:`LayerState` per layer.

A recurrent layer keeps a fixed-size state (GSA/ABC: ``(hk [B, H, K, M], hv [B, H, M, V])``, GLA:
``[B, H, K, V]``), the caches of its short convolutions if it has them, and ABC also its running slot
normalizer. A softmax-attention layer keeps its keys and values. Every layer keeps the number of
positions it has seen (padding included, as Hugging Face counts them) and the number of real tokens
of each sequence (the position of the next token, for rotary embeddings of left-padded batches).

:class:`Cache` subclasses the installed ``transformers.Cache``, so ``generate()`` accepts it; it holds
its own per-layer states and overrides the parts of the base class that ``generate()`` touches.
Layers never modify a state in place: each step stores a new :class:`LayerState`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache as HFCache


def _map_tensors(x, fn: Callable[[torch.Tensor], torch.Tensor]):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(t, fn) for t in x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    return x


@dataclasses.dataclass
class LayerState:
    """What one layer remembers between calls. Every tensor has the batch in its first dimension.

    Attributes:
        seen_tokens: positions seen so far, padding included (``get_seq_length()``).
        positions: ``[B]`` int64, real (unpadded) tokens seen by each sequence: the rotary position of
            its next token.
        recurrent_state: the state of a recurrent layer (a tensor or a tuple of tensors), or None.
        conv_state: tuple of short-convolution caches ``[B, D, W]``, or None.
        attn_state: ``(k, v)`` ``[B, S, H, D]`` of a softmax-attention layer, or None.
        kv_mask: ``[B, S]`` bool, which cached keys are real tokens; None when no padding was seen.
        extra: anything else a layer needs (ABC: ``"slot_lse"`` ``[B, H, M]``, the running
            log-sum-exp of its slot logits).

    Example:
        >>> import torch
        >>> from fla_gsa.layers import Cache, GatedSlotAttention
        >>> layer = GatedSlotAttention(hidden_size=32, num_heads=2, num_slots=8, layer_idx=0)
        >>> _, _, cache = layer(torch.randn(3, 5, 32), use_cache=True)
        >>> state = cache[0]
        >>> hk, hv = state.recurrent_state
        >>> state.seen_tokens, state.positions.tolist(), hk.shape, hv.shape
        (5, [5, 5, 5], torch.Size([3, 2, 16, 8]), torch.Size([3, 2, 8, 16]))
        >>> state.map_batch(lambda t: t[:1]).recurrent_state[0].shape   # keep the first row
        torch.Size([1, 2, 16, 8])
    """

    seen_tokens: int = 0
    positions: torch.Tensor | None = None
    recurrent_state: Any = None
    conv_state: tuple | None = None
    attn_state: tuple | None = None
    kv_mask: torch.Tensor | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LayerState":
        """A new state with ``fn`` applied to every tensor (for beam search: select or repeat rows)."""
        return LayerState(
            seen_tokens=self.seen_tokens,
            positions=_map_tensors(self.positions, fn),
            recurrent_state=_map_tensors(self.recurrent_state, fn),
            conv_state=_map_tensors(self.conv_state, fn),
            attn_state=_map_tensors(self.attn_state, fn),
            kv_mask=_map_tensors(self.kv_mask, fn),
            extra=_map_tensors(self.extra, fn),
        )

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0] if self.positions is not None else -1

    @property
    def is_recurrent(self) -> bool:
        return self.recurrent_state is not None


class Cache(HFCache):
    """Per-layer decoding states for models mixing GSA, GLA, ABC and softmax-attention layers.

    ``cache[i]`` is layer ``i``'s :class:`LayerState` (None before the layer's first call); layers store
    a new state with ``cache[i] = state``. ``get_seq_length()`` is the number of positions seen.

    Example:
        >>> import torch
        >>> from fla_gsa.layers import Cache, GatedSlotAttention
        >>> layer = GatedSlotAttention(hidden_size=32, num_heads=2, num_slots=8, layer_idx=0)
        >>> cache = Cache()
        >>> _ = layer(torch.randn(2, 5, 32), past_key_values=cache, use_cache=True)
        >>> o, _, cache = layer(torch.randn(2, 1, 32), past_key_values=cache, use_cache=True)
        >>> o.shape, cache.get_seq_length()
        (torch.Size([2, 1, 32]), 6)
    """

    is_compileable = False

    def __init__(self, states: list[LayerState | None] | None = None):
        super().__init__(layers=list(states) if states is not None else [])

    # -- per-layer access -------------------------------------------------------------------------
    def __getitem__(self, layer_idx: int) -> LayerState | None:
        return self.layers[layer_idx] if layer_idx < len(self.layers) else None

    def __setitem__(self, layer_idx: int, state: LayerState) -> None:
        if not isinstance(state, LayerState):
            raise TypeError(f"a cache entry must be a LayerState, got {type(state).__name__}")
        while len(self.layers) <= layer_idx:
            self.layers.append(None)
        self.layers[layer_idx] = state

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.layers)}, seen_tokens={self.get_seq_length()})"

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError(
            "fla_gsa's Cache holds one LayerState per layer; layers store theirs with `cache[layer_idx] = state` "
            "instead of Cache.update(key_states, value_states, layer_idx)")

    # -- lengths ----------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Positions (padding included) that layer ``layer_idx`` has seen; 0 before its first call."""
        state = self[layer_idx or 0]
        return state.seen_tokens if state is not None else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    @property
    def max_cache_len(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        sizes = {s.batch_size for s in self.layers if s is not None and s.batch_size >= 0}
        if len(sizes) > 1:
            raise ValueError(f"the layers of the cache hold different batch sizes: {sorted(sizes)}")
        return sizes.pop() if sizes else -1

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    @property
    def is_initialized(self) -> bool:
        return len(self.layers) > 0 and all(s is not None for s in self.layers)

    @property
    def is_croppable(self) -> bool:
        return not any(s is not None and s.is_recurrent for s in self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [s is not None and s.is_recurrent for s in self.layers]

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        if layer_idx is None:
            return any(s is not None for s in self.layers)
        return self[layer_idx] is not None

    # -- batch manipulation (beam search, contrastive search) -------------------------------------
    def _map(self, fn) -> None:
        self.layers = [s.map_batch(fn) if s is not None else None for s in self.layers]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` of every state (beam search)."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``tokens_to_remove`` positions of softmax-attention layers (a negative value
        counts from the end as in Hugging Face, ``crop(-n)`` keeps all but ``n``). Recurrent states can't
        be rolled back: cropping a cache that has one raises, except ``crop(0)``."""
        if tokens_to_remove == 0:
            return
        if not self.is_croppable:
            raise ValueError("this cache holds recurrent states (GSA/GLA/ABC layers), which cannot be cropped")
        for i, s in enumerate(self.layers):
            if s is None or s.attn_state is None:
                continue
            length = s.attn_state[0].shape[1]
            keep = length + tokens_to_remove if tokens_to_remove < 0 else length - tokens_to_remove
            keep = max(0, keep)
            if s.kv_mask is not None:
                removed_real = s.kv_mask[:, keep:].sum(-1)
            else:
                removed_real = length - keep
            self.layers[i] = dataclasses.replace(
                s, seen_tokens=keep, positions=s.positions - removed_real,
                attn_state=tuple(t[:, :keep] for t in s.attn_state),
                kv_mask=s.kv_mask[:, :keep] if s.kv_mask is not None else None)

    def reset(self) -> None:
        self.layers = []

    # -- unsupported parts of the base class ------------------------------------------------------
    def offload(self, *args, **kwargs):
        raise NotImplementedError("fla_gsa's Cache does not support offloading")

    def prefetch(self, *args, **kwargs):
        raise NotImplementedError("fla_gsa's Cache does not support offloading")

    def early_initialization(self, *args, **kwargs):
        return None
