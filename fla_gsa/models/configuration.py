"""Configurations of the language models: one set of fields for every layer kind, so that
``layer_types`` can mix GSA, GLA, ABC and softmax-attention layers in one model.

:class:`GSAConfig`, :class:`GLAConfig`, :class:`ABCConfig` and :class:`TransformerConfig` differ only in
their ``model_type`` and defaults (the layer kind used when ``layer_types`` is not given, and the
gate normalizer). Their ``model_type`` names are prefixed with ``fla_gsa.`` so they never collide with
flash-linear-attention's ``"gsa"``, ``"gla"``, ``"abc"``, ``"transformer"`` in ``AutoConfig``.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from fla_gsa.ops.utils.checks import check_checkpoint_level

LAYER_TYPES = ("gsa", "gla", "abc", "attention")
# transformers >= 5 rewrites the legacy name "attention" to "full_attention" in some code paths
_ALIASES = {"full_attention": "attention"}


def normalize_layer_types(layer_types, num_hidden_layers: int, default: str) -> list[str]:
    """Check ``layer_types`` (one entry per layer from :data:`LAYER_TYPES`, or None for all ``default``)."""
    if layer_types is None:
        return [default] * num_hidden_layers
    if isinstance(layer_types, str) or not hasattr(layer_types, "__iter__"):
        raise TypeError(f"layer_types must be a list of layer kinds from {LAYER_TYPES}, got {layer_types!r}")
    kinds = [_ALIASES.get(t, t) for t in layer_types]
    bad = [t for t in kinds if t not in LAYER_TYPES]
    if bad:
        raise ValueError(f"layer_types entries must be in {LAYER_TYPES}, got {bad} in {list(layer_types)}")
    if len(kinds) != num_hidden_layers:
        raise ValueError(f"layer_types must have one entry per layer (num_hidden_layers={num_hidden_layers}), "
                         f"got {len(kinds)}: {kinds}")
    return kinds


class HybridConfig(PretrainedConfig):
    r"""Fields shared by every model of fla_gsa (the base of the registered configs).

    Args:
        vocab_size: number of tokens.
        hidden_size: model width ``D``.
        num_hidden_layers: number of blocks.
        num_heads: query heads of every token mixer.
        num_kv_heads: key/value heads (GQA: ``num_heads`` a multiple); default ``num_heads``.
        head_dim: per-head width (keys and values); default ``hidden_size // num_heads``.
        num_slots: memory slots per key/value head of GSA and ABC layers.
        gate_logit_normalizer: ``τ`` of the forget gates ``logsigmoid(·) / τ`` of GSA and GLA layers;
            None for each kind's default (GSA 8, GLA 16).
        gate_low_rank_dim: rank of GLA's forget-gate projection.
        gate_bias: give GSA's slot-gate projection ``f_proj`` a bias (converted checkpoints use it to
            place the initial forget gates).
        attn_scale: factor on the query-key logits of every token mixer; None for each kind's default
            (GSA 1, as in the paper; GLA, ABC and attention ``head_dim ** -0.5``).
        attention_bias: biases on the q/k/v/o projections of every token mixer (Llama's
            ``attention_bias``).
        mlp_bias: biases on the MLP projections.
        use_short_conv: short causal convolutions on q/k/v of the recurrent layers; ``conv_size`` taps,
            ``conv_bias``.
        use_rope: rotary embedding in ABC layers (attention layers always use it).
        rope_theta: rotary base.
        attn_mode: ``"chunk"`` or ``"fused_recurrent"``, the op mode of recurrent layers for more than
            one token (one token always takes the fused recurrent step).
        checkpoint_level: of the recurrent layers' chunked ops in training: 0 keeps the chunk-boundary
            states for the backward (GSA: ``2 · H · K · M`` elements of the compute dtype per 64 tokens,
            128 MiB per layer at 16K tokens of the 1.3B shape), 1 recomputes them there.
        intermediate_size: MLP width; default from ``hidden_ratio`` (SwiGLU, rounded to 256).
        hidden_ratio: used when ``intermediate_size`` is None.
        hidden_act: MLP activation (``"swish"``).
        max_position_embeddings: the longest context the model is meant for (informational; recurrent
            layers have no limit).
        rms_norm_eps: epsilon of every RMSNorm.
        initializer_range: std of the normal initialization of linear and embedding weights.
        tie_word_embeddings: share the input embedding with the LM head.
        use_cache: return a :class:`fla_gsa.layers.Cache` by default (not in training).
        fuse_linear_cross_entropy: with ``labels``, compute the loss chunk by chunk from the hidden
            states, never materializing the ``[N, vocab]`` logits.
        layer_types: one entry per layer from ``"gsa"``, ``"gla"``, ``"abc"``, ``"attention"``; default:
            all layers of the model's own kind.
        pad_token_id, bos_token_id, eos_token_id: special tokens.

    Example:
        >>> from fla_gsa.models import HybridConfig
        >>> cfg = HybridConfig(hidden_size=256, num_hidden_layers=4, num_heads=4, layer_types=["gsa", "gla", "abc", "attention"])
        >>> cfg.layer_types, cfg.gate_normalizer("gsa"), cfg.gate_normalizer("gla")
        (['gsa', 'gla', 'abc', 'attention'], 8.0, 16.0)
    """

    model_type = "fla_gsa.hybrid"
    default_layer_type = "gsa"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_heads: int = 16,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        num_slots: int = 64,
        gate_logit_normalizer: float | None = None,
        gate_low_rank_dim: int = 16,
        gate_bias: bool = False,
        attn_scale: float | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        attn_mode: str = "chunk",
        checkpoint_level: int = 0,
        intermediate_size: int | None = None,
        hidden_ratio: float = 4,
        hidden_act: str = "swish",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        fuse_linear_cross_entropy: bool = True,
        layer_types: list[str] | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_slots = num_slots
        self.gate_logit_normalizer = gate_logit_normalizer
        self.gate_low_rank_dim = gate_low_rank_dim
        self.gate_bias = gate_bias
        self.attn_scale = attn_scale
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.conv_bias = conv_bias
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.attn_mode = attn_mode
        self.checkpoint_level = checkpoint_level
        self.intermediate_size = intermediate_size
        self.hidden_ratio = hidden_ratio
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        kinds = normalize_layer_types(layer_types, num_hidden_layers, self.default_layer_type)
        if attn_mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"attn_mode must be 'chunk' or 'fused_recurrent', got {attn_mode!r}")
        check_checkpoint_level(checkpoint_level)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Set after the base __init__: transformers >= 5 validates `layer_types` there against its own
        # list of kinds (and renames "attention"), which knows nothing of "gsa", "gla" or "abc".
        self.layer_types = kinds

    @property
    def num_attention_heads(self) -> int:  # the name other Hugging Face code looks for
        return self.num_heads

    def gate_normalizer(self, kind: str) -> float:
        if self.gate_logit_normalizer is not None:
            return float(self.gate_logit_normalizer)
        return {"gsa": 8.0, "gla": 16.0}.get(kind, 8.0)

    def validate(self):
        """Hugging Face's strict validation (run on ``save_pretrained``) without its ``layer_types``
        check, which only knows Hugging Face's kinds; ours is :func:`normalize_layer_types`."""
        base = getattr(super(), "validate", None)
        if base is not None:
            layer_types = self.__dict__.pop("layer_types", None)
            try:
                base()
            finally:
                self.__dict__["layer_types"] = layer_types
        self.layer_types = normalize_layer_types(self.layer_types, self.num_hidden_layers, self.default_layer_type)


class GSAConfig(HybridConfig):
    """Configuration of :class:`fla_gsa.models.GSAForCausalLM`: every layer GSA unless ``layer_types``
    says otherwise. Fields: see :class:`HybridConfig`.

    Example:
        >>> from fla_gsa.models import GSAConfig
        >>> cfg = GSAConfig(hidden_size=256, num_hidden_layers=4, num_heads=4, layer_types=["gsa", "gsa", "attention", "gsa"])
        >>> cfg.model_type, cfg.layer_types[2]
        ('fla_gsa.gsa', 'attention')
    """

    model_type = "fla_gsa.gsa"
    default_layer_type = "gsa"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


class GLAConfig(HybridConfig):
    """Configuration of :class:`fla_gsa.models.GLAForCausalLM` (default: every layer GLA). Fields: see
    :class:`HybridConfig`.

    Example:
        >>> from fla_gsa.models import GLAConfig
        >>> cfg = GLAConfig(hidden_size=256, num_hidden_layers=2, num_heads=4)
        >>> cfg.model_type, cfg.layer_types, cfg.gate_normalizer("gla")
        ('fla_gsa.gla', ['gla', 'gla'], 16.0)
    """

    model_type = "fla_gsa.gla"
    default_layer_type = "gla"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


class ABCConfig(HybridConfig):
    """Configuration of :class:`fla_gsa.models.ABCForCausalLM` (default: every layer ABC). Fields: see
    :class:`HybridConfig`.

    Example:
        >>> from fla_gsa.models import ABCConfig
        >>> cfg = ABCConfig(hidden_size=256, num_hidden_layers=2, num_heads=4, num_slots=32)
        >>> cfg.model_type, cfg.layer_types, cfg.num_slots
        ('fla_gsa.abc', ['abc', 'abc'], 32)
    """

    model_type = "fla_gsa.abc"
    default_layer_type = "abc"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


class TransformerConfig(HybridConfig):
    """Configuration of :class:`fla_gsa.models.TransformerForCausalLM`, the softmax-attention baseline
    (default: every layer ``"attention"``, with RoPE and GQA). Fields: see :class:`HybridConfig`.

    Example:
        >>> from fla_gsa.models import TransformerConfig
        >>> cfg = TransformerConfig(hidden_size=256, num_hidden_layers=2, num_heads=8, num_kv_heads=2)
        >>> cfg.model_type, cfg.layer_types
        ('fla_gsa.transformer', ['attention', 'attention'])
    """

    model_type = "fla_gsa.transformer"
    default_layer_type = "attention"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
