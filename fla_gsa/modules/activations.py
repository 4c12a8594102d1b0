"""SwiGLU, ``swiglu(a, b) = silu(a) · b``, as one elementwise kernel each way, and
``swiglu_linear``, SwiGLU followed by a linear layer (a SwiGLU MLP's down projection). Both also take
``a`` and ``b`` as the two halves of one tensor (``b=None``): the gate and up projections then run as
one matrix product and their gradient comes back as one tensor, so the input's gradient is one product
too, not a sum of two.

The backward recomputes ``sigmoid(a)`` from the saved inputs instead of saving ``silu(a)``: only
``a`` and ``b`` (already alive for the projections' backward) are kept, never the intermediate.

    da = dy · b · σ(a) · (1 + a · (1 − σ(a)))        db = dy · a · σ(a)

``swiglu_linear`` also leaves out the product ``h = swiglu(a, b)`` that the linear layer's backward
would otherwise keep (``[tokens, intermediate]``, 176 MiB per layer of a 1.3B model at 16K tokens): its
backward recomputes ``h`` for the weight gradient, in the same kernel that forms ``da`` and ``db``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fla_gsa.modules.linear import mm_fp32
from fla_gsa.modules.weight_cast import half_weight
from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_same_device, check_tensor
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv

# elements of one program's tile: rows x columns of a [rows, I] view
TILE = 4096


def _plan(R: int, C: int) -> tuple[tuple[int], int, int, int]:
    """``(grid, NC, BR, BC)`` of a launch over ``[R, C]``: tiles of ``BR`` rows and ``BC`` columns,
    ``NC`` column blocks per row block."""
    BC = min(1024, triton.next_power_of_2(C))
    BR = max(1, TILE // BC)
    NC = cdiv(C, BC)
    return (cdiv(R, BR) * NC,), NC, BR, BC


@triton.jit
def _rows_cols(R, C, NC, BR: tl.constexpr, BC: tl.constexpr):
    """This program's rows (int64, ``[BR, 1]``), columns (``[1, BC]``) and their mask."""
    i_r, i_c = tl.program_id(0) // NC, tl.program_id(0) % NC
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    return o_r[:, None], o_c[None, :], (o_r < R)[:, None] & (o_c < C)[None, :]


@lean
@triton.jit
def swiglu_fwd_kernel(a, b, y, R, C, s_ab, NC, BR: tl.constexpr, BC: tl.constexpr):
    # a, b: [R, C] views with row stride s_ab (the two halves of one [R, 2C] tensor, or two
    # contiguous tensors); y: contiguous [R, C]
    o_r, o_c, m = _rows_cols(R, C, NC, BR, BC)
    o_ab = o_r * s_ab + o_c
    b_a = tl.load(a + o_ab, mask=m, other=0).to(tl.float32)
    b_b = tl.load(b + o_ab, mask=m, other=0).to(tl.float32)
    b_y = b_a * tl.sigmoid(b_a) * b_b
    tl.store(y + o_r * C + o_c, b_y.to(y.dtype.element_ty), mask=m)


@lean
@triton.jit
def swiglu_bwd_kernel(a, b, dy, da, db, y, R, C, s_ab, s_d, NC, BR: tl.constexpr, BC: tl.constexpr,
                      STORE_Y: tl.constexpr):
    # da, db: [R, C] views with row stride s_d (halves of one gradient, or two tensors); dy, y: [R, C].
    # STORE_Y: also write the forward's output silu(a) · b (for a following linear layer's weight
    # gradient) while a and b are loaded anyway
    o_r, o_c, m = _rows_cols(R, C, NC, BR, BC)
    o_ab, o_y, o_d = o_r * s_ab + o_c, o_r * C + o_c, o_r * s_d + o_c
    b_a = tl.load(a + o_ab, mask=m, other=0).to(tl.float32)
    b_b = tl.load(b + o_ab, mask=m, other=0).to(tl.float32)
    b_dy = tl.load(dy + o_y, mask=m, other=0).to(tl.float32)
    b_sig = tl.sigmoid(b_a)
    if STORE_Y:
        tl.store(y + o_y, (b_a * b_sig * b_b).to(y.dtype.element_ty), mask=m)
    b_da = b_dy * b_b * b_sig * (1 + b_a * (1 - b_sig))
    b_db = b_dy * b_a * b_sig
    tl.store(da + o_d, b_da.to(da.dtype.element_ty), mask=m)
    tl.store(db + o_d, b_db.to(db.dtype.element_ty), mask=m)


def _halves(a, b):
    """``(a, b)`` as ``[R, C]`` views of one row stride: with ``b`` None, the two halves of ``a``
    ``[..., 2C]`` (gate first, as ``F.glu`` splits); else ``a`` and ``b`` made contiguous."""
    if b is None:
        a = a.reshape(-1, a.shape[-1])
        if a.stride(-1) != 1:
            a = a.contiguous()
        C = a.shape[-1] // 2
        return a[:, :C], a[:, C:]
    return a.contiguous().view(-1, a.shape[-1]), b.contiguous().view(-1, b.shape[-1])


def _swiglu_fwd(a, b):
    """``silu(a) · b`` of ``[R, C]`` views ``a``, ``b`` of one row stride (:func:`_halves`): fp32
    arithmetic, a contiguous ``[R, C]`` result in ``a``'s dtype."""
    if not use_triton(a):
        return (F.silu(a.float()) * b.float()).to(a.dtype)
    R, C = a.shape
    y = torch.empty(R, C, dtype=a.dtype, device=a.device)
    grid, NC, BR, BC = _plan(R, C)
    if R * C:
        swiglu_fwd_kernel[grid](a, b, y, R, C, a.stride(0), NC, BR=BR, BC=BC, num_warps=8)
    return y


def _swiglu_bwd(a, b, dy, packed, with_y=False):
    """``(da, db)`` of ``silu(a) · b`` for ``[R, C]`` views ``a``, ``b`` (:func:`_halves`) and a
    contiguous ``dy``: with ``packed``, ``(d, None)`` with ``d = [da | db]`` one ``[R, 2C]`` tensor;
    with ``with_y`` also ``silu(a) · b`` (contiguous ``[R, C]``) from the same pass over ``a`` and ``b``."""
    R, C = a.shape
    if not use_triton(a):
        af, bf, dyf = a.float(), b.float(), dy.float()
        sig = torch.sigmoid(af)
        da, db = (dyf * bf * sig * (1 + af * (1 - sig))).to(a.dtype), (dyf * af * sig).to(b.dtype)
        grads = (torch.cat([da, db], -1), None) if packed else (da, db)
        return (*grads, (af * sig * bf).to(a.dtype)) if with_y else grads
    if packed:
        d = torch.empty(R, 2 * C, dtype=a.dtype, device=a.device)
        da, db, s_d = d[:, :C], d[:, C:], 2 * C
    else:
        da, db, s_d = torch.empty(R, C, dtype=a.dtype, device=a.device), torch.empty_like(dy, dtype=b.dtype), C
    y = torch.empty(R, C, dtype=a.dtype, device=a.device) if with_y else None
    grid, NC, BR, BC = _plan(R, C)
    if R * C:
        swiglu_bwd_kernel[grid](a, b, dy, da, db, y, R, C, a.stride(0), s_d, NC, BR=BR, BC=BC, STORE_Y=with_y,
                                num_warps=8)
    grads = (d, None) if packed else (da, db)
    return (*grads, y) if with_y else grads


def _out_shape(a, b):
    return a.shape if b is not None else (*a.shape[:-1], a.shape[-1] // 2)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        A, B = _halves(a, b)
        ctx.save_for_backward(A, B)
        ctx.packed, ctx.shape = b is None, a.shape
        return _swiglu_fwd(A, B).view(_out_shape(a, b))

    @staticmethod
    def backward(ctx, dy):
        A, B = ctx.saved_tensors
        da, db = _swiglu_bwd(A, B, dy.contiguous().view(A.shape), ctx.packed)
        return da.view(ctx.shape), (db.view(ctx.shape) if db is not None else None)


class SwiGLULinearFunction(torch.autograd.Function):
    # The linear layer runs in the activations' dtype (as autocast would run it); the weight's
    # gradient is cast back to the weight's dtype.
    @staticmethod
    def forward(ctx, a, b, weight, bias):
        A, B = _halves(a, b)
        h = _swiglu_fwd(A, B)
        w = half_weight([weight], h.dtype)  # kept for dh (cast once, as autocast would keep it)
        y = F.linear(h, w, bias.to(h.dtype) if bias is not None else None)
        ctx.save_for_backward(A, B, w)
        ctx.packed, ctx.shape = b is None, a.shape
        ctx.w_dtype = weight.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*a.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        A, B, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh = (dy2 @ w.to(dy.dtype)).to(A.dtype)
        dw = db_ = None
        if ctx.needs_input_grad[2]:
            # h recomputed (never kept) by the pass that forms da and db: a and b are read once
            da, db, h = _swiglu_bwd(A, B, dh, ctx.packed, with_y=True)
            dyt, h2 = dy2.t(), h.to(dy.dtype)
            # an fp32 weight's gradient formed in fp32 by the product (not rounded to dy's dtype)
            dw = mm_fp32(dyt, h2) if ctx.w_dtype == torch.float32 else (dyt @ h2).to(ctx.w_dtype)
        else:
            da, db = _swiglu_bwd(A, B, dh, ctx.packed)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db_ = dy2.sum(0).to(ctx.bias_dtype)
        return da.view(ctx.shape), (db.view(ctx.shape) if db is not None else None), dw, db_


def _check_inputs(a, b):
    """``a`` and ``b`` of one shape and dtype, or with ``b`` None, ``a [..., 2C]`` (``C >= 1``)."""
    if b is not None:
        return _check_pair(a, b)
    check_tensor(a, "a")
    if a.ndim < 1 or a.shape[-1] % 2 or a.shape[-1] == 0:
        raise ValueError(f"a must have shape [..., 2C] (gate and up halves) when b is None, got {tuple(a.shape)}")


def _check_pair(a, b):
    check_tensor(a, "a")
    check_tensor(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"b must have the dtype of a ({a.dtype}), got {b.dtype}")


def swiglu(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(a) · b``, computed in fp32 and returned in the inputs' dtype.

    Args:
        a: gate activations, any shape, float16/bfloat16/float32 (float64 runs in plain PyTorch); or,
            with ``b`` None, ``[..., 2C]`` holding the gate in its first half and the up activations in
            its second (as ``F.glu`` splits), e.g. one product for both projections. Its gradient is
            then one ``[..., 2C]`` tensor.
        b: up activations, the shape and dtype of ``a``, or None (above).

    Returns:
        Tensor of ``a``'s shape (``[..., C]`` when ``b`` is None) and dtype.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import swiglu
        >>> a, b = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])
        >>> [round(v, 4) for v in swiglu(a, b).tolist()]
        [0.0, 1.4621]
        >>> [round(v, 4) for v in swiglu(torch.cat([a, b])).tolist()]
        [0.0, 1.4621]
    """
    _check_inputs(a, b)
    check_same_device({"a": a, "b": b})
    if use_triton(a) and a.dtype != torch.float64 and a.numel() > 0:
        return SwiGLUFunction.apply(a, b)
    if b is None:
        a, b = a.chunk(2, dim=-1)
    acc = torch.promote_types(a.dtype, torch.float32)
    return (F.silu(a.to(acc)) * b.to(acc)).to(a.dtype)


def swiglu_linear(a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(swiglu(a, b), weight, bias)`` without keeping ``swiglu(a, b)`` for the backward
    (it is recomputed there). The product runs in ``a``'s dtype (the weight and bias are cast to it, as
    under autocast); gradients come back in each input's dtype.

    Args:
        a: gate activations ``[..., I]``, float16/bfloat16/float32 (float64: plain PyTorch); or, with
            ``b`` None, ``[..., 2I]`` holding the gate and up activations in its two halves (one
            product for both projections; its gradient is then one ``[..., 2I]`` tensor).
        b: up activations, the shape and dtype of ``a``, or None (above).
        weight: ``[O, I]``.
        bias: ``[O]`` or None.

    Returns:
        ``[..., O]`` in ``a``'s dtype.

    Example:
        >>> import torch
        >>> from fla_gsa.modules.activations import swiglu, swiglu_linear
        >>> a, b, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(5, 8)
        >>> torch.allclose(swiglu_linear(a, b, w), swiglu(a, b) @ w.t(), atol=1e-5)
        True
        >>> torch.allclose(swiglu_linear(torch.cat([a, b], -1), None, w), swiglu(a, b) @ w.t(), atol=1e-5)
        True
    """
    _check_inputs(a, b)
    I = a.shape[-1] if b is not None else a.shape[-1] // 2
    check_tensor(weight, "weight")
    if weight.ndim != 2 or weight.shape[1] != I:
        raise ValueError(f"weight must have shape [O, {I}], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_same_device({"a": a, "b": b, "weight": weight, "bias": bias})
    if a.dtype == torch.float64 or a.numel() == 0:
        return F.linear(swiglu(a, b), weight.to(a.dtype), bias.to(a.dtype) if bias is not None else None)
    return SwiGLULinearFunction.apply(a, b, weight, bias)
