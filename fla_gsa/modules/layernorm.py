"""RMSNorm with a fused residual add, and its swish-gated variant.

    x' = act(x) + residual             (act: identity or silu; residual optional; formed in the kernel)
    y  = x' · rstd · w                 rstd = 1 / sqrt(mean(x'²) + eps), over the last dimension
    y  = y · swish(gate)               (gated variant; swish(g) = g · sigmoid(g))

One forward kernel and one backward kernel serve both variants (``HAS_GATE``). With a residual whose
sum the forward returns in fp32 (``prenorm``: the residual stream of a pre-norm block), the backward
reads that sum, which the next block holds anyway, in place of ``x`` and ``residual``: ``x`` (a
half-precision branch output) is then not kept at all, and the backward reads one fp32 tensor instead
of two inputs. Otherwise it recomputes ``x'`` from ``x`` and ``residual``. Either way only ``rstd``
(``[rows]``, fp32) is new memory between forward and backward. With ``rstd`` known,

    x̂ = x' · rstd,   dŷ = dy · w,   dx' = rstd · (dŷ − x̂ · mean(x̂ · dŷ)),   dw = Σ_rows dy · x̂

where, in the gated variant, ``dy`` is first multiplied by ``swish(gate)``, and with ``act = silu``,
``dx = dx' · silu'(x)`` (the input is re-read, never a saved ``silu(x)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_same_device, check_tensor
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv, next_power_of_2

# Largest row the kernels hold in registers at once (elements of one block row).
MAX_FUSED_SIZE = 65536


@lean
@triton.jit
def rms_norm_fwd_kernel(
    x, residual, weight, gate, y, residual_out, rstd, eps, M,
    D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_GATE: tl.constexpr, X_SILU: tl.constexpr,
):
    # A tile of BM rows per program: small hidden sizes still fill a block.
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m, m_d = o_m < M, o_d < D
    m = m_m[:, None] & m_d[None, :]
    offs = o_m.to(tl.int64)[:, None] * D + o_d[None, :]

    b_x = tl.load(x + offs, mask=m, other=0).to(tl.float32)  # [BM, BD]
    if X_SILU:
        b_x = b_x * tl.sigmoid(b_x)
    if HAS_RESIDUAL:
        b_x += tl.load(residual + offs, mask=m, other=0).to(tl.float32)
    if STORE_RESIDUAL_OUT:
        tl.store(residual_out + offs, b_x.to(residual_out.dtype.element_ty), mask=m)

    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)  # [BM]
    tl.store(rstd + o_m, b_rstd, mask=m_m)
    b_y = b_x * b_rstd[:, None]
    if HAS_WEIGHT:
        b_y *= tl.load(weight + o_d, mask=m_d, other=0).to(tl.float32)[None, :]
    if HAS_GATE:
        b_g = tl.load(gate + offs, mask=m, other=0).to(tl.float32)
        b_y *= b_g * tl.sigmoid(b_g)
    tl.store(y + offs, b_y.to(y.dtype.element_ty), mask=m)


@lean
@triton.jit
def rms_norm_bwd_kernel(
    x, residual, weight, gate, dy, dres_out, dx, dres, dgate, dw, rstd, M, rows_per_program,
    D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_DRES_OUT: tl.constexpr, STORE_DRES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_GATE: tl.constexpr, X_SILU: tl.constexpr,
):
    # Each program walks `rows_per_program` rows in tiles of BM and keeps its own partial dw, summed
    # over its tiles in the tile's shape [BM, BD] and over the tile's rows once at the end (not in
    # every step); one small launch sums the few partials (one per program), so no atomics are needed.
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if HAS_WEIGHT:
        b_w = tl.load(weight + o_d, mask=m_d, other=0).to(tl.float32)  # [BD]
    b_dw = tl.zeros([BM, BD], dtype=tl.float32)
    row_start = i_p * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for i_m in range(row_start, row_end, BM):
        o_m = i_m + tl.arange(0, BM)
        m_m = o_m < row_end
        m = m_m[:, None] & m_d[None, :]
        offs = o_m.to(tl.int64)[:, None] * D + o_d[None, :]

        b_x = tl.load(x + offs, mask=m, other=0).to(tl.float32)  # [BM, BD]
        if X_SILU:
            b_xin = b_x
            b_sx = tl.sigmoid(b_xin)
            b_x = b_xin * b_sx
        if HAS_RESIDUAL:
            b_x += tl.load(residual + offs, mask=m, other=0).to(tl.float32)
        b_rstd = tl.load(rstd + o_m, mask=m_m, other=0)  # [BM]
        b_xhat = b_x * b_rstd[:, None]
        b_dy = tl.load(dy + offs, mask=m, other=0).to(tl.float32)
        if HAS_GATE:
            b_g = tl.load(gate + offs, mask=m, other=0).to(tl.float32)
            b_sig = tl.sigmoid(b_g)
            b_yn = b_xhat * b_w[None, :] if HAS_WEIGHT else b_xhat
            # d swish(g) / dg = sigmoid(g) · (1 + g · (1 − sigmoid(g)))
            b_dg = b_dy * b_yn * b_sig * (1 + b_g * (1 - b_sig))
            tl.store(dgate + offs, b_dg.to(dgate.dtype.element_ty), mask=m)
            b_dy = b_dy * b_g * b_sig
        if HAS_WEIGHT:
            b_dw += b_dy * b_xhat
            b_dy = b_dy * b_w[None, :]
        b_c = tl.sum(b_xhat * b_dy, axis=1) / D  # [BM]
        b_dx = (b_dy - b_xhat * b_c[:, None]) * b_rstd[:, None]
        if HAS_DRES_OUT:
            b_dx += tl.load(dres_out + offs, mask=m, other=0).to(tl.float32)
        if STORE_DRES:
            tl.store(dres + offs, b_dx.to(dres.dtype.element_ty), mask=m)
        if X_SILU:
            b_dx = b_dx * b_sx * (1 + b_xin * (1 - b_sx))
        tl.store(dx + offs, b_dx.to(dx.dtype.element_ty), mask=m)
    if HAS_WEIGHT:
        tl.store(dw + i_p * D + o_d, tl.sum(b_dw, axis=0), mask=m_d)


@lean
@triton.jit
def sum_rows_kernel(x, y, P, D, BP: tl.constexpr, BD: tl.constexpr):
    # y[d] = sum_p x[p, d] in fp32, stored in y's dtype: the backward's per-program partials of dw
    o_d = tl.program_id(0) * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_s = tl.zeros([BD], dtype=tl.float32)
    for i_p in range(0, P, BP):
        o_p = i_p + tl.arange(0, BP)
        m = (o_p < P)[:, None] & m_d[None, :]
        b_s += tl.sum(tl.load(x + o_p[:, None] * D + o_d[None, :], mask=m, other=0), axis=0)
    tl.store(y + o_d, b_s.to(y.dtype.element_ty), mask=m_d)


def _tile(M: int, D: int) -> tuple[int, int]:
    BD = next_power_of_2(D)
    if BD > MAX_FUSED_SIZE:
        raise ValueError(f"RMSNorm supports a hidden size of at most {MAX_FUSED_SIZE}, got {D}")
    BM = max(1, min(next_power_of_2(M), 4096 // BD))
    return BM, BD


def _num_warps(BM: int, BD: int) -> int:
    # about 16 fp32 elements of a tile per thread, 1 to 16 warps
    return min(max(BM * BD // 512, 1), 16)


def _bwd_tile(M: int, D: int) -> tuple[int, int, int]:
    """``(BM, BD, num_warps)`` of the backward: tiles of up to 4096 elements (at most 4 rows), 16 per
    thread. A sweep on an H100 (tiles of 1-32 rows, 2-16 warps, 2-8 programs per SM, dw summed per
    tile or in the tile's shape): GSA's per-head output norm (65536 x 512, bf16, silu) 138 -> 95 us
    against tiles of 8K elements with 64 per thread; the residual norms (16384 x 2048, fp32 sum)
    194 -> 192 us (the best of the sweep 191)."""
    BD = _tile(M, D)[1]
    BM = max(1, min(next_power_of_2(M), 4, 4096 // BD))
    return BM, BD, min(max(BM * BD // 512, 1), 16)


def _num_programs(x: torch.Tensor) -> int:
    # the backward's programs (each keeps a partial dw): 4 per SM measured best on an H100
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count * 4
    return 4


def _flat(t):
    return None if t is None else t.reshape(-1, t.shape[-1]).contiguous()


def rms_norm_fwd(x, gate, weight, residual, eps, residual_dtype, x_silu=False):
    """Launch the forward kernel on ``[M, D]`` views. Returns ``(y, residual_out or None, rstd)``."""
    M, D = x.shape
    BM, BD = _tile(M, D)
    y = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    residual_out = torch.empty(M, D, dtype=residual_dtype, device=x.device) if residual_dtype is not None else None
    rms_norm_fwd_kernel[(cdiv(M, BM),)](
        x, residual, weight, gate, y, residual_out, rstd, eps, M,
        D=D, BM=BM, BD=BD, HAS_RESIDUAL=residual is not None, STORE_RESIDUAL_OUT=residual_out is not None,
        HAS_WEIGHT=weight is not None, HAS_GATE=gate is not None, X_SILU=x_silu, num_warps=_num_warps(BM, BD),
    )
    return y, residual_out, rstd


def rms_norm_bwd(dy, dres_out, x, gate, weight, residual, rstd, need_dres, x_silu=False, x_dtype=None):
    """Launch the backward kernel. Returns ``(dx, dgate, dweight, dresidual)`` (``None`` where absent).
    With ``x_dtype`` given, ``x`` is the forward's fp32 sum ``x + residual`` (``residual`` is None) and
    ``dx`` comes back in ``x_dtype``, ``dresidual`` (with ``need_dres``) in fp32."""
    M, D = x.shape
    BM, BD, num_warps = _bwd_tile(M, D)
    P = min(cdiv(M, BM), _num_programs(x))
    rows_per_program = cdiv(cdiv(M, P), BM) * BM
    P = cdiv(M, rows_per_program)
    dx = torch.empty_like(x, dtype=x_dtype)
    dgate = torch.empty_like(gate) if gate is not None else None
    dres = (torch.empty_like(x) if x_dtype is not None else torch.empty_like(residual)) if need_dres else None
    dw = torch.empty(P, D, dtype=torch.float32, device=x.device) if weight is not None else None
    rms_norm_bwd_kernel[(P,)](
        x, residual, weight, gate, dy, dres_out, dx, dres, dgate, dw, rstd, M, rows_per_program,
        D=D, BM=BM, BD=BD, HAS_RESIDUAL=residual is not None, HAS_DRES_OUT=dres_out is not None,
        STORE_DRES=need_dres, HAS_WEIGHT=weight is not None, HAS_GATE=gate is not None, X_SILU=x_silu,
        num_warps=num_warps,
    )
    dweight = None
    if weight is not None:  # the partials summed by one small launch (torch.sum: a memset and a reduction)
        dweight = torch.empty(D, dtype=weight.dtype, device=x.device)
        # narrow column blocks, many rows per step: 128 programs at D = 2048, each with few steps
        BDS = min(16, BD)
        sum_rows_kernel[(cdiv(D, BDS),)](dw, dweight, P, D, BP=512, BD=BDS, num_warps=8)
    return dx, dgate, dweight, dres


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, residual, eps, residual_dtype, x_silu=False):
        shape = x.shape
        x2, g2, r2 = _flat(x), _flat(gate), _flat(residual)
        w = weight.contiguous() if weight is not None else None
        y, residual_out, rstd = rms_norm_fwd(x2, g2, w, r2, eps, residual_dtype, x_silu)
        # the fp32 sum returned to the caller serves the backward in place of x and residual (not after
        # a silu: its derivative needs x)
        ctx.x_dtype = None
        if r2 is not None and residual_dtype == torch.float32 and not x_silu:
            ctx.x_dtype = x.dtype
            x2, r2 = residual_out, None
        ctx.save_for_backward(x2, g2, w, r2, rstd)
        ctx.set_materialize_grads(False)
        ctx.shape = shape
        ctx.prenorm = residual_dtype is not None
        ctx.x_silu = x_silu
        y = y.view(shape)
        return (y, residual_out.view(shape)) if ctx.prenorm else y

    @staticmethod
    def backward(ctx, dy, dres_out=None):
        x, gate, weight, residual, rstd = ctx.saved_tensors
        dy = _flat(dy) if dy is not None else torch.zeros_like(x)
        dres_out = _flat(dres_out) if ctx.prenorm and dres_out is not None else None
        need_dres = (residual is not None or ctx.x_dtype is not None) and ctx.needs_input_grad[3]
        dx, dgate, dweight, dres = rms_norm_bwd(dy, dres_out, x, gate, weight, residual, rstd, need_dres,
                                                ctx.x_silu, ctx.x_dtype)
        shape = ctx.shape
        return (
            dx.view(shape),
            dgate.view(shape) if dgate is not None else None,
            dweight,
            dres.view(shape) if dres is not None else None,
            None,
            None,
            None,
        )


def _rms_norm_torch(x, gate, weight, residual, eps, residual_dtype, x_silu=False):
    """Plain PyTorch: accumulate in fp32 (fp64 for fp64 inputs), autograd does the backward."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    if x_silu:
        h = F.silu(h)
    if residual is not None:
        h = h + residual.to(acc)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if gate is not None:
        y = y * F.silu(gate.to(acc))
    y = y.to(x.dtype)
    return (y, h.to(residual_dtype)) if residual_dtype is not None else y


def _check_norm_inputs(x, gate, weight, residual, eps):
    check_tensor(x, "x")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {tuple(x.shape)}")
    D = x.shape[-1]
    if gate is not None:
        check_tensor(gate, "gate")
        if gate.shape != x.shape:
            raise ValueError(f"gate must have the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}")
    if residual is not None:
        check_tensor(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight is not None:
        check_tensor(weight, "weight")
        if weight.shape != (D,):
            raise ValueError(f"weight must have shape [D] = ({D},) to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    check_same_device({"x": x, "gate": gate, "weight": weight, "residual": residual})


def _check_activation(activation):
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return activation == "silu"


def _norm(x, gate, weight, eps, residual, prenorm, activation=None):
    _check_norm_inputs(x, gate, weight, residual, eps)
    x_silu = _check_activation(activation)
    if prenorm and residual is None:
        # No residual stream yet: x (after the activation) is the residual the next block adds to.
        return _norm(x, gate, weight, eps, None, False, activation), (F.silu(x) if x_silu else x)
    residual_dtype = None
    if prenorm:
        residual_dtype = torch.float32 if residual.dtype == torch.float32 else x.dtype
    if use_triton(x) and x.dtype != torch.float64 and x.numel() > 0:
        return RMSNormFunction.apply(x, gate, weight, residual, float(eps), residual_dtype, x_silu)
    return _rms_norm_torch(x, gate, weight, residual, float(eps), residual_dtype, x_silu)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    activation: str | None = None,
):
    """Root-mean-square normalization over the last dimension, with an optional fused residual add.

    Args:
        x: ``[..., D]``, float16/bfloat16/float32 (float64 runs in plain PyTorch).
        weight: ``[D]`` scale, or ``None`` for no affine scale.
        eps: added to the mean square.
        residual: optional ``[..., D]``; ``x + residual`` is normalized (the sum is formed in fp32).
        prenorm: also return the new residual stream ``x + residual`` (``x`` when ``residual`` is
            ``None``), in fp32 if ``residual`` is fp32, else in ``x``'s dtype.
        activation: ``"silu"`` normalizes ``silu(x)`` (plus ``residual``) instead of ``x``, inside the
            same kernels; ``None`` (default) for none.

    Returns:
        ``y`` of ``x``'s shape and dtype, or ``(y, new_residual)`` when ``prenorm``.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import rms_norm
        >>> x = torch.tensor([[3.0, 4.0]])
        >>> y = rms_norm(x, torch.ones(2), eps=0.0)
        >>> [round(v, 4) for v in y[0].tolist()]
        [0.8485, 1.1314]
    """
    return _norm(x, None, weight, eps, residual, prenorm, activation)


def rms_norm_gated(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
):
    """``rms_norm(x) · weight · swish(gate)`` in one kernel (``swish(g) = g · sigmoid(g)``).

    Args:
        x: ``[..., D]``.
        gate: ``[..., D]``, the shape of ``x``.
        weight, eps, residual, prenorm: as in :func:`rms_norm`.

    Returns:
        ``y`` of ``x``'s shape and dtype, or ``(y, new_residual)`` when ``prenorm``.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import rms_norm_gated
        >>> x, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        >>> rms_norm_gated(x, g, torch.ones(8)).shape
        torch.Size([2, 5, 8])
    """
    if gate is None:
        raise TypeError("gate must be a torch.Tensor, got None (use rms_norm for the ungated norm)")
    return _norm(x, gate, weight, eps, residual, prenorm)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with an optional fused residual add (see :func:`rms_norm`).

    Args:
        hidden_size: ``D``, the size of the last dimension.
        eps: added to the mean square.
        elementwise_affine: learn a ``[D]`` scale ``weight`` (initialized to ones).
        activation: ``"silu"`` normalizes ``silu(x)`` (fused; see :func:`rms_norm`), ``None`` none.
        dtype, device: of ``weight``.

    Shapes:
        ``forward(x [..., D], residual [..., D] = None, prenorm=False)`` returns ``y [..., D]``, or
        ``(y, x + residual)`` when ``prenorm``.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import RMSNorm
        >>> norm = RMSNorm(100)
        >>> x, res = torch.randn(2, 7, 100), torch.randn(2, 7, 100)
        >>> y, new_res = norm(x, res, prenorm=True)
        >>> y.shape, torch.allclose(new_res, x + res)
        (torch.Size([2, 7, 100]), True)
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 activation: str | None = None, dtype=None, device=None):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        _check_activation(activation)
        self.hidden_size = hidden_size
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.activation = activation
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}{act}"

    def _check_size(self, x):
        if isinstance(x, torch.Tensor) and (x.ndim < 1 or x.shape[-1] != self.hidden_size):
            raise ValueError(f"x must have shape [..., {self.hidden_size}] (hidden_size), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
        self._check_size(x)
        return rms_norm(x, self.weight, self.eps, residual=residual, prenorm=prenorm, activation=self.activation)


class FusedRMSNormGated(RMSNorm):
    """``RMSNorm(x) · swish(gate)``, fused forward and backward (see :func:`rms_norm_gated`).

    Args:
        hidden_size: ``D``.
        eps: added to the mean square.
        elementwise_affine: learn a ``[D]`` scale ``weight``.

    Shapes:
        ``forward(x [..., D], gate [..., D])`` returns ``[..., D]`` in ``x``'s dtype. ``residual`` and
        ``prenorm`` work as in :class:`RMSNorm`.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import FusedRMSNormGated
        >>> norm = FusedRMSNormGated(64)
        >>> o, g = torch.randn(2, 3, 4, 64), torch.randn(2, 3, 4, 64)
        >>> norm(o, g).shape
        torch.Size([2, 3, 4, 64])
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True, dtype=None, device=None):
        super().__init__(hidden_size, eps, elementwise_affine, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
        self._check_size(x)
        return rms_norm_gated(x, gate, self.weight, self.eps, residual=residual, prenorm=prenorm)
