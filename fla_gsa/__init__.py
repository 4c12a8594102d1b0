"""fla_gsa: fast, composable gated linear attention built around Gated Slot Attention."""
__version__ = "0.1.0"

# Registers the models with transformers' AutoConfig / AutoModel / AutoModelForCausalLM, so that
# `AutoModelForCausalLM.from_pretrained(dir)` works after `import fla_gsa`.
import fla_gsa.models  # noqa: E402,F401
