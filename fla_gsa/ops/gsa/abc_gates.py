"""ABC's slot normalizer as two Triton kernels: a running log-sum-exp over time (forward) and its
reverse linear recurrence (backward).

Per sequence, head and slot, with slot logits ``s_t``::

    z_t  = log sum_{j <= t} exp(s_j) = logaddexp(z_{t-1}, s_t)
    g_t  = z_{t-1} - z_t   (0 at a sequence's first step)
    so_t = exp(s_t - z_t)

Backward, with upstream gradients ``dso`` and ``dg`` (``g`` at a first step is a constant)::

    dz_t = -dso_t so_t - dg_t [t > 0] + dg_{t+1} [t + 1 < T]
    R_t  = dz_t + exp(g_{t+1}) R_{t+1}          (R_T = 0; exp(g) = exp(z_t - z_{t+1}) <= 1)
    ds_t = so_t (dso_t + R_t)

Every exponent is <= 0, so neither pass overflows however far apart the logits are. One program walks
one (sequence, head, slot block) through time in tiles of ``BT`` rows: a scan inside the tile, a carry
between tiles. Varlen sequences are separate programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_gsa.ops.utils.triton_utils import load_tile, next_pow2, store_tile
from fla_gsa.ops.utils.triton_utils import seq_bounds as tl_seq_bounds

# Log-sum-exp of "nothing yet". Finite, so the scan never meets inf - inf: logaddexp(NEG, x) is exactly
# x for any fp32 logit a caller could mean (|x| < 1e29).
NEG = tl.constexpr(-1.0e30)

# Tile sizes. A program is one slot block of one head of one sequence and walks all of its time steps,
# so the work is latency-bound and few long sequences give a small grid: the slot block narrows (down to
# MIN_BLOCK_M) until the grid has TARGET_PROGRAMS programs, trading whole 32-byte sectors for more loads
# in flight. Chosen on an H100 from 11 configurations (forward+backward, [B, T, 4, 64] at 16K tokens):
# 256-row tiles, slot blocks down to 2 and 512 programs took 0.42 ms at 1 x 16384 against 0.65 ms for
# 128 / 4 / 256, and about the same at 4 x 4096 and 8 x 2048.
BLOCK_T = 256
MAX_BLOCK_M = 16
MIN_BLOCK_M = 2
TARGET_PROGRAMS = 512
NUM_WARPS = 4


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    return m + tl.log(1 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _lse_pair(p1, z1, p2, z2):
    # A run of rows as (log-sum-exp of all its rows but the last, log-sum-exp of all of them); one row
    # is (NEG, s). Joining run 1 and then run 2: all but the last = run 1 and all of run 2 but its last.
    # The scan then gives z_{t-1} and z_t of every row at once, so g needs no shift across the tile.
    # (_logaddexp written out twice: the interpreter calls this once per element, and a nested call
    # there costs more than the arithmetic.)
    mp, mz = tl.maximum(z1, p2), tl.maximum(z1, z2)
    return mp + tl.log(1 + tl.exp(-tl.abs(z1 - p2))), mz + tl.log(1 + tl.exp(-tl.abs(z1 - z2)))


@triton.jit
def _affine(a1, x1, a2, x2):
    # Compose R -> a1 R + x1, then R -> a2 R + x2.
    return a1 * a2, a2 * x1 + x2


@triton.jit
def abc_gates_fwd_kernel(
    s, o, o32, g, cu_seqlens, T,
    H: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
    SAVE_O32: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_m, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = tl_seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    b_c = tl.full([BM], NEG, dtype=tl.float32)  # z of the row before the tile
    for i_t in range(0, tl.cdiv(T, BT)):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_s = load_tile(s, bos, o_t, m_t, i_h, H, M, o_m, m_m).to(tl.float32)  # [BT, BM]
        b_p, b_z = tl.associative_scan((tl.full([BT, BM], NEG, dtype=tl.float32), b_s), 0, _lse_pair)
        b_p = _logaddexp(b_c[None, :], b_p)  # z_{t-1}: the carry itself on the tile's first row
        b_z = _logaddexp(b_c[None, :], b_z)  # z_t
        b_o = tl.exp(b_s - b_z)
        b_g = tl.where((o_t > 0)[:, None], b_p - b_z, 0.)
        store_tile(o, b_o, bos, o_t, m_t, i_h, H, M, o_m, m_m)
        if SAVE_O32:
            store_tile(o32, b_o, bos, o_t, m_t, i_h, H, M, o_m, m_m)
        store_tile(g, b_g, bos, o_t, m_t, i_h, H, M, o_m, m_m)
        # z never decreases along time: the carry is the tile's largest z (only the last tile has
        # padded rows, and its carry is not used)
        b_c = tl.max(b_z, axis=0)


@triton.jit
def abc_gates_bwd_kernel(
    o32, g, do, dg, ds, cu_seqlens, T,
    H: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_m, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = tl_seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_i = tl.arange(0, BT)
    b_c = tl.zeros([BM], dtype=tl.float32)  # R of the row after the tile
    # Tiles from the end of the sequence, rows in descending time order (so a forward scan runs the
    # reverse recurrence); only the last tile visited, holding t = 0, is partial.
    for i_t in range(0, tl.cdiv(T, BT)):
        o_t = T - 1 - i_t * BT - o_i
        m_t = o_t >= 0
        m_n = m_t & (o_t + 1 < T)
        b_o = load_tile(o32, bos, o_t, m_t, i_h, H, M, o_m, m_m)  # [BT, BM]
        b_do = load_tile(do, bos, o_t, m_t, i_h, H, M, o_m, m_m).to(tl.float32)
        b_dg = load_tile(dg, bos, o_t, m_t & (o_t > 0), i_h, H, M, o_m, m_m)
        b_dgn = load_tile(dg, bos, o_t + 1, m_n, i_h, H, M, o_m, m_m)  # dg_{t+1}
        b_a = tl.exp(load_tile(g, bos, o_t + 1, m_n, i_h, H, M, o_m, m_m))  # exp(g_{t+1}); 1 past the end
        b_dz = b_dgn - b_dg - b_do * b_o
        b_A, b_R = tl.associative_scan((b_a, b_dz), 0, _affine)
        b_R = b_R + b_A * b_c[None, :]
        store_tile(ds, b_o * (b_do + b_R), bos, o_t, m_t, i_h, H, M, o_m, m_m)
        b_c = tl.sum(tl.where((o_i == BT - 1)[:, None], b_R, 0.), axis=0)


def _launch_config(s, cu_seqlens):
    """``(grid, BT, BM)`` for ``s [B, T, H, M]``."""
    B, _, H, M = s.shape
    NH = (B if cu_seqlens is None else len(cu_seqlens) - 1) * H
    BM = min(next_pow2(M, 1), MAX_BLOCK_M)
    while BM > MIN_BLOCK_M and NH * triton.cdiv(M, BM) < TARGET_PROGRAMS:
        BM //= 2
    return (triton.cdiv(M, BM), NH), BLOCK_T, BM


def abc_gates_fwd(s: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """``(so in s's dtype, g fp32, so fp32)`` for contiguous ``s [B, T, H, M]`` (the last is ``so``
    itself for fp32 ``s``)."""
    _, T, H, M = s.shape
    grid, BT, BM = _launch_config(s, cu_seqlens)
    o = torch.empty_like(s)
    g = torch.empty_like(s, dtype=torch.float32)
    save = s.dtype != torch.float32
    o32 = torch.empty_like(g) if save else o
    abc_gates_fwd_kernel[grid](
        s, o, o32, g, cu_seqlens, T, H=H, M=M, BT=BT, BM=BM, SAVE_O32=save,
        IS_VARLEN=cu_seqlens is not None, num_warps=NUM_WARPS,
    )
    return o, g, o32


def abc_gates_bwd(o32, g, do, dg, cu_seqlens, dtype):
    """``ds`` in ``dtype`` from the saved fp32 ``so`` and ``g`` and the upstream ``dso``, ``dg``."""
    _, T, H, M = g.shape
    grid, BT, BM = _launch_config(g, cu_seqlens)
    ds = torch.empty_like(g, dtype=dtype)
    abc_gates_bwd_kernel[grid](
        o32, g, do.contiguous(), dg.contiguous(), ds, cu_seqlens, T, H=H, M=M, BT=BT, BM=BM,
        IS_VARLEN=cu_seqlens is not None, num_warps=NUM_WARPS,
    )
    return ds


class AbcSlotGatesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, cu_seqlens):
        o, g, o32 = abc_gates_fwd(s.contiguous(), cu_seqlens)
        ctx.save_for_backward(o32, g, cu_seqlens)
        ctx.s_dtype = s.dtype
        return o, g

    @staticmethod
    def backward(ctx, do, dg):
        o32, g, cu_seqlens = ctx.saved_tensors
        return abc_gates_bwd(o32, g, do, dg, cu_seqlens, ctx.s_dtype), None


def abc_slot_gates_triton(s: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """The Triton path of :func:`fla_gsa.ops.gsa.utils.abc_slot_gates` (unchecked)."""
    return AbcSlotGatesFunction.apply(s, cu_seqlens)
