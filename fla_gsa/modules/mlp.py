"""The gated MLP of Llama-style blocks: ``down(silu(gate(x)) · up(x))``."""
from __future__ import annotations

import torch
import torch.nn as nn

from fla_gsa.modules.activations import swiglu_linear
from fla_gsa.modules.linear import fused_linear

_SWISH = ("swish", "silu")


def default_intermediate_size(hidden_size: int, hidden_ratio: float = 4) -> int:
    """``int(hidden_size · hidden_ratio · 2/3)`` rounded up to a multiple of 256 (the SwiGLU MLP keeps
    the parameter count of a ``hidden_ratio`` MLP with two matrices)."""
    size = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward block: ``down_proj(swiglu(gate_proj(x), up_proj(x)))``.

    The projection names match Llama's ``LlamaMLP``, so converted checkpoints load by name.

    Args:
        hidden_size: ``D``, input and output size.
        intermediate_size: ``I``; default :func:`default_intermediate_size` of ``hidden_size`` and
            ``hidden_ratio``.
        hidden_ratio: used only when ``intermediate_size`` is ``None``.
        hidden_act: ``"swish"`` (alias ``"silu"``), the only activation of a SwiGLU block.
        bias: give the three projections a bias.

    Shapes:
        ``forward(x [..., D])`` returns ``[..., D]``.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import GatedMLP
        >>> mlp = GatedMLP(100)
        >>> mlp.intermediate_size
        512
        >>> mlp(torch.randn(2, 3, 100)).shape
        torch.Size([2, 3, 100])
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int | None = None,
        hidden_ratio: float = 4,
        hidden_act: str = "swish",
        bias: bool = False,
    ):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if hidden_act not in _SWISH:
            raise ValueError(f"hidden_act must be 'swish' (or 'silu') for a SwiGLU MLP, got {hidden_act!r}")
        if intermediate_size is None:
            if not isinstance(hidden_ratio, (int, float)) or hidden_ratio <= 0:
                raise ValueError(f"hidden_ratio must be a positive number, got {hidden_ratio!r}")
            intermediate_size = default_intermediate_size(hidden_size, hidden_ratio)
        elif isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int) or intermediate_size < 1:
            raise ValueError(f"intermediate_size must be a positive int or None, got {intermediate_size!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.hidden_ratio = hidden_ratio
        self.hidden_act = hidden_act
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [..., {self.hidden_size}] (hidden_size), got {tuple(x.shape)}")
        # gate and up as one product [gate | up] (one dx product in the backward); the down projection's
        # input, swiglu(gate, up), is recomputed in the backward instead of kept (fp32 weight gradients
        # under autocast: fla_gsa.modules.linear)
        return swiglu_linear(fused_linear(x, [self.gate_proj, self.up_proj]), None,
                             self.down_proj.weight, self.down_proj.bias)
