"""Cross entropy over a large vocabulary: one program per row, the vocabulary walked in blocks.

    lse_n  = log Σ_v exp(x_nv)                              (online: running max and rescaled sum)
    loss_n = lse_n − x_{n, y_n}                             (0 where y_n == ignore_index)
    dx_nv  = (exp(x_nv − lse_n) − [v == y_n]) · dloss_n      (0 where y_n == ignore_index)

The forward kernel writes only ``lse`` and the per-row loss; the backward kernel writes the gradient
into a fresh tensor (or, for the chunks of :mod:`fla_gsa.modules.linear_cross_entropy`, in place over
a working logits buffer the op owns). The caller's logits are never written.

``reduction="mean"`` divides by the number of non-ignored rows, clamped to 1: when every row is ignored
the loss and the gradients are 0, not NaN (``F.cross_entropy`` returns NaN there).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_tensor
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import next_power_of_2

REDUCTIONS = ("mean", "sum", "none")


@lean
@triton.jit
def cross_entropy_fwd_kernel(logits, labels, loss, lse, V, stride, ignore_index, BV: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    p_x = logits + i_n * stride
    b_m = tl.full([], float("-inf"), tl.float32)
    b_s = tl.full([], 0.0, tl.float32)
    for i_v in range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        b_x = tl.load(p_x + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)  # [BV]
        b_mn = tl.maximum(b_m, tl.max(b_x, axis=0))
        b_s = b_s * tl.exp(b_m - b_mn) + tl.sum(tl.exp(b_x - b_mn), axis=0)
        b_m = b_mn
    b_lse = b_m + tl.log(b_s)
    tl.store(lse + i_n, b_lse)
    b_y = tl.load(labels + i_n).to(tl.int64)
    b_valid = b_y != ignore_index
    b_xy = tl.load(p_x + tl.where(b_valid, b_y, 0)).to(tl.float32)
    tl.store(loss + i_n, tl.where(b_valid, b_lse - b_xy, 0.0))


@lean
@triton.jit
def cross_entropy_bwd_kernel(
    logits, labels, lse, dloss, dlogits, V, stride, stride_d, ignore_index,
    BV: tl.constexpr, DLOSS_PER_ROW: tl.constexpr,
):
    # dlogits may be logits itself (a working buffer): every element is read before it is written,
    # by the same program.
    i_n = tl.program_id(0).to(tl.int64)
    p_x = logits + i_n * stride
    p_dx = dlogits + i_n * stride_d
    b_y = tl.load(labels + i_n).to(tl.int64)
    b_dl = tl.load(dloss + i_n).to(tl.float32) if DLOSS_PER_ROW else tl.load(dloss).to(tl.float32)
    b_dl = tl.where(b_y != ignore_index, b_dl, 0.0)
    b_lse = tl.load(lse + i_n)
    for i_v in range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        m_v = o_v < V
        b_x = tl.load(p_x + o_v, mask=m_v, other=0).to(tl.float32)
        b_p = tl.exp(b_x - b_lse)
        b_p = tl.where(o_v == b_y, b_p - 1.0, b_p)
        tl.store(p_dx + o_v, (b_p * b_dl).to(dlogits.dtype.element_ty), mask=m_v)


def _block(V: int) -> int:
    return min(next_power_of_2(V), 4096)


def cross_entropy_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """Per-row ``(loss, lse)`` in fp32 for ``logits [N, V]`` (last dim contiguous), on either backend."""
    N, V = logits.shape
    if use_triton(logits) and logits.dtype != torch.float64:
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        if N > 0:
            cross_entropy_fwd_kernel[(N,)](logits, labels, loss, lse, V, logits.stride(0), ignore_index,
                                           BV=_block(V), num_warps=8)
        return loss, lse
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    lse = torch.logsumexp(x, -1)
    valid = labels != ignore_index
    x_y = x.gather(-1, torch.where(valid, labels, 0).long()[:, None])[:, 0]
    return torch.where(valid, lse - x_y, 0.0), lse


def cross_entropy_bwd(logits, labels, lse, dloss, ignore_index, out=None):
    """``(softmax − onehot) · dloss`` per row into ``out`` (a new tensor of ``logits``' dtype by default;
    ``out=logits`` overwrites a working buffer). ``dloss``: a 1-element tensor, or ``[N]`` per row."""
    N, V = logits.shape
    out = torch.empty_like(logits) if out is None else out
    per_row = dloss.numel() != 1  # with N == 1 the two cases agree
    if use_triton(logits) and logits.dtype != torch.float64:
        if N > 0:
            cross_entropy_bwd_kernel[(N,)](logits, labels, lse, dloss.float().contiguous(), out, V,
                                           logits.stride(0), out.stride(0), ignore_index,
                                           BV=_block(V), DLOSS_PER_ROW=per_row, num_warps=8)
        return out
    acc = torch.promote_types(logits.dtype, torch.float32)
    valid = labels != ignore_index
    p = torch.exp(logits.to(acc) - lse.to(acc)[:, None])
    p = p.scatter_add(-1, torch.where(valid, labels, 0).long()[:, None], -torch.ones_like(p[:, :1]))
    dl = dloss.to(acc).reshape(-1)
    scale = torch.where(valid, dl if per_row else dl.expand(N), 0.0)
    out.copy_(p * scale[:, None])
    return out


class LabelCheck:
    """The range check of class labels, begun without waiting for it (see :func:`check_labels`).

    Created, it queues the check on the current stream and, for CUDA labels, a copy of its one-byte
    result into pinned host memory followed by an event. :meth:`finish` then waits for that event only,
    not for the work queued after it: a caller that begins the check early (a model, before its layers)
    learns the answer without draining the GPU's queue."""

    def __init__(self, labels: torch.Tensor, V: int, ignore_index: int):
        self.labels, self.V, self.ignore_index = labels, V, ignore_index
        self.bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        self.flag = self.event = None
        if labels.is_cuda and labels.numel():
            self.flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.flag.copy_(self.bad.any(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def finish(self, name: str = "labels") -> None:
        """Raise a ``ValueError`` naming the first bad label, if any."""
        if self.event is not None:
            self.event.synchronize()
            hit = bool(self.flag)
        else:
            hit = bool(self.labels.numel()) and bool(self.bad.any())
        if hit:
            first = self.labels[self.bad][0].item()
            raise ValueError(f"{name} must be in [0, {self.V}) or equal ignore_index={self.ignore_index}, "
                             f"got {first}")


def check_labels(labels, name: str, shape, V: int, ignore_index: int, device, pending: LabelCheck | None = None):
    """Dtype, shape, device and range of class labels. The range check needs the labels' values: one host
    sync, so a bad label is a ValueError here rather than an out-of-bounds read in a kernel; ``pending``,
    a :class:`LabelCheck` of these labels begun earlier, is finished instead (no sync beyond it)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int64 or int32, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"all inputs must be on one device, got {name} on {labels.device} and the inputs on {device}")
    if pending is None or pending.labels is not labels or pending.V != V or pending.ignore_index != ignore_index:
        pending = LabelCheck(labels, V, ignore_index)
    pending.finish(name)


def check_reduction(reduction, allowed=REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def reduce_loss(loss: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.sum() / count.clamp_min(1)
    return loss.sum() if reduction == "sum" else loss


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction):
        loss, lse = cross_entropy_fwd(logits, labels, ignore_index)
        count = (labels != ignore_index).sum()
        ctx.save_for_backward(logits, labels, lse, count)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        return reduce_loss(loss, count, reduction)

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, lse, count = ctx.saved_tensors
        if ctx.reduction == "mean":
            dloss = dloss / count.clamp_min(1)
        dlogits = cross_entropy_bwd(logits, labels, lse, dloss.reshape(-1).contiguous(), ctx.ignore_index)
        return dlogits, None, None, None


def fused_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross entropy of precomputed ``logits``, matching ``F.cross_entropy`` (with ``ignore_index``).

    Args:
        logits: ``[..., V]``, float16/bfloat16/float32 (float64 runs in plain PyTorch); the math is fp32.
        labels: ``[...]`` int64/int32 class indices in ``[0, V)`` or ``ignore_index``.
        ignore_index: label whose rows contribute neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored rows; 0 when all are ignored), ``"sum"`` or ``"none"``.

    Returns:
        fp32 loss: a scalar, or ``labels``' shape for ``"none"`` (0 at ignored rows).
        The gradient w.r.t. ``logits`` has ``logits``' dtype.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import fused_cross_entropy
        >>> logits, labels = torch.randn(6, 50), torch.tensor([1, 2, -100, 4, 5, 6])
        >>> ref = torch.nn.functional.cross_entropy(logits, labels)
        >>> torch.allclose(fused_cross_entropy(logits, labels), ref)
        True
    """
    check_tensor(logits, "logits")
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    check_ignore_index(ignore_index)
    check_reduction(reduction)
    check_labels(labels, "labels", logits.shape[:-1], logits.shape[-1], ignore_index, logits.device)
    shape = labels.shape
    x = logits.reshape(-1, logits.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    loss = CrossEntropyFunction.apply(x, labels.reshape(-1), ignore_index, reduction)
    return loss.view(shape) if reduction == "none" else loss


class FusedCrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss`` for ``[..., V]`` logits with Triton kernels on CUDA (see
    :func:`fused_cross_entropy`).

    Args:
        ignore_index: label whose rows are skipped.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes:
        ``forward(logits [..., V], labels [...])`` returns a scalar (``[...]`` for ``"none"``).

    Example:
        >>> import torch
        >>> from fla_gsa.modules import FusedCrossEntropyLoss
        >>> loss_fn = FusedCrossEntropyLoss()
        >>> logits = torch.randn(2, 5, 30, requires_grad=True)
        >>> loss = loss_fn(logits, torch.randint(0, 30, (2, 5)))
        >>> loss.backward(); logits.grad.shape
        torch.Size([2, 5, 30])
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        check_ignore_index(ignore_index)
        check_reduction(reduction)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return fused_cross_entropy(logits, labels, self.ignore_index, self.reduction)

