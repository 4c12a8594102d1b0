"""Linear layers for mixed-precision training: one matrix product for several layers that read the same
input, and fp32 weight gradients formed in the product's epilogue.

Under autocast, ``nn.Linear`` casts its fp32 weight to half precision, and its backward forms the
weight gradient in half precision and casts it back to fp32: a rounding of every gradient to bf16 and a
weight-sized cast kernel per layer per step. :func:`linear` forms that gradient in fp32 directly
(``torch.mm`` with ``out_dtype``), and takes a list of weights: ``linear(x, [w1, w2])`` equals
``torch.cat([x @ w1.T, x @ w2.T], -1)`` as one product, so the backward forms ``dx`` in one product
instead of a sum of one per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fla_gsa.modules.weight_cast import half_weight, join_cast  # noqa: F401 (join_cast: re-exported)
from fla_gsa.ops.utils.checks import check_tensor

HALF = (torch.float16, torch.bfloat16)
_OUT_DTYPE = {"ok": True}  # whether this PyTorch has matrix products with out_dtype


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (``+ out`` when given, in place) with an fp32 result, for half-precision CUDA ``a``, ``b``
    of one dtype: accumulated in fp32 and written as fp32 by the product itself, not rounded to half
    precision first. Falls back to a half-precision product and an fp32 cast or add where this PyTorch
    has no ``out_dtype`` (and for other inputs: then ``(a @ b).float()``).

    Example:
        >>> import torch
        >>> from fla_gsa.modules import mm_fp32
        >>> a, b = torch.ones(2, 3), torch.ones(3, 4)
        >>> mm_fp32(a, b).dtype, mm_fp32(a, b, out=torch.ones(2, 4))[0, 0].item()
        (torch.float32, 4.0)
    """
    if _OUT_DTYPE["ok"] and a.is_cuda and a.dtype == b.dtype and a.dtype in HALF:
        try:
            with torch.autocast("cuda", enabled=False):
                if out is None:
                    return torch.mm(a, b, out_dtype=torch.float32)
                return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError):  # no out_dtype here
            _OUT_DTYPE["ok"] = False
    if out is None:
        return (a @ b).float()
    return out.add_(a @ b)


class HalfLinearFunction(torch.autograd.Function):
    # x in half precision; fp32 weights (autocast's masters) cast to x's dtype and concatenated. The
    # cast weight is kept for dx, as autocast would keep it; the weight gradients come out in fp32
    # from one product.
    @staticmethod
    def forward(ctx, x, bias, *weights):
        w = half_weight(weights, x.dtype)  # made at the forward's start, or joined and cast now
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
        ctx.save_for_backward(x, w)
        ctx.sizes = [wi.shape[0] for wi in weights]
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ w).view(x.shape) if ctx.needs_input_grad[0] else None
        db = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        dws = [None] * len(ctx.sizes)
        if any(ctx.needs_input_grad[2:]):
            dw = mm_fp32(dy2.t(), x.reshape(-1, x.shape[-1]))
            dws = [d if ctx.needs_input_grad[2 + i] else None for i, d in enumerate(dw.split(ctx.sizes))]
        return (dx, db, *dws)


def linear(x: torch.Tensor, weights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ cat(weights).T + bias``: one linear layer, or several that read the same input.

    Args:
        x: ``[..., D]``.
        weights: a ``[N, D]`` weight or a list of ``[N_i, D]`` weights (of one dtype).
        bias: ``[sum N_i]`` or ``None``.

    Returns:
        ``[..., sum N_i]``. Under CUDA autocast with fp32 weights the product runs in the autocast
        dtype and the weights' gradients are formed in fp32 (see the module's notes); otherwise this is
        ``F.linear`` with the weights concatenated.

    Example:
        >>> import torch
        >>> from fla_gsa.modules.linear import linear
        >>> x, w1, w2 = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4)
        >>> bool(torch.allclose(linear(x, [w1, w2]), torch.cat([x @ w1.T, x @ w2.T], -1), atol=1e-6))
        True
    """
    weights = list(weights) if isinstance(weights, (list, tuple)) else [weights]
    check_tensor(x, "x")
    D = x.shape[-1] if x.ndim else None
    for i, w in enumerate(weights):
        check_tensor(w, f"weights[{i}]")
        if w.ndim != 2 or w.shape[1] != D:
            raise ValueError(f"weights[{i}] must have shape [N, {D}] (N outputs, x's last dimension), "
                             f"got {tuple(w.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
        N = sum(w.shape[0] for w in weights)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape [{N}] (the weights' outputs together), got {tuple(bias.shape)}")
    if x.is_cuda and torch.is_autocast_enabled("cuda") and all(w.dtype == torch.float32 for w in weights):
        dtype = torch.get_autocast_dtype("cuda")
        if dtype in HALF:
            return HalfLinearFunction.apply(x.to(dtype), bias, *weights)
    w = torch.cat(weights) if len(weights) > 1 else weights[0]
    return F.linear(x, w, bias)


def _plain(lin) -> bool:
    # an nn.Linear itself, with no hooks: its forward is F.linear, so calling linear() on its weight
    # skips nothing (a wrapped or hooked layer, e.g. with adapters, is called as it is)
    return type(lin) is torch.nn.Linear and not lin._forward_hooks and not lin._forward_pre_hooks


def fused_linear(x: torch.Tensor, linears) -> torch.Tensor:
    """``torch.cat([lin(x) for lin in linears], -1)`` for ``nn.Linear`` layers that read the same
    input, as one product through :func:`linear` (biases concatenated, zeros where a layer has none).
    Layers that are not plain ``nn.Linear`` (subclasses, hooks) are called as they are, and so are
    several layers on a few tokens (decoding: no more than the input width), where concatenating the
    weights would move more bytes than the products.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import fused_linear
        >>> q_proj, k_proj = torch.nn.Linear(8, 6), torch.nn.Linear(8, 4, bias=False)
        >>> x = torch.randn(20, 8)
        >>> y = fused_linear(x, [q_proj, k_proj])
        >>> y.shape, bool(torch.allclose(y, torch.cat([q_proj(x), k_proj(x)], -1), atol=1e-6))
        (torch.Size([20, 10]), True)
    """
    linears = list(linears)
    few = len(linears) > 1 and x.numel() // max(x.shape[-1], 1) <= x.shape[-1]
    if few or not all(_plain(lin) for lin in linears):
        return torch.cat([lin(x) for lin in linears], dim=-1) if len(linears) > 1 else linears[0](x)
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                          for lin in linears])
    return linear(x, [lin.weight for lin in linears], bias)
