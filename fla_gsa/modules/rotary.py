"""Rotary position embedding (RoPE), Llama / Hugging Face convention.

For position ``p`` and frequency ``θ_i = base^(−2i/dim)``, ``i < dim/2``, the first ``dim`` features of
each head are rotated by the angles ``p·θ_i``; the rest pass through unchanged.

- rotate-half (default, Llama/HF): pairs are ``(x_i, x_{i + dim/2})``.
- interleaved (GPT-J / original RoFormer): pairs are ``(x_{2i}, x_{2i+1})``.

The angles are formed in float64 (``p·θ`` loses ~``p·2^-24`` radians in fp32, 4e-3 at 64K) and handed
to the rotation as fp32 ``cos``/``sin`` tables; the rotation is done in fp32 (fp64 for fp64 inputs),
then cast back. On CUDA tensors (or under ``TRITON_INTERPRET=1``) one Triton kernel does the rotation,
and its backward is the same kernel rotating by the opposite angle (``sin → −sin``); otherwise plain
PyTorch with autograd.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_cu_seqlens, check_same_device, check_tensor
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv, next_power_of_2


@lean
@triton.jit
def rotary_kernel(
    x, cos, sin, y, T, H, s_cb,
    D: tl.constexpr, R: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
    INTERLEAVED: tl.constexpr, REVERSE: tl.constexpr, HAS_REST: tl.constexpr,
):
    # One token and BH heads per program. x, y: contiguous [B, T, H, D]; cos, sin: fp32 [B or 1, T, R]
    # (batch stride s_cb, 0 when shared). The first 2R features are rotated, the rest copied.
    i_bt, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_t = i_bt // T, i_bt % T
    o_h = i_h * BH + tl.arange(0, BH)
    o_r = tl.arange(0, BR)
    m_h, m_r = o_h < H, o_r < R
    m = m_h[:, None] & m_r[None, :]

    p_cs = i_b.to(tl.int64) * s_cb + i_t.to(tl.int64) * R + o_r
    b_c = tl.load(cos + p_cs, mask=m_r, other=0).to(tl.float32)[None, :]  # [1, BR]
    b_s = tl.load(sin + p_cs, mask=m_r, other=0).to(tl.float32)[None, :]
    if REVERSE:
        b_s = -b_s
    row = (i_bt.to(tl.int64) * H + o_h)[:, None] * D  # [BH, 1]
    if INTERLEAVED:
        o_1, o_2 = 2 * o_r, 2 * o_r + 1
    else:
        o_1, o_2 = o_r, o_r + R
    b_x1 = tl.load(x + row + o_1[None, :], mask=m, other=0).to(tl.float32)  # [BH, BR]
    b_x2 = tl.load(x + row + o_2[None, :], mask=m, other=0).to(tl.float32)
    b_y1 = b_x1 * b_c - b_x2 * b_s
    b_y2 = b_x2 * b_c + b_x1 * b_s
    tl.store(y + row + o_1[None, :], b_y1.to(y.dtype.element_ty), mask=m)
    tl.store(y + row + o_2[None, :], b_y2.to(y.dtype.element_ty), mask=m)
    if HAS_REST:
        o_p = 2 * R + tl.arange(0, BP)
        m_p = m_h[:, None] & (o_p < D)[None, :]
        tl.store(y + row + o_p[None, :], tl.load(x + row + o_p[None, :], mask=m_p, other=0), mask=m_p)


def rotary_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
               reverse: bool = False) -> torch.Tensor:
    """Launch :func:`rotary_kernel` on ``x [B, T, H, D]`` with fp32 ``cos``/``sin`` ``[B or 1, T, R]``;
    ``reverse`` rotates by the opposite angle (the backward)."""
    x = x.contiguous()
    B, T, H, D = x.shape
    R = cos.shape[-1]
    y = torch.empty_like(x)
    BR = next_power_of_2(R)
    BH = max(1, min(next_power_of_2(H), 2048 // BR))
    HAS_REST = D > 2 * R
    BP = next_power_of_2(D - 2 * R) if HAS_REST else 1
    s_cb = 0 if cos.shape[0] == 1 else T * R
    rotary_kernel[(B * T, cdiv(H, BH))](
        x, cos, sin, y, T, H, s_cb,
        D=D, R=R, BH=BH, BR=BR, BP=BP, INTERLEAVED=interleaved, REVERSE=reverse, HAS_REST=HAS_REST,
        num_warps=min(max(BH * BR // 256, 1), 8),
    )
    return y


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return rotary_fwd(x, cos, sin, interleaved)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # the rotation is orthogonal: its transpose is the rotation by −θ
        return rotary_fwd(dy, cos, sin, ctx.interleaved, reverse=True), None, None, None


def _triton_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``cos``, ``sin`` as contiguous fp32 ``[B or 1, T, R]`` when the Triton kernel can take them
    (``[B or 1, T, 1, R]``, no gradient wanted), else ``None``."""
    if not use_triton(x) or x.dtype == torch.float64 or x.ndim != 4 or x.numel() == 0:
        return None
    B, T = x.shape[:2]
    if cos.shape != sin.shape or cos.ndim != 4 or cos.shape[2] != 1 or cos.shape[1] != T or cos.shape[0] not in (1, B):
        return None
    if cos.requires_grad or sin.requires_grad or cos.device != x.device or sin.device != x.device:
        return None
    R = cos.shape[-1]
    if R == 0 or 2 * R > x.shape[-1]:
        return None
    return (cos.reshape(cos.shape[0], T, R).to(torch.float32).contiguous(),
            sin.reshape(sin.shape[0], T, R).to(torch.float32).contiguous())


def rotary_positions(B: int, T: int, seqlen_offset=0, cu_seqlens: torch.Tensor | None = None,
                     device=None) -> torch.Tensor:
    """Position of every token, int64 ``[B, T]`` (``[1, T]`` when every row shares them): ``offset + t``;
    with ``cu_seqlens`` positions restart at each sequence and ``seqlen_offset`` may be one offset per
    sequence (``[N]``)."""
    t = torch.arange(T, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        N = cu.numel() - 1
        seq = torch.repeat_interleave(torch.arange(N, device=device), cu[1:] - cu[:-1], output_size=T)
        pos = t - cu[seq]
        if isinstance(seqlen_offset, torch.Tensor):
            pos = pos + seqlen_offset.to(device=device, dtype=torch.long)[seq]
        else:
            pos = pos + seqlen_offset
        return pos[None]
    if isinstance(seqlen_offset, torch.Tensor):
        return seqlen_offset.to(device=device, dtype=torch.long)[:, None] + t[None]
    return (t + seqlen_offset)[None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``2·cos.shape[-1]`` features of ``x [B, T, H, D]`` by the angles whose ``cos`` and
    ``sin`` are given (``[B or 1, T, 1, dim/2]``); returns a new tensor of ``x``'s dtype.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import apply_rotary
        >>> x = torch.tensor([[[[1.0, 0.0]]]])  # [B, T, H, D] = [1, 1, 1, 2]
        >>> angle = torch.tensor(torch.pi / 2)
        >>> y = apply_rotary(x, angle.cos().view(1, 1, 1, 1), angle.sin().view(1, 1, 1, 1))
        >>> torch.allclose(y, torch.tensor([0.0, 1.0]), atol=1e-6)  # (1, 0) turned a quarter
        True
    """
    tables = _triton_tables(x, cos, sin)
    if tables is not None:
        return RotaryFunction.apply(x, *tables, bool(interleaved))
    dim = 2 * cos.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    xr = x[..., :dim].to(acc)
    cos, sin = cos.to(acc), sin.to(acc)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, -1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    out = out.to(x.dtype)
    return torch.cat([out, x[..., dim:]], -1) if dim < x.shape[-1] else out


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of queries and keys.

    Args:
        dim: number of rotated features per head (even, ``<= D``; the rest pass through).
        base: frequency base ``θ_i = base^(−2i/dim)``.
        interleaved: pair features ``(2i, 2i+1)`` instead of Llama's rotate-half ``(i, i + dim/2)``.

    Shapes:
        ``forward(q [B, T, HQ, D], k [B, T, H, D], seqlen_offset=0, cu_seqlens=None)`` returns the rotated
        ``(q, k)``. ``seqlen_offset``: the position of the first token, an int or a ``[B]`` tensor (``[N]``
        with ``cu_seqlens``) for cached decoding. With ``cu_seqlens`` (B = 1) positions restart at each
        packed sequence.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import RotaryEmbedding
        >>> rope = RotaryEmbedding(64)
        >>> q, k = torch.randn(2, 10, 8, 64), torch.randn(2, 10, 2, 64)
        >>> q1, k1 = rope(q, k)
        >>> q2, _ = rope(q[:, 7:], k[:, 7:], seqlen_offset=7)
        >>> torch.allclose(q1[:, 7:], q2, atol=1e-6)
        True
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be a positive even int, got {dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 0:
            raise ValueError(f"base must be a positive number, got {base!r}")
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}"

    def inv_freq(self, device=None) -> torch.Tensor:
        """``[dim/2]`` float64 frequencies ``base^(−2i/dim)`` (computed on use, so ``module.to(bfloat16)``
        cannot round them)."""
        return self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` ``[..., dim/2]`` in fp32 for integer ``positions [...]``."""
        angles = positions.to(torch.float64)[..., None] * self.inv_freq(positions.device)
        return angles.cos().float(), angles.sin().float()

    def forward(self, q: torch.Tensor, k: torch.Tensor, seqlen_offset=0, cu_seqlens: torch.Tensor | None = None):
        check_tensor(q, "q", 4, "[B, T, HQ, D]")
        check_tensor(k, "k", 4, "[B, T, H, D]")
        B, T, _, D = q.shape
        if k.shape[:2] != (B, T) or k.shape[3] != D:
            raise ValueError(f"k must have shape [B, T, H, D] = ({B}, {T}, H, {D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
        if D < self.dim:
            raise ValueError(f"the head dimension D={D} of q must be at least the rotary dim={self.dim}")
        check_same_device({"q": q, "k": k, "cu_seqlens": cu_seqlens})
        N = check_cu_seqlens(cu_seqlens, B, T)
        if isinstance(seqlen_offset, torch.Tensor):
            if seqlen_offset.dtype.is_floating_point or seqlen_offset.dtype == torch.bool:
                raise TypeError(f"seqlen_offset must be an int or an integer tensor, got dtype {seqlen_offset.dtype}")
            if seqlen_offset.shape != (N,):
                what = "[N] (one per sequence of cu_seqlens)" if cu_seqlens is not None else "[B]"
                raise ValueError(f"seqlen_offset must have shape {what} = ({N},), got {tuple(seqlen_offset.shape)}")
        elif isinstance(seqlen_offset, bool) or not isinstance(seqlen_offset, int):
            raise TypeError(f"seqlen_offset must be an int or an integer tensor, got {type(seqlen_offset).__name__}")
        pos = rotary_positions(B, T, seqlen_offset, cu_seqlens, device=q.device)  # [B or 1, T]
        cos, sin = self.cos_sin(pos)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B or 1, T, 1, dim/2]
        return apply_rotary(q, cos, sin, self.interleaved), apply_rotary(k, cos, sin, self.interleaved)
