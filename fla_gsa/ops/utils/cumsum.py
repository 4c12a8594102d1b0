"""Cumulative sums of log-gates: within each chunk (``chunk_local_cumsum``, the ``G`` of the chunked
algorithm) and over whole sequences (``chunk_global_cumsum``, used for gate gradients).

Both take vector gates ``[B, T, H, D]`` or scalar gates ``[B, T, H]``, forward or reverse, varlen-aware,
accumulate in fp32 and are differentiable (the gradient of a cumsum is the reverse cumsum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_chunk_size, check_cu_seqlens, check_tensor
from fla_gsa.ops.utils.index import chunk_grid, seq_bounds
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv, chunk_bounds, next_pow2
from fla_gsa.ops.utils.triton_utils import seq_bounds as tl_seq_bounds


@lean
@triton.jit
def chunk_local_cumsum_kernel(
    s, o, x, xd, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    REVERSE: tl.constexpr, HAS_SCALE: tl.constexpr, IS_VARLEN: tl.constexpr, DECAY: tl.constexpr,
):
    i_d, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    _, i_t, bos, T = chunk_bounds(i_b, i_t, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m = (o_t < T)[:, None] & (o_d < D)[None, :]
    offs = (bos + o_t)[:, None] * H * D + i_h * D + o_d[None, :]
    b_s = tl.load(s + offs, mask=m, other=0).to(tl.float32)  # [BT, BD]
    b_o = tl.cumsum(b_s, axis=0)
    if REVERSE:
        b_o = tl.sum(b_s, axis=0)[None, :] - b_o + b_s
    if HAS_SCALE:
        b_o = b_o * scale
    b_o = b_o.to(o.dtype.element_ty)
    tl.store(o + offs, b_o, mask=m)
    if DECAY:  # xd = x * e^{G_L - G}, G_L the chunk's last row exactly as stored (the scans read that row)
        last = tl.minimum(i_t * BT + BT, T) - 1
        b_l = tl.sum(tl.where((o_t == last)[:, None], b_o.to(tl.float32), 0), axis=0)  # [BD]
        b_x = tl.load(x + offs, mask=m, other=0).to(tl.float32)
        b_x = b_x * tl.exp(b_l[None, :] - b_o.to(tl.float32))
        tl.store(xd + offs, b_x.to(xd.dtype.element_ty), mask=m)


@lean
@triton.jit
def decay_kernel(x, g, y, N, D: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    # x, y [.., H * GROUP, D] and g [.., H, D], flat: head i of x reads head i // GROUP of g
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_x = tl.load(x + o, mask=m, other=0).to(tl.float32)
    b_g = tl.load(g + (o // (GROUP * D)) * D + o % D, mask=m, other=0).to(tl.float32)
    tl.store(y + o, (b_x * tl.exp(b_g)).to(y.dtype.element_ty), mask=m)


@lean
@triton.jit
def chunk_global_cumsum_kernel(
    s, o, cu_seqlens, scale, T,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    REVERSE: tl.constexpr, HAS_SCALE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # One program walks one sequence chunk by chunk, carrying the running sum.
    i_d, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = tl_seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_d = i_d * BD + tl.arange(0, BD)
    b_carry = tl.zeros([BD], dtype=tl.float32)
    NT = tl.cdiv(T, BT)
    for i in range(0, NT):
        i_t = NT - 1 - i if REVERSE else i
        o_t = i_t * BT + tl.arange(0, BT)
        m = (o_t < T)[:, None] & (o_d < D)[None, :]
        offs = (bos + o_t)[:, None] * H * D + i_h * D + o_d[None, :]
        b_s = tl.load(s + offs, mask=m, other=0).to(tl.float32)
        b_c = tl.cumsum(b_s, axis=0)
        b_tot = tl.sum(b_s, axis=0)
        if REVERSE:
            b_c = b_tot[None, :] - b_c + b_s
        b_o = b_c + b_carry[None, :]
        b_carry += b_tot
        if HAS_SCALE:
            b_o = b_o * scale
        tl.store(o + offs, b_o.to(o.dtype.element_ty), mask=m)


def _as_4d(g: torch.Tensor) -> torch.Tensor:
    return g.unsqueeze(-1) if g.ndim == 3 else g


def _torch_cumsum(g, chunk_size, reverse, cu_seqlens):
    """Vectorized PyTorch version: reshape each sequence into chunks (``chunk_size=None``: one chunk)."""
    out = torch.empty_like(g, dtype=torch.float32)
    gf = g.float()
    for b, bos, eos in seq_bounds(cu_seqlens, g.shape[0], g.shape[1]):
        x = gf[b, bos:eos]
        L = eos - bos
        C = L if chunk_size is None else chunk_size
        pad = (-L) % C
        x = torch.nn.functional.pad(x, (0, 0) * (x.ndim - 1) + (0, pad)).unflatten(0, (-1, C))
        if reverse:
            x = x.flip(1).cumsum(1).flip(1)
        else:
            x = x.cumsum(1)
        out[b, bos:eos] = x.flatten(0, 1)[:L]
    return out


def _launch(g, chunk_size, reverse, scale, cu_seqlens, output_dtype, x=None, xd=None):
    g4 = _as_4d(g).contiguous()
    B, T, H, D = g4.shape
    o = torch.empty_like(g4, dtype=output_dtype)
    BD = min(next_pow2(D, 1), 64)
    common = dict(H=H, D=D, BD=BD, REVERSE=reverse, HAS_SCALE=scale is not None, IS_VARLEN=cu_seqlens is not None)
    if chunk_size is not None:
        NT, indices = chunk_grid(cu_seqlens, T, chunk_size)
        grid = (cdiv(D, BD), NT, B * H)
        chunk_local_cumsum_kernel[grid](g4, o, x, xd, cu_seqlens, indices, scale or 1.0, T, BT=chunk_size,
                                        DECAY=x is not None, **common)
    else:
        N = B if cu_seqlens is None else len(cu_seqlens) - 1
        grid = (cdiv(D, BD), N * H)
        chunk_global_cumsum_kernel[grid](g4, o, cu_seqlens, scale or 1.0, T, BT=64, **common)
    return o.view(g.shape)


def cumsum_fwd(g, chunk_size=None, reverse=False, scale=None, cu_seqlens=None, output_dtype=torch.float32,
               decay=None, decay_dtype=None):
    """Unchecked, non-differentiable cumsum for use inside other ops (``chunk_size=None``: whole
    sequences).

    ``decay`` (a tensor of ``g``'s shape, with ``chunk_size``, forward, no ``scale``): also return it
    decayed to the end of its chunk, ``decay * e^{G_L - G}`` with ``G`` the result and ``G_L`` its value
    at the chunk's last row, in ``decay_dtype`` (default ``decay``'s): the gated input of a state scan
    (``chunk_fwd_h(decayed=True)``). Returns ``(G, decayed)`` then."""
    if decay is not None and (chunk_size is None or reverse or scale is not None):
        raise ValueError("cumsum_fwd: decay needs chunk_size, reverse=False and no scale")
    if use_triton(g):
        if decay is None:
            return _launch(g, chunk_size, reverse, scale, cu_seqlens, output_dtype)
        xd = torch.empty_like(decay, dtype=decay_dtype or decay.dtype)
        G = _launch(g, chunk_size, reverse, scale, cu_seqlens, output_dtype, decay.contiguous(), xd)
        return G, xd
    o = _torch_cumsum(_as_4d(g), chunk_size, reverse, cu_seqlens).view(g.shape)
    o = (o * scale if scale is not None else o).to(output_dtype)
    if decay is None:
        return o
    last = o.new_empty(o.shape, dtype=torch.float32)
    for b, bos, eos in seq_bounds(cu_seqlens, g.shape[0], g.shape[1]):
        for t0 in range(bos, eos, chunk_size):
            t1 = min(t0 + chunk_size, eos)
            last[b, t0:t1] = o[b, t1 - 1].float()
    return o, (decay.float() * (last - o.float()).exp()).to(decay_dtype or decay.dtype)


def decay_fwd(x, G, dtype):
    """``x * e^G`` in ``dtype`` (fp32 arithmetic) for ``x [B, T, HQ, D]`` and in-chunk cumsums ``G [B,
    T, H, D]`` (``HQ = GROUP * H``: query head ``i`` takes ``G``'s head ``i // GROUP``): the gated input of a
    backward state scan (``chunk_bwd_dh(decayed=True)``). One Triton launch."""
    B, T, HQ, D = x.shape
    group = HQ // G.shape[2]
    if not use_triton(x):
        return (x.float() * G.float().repeat_interleave(group, dim=2).exp()).to(dtype)
    x, G = x.contiguous(), G.contiguous()
    y = torch.empty_like(x, dtype=dtype)
    N, BLOCK = x.numel(), 2048
    decay_kernel[(cdiv(N, BLOCK),)](x, G, y, N, D=D, GROUP=group, BLOCK=BLOCK)
    return y


class _CumsumFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, chunk_size, reverse, scale, cu_seqlens, output_dtype):
        ctx.args = (chunk_size, reverse, scale, cu_seqlens)
        ctx.in_dtype = g.dtype
        return cumsum_fwd(g, chunk_size, reverse, scale, cu_seqlens, output_dtype)

    @staticmethod
    def backward(ctx, do):
        chunk_size, reverse, scale, cu_seqlens = ctx.args
        dg = _CumsumFunction.apply(do, chunk_size, not reverse, scale, cu_seqlens, ctx.in_dtype)
        return dg, None, None, None, None, None


def _check(g, chunk_size, cu_seqlens, output_dtype):
    check_tensor(g, "g")
    if g.ndim not in (3, 4):
        raise ValueError(f"g must have shape [B, T, H] (scalar gates) or [B, T, H, D], got {tuple(g.shape)}")
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    check_cu_seqlens(cu_seqlens, g.shape[0], g.shape[1])
    if not (isinstance(output_dtype, torch.dtype) and output_dtype.is_floating_point):
        raise TypeError(f"output_dtype must be a floating torch.dtype, got {output_dtype!r}")


def chunk_local_cumsum(
    g: torch.Tensor,
    chunk_size: int,
    reverse: bool = False,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cumulative sum of ``g`` along time, restarting at every chunk of ``chunk_size`` steps.

    Args:
        g: ``[B, T, H, D]`` (vector gates) or ``[B, T, H]`` (scalar gates), any float dtype.
        chunk_size: chunk length, a power of two ``>= 16``.
        reverse: sum from the end of each chunk instead (``o_t = sum_{s >= t} g_s`` within the chunk).
        scale: optional factor applied to the result.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1); chunks restart at each sequence.
        output_dtype: dtype of the result (the sums accumulate in fp32).

    Returns:
        Tensor of ``g``'s shape and ``output_dtype``.

    Example:
        >>> import torch
        >>> from fla_gsa.ops import chunk_local_cumsum
        >>> g = torch.full((1, 5, 1), -1.0)
        >>> chunk_local_cumsum(g, chunk_size=16)[0, :, 0].tolist()
        [-1.0, -2.0, -3.0, -4.0, -5.0]
    """
    _check(g, chunk_size, cu_seqlens, output_dtype)
    return _CumsumFunction.apply(g, chunk_size, reverse, scale, cu_seqlens, output_dtype)


def chunk_global_cumsum(
    g: torch.Tensor,
    reverse: bool = False,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cumulative sum of ``g`` along the whole of each sequence; same arguments as
    :func:`chunk_local_cumsum` without ``chunk_size``: ``g`` ``[B, T, H, D]`` or ``[B, T, H]``, with
    ``cu_seqlens`` the sums restart at each packed sequence. Returns a tensor of ``g``'s shape in
    ``output_dtype``.

    Example:
        >>> import torch
        >>> from fla_gsa.ops import chunk_global_cumsum
        >>> g = torch.ones(1, 4, 1)
        >>> chunk_global_cumsum(g, reverse=True)[0, :, 0].tolist()
        [4.0, 3.0, 2.0, 1.0]
    """
    _check(g, None, cu_seqlens, output_dtype)
    return _CumsumFunction.apply(g, None, reverse, scale, cu_seqlens, output_dtype)
