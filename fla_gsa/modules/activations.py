"""SwiGLU, ``swiglu(a, b) = silu(a) · b``, as one elementwise kernel each way, and
``swiglu_linear``, SwiGLU followed by a linear layer (a SwiGLU MLP's down projection).

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
from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_same_device, check_tensor
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv

BLOCK = 1024


@lean
@triton.jit
def swiglu_fwd_kernel(a, b, y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_a = tl.load(a + o, mask=m, other=0).to(tl.float32)
    b_b = tl.load(b + o, mask=m, other=0).to(tl.float32)
    b_y = b_a * tl.sigmoid(b_a) * b_b
    tl.store(y + o, b_y.to(y.dtype.element_ty), mask=m)


@lean
@triton.jit
def swiglu_bwd_kernel(a, b, dy, da, db, y, n, BLOCK: tl.constexpr, STORE_Y: tl.constexpr):
    # STORE_Y: also write the forward's output silu(a) · b (for a following linear layer's weight
    # gradient) while a and b are loaded anyway
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_a = tl.load(a + o, mask=m, other=0).to(tl.float32)
    b_b = tl.load(b + o, mask=m, other=0).to(tl.float32)
    b_dy = tl.load(dy + o, mask=m, other=0).to(tl.float32)
    b_sig = tl.sigmoid(b_a)
    if STORE_Y:
        tl.store(y + o, (b_a * b_sig * b_b).to(y.dtype.element_ty), mask=m)
    b_da = b_dy * b_b * b_sig * (1 + b_a * (1 - b_sig))
    b_db = b_dy * b_a * b_sig
    tl.store(da + o, b_da.to(da.dtype.element_ty), mask=m)
    tl.store(db + o, b_db.to(db.dtype.element_ty), mask=m)


def _swiglu_fwd(a, b):
    """``silu(a) · b`` of contiguous ``a``, ``b`` (fp32 arithmetic, ``a``'s dtype)."""
    if not use_triton(a):
        return (F.silu(a.float()) * b.float()).to(a.dtype)
    y = torch.empty_like(a)
    n = a.numel()
    swiglu_fwd_kernel[(cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK)
    return y


def _swiglu_bwd(a, b, dy, with_y=False):
    """``(da, db)`` of ``silu(a) · b`` for contiguous ``a``, ``b``, ``dy``; with ``with_y``,
    ``(da, db, silu(a) · b)`` from the same pass over ``a`` and ``b``."""
    if not use_triton(a):
        af, bf, dyf = a.float(), b.float(), dy.float()
        sig = torch.sigmoid(af)
        grads = (dyf * bf * sig * (1 + af * (1 - sig))).to(a.dtype), (dyf * af * sig).to(b.dtype)
        return (*grads, (af * sig * bf).to(a.dtype)) if with_y else grads
    da, db = torch.empty_like(a), torch.empty_like(b)
    y = torch.empty_like(a) if with_y else None
    n = a.numel()
    swiglu_bwd_kernel[(cdiv(n, BLOCK),)](a, b, dy, da, db, y, n, BLOCK=BLOCK, STORE_Y=with_y)
    return (da, db, y) if with_y else (da, db)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return _swiglu_fwd(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        return _swiglu_bwd(a, b, dy.contiguous())


class SwiGLULinearFunction(torch.autograd.Function):
    # The linear layer runs in the activations' dtype (as autocast would run it); the weight's
    # gradient is cast back to the weight's dtype.
    @staticmethod
    def forward(ctx, a, b, weight, bias):
        a, b = a.contiguous(), b.contiguous()
        h = _swiglu_fwd(a, b)
        w = weight.to(h.dtype)  # kept for dh (cast once, as autocast would keep it)
        y = F.linear(h, w, bias.to(h.dtype) if bias is not None else None)
        ctx.save_for_backward(a, b, w)
        ctx.w_dtype = weight.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh = (dy2 @ w.to(dy.dtype)).view(a.shape).contiguous()
        dw = db_ = None
        if ctx.needs_input_grad[2]:
            # h recomputed (never kept) by the pass that forms da and db: a and b are read once
            da, db, h = _swiglu_bwd(a, b, dh.to(a.dtype), with_y=True)
            dyt, h2 = dy2.t(), h.reshape(-1, a.shape[-1]).to(dy.dtype)
            # an fp32 weight's gradient formed in fp32 by the product (not rounded to dy's dtype)
            dw = mm_fp32(dyt, h2) if ctx.w_dtype == torch.float32 else (dyt @ h2).to(ctx.w_dtype)
        else:
            da, db = _swiglu_bwd(a, b, dh.to(a.dtype))
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db_ = dy2.sum(0).to(ctx.bias_dtype)
        return da, db, dw, db_


def _check_pair(a, b):
    check_tensor(a, "a")
    check_tensor(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"b must have the dtype of a ({a.dtype}), got {b.dtype}")


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) · b``, computed in fp32 and returned in the inputs' dtype.

    Args:
        a: gate activations, any shape, float16/bfloat16/float32 (float64 runs in plain PyTorch).
        b: up activations, the shape and dtype of ``a``.

    Returns:
        Tensor of ``a``'s shape and dtype.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import swiglu
        >>> a, b = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])
        >>> [round(v, 4) for v in swiglu(a, b).tolist()]
        [0.0, 1.4621]
    """
    _check_pair(a, b)
    check_same_device({"a": a, "b": b})
    if use_triton(a) and a.dtype != torch.float64 and a.numel() > 0:
        return SwiGLUFunction.apply(a, b)
    acc = torch.promote_types(a.dtype, torch.float32)
    return (F.silu(a.to(acc)) * b.to(acc)).to(a.dtype)


def swiglu_linear(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(swiglu(a, b), weight, bias)`` without keeping ``swiglu(a, b)`` for the backward
    (it is recomputed there). The product runs in ``a``'s dtype (the weight and bias are cast to it, as
    under autocast); gradients come back in each input's dtype.

    Args:
        a: gate activations ``[..., I]``, float16/bfloat16/float32 (float64: plain PyTorch).
        b: up activations, the shape and dtype of ``a``.
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
    """
    _check_pair(a, b)
    check_tensor(weight, "weight")
    if weight.ndim != 2 or weight.shape[1] != a.shape[-1]:
        raise ValueError(f"weight must have shape [O, {a.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_same_device({"a": a, "b": b, "weight": weight, "bias": bias})
    if a.dtype == torch.float64 or a.numel() == 0:
        return F.linear(swiglu(a, b), weight.to(a.dtype), bias.to(a.dtype) if bias is not None else None)
    return SwiGLULinearFunction.apply(a, b, weight, bias)
