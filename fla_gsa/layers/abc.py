"""ABC layer (Peng et al., 2022, "ABC: Attention with Bounded-memory Control"), as in
flash-linear-attention: GSA whose slot writes are a softmax over *time* instead of a learned gate.

    q, k (rotary), v = W_q x, W_k x, W_v x;   e = clamp(W_s x, ±32)     (slot logits, M per kv head)
    z_t = log Σ_{j≤t} exp(e_j)                                         (running log-sum-exp over time)
    s_t = exp(e_t − z_t),  g_t = z_{t−1} − z_t                          (writes and forget gates)
    o = GSA(q, k, v, s, g);   y = W_o · (RMSNorm(o) ⊙ swish(W_g x))

The normalizer ``z`` is not part of GSA's ``(hk, hv)`` state, so the layer computes ``s`` and ``g``
itself and keeps ``z`` in the cache: a decoding step continues ``z`` from the prefix instead of
restarting it (which is what ``fused_recurrent_abc`` on one token would do).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fla_gsa.layers.base import RecurrentLayer
from fla_gsa.layers.utils import check_mode, check_positive_int, resolve_heads, rotate
from fla_gsa.modules import FusedRMSNormGated, RotaryEmbedding
from fla_gsa.ops.gsa.abc_gates import abc_slot_gates_triton
from fla_gsa.ops.gsa.utils import logcumsumexp_time
from fla_gsa.ops.utils.backend import use_kernels
from fla_gsa.ops.utils.checks import check_checkpoint_level

# Log-sum-exp of "nothing yet" and the slot logit given to padding. Finite, so no inf − inf appears in
# values or gradients; far enough below any clamped logit (|e| <= 32) that exp(NEG - z) is exactly 0 in
# fp32 and logaddexp(NEG, e) is exactly e.
NEG = -1.0e4


def abc_slot_gates(e: torch.Tensor, z0: torch.Tensor | None, mask: torch.Tensor | None):
    """ABC's writes and gates from slot logits ``e [B, T, H, M]``, continuing the running
    log-sum-exp ``z0 [B, H, M]`` (None: a fresh sequence). Padded positions (``mask [B, T]`` False)
    take the logit ``NEG``, which leaves ``z`` unchanged once it holds a real token.

    Returns ``(s, g, z_T)``, ``s`` and ``g [B, T, H, M]`` and ``z_T [B, H, M]`` (the ``z0`` of the next
    call), all fp32 (float64 for float64 ``e``: a reference run). ``g = 0`` where the previous ``z`` is
    empty (``<= NEG / 2``: a fresh sequence's first real token and any padding before it), since the
    state it would forget is empty.

    CUDA tensors (and any under the Triton interpreter) run the Triton kernels of
    :mod:`fla_gsa.ops.gsa.abc_gates`, with the same rules; CPU tensors and float64 run PyTorch.
    ``z0`` gets a gradient on both paths, though the layer passes it detached (cached state)."""
    x = e.to(torch.promote_types(e.dtype, torch.float32))
    if mask is not None:
        x = x.masked_fill(~mask[:, :, None, None], NEG)
    if use_kernels(e, z0):
        return abc_slot_gates_triton(x, z0=None if z0 is None else z0.float(), z_empty=NEG / 2,
                                     output_final_z=True)
    z = logcumsumexp_time(x)
    if z0 is not None:
        z0 = z0[:, None].to(x.dtype)
        z = torch.logaddexp(z0, z)
    z_prev = torch.cat([z0 if z0 is not None else z.new_full(z[:, :1].shape, NEG), z[:, :-1]], dim=1)
    g = torch.where(z_prev > NEG / 2, z_prev - z, torch.zeros_like(z))
    s = (x - z).exp()
    return s, g, z[:, -1]


class ABCAttention(RecurrentLayer):
    """Attention with bounded-memory control: GSA with writes normalized by a softmax over time.

    Args:
        hidden_size: ``D``.
        num_heads: query heads ``HQ``.
        num_kv_heads: key/value (and slot) heads ``H``; default ``num_heads``.
        head_dim: ``K = V`` per head; default ``hidden_size // num_heads``.
        num_slots: ``M`` memory slots per key/value head.
        norm_eps: epsilon of the gated output RMSNorm.
        mode: ``"chunk"`` or ``"fused_recurrent"`` (a single token always takes the recurrent step).
        checkpoint_level: of the chunked op in training: 0 (default) keeps the chunk-boundary states for
            the backward, 1 recomputes them there (less memory, a slower backward).
        scale: factor on the slot logits; default ``head_dim ** -0.5``.
        use_rope: rotary embedding on ``q`` and ``k`` (base ``rope_theta``).
        clamp_min, clamp_max: range of the slot logits.
        attention_bias: biases on ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
        use_short_conv, conv_size, conv_bias: short convolutions on ``q``, ``k``, ``v``.
        layer_idx: the layer's index in the model's cache.

    Shapes: as :class:`fla_gsa.layers.GatedSlotAttention`.

    Example:
        >>> import torch
        >>> from fla_gsa.layers import ABCAttention
        >>> ABCAttention(hidden_size=64, num_heads=4, num_slots=16)(torch.randn(2, 10, 64))[0].shape
        torch.Size([2, 10, 64])
    """

    uses_positions = True  # rotary (packed beside q, k, v either way)

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        num_slots: int = 64,
        norm_eps: float = 1e-6,
        mode: str = "chunk",
        checkpoint_level: int = 0,
        scale: float | None = None,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        clamp_min: float = -32.0,
        clamp_max: float = 32.0,
        attention_bias: bool = False,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
        **kwargs,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = resolve_heads(hidden_size, num_heads, num_kv_heads, head_dim)
        self.num_slots = check_positive_int(num_slots, "num_slots")
        if not -NEG / 2 > clamp_max > clamp_min > NEG / 2:
            raise ValueError(f"need {NEG / 2} < clamp_min < clamp_max < {-NEG / 2}, got {clamp_min}, {clamp_max}")
        self.clamp_min, self.clamp_max = float(clamp_min), float(clamp_max)
        self.mode = check_mode(mode)
        self.checkpoint_level = check_checkpoint_level(checkpoint_level)
        self.scale = scale
        self.layer_idx = layer_idx
        self.use_short_conv = use_short_conv

        H, HQ, K, M = self.num_kv_heads, self.num_heads, self.head_dim, self.num_slots
        self.make_projections(hidden_size, attention_bias, use_short_conv, conv_size, conv_bias)
        self.s_proj = nn.Linear(hidden_size, H * M, bias=False)
        self.g_proj = nn.Linear(hidden_size, HQ * K, bias=False)
        self.rotary = RotaryEmbedding(K, base=rope_theta) if use_rope else None
        self.g_norm = FusedRMSNormGated(K, eps=norm_eps)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, num_slots={self.num_slots}, use_rope={self.rotary is not None}")

    def project(self, x):
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x), self.s_proj(x)]

    def prepare(self, xs, state, mask, positions):
        q, k, v, e = xs
        e = e.unflatten(-1, (-1, self.num_slots)).clamp(self.clamp_min, self.clamp_max)
        z0 = state.extra.get("slot_lse") if state is not None else None
        s, g, z = abc_slot_gates(e, z0, mask)
        if self.rotary is not None and self.convs is None:
            K = self.head_dim
            q, k = rotate(self.rotary, q.unflatten(-1, (-1, K)), k.unflatten(-1, (-1, K)), positions)
            q, k = q.flatten(-2), k.flatten(-2)
        return [q, k, v, s.to(q.dtype), g, positions], {"slot_lse": z}

    def mix(self, xs, initial_state, cu_seqlens, output_final_state):
        q, k, v, s, g, positions = xs
        K = self.head_dim
        q, k, v = (x.unflatten(-1, (-1, K)) for x in (q, k, v))
        if self.rotary is not None and self.convs is not None:  # rotary after the convolutions
            q, k = rotate(self.rotary, q, k, positions)
        return self.gsa_op(q, k, v, s, g, initial_state, cu_seqlens, output_final_state)

    def finish_extra(self, extra, old, p):
        return extra

    def output(self, o, x):
        g = self.g_proj(x).unflatten(-1, (-1, self.head_dim))
        return self.o_proj(self.g_norm(o, g).flatten(-2))
