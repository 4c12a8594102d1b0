"""Building blocks of the layers and models: norms, the gated MLP, the short convolution, rotary
embeddings and the fused (linear) cross entropy. Each runs Triton kernels on CUDA tensors (and under
``TRITON_INTERPRET=1``) where it has them, plain PyTorch on CPU tensors."""
from fla_gsa.modules.activations import swiglu, swiglu_linear
from fla_gsa.modules.convolution import ShortConvolution
from fla_gsa.modules.cross_entropy import FusedCrossEntropyLoss, fused_cross_entropy
from fla_gsa.modules.linear import fused_linear, linear, mm_fp32
from fla_gsa.modules.linear_cross_entropy import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from fla_gsa.modules.layernorm import FusedRMSNormGated, RMSNorm, rms_norm, rms_norm_gated
from fla_gsa.modules.mlp import GatedMLP
from fla_gsa.modules.rotary import RotaryEmbedding, apply_rotary

__all__ = [
    "RMSNorm",
    "FusedRMSNormGated",
    "rms_norm",
    "rms_norm_gated",
    "GatedMLP",
    "swiglu",
    "swiglu_linear",
    "ShortConvolution",
    "RotaryEmbedding",
    "apply_rotary",
    "FusedCrossEntropyLoss",
    "fused_cross_entropy",
    "linear",
    "fused_linear",
    "mm_fp32",
    "FusedLinearCrossEntropyLoss",
    "fused_linear_cross_entropy",
]
