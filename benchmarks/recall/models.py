"""The models of the MQAR benchmark: 2-layer fla_gsa causal LMs, and the size of their recurrent state.

Kinds: ``gsa``, ``gla``, ``abc``, ``attention`` (the Transformer baseline, whose KV cache grows with
the sequence: the ceiling) and ``hybrid`` (a GSA layer, then an attention layer, through
``layer_types``). A :class:`ModelSpec` names one size of one kind; :data:`DEFAULT_GRID` holds three
sizes per kind at ``d_model`` 64, 128, 256, with ``num_slots = head_dim / 2`` so that a GSA/ABC state
(``H·M·(K + V)``) is as large as the GLA state of the same width (``H·K·V``).
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from fla_gsa.layers import ABCAttention, Attention, GatedLinearAttention, GatedSlotAttention
from fla_gsa.models import (ABCConfig, ABCForCausalLM, GLAConfig, GLAForCausalLM, GSAConfig, GSAForCausalLM,
                            TransformerConfig, TransformerForCausalLM)

# kind -> (config class, model class, layer_types of the 2-layer model)
KINDS = {
    "gsa": (GSAConfig, GSAForCausalLM, ["gsa", "gsa"]),
    "gla": (GLAConfig, GLAForCausalLM, ["gla", "gla"]),
    "abc": (ABCConfig, ABCForCausalLM, ["abc", "abc"]),
    "attention": (TransformerConfig, TransformerForCausalLM, ["attention", "attention"]),
    "hybrid": (GSAConfig, GSAForCausalLM, ["gsa", "attention"]),
}
SLOT_KINDS = ("gsa", "abc", "hybrid")  # kinds with a num_slots


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model size: ``kind``, ``d_model``, ``num_heads`` and (GSA/ABC/hybrid) ``num_slots``."""

    kind: str
    d_model: int
    num_heads: int
    num_slots: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {tuple(KINDS)}, got {self.kind!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        if (self.num_slots is not None) != (self.kind in SLOT_KINDS):
            raise ValueError(f"num_slots is {'required' if self.kind in SLOT_KINDS else 'meaningless'} "
                             f"for {self.kind!r}, got {self.num_slots!r}")

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``"gsa:128:2:32"`` (kind:d_model:heads[:slots]) → a spec."""
        parts = text.split(":")
        try:
            kind, d, h, *m = parts[0], int(parts[1]), int(parts[2]), *(int(x) for x in parts[3:])
        except (IndexError, ValueError):
            raise ValueError(f"a model spec is 'kind:d_model:num_heads[:num_slots]', got {text!r}") from None
        if len(m) > 1:
            raise ValueError(f"a model spec is 'kind:d_model:num_heads[:num_slots]', got {text!r}")
        return cls(kind, d, h, m[0] if m else None)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def name(self) -> str:
        slots = f"-m{self.num_slots}" if self.num_slots is not None else ""
        return f"{self.kind}-d{self.d_model}-h{self.num_heads}{slots}"

    def __str__(self) -> str:
        return ":".join(str(x) for x in (self.kind, self.d_model, self.num_heads, self.num_slots) if x is not None)


def _grid() -> list[ModelSpec]:
    specs = []
    for kind in KINDS:
        for d in (64, 128, 256):
            heads = 2
            slots = d // heads // 2 if kind in SLOT_KINDS else None
            specs.append(ModelSpec(kind, d, heads, slots))
    return specs


DEFAULT_GRID: list[ModelSpec] = _grid()


def build_model(spec: ModelSpec, vocab_size: int, max_len: int, short_conv: bool = True) -> nn.Module:
    """A 2-layer causal LM of ``spec``, from the library's own config and model classes.

    ``short_conv``: short causal convolutions on q/k/v of the recurrent layers (Zoology puts a short
    convolution before every sequence mixer of its MQAR models; attention layers here have none).
    """
    config_cls, model_cls, layer_types = KINDS[spec.kind]
    extra = {} if spec.num_slots is None else {"num_slots": spec.num_slots}
    config = config_cls(vocab_size=vocab_size, hidden_size=spec.d_model, num_hidden_layers=2,
                        num_heads=spec.num_heads, layer_types=list(layer_types), use_short_conv=short_conv,
                        max_position_embeddings=max_len, use_cache=False, tie_word_embeddings=False,
                        fuse_linear_cross_entropy=True, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                        **extra)
    return model_cls(config)


def layer_state_size(layer: nn.Module, seq_len: int) -> int:
    """Elements of one token mixer's state per sequence after ``seq_len`` tokens (short-convolution
    buffers not included: :func:`conv_state_size`).

    GSA: ``H·M·(K + V)`` (``hk [K, M]``, ``hv [M, V]`` per key/value head); ABC: the same plus its
    running slot normalizer ``H·M``; GLA: ``H·K·V``; attention: the KV cache ``2·H·K·seq_len``.
    """
    if isinstance(layer, (GatedSlotAttention, ABCAttention)):
        H, M, K = layer.num_kv_heads, layer.num_slots, layer.head_dim
        return H * M * (K + K) + (H * M if isinstance(layer, ABCAttention) else 0)
    if isinstance(layer, GatedLinearAttention):
        H, K = layer.num_kv_heads, layer.head_dim
        return H * K * K
    if isinstance(layer, Attention):
        return 2 * layer.num_kv_heads * layer.head_dim * seq_len
    raise TypeError(f"no state-size rule for {type(layer).__name__}")


def state_size(model: nn.Module, seq_len: int) -> int:
    """Elements of the recurrent state (or KV cache) of every layer, per sequence, after ``seq_len`` tokens."""
    return sum(layer_state_size(block.attn, seq_len) for block in model.model.layers)


def conv_state_size(model: nn.Module) -> int:
    """Elements of the short-convolution buffers (``(conv_size - 1)·channels`` per convolution)."""
    total = 0
    for block in model.model.layers:
        for conv in (getattr(block.attn, "convs", None) or []):
            total += (conv.kernel_size[0] - 1) * conv.hidden_size
    return total


def num_params(model: nn.Module, with_embeddings: bool = False) -> int:
    """Parameters of the model; without the input embedding and LM head by default (they scale with the
    vocabulary, not with what the model can recall)."""
    skip = set() if with_embeddings else {id(model.model.embeddings.weight), id(model.lm_head.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
