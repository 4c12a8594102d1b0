"""Hugging Face models: :class:`GSAForCausalLM`, :class:`GLAForCausalLM`, :class:`ABCForCausalLM` and the
softmax-attention baseline :class:`TransformerForCausalLM`, any of which can mix layer kinds through
``config.layer_types``; and :func:`convert_from_llama`, which turns a Llama/Mistral-style checkpoint
into a GSA model (T2R).

Importing this package registers the configs and models with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` under ``model_type`` ``"fla_gsa.gsa"``, ``"fla_gsa.gla"``, ``"fla_gsa.abc"`` and
``"fla_gsa.transformer"`` (prefixed, so they coexist with flash-linear-attention's registrations).
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fla_gsa.layers import Cache, LayerState
from fla_gsa.models.configuration import (LAYER_TYPES, ABCConfig, GLAConfig, GSAConfig, HybridConfig,
                                          TransformerConfig)
from fla_gsa.models.modeling import (ABCForCausalLM, ABCModel, GLAForCausalLM, GLAModel, GSAForCausalLM, GSAModel,
                                     HybridBlock, HybridForCausalLM, HybridModel, TransformerForCausalLM,
                                     TransformerModel)

MODELS = {
    GSAConfig: (GSAModel, GSAForCausalLM),
    GLAConfig: (GLAModel, GLAForCausalLM),
    ABCConfig: (ABCModel, ABCForCausalLM),
    TransformerConfig: (TransformerModel, TransformerForCausalLM),
}

for _config, (_model, _lm) in MODELS.items():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)


def __getattr__(name):
    # convert.py is also a script (python -m fla_gsa.models.convert): import it on first use only, so
    # running it does not find it already imported by its own package
    if name in ("convert_from_llama", "ConversionReport"):
        from fla_gsa.models import convert
        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LAYER_TYPES", "Cache", "LayerState", "HybridConfig", "HybridBlock", "HybridModel", "HybridForCausalLM",
    "GSAConfig", "GSAModel", "GSAForCausalLM", "GLAConfig", "GLAModel", "GLAForCausalLM",
    "ABCConfig", "ABCModel", "ABCForCausalLM", "TransformerConfig", "TransformerModel", "TransformerForCausalLM",
    "convert_from_llama", "ConversionReport",
]
