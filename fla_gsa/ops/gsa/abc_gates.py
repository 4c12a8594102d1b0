"""ABC's slot normalizer as two Triton kernels: a running log-sum-exp over time (forward) and its
reverse linear recurrence (backward).

Per sequence, head and slot, with slot logits ``s_t``, a start ``z_{-1}`` (the carried ``z0``, or
"nothing yet") and a level ``z_empty`` at or below which a log-sum-exp counts as empty::

    z_t  = log(exp(z_{-1}) + sum_{j <= t} exp(s_j)) = logaddexp(z_{t-1}, s_t)
    a_t  = [z_{t-1} > z_empty]       (the state that g_t would decay is not empty)
    g_t  = a_t (z_{t-1} - z_t)       (held at 0 where a_t = 0)
    so_t = exp(s_t - z_t)

With no ``z0`` and logits above ``z_empty``, ``a_t = [t > 0]``: the op's rule, g = 0 at a sequence's
first step. The ABC layer's level (half its padding logit) also holds g at 0 through padding before a
sequence's first real token. ``z`` never decreases, so the rows with ``a_t = 0`` are a prefix: the
forward counts them (``na``) for the backward.

Backward, with upstream gradients ``dso``, ``dg`` and ``dz_T`` (of the final ``z``, if returned)::

    dz_t = -dso_t so_t - a_t dg_t + a_{t+1} dg_{t+1}
    e_t  = exp(z_{t-1} - z_t) = exp(g_t) if a_t, else 1 - so_t        (<= 1)
    R_t  = dz_t + e_{t+1} R_{t+1}    (R_{T-1} gets dz_T in place of e_T R_T)
    ds_t = so_t (dso_t + R_t)
    dz0  = a_0 dg_0 + e_0 R_0        (R_{-1}: the same step once more)

(``1 - so_t = exp(z_{t-1} - z_t)`` since the two terms of the logaddexp sum to ``exp(z_t)``; it is only
used where ``g`` was held at 0 and so no longer holds the difference.) Every exponent is <= 0, so
neither pass overflows however far apart the logits are. One program walks one (sequence, head, slot
block) through time in tiles of ``BT`` rows: a scan inside the tile, a carry between tiles. Varlen
sequences are separate programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import broadcast_lt, cdiv, load_tile, next_pow2, store_tile
from fla_gsa.ops.utils.triton_utils import seq_bounds as tl_seq_bounds

# Log-sum-exp of "nothing yet". Finite, so the scan never meets inf - inf: logaddexp(NEG, x) is exactly
# x for any fp32 logit a caller could mean (|x| < 1e29).
NEG = tl.constexpr(-1.0e30)
# The op's z_empty: only "nothing yet" is empty (g = 0 at a fresh sequence's first step).
OP_Z_EMPTY = -5.0e29

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
def _load_masked(ptr, bos, o_t, i_h, H: tl.constexpr, M: tl.constexpr, o_m, m_tm):
    # load_tile with a [BT, BM] mask: the lanes masked off are not read at all
    offs = ((bos + o_t) * H + i_h)[:, None] * M + o_m[None, :]
    return tl.load(ptr + offs, mask=m_tm, other=0)


@lean
@triton.jit
def abc_gates_fwd_kernel(
    s, z0, o, o32, g, na, zt, cu_seqlens, T, z_empty,
    H: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
    USE_Z0: tl.constexpr, SAVE_O32: tl.constexpr, STORE_ZT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_m, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = tl_seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    if USE_Z0:  # z of the row before the tile
        b_c = tl.load(z0 + i_nh * M + o_m, mask=m_m, other=0).to(tl.float32)
    else:
        b_c = tl.full([BM], NEG, dtype=tl.float32)
    # rows with z_{t-1} <= z_empty: a prefix, as z never decreases (in fp32, but for rounding right at
    # z_empty, where g ~ 0 and so ~ 0 make either reading the same to rounding)
    b_na = tl.zeros([BM], dtype=tl.int32)
    for i_t in range(0, tl.cdiv(T, BT)):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_s = load_tile(s, bos, o_t, m_t, i_h, H, M, o_m, m_m).to(tl.float32)  # [BT, BM]
        b_p, b_z = tl.associative_scan((tl.full([BT, BM], NEG, dtype=tl.float32), b_s), 0, _lse_pair)
        b_p = _logaddexp(b_c[None, :], b_p)  # z_{t-1}: the carry itself on the tile's first row
        b_z = _logaddexp(b_c[None, :], b_z)  # z_t
        b_o = tl.exp(b_s - b_z)
        b_g = tl.where(b_p > z_empty, b_p - b_z, 0.)
        b_na += tl.sum((m_t[:, None] & (b_p <= z_empty)).to(tl.int32), axis=0)
        store_tile(o, b_o, bos, o_t, m_t, i_h, H, M, o_m, m_m)
        if SAVE_O32:
            store_tile(o32, b_o, bos, o_t, m_t, i_h, H, M, o_m, m_m)
        store_tile(g, b_g, bos, o_t, m_t, i_h, H, M, o_m, m_m)
        # z never decreases along time: the carry is the largest z of the tile's rows (rows past the end
        # hold z of zero logits, so they are left out: the last carry is the final z)
        b_c = tl.max(tl.where(m_t[:, None], b_z, NEG), axis=0)
    tl.store(na + i_nh * M + o_m, b_na, mask=m_m)
    if STORE_ZT:
        tl.store(zt + i_nh * M + o_m, b_c, mask=m_m)


@lean
@triton.jit
def abc_gates_bwd_kernel(
    o32, g, na, do, dg, dzt, ds, dz0, cu_seqlens, T,
    H: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
    USE_DZT: tl.constexpr, STORE_DZ0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_m, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = tl_seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_i = tl.arange(0, BT)
    b_na = tl.load(na + i_nh * M + o_m, mask=m_m, other=0)  # g_t is held at 0 for t < na
    if USE_DZT:  # R of the row after the tile (on the last row: e_T R_T = dz_T)
        b_c = tl.load(dzt + i_nh * M + o_m, mask=m_m, other=0).to(tl.float32)
    else:
        b_c = tl.zeros([BM], dtype=tl.float32)
    # Tiles from the end of the sequence, rows in descending time order (so a forward scan runs the
    # reverse recurrence); only the last tile visited, holding t = 0, is partial, and its rows before
    # t = 0 pass the carry on unchanged (dz = 0, e = 1).
    for i_t in range(0, tl.cdiv(T, BT)):
        o_t = T - 1 - i_t * BT - o_i
        m_t = o_t >= 0
        m_n = m_t & (o_t + 1 < T)
        m_tm = m_t[:, None] & m_m[None, :]
        m_nm = m_n[:, None] & m_m[None, :]
        a_t = o_t[:, None] >= b_na[None, :]  # [BT, BM]: g_t is not held at 0
        a_n = (o_t + 1)[:, None] >= b_na[None, :]
        h_n = (o_t + 1)[:, None] < b_na[None, :]
        b_o = load_tile(o32, bos, o_t, m_t, i_h, H, M, o_m, m_m)  # [BT, BM]
        b_do = load_tile(do, bos, o_t, m_t, i_h, H, M, o_m, m_m).to(tl.float32)
        b_dg = _load_masked(dg, bos, o_t, i_h, H, M, o_m, m_tm & a_t)
        b_dgn = _load_masked(dg, bos, o_t + 1, i_h, H, M, o_m, m_nm & a_n)  # a_{t+1} dg_{t+1}
        # e_{t+1}: exp(g_{t+1}), or 1 - so_{t+1} where g_{t+1} is held at 0 (only that one is read);
        # 1 past the end
        b_gn = _load_masked(g, bos, o_t + 1, i_h, H, M, o_m, m_nm & a_n)
        b_on = _load_masked(o32, bos, o_t + 1, i_h, H, M, o_m, m_nm & h_n)
        b_e = tl.where(a_n, tl.exp(b_gn), 1 - b_on)
        b_dz = b_dgn - b_dg - b_do * b_o
        b_A, b_R = tl.associative_scan((b_e, b_dz), 0, _affine)
        b_R = b_R + b_A * b_c[None, :]
        store_tile(ds, b_o * (b_do + b_R), bos, o_t, m_t, i_h, H, M, o_m, m_m)
        b_c = tl.sum(tl.where((o_i == BT - 1)[:, None], b_R, 0.), axis=0)  # R_0 after the last tile
    if STORE_DZ0:
        m_0 = m_m & broadcast_lt(o_m, 0, T)
        a_0 = b_na == 0
        b_g0 = tl.load(g + (bos * H + i_h) * M + o_m, mask=m_0 & a_0, other=0)
        b_o0 = tl.load(o32 + (bos * H + i_h) * M + o_m, mask=m_0 & (b_na > 0), other=0)
        b_dg0 = tl.load(dg + (bos * H + i_h) * M + o_m, mask=m_0 & a_0, other=0).to(tl.float32)
        b_e0 = tl.where(a_0, tl.exp(b_g0), 1 - b_o0)
        tl.store(dz0 + i_nh * M + o_m, b_dg0 + b_e0 * b_c, mask=m_m)


def _launch_config(s, cu_seqlens):
    """``(grid, BT, BM)`` for ``s [B, T, H, M]``."""
    B, _, H, M = s.shape
    NH = (B if cu_seqlens is None else len(cu_seqlens) - 1) * H
    BM = min(next_pow2(M, 1), MAX_BLOCK_M)
    while BM > MIN_BLOCK_M and NH * cdiv(M, BM) < TARGET_PROGRAMS:
        BM //= 2
    return (cdiv(M, BM), NH), BLOCK_T, BM


def abc_gates_fwd(s: torch.Tensor, z0: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                  z_empty: float = OP_Z_EMPTY, output_final_z: bool = False):
    """``(so in s's dtype, g fp32, so fp32, na int32 [N, H, M], z_T fp32 [N, H, M] or None)`` for
    contiguous ``s [B, T, H, M]`` and contiguous ``z0 [N, H, M]`` or None (the so fp32 is ``so`` itself
    for fp32 ``s``; ``na`` counts each slot's leading rows with g held at 0)."""
    B, T, H, M = s.shape
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    grid, BT, BM = _launch_config(s, cu_seqlens)
    o = torch.empty_like(s)
    g = torch.empty_like(s, dtype=torch.float32)
    save = s.dtype != torch.float32
    o32 = torch.empty_like(g) if save else o
    na = torch.empty(N, H, M, dtype=torch.int32, device=s.device)
    zt = torch.empty(N, H, M, dtype=torch.float32, device=s.device) if output_final_z else None
    abc_gates_fwd_kernel[grid](
        s, z0, o, o32, g, na, zt, cu_seqlens, T, z_empty, H=H, M=M, BT=BT, BM=BM, USE_Z0=z0 is not None,
        SAVE_O32=save, STORE_ZT=output_final_z, IS_VARLEN=cu_seqlens is not None, num_warps=NUM_WARPS,
    )
    return o, g, o32, na, zt


def abc_gates_bwd(o32, g, na, do, dg, dzt, cu_seqlens, dtype, output_dz0: bool = False):
    """``(ds in dtype, dz0 fp32 [N, H, M] or None)`` from the saved fp32 ``so``, ``g`` and ``na`` and the
    upstream ``dso``, ``dg`` and ``dz_T`` (or None: 0)."""
    _, T, H, M = g.shape
    grid, BT, BM = _launch_config(g, cu_seqlens)
    ds = torch.empty_like(g, dtype=dtype)
    dz0 = torch.empty_like(na, dtype=torch.float32) if output_dz0 else None
    abc_gates_bwd_kernel[grid](
        o32, g, na, do.contiguous(), dg.contiguous(), None if dzt is None else dzt.contiguous(), ds, dz0,
        cu_seqlens, T, H=H, M=M, BT=BT, BM=BM, USE_DZT=dzt is not None, STORE_DZ0=output_dz0,
        IS_VARLEN=cu_seqlens is not None, num_warps=NUM_WARPS,
    )
    return ds, dz0


class AbcSlotGatesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, z0, cu_seqlens, z_empty, output_final_z):
        o, g, o32, na, zt = abc_gates_fwd(s.contiguous(), None if z0 is None else z0.contiguous(), cu_seqlens,
                                          z_empty, output_final_z)
        ctx.save_for_backward(o32, g, na, cu_seqlens)
        ctx.s_dtype = s.dtype
        ctx.z0_dtype = None if z0 is None else z0.dtype
        return o, g, zt

    @staticmethod
    def backward(ctx, do, dg, dzt):
        o32, g, na, cu_seqlens = ctx.saved_tensors
        ds, dz0 = abc_gates_bwd(o32, g, na, do, dg, dzt, cu_seqlens, ctx.s_dtype,
                                output_dz0=ctx.needs_input_grad[1])
        return ds, None if dz0 is None else dz0.to(ctx.z0_dtype), None, None, None


def abc_slot_gates_triton(s: torch.Tensor, cu_seqlens: torch.Tensor | None = None, z0: torch.Tensor | None = None,
                          z_empty: float = OP_Z_EMPTY, output_final_z: bool = False):
    """The Triton path of :func:`fla_gsa.ops.gsa.utils.abc_slot_gates` and of the ABC layer's
    normalizer (unchecked but for ``z0``'s shape).

    Args:
        s: slot logits ``[B, T, H, M]``.
        cu_seqlens: ``[N + 1]`` sequence bounds for packed input (``B = 1``), or None.
        z0: log-sum-exp ``[N, H, M]`` to continue from (None: nothing yet); its gradient is computed
            when it requires one.
        z_empty: ``g_t = 0`` (held constant) where ``z_{t-1} <= z_empty``. The default treats only
            "nothing yet" as empty.
        output_final_z: also return the final ``z`` of each sequence.

    Returns:
        ``(so in s's dtype, g fp32)``, both ``[B, T, H, M]``, and with ``output_final_z`` the final
        ``z [N, H, M]`` fp32 (differentiable).
    """
    if z0 is not None:
        N = s.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
        if tuple(z0.shape) != (N, *s.shape[2:]):
            raise ValueError(f"z0 must have shape [N, H, M] = {[N, *s.shape[2:]]}, got {list(z0.shape)}")
    o, g, zt = AbcSlotGatesFunction.apply(s, z0, cu_seqlens, float(z_empty), output_final_z)
    return (o, g, zt) if output_final_z else (o, g)
