"""T2R ("Transformer to RNN"): turn a pretrained Llama/Mistral-style checkpoint into a GSA model that
keeps every pretrained weight, then finetune it (see docs/t2r.md).

Every weight of the source is carried over unchanged, by name:

    model.embed_tokens            → model.embeddings
    layers.i.input_layernorm      → layers.i.attn_norm
    layers.i.self_attn.{q,k,v,o}_proj → layers.i.attn.{q,k,v,o}_proj      (same heads, kv heads, head_dim)
    layers.i.post_attention_layernorm → layers.i.mlp_norm
    layers.i.mlp.{gate,up,down}_proj  → layers.i.mlp.{gate,up,down}_proj
    model.norm, lm_head           → model.norm, lm_head (or tied to the embeddings, as in the source)

and each GSA layer gains two new parameters:

- ``attn.f_proj`` (the slot forget gate, ``[H·M, D]`` weight and ``[H·M]`` bias): the weight starts at
  zero (std ``gate_init_std``) and the bias places slot ``m``'s initial forget gate
  ``α_m = sigmoid(b_m)^(1/τ)`` on a geometric ladder of memory lengths ``1/(1−α)`` from
  ``1/(1−decay_range[0])`` to ``1/(1−decay_range[1])`` tokens (default 10 to 1000), the same ladder in
  every head. Different per-slot gates break the symmetry between slots (with equal gates every slot
  would get the same gradient forever); an input-independent start keeps the converted model's first
  steps predictable, and finetuning makes the gates data-dependent.
- ``attn.g_norm.weight`` (the RMSNorm on the output of each head): ones.

GSA layers read their slots with the attention scale ``head_dim ** -0.5`` (``attn_scale``), not the
scale 1 of a GSA layer trained from scratch, so the pretrained queries and keys keep their calibration.

Layers may stay softmax attention (``layer_types`` with ``"attention"`` entries) for a hybrid; their
weights map the same way and they add nothing new. GSA layers have no positional encoding: the source's
RoPE is dropped there (its order information comes from the recurrence).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys

import torch
import torch.nn as nn

from fla_gsa.models.configuration import GSAConfig
from fla_gsa.models.modeling import GSAForCausalLM

_SWISH = ("silu", "swish")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert_from_llama` did: ``copied`` maps each GSA parameter to the source parameter it
    holds unchanged; ``new`` lists the parameters initialized here; ``notes`` any caveat.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from fla_gsa.models import convert_from_llama
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
        ...                                      num_hidden_layers=1, num_attention_heads=4))
        >>> _, report = convert_from_llama(llama, num_slots=8, return_report=True)
        >>> report.copied["model.layers.0.attn.q_proj.weight"]
        'model.layers.0.self_attn.q_proj.weight'
        >>> print(report)
        copied 12 tensors unchanged from the source
        new (3): model.layers.0.attn.f_proj.weight, model.layers.0.attn.f_proj.bias, model.layers.0.attn.g_norm.weight
    """

    copied: dict[str, str]
    new: list[str]
    notes: list[str]

    def __str__(self) -> str:
        lines = [f"copied {len(self.copied)} tensors unchanged from the source",
                 f"new ({len(self.new)}): " + ", ".join(self.new)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(cfg, "rope_theta", None) or 10000.0)


def _rope_type(cfg) -> str:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return "default"
    return params.get("rope_type", params.get("type", "default")) or "default"


def gsa_config_from_llama(src_config, num_slots: int = 64, gate_logit_normalizer: float = 8.0,
                          layer_types: list[str] | None = None, **overrides) -> GSAConfig:
    """The :class:`GSAConfig` with the source's shapes (vocabulary, width, depth, heads, kv heads, head
    dim, MLP width, norms' epsilon, tied embeddings, special tokens) and GSA's slot settings."""
    act = getattr(src_config, "hidden_act", "silu")
    if act not in _SWISH:
        raise ValueError(f"only SwiGLU (hidden_act 'silu') MLPs convert, the source has hidden_act={act!r}")
    num_heads = src_config.num_attention_heads
    head_dim = getattr(src_config, "head_dim", None) or src_config.hidden_size // num_heads
    fields = dict(
        vocab_size=src_config.vocab_size,
        hidden_size=src_config.hidden_size,
        num_hidden_layers=src_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(src_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        num_slots=num_slots,
        gate_logit_normalizer=gate_logit_normalizer,
        gate_bias=True,
        attn_scale=head_dim ** -0.5,
        attention_bias=bool(getattr(src_config, "attention_bias", False)),
        mlp_bias=bool(getattr(src_config, "mlp_bias", False)),
        intermediate_size=src_config.intermediate_size,
        hidden_act="swish",
        max_position_embeddings=getattr(src_config, "max_position_embeddings", 2048),
        rms_norm_eps=getattr(src_config, "rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(src_config),
        initializer_range=getattr(src_config, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(src_config, "tie_word_embeddings", False)),
        layer_types=layer_types,
        pad_token_id=getattr(src_config, "pad_token_id", None),
        bos_token_id=getattr(src_config, "bos_token_id", None),
        eos_token_id=getattr(src_config, "eos_token_id", None),
    )
    fields.update(overrides)
    return GSAConfig(**fields)


def gate_bias_init(num_slots: int, gate_logit_normalizer: float, decay_range=(0.9, 0.999)) -> torch.Tensor:
    """``[M]`` biases whose forget gates ``sigmoid(b)^(1/τ)`` have memory lengths ``1/(1−α)`` spaced
    geometrically over ``decay_range`` (float64)."""
    lo, hi = decay_range
    if not 0 < lo <= hi < 1:
        raise ValueError(f"decay_range must satisfy 0 < low <= high < 1, got {decay_range}")
    lengths = torch.logspace(math.log10(1 / (1 - lo)), math.log10(1 / (1 - hi)), num_slots, dtype=torch.float64)
    alpha = 1 - 1 / lengths
    p = alpha ** gate_logit_normalizer  # sigmoid(b) = α^τ
    return torch.log(p) - torch.log1p(-p)  # logit


def _load_source(model_or_path, dtype):
    if isinstance(model_or_path, nn.Module):
        return model_or_path, True
    from transformers import AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    return AutoModelForCausalLM.from_pretrained(model_or_path, **kwargs), False


def _source_map(state: dict) -> tuple[dict[str, str], list[str]]:
    """``{gsa name: source name}`` for every source tensor, and the source names left unused."""
    mapping, unused = {}, []
    for name in state:
        parts = name.split(".")
        target = None
        if name == "model.embed_tokens.weight":
            target = "model.embeddings.weight"
        elif name == "model.norm.weight" or name == "lm_head.weight":
            target = name
        elif len(parts) >= 5 and parts[:2] == ["model", "layers"]:
            i, rest = parts[2], ".".join(parts[3:])
            if rest == "input_layernorm.weight":
                target = f"model.layers.{i}.attn_norm.weight"
            elif rest == "post_attention_layernorm.weight":
                target = f"model.layers.{i}.mlp_norm.weight"
            elif parts[3] == "self_attn" and parts[4] in ("q_proj", "k_proj", "v_proj", "o_proj"):
                target = f"model.layers.{i}.attn.{'.'.join(parts[4:])}"
            elif parts[3] == "mlp" and parts[4] in ("gate_proj", "up_proj", "down_proj"):
                target = f"model.layers.{i}.mlp.{'.'.join(parts[4:])}"
        if target is None:
            unused.append(name)
        else:
            mapping[target] = name
    return mapping, unused


def _has_attention_bias(state: dict) -> bool:
    return any(k.startswith("model.layers.0.self_attn.") and k.endswith("_proj.bias") for k in state)


def convert_from_llama(
    model_or_path,
    num_slots: int = 64,
    gate_logit_normalizer: float = 8.0,
    layer_types: list[str] | None = None,
    decay_range: tuple[float, float] = (0.9, 0.999),
    gate_init_std: float = 0.0,
    dtype: torch.dtype | None = None,
    return_report: bool = False,
    **config_overrides,
):
    """Convert a Llama/Mistral-style causal LM into a :class:`GSAForCausalLM` (T2R).

    Args:
        model_or_path: a loaded ``LlamaForCausalLM``-like model (its tensors are copied, it is left
            as it was) or a path / hub id (loaded with ``AutoModelForCausalLM``; its tensors are moved
            into the GSA model without copies).
        num_slots: GSA memory slots per key/value head.
        gate_logit_normalizer: ``τ`` of the GSA forget gates.
        layer_types: per layer ``"gsa"`` or ``"attention"`` (kept as softmax attention); default all GSA.
        decay_range: initial forget gates of the slots, from the fastest to the slowest (see the module
            docstring).
        gate_init_std: std of the initial ``f_proj`` weight (0: zeros, gates independent of the input at
            the start).
        dtype: convert every tensor to this dtype; default the source's.
        return_report: also return the :class:`ConversionReport`.
        config_overrides: further :class:`GSAConfig` fields (e.g. ``attn_mode``).

    Returns:
        The GSA model (in eval mode), or ``(model, report)``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from fla_gsa.models import convert_from_llama
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
        ...                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        >>> gsa, report = convert_from_llama(llama, num_slots=16, return_report=True)
        >>> report.new
        ['model.layers.0.attn.f_proj.weight', 'model.layers.0.attn.f_proj.bias', 'model.layers.0.attn.g_norm.weight', 'model.layers.1.attn.f_proj.weight', 'model.layers.1.attn.f_proj.bias', 'model.layers.1.attn.g_norm.weight']
    """
    source, given = _load_source(model_or_path, dtype)
    src_config = source.config
    if layer_types is not None and any(t not in ("gsa", "attention") for t in layer_types):
        raise ValueError(f"layer_types for a conversion must be 'gsa' or 'attention' per layer, got {list(layer_types)}")
    state = source.state_dict()
    if _has_attention_bias(state):  # e.g. Qwen2: biased q/k/v whatever the config says
        config_overrides.setdefault("attention_bias", True)
    config = gsa_config_from_llama(src_config, num_slots, gate_logit_normalizer, layer_types, **config_overrides)
    notes = []
    if "attention" in config.layer_types and _rope_type(src_config) != "default":
        notes.append(f"the source uses rope_type={_rope_type(src_config)!r}; kept attention layers use plain RoPE "
                     f"(theta={config.rope_theta})")
    if getattr(src_config, "sliding_window", None) and "attention" in config.layer_types:
        notes.append("the source's sliding window is not applied in kept attention layers (full attention)")

    mapping, unused = _source_map(state)
    if config.tie_word_embeddings:
        mapping.pop("lm_head.weight", None)
    if unused:
        raise ValueError(f"source tensors with no place in the GSA model: {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''} (is this a Llama/Mistral-style checkpoint?)")

    ref = state["model.embed_tokens.weight"]
    dtype = dtype or ref.dtype
    with torch.device("meta"):
        model = GSAForCausalLM(config)
    expected = dict(model.named_parameters())
    missing_in_model = [t for t in mapping if t not in expected]
    if missing_in_model:
        raise ValueError(f"the GSA model has no place for {missing_in_model[:8]}")

    new_state, new = {}, []
    for name, p in expected.items():
        if name in mapping:
            t = state[mapping[name]]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{mapping[name]} has shape {tuple(t.shape)}, the GSA model expects {tuple(p.shape)} for {name}")
            new_state[name] = t.to(dtype=dtype, copy=given)  # a loaded-here source is moved, not copied
            continue
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        new.append(name)
        if name.endswith("attn.f_proj.weight"):
            w = torch.zeros(p.shape, dtype=torch.float32, device=ref.device)
            if gate_init_std > 0:
                w.normal_(0.0, gate_init_std)
            new_state[name] = w.to(dtype)
        elif name.endswith("attn.f_proj.bias"):
            b = gate_bias_init(config.num_slots, config.gate_logit_normalizer, decay_range)
            new_state[name] = b.repeat(p.shape[0] // config.num_slots).to(device=ref.device, dtype=dtype)
        elif name.endswith("norm.weight"):
            new_state[name] = torch.ones(p.shape, dtype=dtype, device=ref.device)
        elif name.endswith(".bias"):  # a bias the source lacks (e.g. o_proj next to biased q/k/v)
            new_state[name] = torch.zeros(p.shape, dtype=dtype, device=ref.device)
        else:
            raise ValueError(f"don't know how to initialize the new parameter {name}")
    model.load_state_dict(new_state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left uninitialized by the conversion: {leftover}")
    if getattr(source, "generation_config", None) is not None:
        model.generation_config = source.generation_config
    model.eval()
    report = ConversionReport(copied=dict(mapping), new=new, notes=notes)
    return (model, report) if return_report else model


def _dtype(name: str):
    if name == "auto":
        return None
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fla_gsa.models.convert",
        description="Convert a Llama/Mistral-style checkpoint into a GSA model (T2R), keeping every weight.")
    parser.add_argument("src", help="source model directory or hub id")
    parser.add_argument("dst", help="output directory (save_pretrained)")
    parser.add_argument("--num-slots", type=int, default=64)
    parser.add_argument("--gate-logit-normalizer", type=float, default=8.0)
    parser.add_argument("--layer-types", default=None,
                        help="comma-separated 'gsa'/'attention' per layer (default: all gsa)")
    parser.add_argument("--decay-range", type=float, nargs=2, default=(0.9, 0.999), metavar=("FAST", "SLOW"))
    parser.add_argument("--gate-init-std", type=float, default=0.0)
    parser.add_argument("--dtype", type=_dtype, default=None, help="auto (default), float32, bfloat16, float16")
    args = parser.parse_args(argv)

    layer_types = args.layer_types.split(",") if args.layer_types else None
    model, report = convert_from_llama(args.src, num_slots=args.num_slots,
                                       gate_logit_normalizer=args.gate_logit_normalizer, layer_types=layer_types,
                                       decay_range=tuple(args.decay_range), gate_init_std=args.gate_init_std,
                                       dtype=args.dtype, return_report=True)
    model.save_pretrained(args.dst)
    if os.path.isdir(args.src):
        for f in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(args.src, f)):
                shutil.copy2(os.path.join(args.src, f), os.path.join(args.dst, f))
    print(report)
    print(f"saved {type(model).__name__} to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
