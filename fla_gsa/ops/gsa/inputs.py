"""GSA's inputs from one fused projection, in one kernel each way.

A GSA layer projects ``x`` to ``[q | k | v | f]`` (one matrix product when the four weights are
concatenated) and needs

    q, k, v = silu(q), silu(k), silu(v)          (the swish feature maps, in the projection's dtype)
    g = logsigmoid(f) / τ                        (log forget gate, fp32: the chunked op sums it)
    s = 1 − exp(g)                               (the tied write gate, in the projection's dtype)

``gsa_inputs`` forms all five from the projection in one pass, and its backward writes the
projection's gradient ``[dq' | dk' | dv' | df]`` in one pass, so the layer's backward has one matrix
product for ``dx`` and no sum of four. With ``σ = sigmoid``:

    dq' = dq · σ(q') · (1 + q' · (1 − σ(q')))   (likewise k, v)
    df  = (dg − ds · exp(g)) · (1 − σ(f)) / τ

Only the projection is saved for the backward; the activations are recomputed from it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_tensor
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv, dsilu

BR, BC = 32, 128  # rows x columns of one part per program


@triton.jit
def _log_gate(b_f, inv_tau):
    # logsigmoid(f) / τ = (min(f, 0) − log(1 + e^−|f|)) / τ, with log1p's small-argument series
    b_t = tl.exp(-tl.abs(b_f))
    b_l = tl.where(b_t < 1e-4, b_t * (1 - 0.5 * b_t), tl.log(1 + b_t))
    return (tl.minimum(b_f, 0.0) - b_l) * inv_tau


@triton.jit
def _tile(i_c, N, D, BR: tl.constexpr, BC: tl.constexpr):
    # rows (int64, [BR, 1]), columns inside the part ([1, BC]) and the mask of one program's tile
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_c = (i_c * BC + tl.arange(0, BC))[None, :]
    return o_r.to(tl.int64)[:, None], o_c, (o_r < N)[:, None] & (o_c < D)


@triton.jit
def _silu_fwd(x, y, i_c, N, W, start, D, BR: tl.constexpr, BC: tl.constexpr):
    r, o_c, m = _tile(i_c, N, D, BR, BC)
    b_x = tl.load(x + r * W + start + o_c, mask=m, other=0).to(tl.float32)
    tl.store(y + r * D + o_c, (b_x * tl.sigmoid(b_x)).to(y.dtype.element_ty), mask=m)


@triton.jit
def _silu_bwd(x, dy, dx, i_c, N, W, start, D, BR: tl.constexpr, BC: tl.constexpr):
    r, o_c, m = _tile(i_c, N, D, BR, BC)
    b_x = tl.load(x + r * W + start + o_c, mask=m, other=0).to(tl.float32)
    b_dy = tl.load(dy + r * D + o_c, mask=m, other=0).to(tl.float32)
    tl.store(dx + r * W + start + o_c, (b_dy * dsilu(b_x)).to(dx.dtype.element_ty), mask=m)


# The grid's second axis walks the column blocks of q, k, v and f in turn (NQ, NK, NV blocks, then
# f's); each program handles one block of one part, so its loads and stores are plain contiguous rows.
@lean
@triton.jit
def gsa_inputs_fwd_kernel(x, q, k, v, s, g, N, W, DQ, DK, DV, DF, E1, E2, E3, NQ, NK, NV, inv_tau,
                          BR: tl.constexpr, BC: tl.constexpr):
    i_c = tl.program_id(1)
    if i_c < NQ:
        _silu_fwd(x, q, i_c, N, W, 0, DQ, BR, BC)
    elif i_c < NQ + NK:
        _silu_fwd(x, k, i_c - NQ, N, W, E1, DK, BR, BC)
    elif i_c < NQ + NK + NV:
        _silu_fwd(x, v, i_c - NQ - NK, N, W, E2, DV, BR, BC)
    else:
        r, o_c, m = _tile(i_c - NQ - NK - NV, N, DF, BR, BC)
        b_f = tl.load(x + r * W + E3 + o_c, mask=m, other=0).to(tl.float32)
        b_g = _log_gate(b_f, inv_tau)
        # s = 1 − e^g = −expm1(g), with expm1's series near 0 (gates close to 1 write little)
        b_s = tl.where(b_g > -1e-4, -b_g * (1 + 0.5 * b_g), 1 - tl.exp(b_g))
        tl.store(g + r * DF + o_c, b_g.to(g.dtype.element_ty), mask=m)
        tl.store(s + r * DF + o_c, b_s.to(s.dtype.element_ty), mask=m)


@lean
@triton.jit
def gsa_inputs_bwd_kernel(x, dq, dk, dv, ds, dg, dx, N, W, DQ, DK, DV, DF, E1, E2, E3, NQ, NK, NV, inv_tau,
                          BR: tl.constexpr, BC: tl.constexpr):
    i_c = tl.program_id(1)
    if i_c < NQ:
        _silu_bwd(x, dq, dx, i_c, N, W, 0, DQ, BR, BC)
    elif i_c < NQ + NK:
        _silu_bwd(x, dk, dx, i_c - NQ, N, W, E1, DK, BR, BC)
    elif i_c < NQ + NK + NV:
        _silu_bwd(x, dv, dx, i_c - NQ - NK, N, W, E2, DV, BR, BC)
    else:
        r, o_c, m = _tile(i_c - NQ - NK - NV, N, DF, BR, BC)
        b_f = tl.load(x + r * W + E3 + o_c, mask=m, other=0).to(tl.float32)
        b_dg = tl.load(dg + r * DF + o_c, mask=m, other=0).to(tl.float32)
        b_ds = tl.load(ds + r * DF + o_c, mask=m, other=0).to(tl.float32)
        b_df = (b_dg - b_ds * tl.exp(_log_gate(b_f, inv_tau))) * tl.sigmoid(-b_f) * inv_tau
        tl.store(dx + r * W + E3 + o_c, b_df.to(dx.dtype.element_ty), mask=m)


def _launch_args(N, sizes):
    """The grid and the integer arguments after the tensors: N, W, the widths, the part starts and the
    column-block counts of q, k, v."""
    DQ, DK, DV, DF = sizes
    blocks = [cdiv(d, BC) for d in sizes]
    grid = (cdiv(N, BR), sum(blocks))
    return grid, (N, sum(sizes), DQ, DK, DV, DF, DQ, DQ + DK, DQ + DK + DV, *blocks[:3])


def _outputs(x2, sizes):
    N = x2.shape[0]
    DQ, DK, DV, DF = sizes
    new = lambda d, dtype: torch.empty(N, d, dtype=dtype, device=x2.device)
    return (new(DQ, x2.dtype), new(DK, x2.dtype), new(DV, x2.dtype), new(DF, x2.dtype),
            new(DF, torch.float32))


def gsa_inputs_fwd(x2, sizes, tau):
    """The forward kernel: ``(q, k, v, s, g)`` as ``[N, D]`` tensors from a ``[N, W]`` projection."""
    q, k, v, s, g = _outputs(x2, sizes)
    grid, ints = _launch_args(x2.shape[0], sizes)
    gsa_inputs_fwd_kernel[grid](x2, q, k, v, s, g, *ints, 1.0 / tau, BR=BR, BC=BC, num_warps=4)
    return q, k, v, s, g


def gsa_gates_bwd(x2, ds, dg, dx, sizes, tau):
    """The backward kernel on the gate part alone: ``dx[:, DQ + DK + DV:] = df`` from ``ds, dg`` (``[N,
    DF]``), for a caller whose kernels wrote the other parts of ``dx`` themselves."""
    N = x2.shape[0]
    DF = sizes[3]
    _, ints = _launch_args(N, sizes)
    grid = (cdiv(N, BR), cdiv(DF, BC))
    # no column blocks of q, k, v: every program takes the gate branch (their pointers are not read)
    gsa_inputs_bwd_kernel[grid](x2, ds, ds, ds, ds, dg, dx, *ints[:-3], 0, 0, 0, 1.0 / tau, BR=BR, BC=BC,
                                num_warps=4)


class GSAInputsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, tau):
        shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        q, k, v, s, g = gsa_inputs_fwd(x2, sizes, tau)
        ctx.save_for_backward(x2)
        ctx.sizes, ctx.tau, ctx.shape = sizes, tau, shape
        return tuple(t.view(*shape, t.shape[-1]) for t in (q, k, v, s, g))

    @staticmethod
    def backward(ctx, dq, dk, dv, ds, dg):
        (x2,) = ctx.saved_tensors
        N, W = x2.shape
        flat = [t.reshape(N, t.shape[-1]).contiguous() for t in (dq, dk, dv, ds, dg)]
        dx = torch.empty_like(x2)
        grid, ints = _launch_args(N, ctx.sizes)
        gsa_inputs_bwd_kernel[grid](x2, *flat, dx, *ints, 1.0 / ctx.tau, BR=BR, BC=BC, num_warps=4)
        return dx.view(*ctx.shape, W), None, None


def _gsa_inputs_torch(x, sizes, tau):
    q, k, v, f = x.split(list(sizes), dim=-1)
    g = F.logsigmoid(f.to(torch.promote_types(x.dtype, torch.float32))) / tau
    s = (-torch.expm1(g)).to(x.dtype)
    return F.silu(q), F.silu(k), F.silu(v), s, g


def check_sizes(x, sizes, lead: str) -> tuple[int, int, int, int]:
    """``sizes`` as a tuple, checked: four positive ints ``(DQ, DK, DV, DF)`` whose sum is ``x``'s last
    dimension (``lead``: how the message names the dimensions before it)."""
    if (not isinstance(sizes, (tuple, list)) or len(sizes) != 4
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in sizes)):
        raise ValueError(f"sizes must be four positive ints (DQ, DK, DV, DF), got {sizes!r}")
    sizes = tuple(sizes)
    if x.ndim < 1 or x.shape[-1] != sum(sizes):
        raise ValueError(f"x must have shape [{lead}, {sum(sizes)}] (DQ + DK + DV + DF of sizes {sizes}), "
                         f"got {tuple(x.shape)}")
    return sizes


def gsa_inputs(x: torch.Tensor, sizes, gate_logit_normalizer: float = 8.0):
    """Split a fused GSA projection into the op's inputs: swish feature maps and the tied gates.

    Args:
        x: ``[B, T, DQ + DK + DV + DF]`` (any leading dimensions), the projection ``[q' | k' | v' | f]``
            of a GSA layer (float16, bfloat16, float32; float64 runs in PyTorch).
        sizes: ``(DQ, DK, DV, DF)``, the four widths (positive ints).
        gate_logit_normalizer: ``τ`` in ``g = logsigmoid(f) / τ`` (positive).

    Returns:
        ``(q, k, v, s, g)``: ``silu`` of the first three parts (``x``'s dtype, ``[B, T, DQ]``,
        ``[B, T, DK]``, ``[B, T, DV]``), ``s = 1 − exp(g)`` (``x``'s dtype) and ``g`` (fp32, fp64 for
        fp64 ``x``), both ``[B, T, DF]``. New contiguous tensors; ``x`` is not modified.

    Example:
        >>> import torch
        >>> from fla_gsa.ops import gsa_inputs
        >>> q, k, v, s, g = gsa_inputs(torch.randn(2, 5, 4 + 4 + 4 + 2), (4, 4, 4, 2))
        >>> q.shape, s.shape, g.dtype
        (torch.Size([2, 5, 4]), torch.Size([2, 5, 2]), torch.float32)
        >>> bool(torch.allclose(s, 1 - g.exp()))
        True
    """
    check_tensor(x, "x")
    sizes = check_sizes(x, sizes, "...")
    tau = gate_logit_normalizer
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"gate_logit_normalizer must be a positive float, got {tau!r}")
    if use_triton(x) and x.dtype != torch.float64 and x.numel() > 0:
        return GSAInputsFunction.apply(x, sizes, float(tau))
    return _gsa_inputs_torch(x, sizes, float(tau))
