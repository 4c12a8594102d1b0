"""The language models, in Hugging Face's conventions: config → block → model → LM head.

One block class serves every layer kind: ``x + mixer(norm(x))`` then ``x + GatedMLP(norm(x))`` (the
second norm fused with the residual add), where the mixer is built from ``config.layer_types[i]``. So
GSA, GLA, ABC and Transformer models are the same code with different defaults, and any config can
mix the four kinds.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from fla_gsa.layers import ABCAttention, Attention, Cache, GatedLinearAttention, GatedSlotAttention
from fla_gsa.models.configuration import ABCConfig, GLAConfig, GSAConfig, HybridConfig, TransformerConfig
from fla_gsa.modules import GatedMLP, RMSNorm, weight_cast
from fla_gsa.modules.cross_entropy import LabelCheck, check_labels
from fla_gsa.modules.linear_cross_entropy import linear_cross_entropy_checked
from fla_gsa.modules.weight_cast import WeightCasts

try:  # transformers >= 4.48
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = nn.Module

try:  # transformers >= 5: initializers that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    init = nn.init


def build_token_mixer(config: HybridConfig, layer_idx: int) -> nn.Module:
    """The token mixer of layer ``layer_idx``, of kind ``config.layer_types[layer_idx]``."""
    kind = config.layer_types[layer_idx]
    common = dict(hidden_size=config.hidden_size, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                  head_dim=config.head_dim, attention_bias=config.attention_bias, layer_idx=layer_idx)
    if getattr(config, "attn_scale", None) is not None:
        common["scale"] = float(config.attn_scale)
    conv = dict(use_short_conv=config.use_short_conv, conv_size=config.conv_size, conv_bias=config.conv_bias,
                mode=config.attn_mode, norm_eps=config.rms_norm_eps,
                checkpoint_level=getattr(config, "checkpoint_level", 0))
    if kind == "gsa":
        return GatedSlotAttention(num_slots=config.num_slots, gate_logit_normalizer=config.gate_normalizer(kind),
                                  gate_bias=config.gate_bias, **common, **conv)
    if kind == "gla":
        return GatedLinearAttention(gate_logit_normalizer=config.gate_normalizer(kind),
                                    gate_low_rank_dim=config.gate_low_rank_dim, **common, **conv)
    if kind == "abc":
        return ABCAttention(num_slots=config.num_slots, use_rope=config.use_rope, rope_theta=config.rope_theta,
                            **common, **conv)
    if kind == "attention":
        return Attention(rope_theta=config.rope_theta, **common)
    raise ValueError(f"unknown layer type {kind!r} at layer {layer_idx}")


class HybridBlock(GradientCheckpointingLayer):
    """``h = x + mixer(attn_norm(x))``, ``y = h + mlp(mlp_norm(h))``; the mixer's kind comes from
    ``config.layer_types[layer_idx]``.

    ``forward(hidden_states [B, T, D], residual [B, T, D] = None, attention_mask [B, S] = None,
    past_key_values = None, use_cache = False, return_residual = False)`` returns the new hidden states
    ``[B, T, D]``: ``y`` above, with ``x = hidden_states + residual``.

    Inside a model the residual stream travels beside the blocks' outputs instead: given
    ``residual`` (the stream before this block, None for the first) and ``return_residual=True``,
    the block returns ``(mlp_out, residual)`` whose sum is ``y``, and the next block's ``attn_norm``
    forms that sum in its kernel. The stream stays in its own dtype (fp32 under autocast with fp32
    weights) while what the projections read and what flows back into them stays in the compute dtype:
    no separate add, and no cast of the normalized input for each projection (and back in the
    backward).

    Example:
        >>> import torch
        >>> from fla_gsa.models import GSAConfig, HybridBlock
        >>> cfg = GSAConfig(hidden_size=64, num_hidden_layers=2, num_heads=2, num_slots=8, layer_types=["gsa", "attention"])
        >>> block = HybridBlock(cfg, layer_idx=1)
        >>> type(block.attn).__name__, block(torch.randn(2, 7, 64)).shape
        ('Attention', torch.Size([2, 7, 64]))
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = build_token_mixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, intermediate_size=config.intermediate_size,
                            hidden_ratio=config.hidden_ratio, hidden_act=config.hidden_act, bias=config.mlp_bias)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool = False, return_residual: bool = False, **kwargs):
        hidden_states, residual = self.attn_norm(hidden_states, residual, prenorm=True)
        hidden_states, _, _ = self.attn(hidden_states, attention_mask=attention_mask,
                                        past_key_values=past_key_values, use_cache=use_cache)
        hidden_states, residual = self.mlp_norm(hidden_states, residual, prenorm=True)
        hidden_states = self.mlp(hidden_states)
        return (hidden_states, residual) if return_residual else residual + hidden_states


class HybridPreTrainedModel(PreTrainedModel):
    """Weight initialization and the Hugging Face plumbing shared by every fla_gsa model."""

    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_cache_class = True
    _is_stateful = True  # recurrent states: no cache cropping (assisted decoding) or rewinding

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model creates its own Cache on the first call
        return False

    def _precast(self, base: "HybridModel") -> bool:
        # make the forward's weight casts in one launch at its start (fla_gsa.modules.weight_cast) where
        # it keeps them for a backward anyway: grad enabled, CUDA autocast, no activation checkpointing
        return (weight_cast.PRECAST and torch.is_grad_enabled() and torch.is_autocast_enabled("cuda")
                and not base.gradient_checkpointing
                # the first block stands for all (gradient_checkpointing_enable sets every block's flag);
                # indexed, not sliced: a slice builds a new ModuleList in every forward
                and not getattr(next(iter(base.layers), None), "gradient_checkpointing", False))

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, RMSNorm) and module.weight is not None:
            init.ones_(module.weight)


class HybridModel(HybridPreTrainedModel):
    """Embeddings, the stack of :class:`HybridBlock`, and the final norm.

    ``forward(input_ids [B, T] | inputs_embeds [B, T, D], attention_mask [B, S] = None,
    past_key_values: Cache = None, use_cache = None, output_hidden_states = None, return_dict = None)``
    returns a ``BaseModelOutputWithPast``. ``attention_mask`` (1 token, 0 padding) may cover the cached
    positions too (as ``generate()`` passes it); its last ``T`` columns describe the input.

    Example:
        >>> import torch
        >>> from fla_gsa.models import GSAConfig, HybridModel
        >>> cfg = GSAConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=2, num_slots=8)
        >>> out = HybridModel(cfg).eval()(torch.tensor([[1, 5, 7, 9]]))
        >>> out.last_hidden_state.shape, out.past_key_values.get_seq_length()
        (torch.Size([1, 4, 64]), 4)
    """

    _input_embed_layer = "embeddings"

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._weight_casts = WeightCasts()
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        with self._weight_casts.scope(self._precast(self)):
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
            if kwargs.get("output_attentions"):
                raise ValueError("output_attentions is not supported: the recurrent layers have no attention matrix")
            output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
            return_dict = return_dict if return_dict is not None else self.config.return_dict
            if use_cache is None:
                use_cache = self.config.use_cache and not self.training
            if past_key_values is not None and not isinstance(past_key_values, Cache):
                raise TypeError(f"past_key_values must be a fla_gsa.layers.Cache (or None), got {type(past_key_values).__name__}")
            if use_cache and past_key_values is None:
                past_key_values = Cache()

            hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
            if attention_mask is not None:
                if attention_mask.ndim != 2:
                    raise ValueError(f"attention_mask must be a [B, S] mask of 1 (token) / 0 (padding), got shape "
                                     f"{tuple(attention_mask.shape)}")
                if bool(attention_mask[:, -hidden_states.shape[1]:].all()):
                    attention_mask = None  # no padding among these tokens: every layer takes its fast path
                # (an attention layer's cache remembers the padding of earlier calls itself)

            all_hidden_states = () if output_hidden_states else None
            residual = None  # the residual stream beside each block's output (see HybridBlock)
            for layer in self.layers:
                if output_hidden_states:
                    all_hidden_states += (hidden_states if residual is None else residual + hidden_states,)
                # both tensors positional: reentrant checkpointing passes gradients to positional inputs only
                hidden_states, residual = layer(hidden_states, residual, attention_mask=attention_mask,
                                                past_key_values=past_key_values, use_cache=use_cache,
                                                return_residual=True)
            hidden_states = self.norm(hidden_states, residual)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)

            out = BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                          past_key_values=past_key_values if use_cache else None,
                                          hidden_states=all_hidden_states)
            return out if return_dict else out.to_tuple()


def _next_token_targets(labels: torch.Tensor, ignore: int) -> torch.Tensor:
    """``labels [B, T]`` shifted left by one, ``ignore`` in the last position, flattened to ``[B * T]``."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore)], dim=1).view(-1)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """:class:`HybridModel` with a language-model head.

    ``forward(..., labels [B, T] = None, logits_to_keep = 0, return_logits = None)``: with ``labels``
    (next-token targets are ``labels`` shifted left by one inside; ``-100`` ignored) the loss comes from
    :func:`fla_gsa.modules.fused_linear_cross_entropy` (the function behind
    ``FusedLinearCrossEntropyLoss``) on the hidden states and no logits are formed
    unless ``return_logits=True`` (or ``config.fuse_linear_cross_entropy`` is False). Without labels the
    logits of the last ``logits_to_keep`` positions (0: all) are returned. ``num_items_in_batch`` (passed
    by the Trainer under gradient accumulation) makes the loss a sum over tokens divided by it.

    Example:
        >>> import torch
        >>> from fla_gsa.models import GSAConfig, HybridForCausalLM
        >>> cfg = GSAConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=2, num_slots=8)
        >>> model = HybridForCausalLM(cfg)
        >>> ids = torch.randint(0, 100, (2, 16))
        >>> out = model(input_ids=ids, labels=ids)   # fused loss: no [B, T, vocab] logits are formed
        >>> out.loss.shape, out.logits is None
        (torch.Size([]), True)
        >>> model(input_ids=ids, logits_to_keep=1).logits.shape   # the next-token logits only
        torch.Size([2, 1, 100])
    """

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._weight_casts = WeightCasts()
        self.post_init()

    base_model_class = HybridModel

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        **kwargs,
    ):
        with self._weight_casts.scope(self._precast(self.model)):
            return_dict = return_dict if return_dict is not None else self.config.return_dict
            num_items_in_batch = kwargs.pop("num_items_in_batch", None)
            ignore = -100
            fused = labels is not None and self.config.fuse_linear_cross_entropy
            targets = label_check = None
            if isinstance(labels, torch.Tensor) and labels.ndim == 2 and labels.dtype in (torch.int32, torch.int64):
                # next-token targets, and their range check begun now: the loss then waits for that check
                # alone, not for the layers queued after it (a sync there would drain the GPU's queue)
                targets = _next_token_targets(labels, ignore)
                label_check = LabelCheck(targets, self.lm_head.out_features, ignore)
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                                 inputs_embeds=inputs_embeds, use_cache=use_cache,
                                 output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
            hidden_states = outputs.last_hidden_state

            loss = logits = None
            if labels is not None:
                if labels.shape != hidden_states.shape[:2]:
                    raise ValueError(f"labels must have shape [B, T] = {tuple(hidden_states.shape[:2])}, got {tuple(labels.shape)}")
                if targets is None:
                    targets = _next_token_targets(labels, ignore)
                if targets.device != hidden_states.device:
                    targets, label_check = targets.to(hidden_states.device), None
                reduction = "mean" if num_items_in_batch is None else "sum"
                if fused:
                    loss = linear_cross_entropy_checked(hidden_states.reshape(-1, hidden_states.shape[-1]),
                                                        self.lm_head.weight, targets, self.lm_head.bias,
                                                        ignore, reduction, label_check=label_check)
                else:
                    logits = self.lm_head(hidden_states)
                    # the same ValueError as the fused loss's for a label out of range (cross_entropy
                    # would raise an IndexError on the CPU and a device-side assert on CUDA)
                    check_labels(targets, "labels", (targets.numel(),), self.lm_head.out_features, ignore,
                                 targets.device, label_check)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore,
                                           reduction=reduction)
                if num_items_in_batch is not None:
                    loss = loss / num_items_in_batch
            if logits is None and (labels is None or return_logits):
                if isinstance(logits_to_keep, int):
                    kept = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
                else:
                    kept = hidden_states[:, logits_to_keep]
                logits = self.lm_head(kept)

            out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                         hidden_states=outputs.hidden_states)
            return out if return_dict else out.to_tuple()


# -- the registered models: the same code, each with its own config class ---------------------------

class GSAPreTrainedModel(HybridPreTrainedModel):
    config_class = GSAConfig


class GSAModel(GSAPreTrainedModel, HybridModel):
    """A stack of Gated Slot Attention blocks (or whatever ``config.layer_types`` mixes in); see
    :class:`HybridModel` for the forward.

    Example:
        >>> import torch
        >>> from fla_gsa.models import GSAConfig, GSAModel
        >>> model = GSAModel(GSAConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=2, num_slots=8))
        >>> model(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
        torch.Size([1, 3, 64])
    """


class GSAForCausalLM(GSAPreTrainedModel, HybridForCausalLM):
    """Gated Slot Attention language model.

    Example:
        >>> import torch
        >>> from fla_gsa.models import GSAConfig, GSAForCausalLM
        >>> cfg = GSAConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=2, num_slots=8)
        >>> model = GSAForCausalLM(cfg).eval()
        >>> model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False).shape
        torch.Size([1, 7])
    """

    base_model_class = GSAModel


class GLAPreTrainedModel(HybridPreTrainedModel):
    config_class = GLAConfig


class GLAModel(GLAPreTrainedModel, HybridModel):
    """A stack of Gated Linear Attention blocks; see :class:`HybridModel` for the forward.

    Example:
        >>> import torch
        >>> from fla_gsa.models import GLAConfig, GLAModel
        >>> model = GLAModel(GLAConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=2))
        >>> model(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
        torch.Size([1, 3, 64])
    """


class GLAForCausalLM(GLAPreTrainedModel, HybridForCausalLM):
    """Gated Linear Attention language model; see :class:`HybridForCausalLM` for the forward.

    Example:
        >>> import torch
        >>> from fla_gsa.models import GLAConfig, GLAForCausalLM
        >>> model = GLAForCausalLM(GLAConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=2)).eval()
        >>> model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False).shape
        torch.Size([1, 6])
    """

    base_model_class = GLAModel


class ABCPreTrainedModel(HybridPreTrainedModel):
    config_class = ABCConfig


class ABCModel(ABCPreTrainedModel, HybridModel):
    """A stack of ABC blocks; see :class:`HybridModel` for the forward.

    Example:
        >>> import torch
        >>> from fla_gsa.models import ABCConfig, ABCModel
        >>> model = ABCModel(ABCConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=2, num_slots=8))
        >>> model(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
        torch.Size([1, 3, 64])
    """


class ABCForCausalLM(ABCPreTrainedModel, HybridForCausalLM):
    """ABC (attention with bounded-memory control) language model; see :class:`HybridForCausalLM` for
    the forward.

    Example:
        >>> import torch
        >>> from fla_gsa.models import ABCConfig, ABCForCausalLM
        >>> model = ABCForCausalLM(ABCConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=2, num_slots=8))
        >>> model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits.shape
        torch.Size([1, 4, 100])
    """

    base_model_class = ABCModel


class TransformerPreTrainedModel(HybridPreTrainedModel):
    config_class = TransformerConfig


class TransformerModel(TransformerPreTrainedModel, HybridModel):
    """A stack of softmax-attention (RoPE, GQA) blocks: the baseline; see :class:`HybridModel` for the
    forward.

    Example:
        >>> import torch
        >>> from fla_gsa.models import TransformerConfig, TransformerModel
        >>> model = TransformerModel(TransformerConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2))
        >>> model(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
        torch.Size([1, 3, 64])
    """


class TransformerForCausalLM(TransformerPreTrainedModel, HybridForCausalLM):
    """Softmax-attention (Llama-style) language model: the baseline; see :class:`HybridForCausalLM` for
    the forward.

    Example:
        >>> import torch
        >>> from fla_gsa.models import TransformerConfig, TransformerForCausalLM
        >>> cfg = TransformerConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2)
        >>> model = TransformerForCausalLM(cfg).eval()
        >>> model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False).shape
        torch.Size([1, 6])
    """

    base_model_class = TransformerModel
