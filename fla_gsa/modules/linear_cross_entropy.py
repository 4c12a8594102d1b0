"""The language-model head and its cross entropy, chunk by chunk, so ``[N, V]`` logits never exist.

For each chunk of ``C`` rows the forward computes the chunk's logits ``h_c Wᵀ + b`` into a working
buffer, their loss, and overwrites the buffer with ``dlogits_c = (softmax − onehot) · scale`` (scale
``1/#valid`` for the mean). From it, still inside the forward:

    dh_c = dlogits_c W          dW += dlogits_cᵀ h_c          db += Σ_rows dlogits_c

The backward only multiplies the stored ``dh, dW, db`` by the incoming scalar gradient. Peak extra memory
is one ``[C, V]`` buffer plus the gradients. The default ``C`` makes the buffer about the size of ``h``,
but no fewer than ``MIN_CHUNK_ROWS`` rows while the buffer stays within ``CHUNK_BUFFER_BYTES``: every
chunk after the first re-reads and re-writes the fp32 ``dW`` (``8·V·D`` bytes) for a product of
``2·C·V·D`` FLOP, so small chunks spend their time on that traffic, not on the product.
Because the weight gradient is a sum over rows, only scalar reductions (``"mean"``, ``"sum"``) can be
stored this way.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla_gsa.modules.cross_entropy import (
    LabelCheck,
    check_ignore_index,
    check_labels,
    check_reduction,
    cross_entropy_bwd,
    cross_entropy_fwd,
)
from fla_gsa.modules.linear import HALF, mm_fp32
from fla_gsa.modules.weight_cast import half_weight
from fla_gsa.ops.utils.checks import check_same_device, check_tensor
from fla_gsa.ops.utils.triton_utils import cdiv, next_power_of_2


# Fewest rows per chunk (memory allowing). On an H100, bf16, V = 32000, D = 2048, N = 16384: the weight
# gradient's 16 chunks of 1024 rows (the buffer the size of h) took 5.64 ms, 352 us each, against
# about 200 us for the product alone: the rest is the fp32 accumulator's 524 MB of traffic per chunk.
MIN_CHUNK_ROWS = 4096
# ... as long as a chunk of logits takes at most this much memory
CHUNK_BUFFER_BYTES = 2**30


def default_chunk_size(N: int, D: int, V: int, element_size: int = 2) -> int:
    """Rows per chunk: a chunk of logits ``[C, V]`` about as large as ``h [N, D]``, but at least
    ``MIN_CHUNK_ROWS`` rows where such a chunk takes at most ``CHUNK_BUFFER_BYTES`` (logits of
    ``element_size`` bytes), and never more than ``N`` rounded up to a power of two."""
    as_large_as_h = next_power_of_2(cdiv(N, cdiv(V, D)))
    fit = max(1, CHUNK_BUFFER_BYTES // max(V * element_size, 1))
    floor = min(MIN_CHUNK_ROWS, 1 << (fit.bit_length() - 1))  # a power of two within the memory cap
    return max(1, min(max(as_large_as_h, floor), next_power_of_2(max(N, 1))))


def linear_cross_entropy_fwd(hidden, weight, labels, bias, ignore_index, reduction, chunk_size, need=(False,) * 3):
    """Loss and, for the inputs flagged in ``need`` (hidden, weight, bias), their gradients for a unit
    upstream gradient, in the inputs' dtypes (weight and bias gradients accumulate in fp32)."""
    N, D = hidden.shape
    V = weight.shape[0]
    need_dh, need_dw, need_db = need
    count = (labels != ignore_index).sum()
    scale = (1.0 / count.clamp_min(1).float()) if reduction == "mean" else torch.ones((), device=hidden.device)
    scale = scale.reshape(1)
    compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else torch.promote_types(hidden.dtype, weight.dtype)
    C = chunk_size or default_chunk_size(N, D, V, compute_dtype.itemsize)
    w_dtype = weight.dtype
    if weight.dtype == torch.float32 and compute_dtype in HALF:  # the copy autocast would make, or the
        weight = half_weight([weight], compute_dtype)            # one made at the forward's start
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = None  # fp32 (fp64 for fp64 inputs), written by the first chunk's product
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_db else None
    for start in range(0, N, C):
        h_c, y_c = hidden[start:start + C], labels[start:start + C]
        logits_c = F.linear(h_c, weight, bias)  # [C, V], a buffer this function owns
        loss_c, lse_c = cross_entropy_fwd(logits_c, y_c, ignore_index)
        loss = loss + loss_c.sum()
        if not any(need):
            continue
        dlogits_c = cross_entropy_bwd(logits_c, y_c, lse_c, scale, ignore_index, out=logits_c)
        if need_dh:
            dh_c = dh[start:start + C]
            if dh_c.dtype == dlogits_c.dtype == weight.dtype:
                torch.mm(dlogits_c, weight, out=dh_c)
            else:  # under autocast the products run in half precision, hidden may be fp32
                dh_c.copy_(torch.mm(dlogits_c, weight))
        if need_dw:
            # the first chunk writes the accumulator (no zero fill, nothing to read), the others add to it;
            # half-precision products accumulate in fp32 in their epilogue (on an H100, 0.27 ms per chunk
            # less than a half-precision partial and an fp32 add)
            if dlogits_c.dtype in HALF:
                dw = mm_fp32(dlogits_c.t(), h_c, out=dw)
            else:
                dw = dlogits_c.t() @ h_c if dw is None else dw.addmm_(dlogits_c.t(), h_c)
        if need_db:
            db += dlogits_c.sum(0, dtype=torch.float32)
    if need_dw and dw is None:  # no rows
        dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device)
    dw = dw.to(w_dtype) if need_dw else None
    db = db.to(bias.dtype) if need_db else None
    return loss * scale[0], dh, dw, db


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, chunk_size):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        loss, dh, dw, db = linear_cross_entropy_fwd(hidden, weight, labels, bias, ignore_index, reduction,
                                                    chunk_size, need)
        ctx.save_for_backward(dh, dw, db)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        def scaled(g):
            return None if g is None else (g * dloss).to(g.dtype)

        dh, dw, db = ctx.saved_tensors
        return scaled(dh), scaled(dw), None, scaled(db), None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` without materializing the logits.

    Args:
        hidden: ``[N, D]`` (or ``[..., D]``), float16/bfloat16/float32.
        weight: ``[V, D]``, the dtype of ``hidden`` (under autocast any float dtype: the products run
            in autocast's dtype, the weight gradient comes back in the weight's).
        labels: ``[N]`` (``hidden``'s leading shape) int64/int32, in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        ignore_index: label whose rows contribute neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored rows; 0 when all are ignored) or ``"sum"``.
        chunk_size: rows per chunk; default makes a ``[chunk, V]`` logits buffer about the size of hidden.

    Returns:
        Scalar fp32 loss. Gradients of ``hidden``, ``weight``, ``bias`` are computed during the forward
        (when they require grad) and only scaled in the backward.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import fused_linear_cross_entropy
        >>> h, w = torch.randn(10, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
        >>> y = torch.randint(0, 100, (10,))
        >>> loss = fused_linear_cross_entropy(h, w, y, chunk_size=4)
        >>> torch.allclose(loss, torch.nn.functional.cross_entropy(h @ w.T, y))
        True
        >>> loss.backward(); h.grad.shape, w.grad.shape
        (torch.Size([10, 16]), torch.Size([100, 16]))
    """
    return linear_cross_entropy_checked(hidden, weight, labels, bias, ignore_index, reduction, chunk_size)


def linear_cross_entropy_checked(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
                                 chunk_size=None, label_check: LabelCheck | None = None):
    """:func:`fused_linear_cross_entropy` with its checks; ``label_check``: the range check of ``labels``
    begun earlier by the caller (``LabelCheck(labels, V, ignore_index)``), finished here instead of a
    host sync on a full queue."""
    check_tensor(hidden, "hidden")
    if hidden.ndim < 2:
        raise ValueError(f"hidden must have shape [N, D] (or [..., D]), got {tuple(hidden.shape)}")
    check_tensor(weight, "weight", 2, "[V, D]")
    D = hidden.shape[-1]
    if weight.shape[1] != D or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, D] with D = {D} (from hidden) and V >= 1, got {tuple(weight.shape)}")
    # under autocast the products run in its dtype whatever the inputs' (fp32 weights, bf16 hidden)
    mixed_ok = torch.is_autocast_enabled(hidden.device.type)
    if weight.dtype != hidden.dtype and not mixed_ok:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}) outside autocast, got {weight.dtype}")
    V = weight.shape[0]
    if bias is not None:
        check_tensor(bias, "bias", 1, "[V]")
        if bias.shape[0] != V:
            raise ValueError(f"bias must have shape [V] = ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype and not mixed_ok:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}) outside autocast, got {bias.dtype}")
    check_same_device({"hidden": hidden, "weight": weight, "bias": bias})
    check_ignore_index(ignore_index)
    check_reduction(reduction, ("mean", "sum"))
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_labels(labels, "labels", hidden.shape[:-1], V, ignore_index, hidden.device, label_check)

    h = hidden.reshape(-1, D).contiguous()
    y = labels.reshape(-1).contiguous()
    tracked = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    if torch.is_grad_enabled() and tracked:
        return FusedLinearCrossEntropyFunction.apply(h, weight, y, bias, ignore_index, reduction, chunk_size)
    return linear_cross_entropy_fwd(h, weight, y, bias, ignore_index, reduction, chunk_size)[0]


class FusedLinearCrossEntropyLoss(nn.Module):
    """Chunked LM head + cross entropy (see :func:`fused_linear_cross_entropy`).

    Args:
        ignore_index: label whose rows are skipped.
        reduction: ``"mean"`` or ``"sum"``.
        chunk_size: rows per chunk (``None``: automatic).

    Shapes:
        ``forward(hidden [N, D], weight [V, D], labels [N], bias [V] = None)`` returns a scalar.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import FusedLinearCrossEntropyLoss
        >>> loss_fn = FusedLinearCrossEntropyLoss()
        >>> lm_head = torch.nn.Linear(32, 200, bias=False)
        >>> h, y = torch.randn(2, 7, 32), torch.randint(0, 200, (2, 7))
        >>> loss_fn(h.flatten(0, 1), lm_head.weight, y.flatten()).shape
        torch.Size([])
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None):
        super().__init__()
        check_ignore_index(ignore_index)
        check_reduction(reduction, ("mean", "sum"))
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, chunk_size={self.chunk_size}"

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, labels, bias, self.ignore_index, self.reduction,
                                          self.chunk_size)
