"""SwiGLU, ``swiglu(a, b) = silu(a) · b``, as one elementwise kernel each way.

The backward recomputes ``sigmoid(a)`` from the saved inputs instead of saving ``silu(a)``: only
``a`` and ``b`` (already alive for the projections' backward) are kept, never the intermediate.

    da = dy · b · σ(a) · (1 + a · (1 − σ(a)))        db = dy · a · σ(a)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_same_device, check_tensor

BLOCK = 1024


@triton.jit
def swiglu_fwd_kernel(a, b, y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_a = tl.load(a + o, mask=m, other=0).to(tl.float32)
    b_b = tl.load(b + o, mask=m, other=0).to(tl.float32)
    b_y = b_a * tl.sigmoid(b_a) * b_b
    tl.store(y + o, b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def swiglu_bwd_kernel(a, b, dy, da, db, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_a = tl.load(a + o, mask=m, other=0).to(tl.float32)
    b_b = tl.load(b + o, mask=m, other=0).to(tl.float32)
    b_dy = tl.load(dy + o, mask=m, other=0).to(tl.float32)
    b_sig = tl.sigmoid(b_a)
    b_da = b_dy * b_b * b_sig * (1 + b_a * (1 - b_sig))
    b_db = b_dy * b_a * b_sig
    tl.store(da + o, b_da.to(da.dtype.element_ty), mask=m)
    tl.store(db + o, b_db.to(db.dtype.element_ty), mask=m)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty_like(a)
        n = a.numel()
        swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        dy = dy.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, dy, da, db, n, BLOCK=BLOCK)
        return da, db


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
    check_tensor(a, "a")
    check_tensor(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"b must have the dtype of a ({a.dtype}), got {b.dtype}")
    check_same_device({"a": a, "b": b})
    if use_triton(a) and a.dtype != torch.float64 and a.numel() > 0:
        return SwiGLUFunction.apply(a, b)
    acc = torch.promote_types(a.dtype, torch.float32)
    return (F.silu(a.to(acc)) * b.to(acc)).to(a.dtype)
