"""Causal depthwise short convolution over time, with a rolling cache for decoding.

    y_t = act( Σ_{j<W} w[:, j] · x_{t−W+1+j} + b )        (x_s = cache or 0 before the sequence start)

The cache ``[N, D, W]`` holds the last ``W`` inputs of each sequence (oldest first, zero-padded when
fewer were seen), so a decode step is ``cache ← [cache[..., 1:], x_t]``, ``y_t = act(Σ cache · w + b)``.

On CUDA tensors (or under ``TRITON_INTERPRET=1``) the forward and backward are Triton kernels over
tiles of ``BT`` tokens × ``BD`` channels (in varlen mode a tile never crosses a sequence: the grid is
the per-sequence chunk list). A tap that reaches before the sequence start reads the cache (or
zero), so nothing leaks across packed sequences. The backward recomputes the pre-activation where the
SiLU derivative needs it (nothing but the inputs is saved) and gives

    dz_t = dy_t · silu'(z_t),   dx_t = Σ_j w[:, j] dz_{t+W−1−j},   dw[:, j] = Σ_t dz_t x_{t−W+1+j},   db = Σ_t dz_t

with ``dx`` of the prefix positions going to the cache; ``dw`` and ``db`` are summed per tile into an
fp32 ``[tiles, D, W]`` partial buffer, then over the tiles on the host. The final cache is a gather
of the last ``W`` inputs (PyTorch, autograd). ``step`` (one token) is PyTorch on every device.

Elsewhere (CPU without the interpreter, float64), plain PyTorch: packed sequences are handled by
scattering the tokens into a layout where each sequence is preceded by its own ``W − 1`` prefix slots
(zeros or its cache), then running one ordinary convolution, with no per-sequence loop.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_cu_seqlens, check_same_device, check_tensor
from fla_gsa.ops.utils.index import chunk_grid
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv, chunk_bounds, dsilu, next_pow2, next_power_of_2

_ACTIVATIONS = (None, "silu", "swish")

# Tokens per tile (at most; fewer for short inputs) and channels per tile.
BLOCK_T = 64
BLOCK_D = 128


@triton.jit
def _conv_input(x, cache, i_n, bos, rows, L, o_d, m_d, D: tl.constexpr, W: tl.constexpr, HAS_CACHE: tl.constexpr):
    """Inputs at the sequence-relative ``rows`` as a fp32 ``[len(rows), BD]`` tile: ``x`` for
    ``0 <= row < L``, the cache for ``1 - W <= row < 0`` (cache slot ``W + row``), zero elsewhere."""
    m_x = (rows >= 0) & (rows < L)
    b_x = tl.load(x + (bos + rows)[:, None] * D + o_d[None, :], mask=m_x[:, None] & m_d[None, :], other=0).to(tl.float32)
    if HAS_CACHE:
        m_c = (rows < 0) & (rows > -W)
        p_c = cache + i_n.to(tl.int64) * D * W + o_d[None, :] * W + (W + rows)[:, None]
        b_x += tl.load(p_c, mask=m_c[:, None] & m_d[None, :], other=0).to(tl.float32)
    return b_x


@triton.jit
def _conv_pre(x, cache, weight, bias, i_n, bos, rows, L, o_d, m_d,
              D: tl.constexpr, W: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
              HAS_CACHE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Pre-activation ``z = Σ_j w[:, j] x_{row−W+1+j} + b`` at ``rows``, fp32 ``[BR, BD]``."""
    b_z = tl.zeros([BR, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        b_w = tl.load(weight + o_d * W + j, mask=m_d, other=0).to(tl.float32)
        b_z += b_w[None, :] * _conv_input(x, cache, i_n, bos, rows - (W - 1) + j, L, o_d, m_d, D, W, HAS_CACHE)
    if HAS_BIAS:
        b_z += tl.load(bias + o_d, mask=m_d, other=0).to(tl.float32)[None, :]
    return b_z


@triton.jit
def _conv_dz(x, cache, weight, bias, dy, i_n, bos, rows, L, o_d, m_d,
             D: tl.constexpr, W: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
             HAS_CACHE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """Gradient of the pre-activation at ``rows`` (zero outside ``[0, L)``), fp32 ``[BR, BD]``."""
    m_r = (rows >= 0) & (rows < L)
    b_dz = tl.load(dy + (bos + rows)[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0).to(tl.float32)
    if SILU:
        b_z = _conv_pre(x, cache, weight, bias, i_n, bos, rows, L, o_d, m_d, D, W, BR, BD, HAS_CACHE, HAS_BIAS)
        b_dz = b_dz * dsilu(b_z)
    return b_dz


@lean
@triton.jit
def short_conv_fwd_kernel(
    x, cache, weight, bias, y, cu_seqlens, chunk_indices, T,
    D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_CACHE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # x, y: contiguous [B, T, D]; weight [D, W]; cache [N, D, W] (oldest first).
    i_d, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_c, bos, L = chunk_bounds(i_b, i_t, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_t, m_d = o_t < L, o_d < D
    b_y = _conv_pre(x, cache, weight, bias, i_n, bos, o_t, L, o_d, m_d, D, W, BT, BD, HAS_CACHE, HAS_BIAS)
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(y + (bos + o_t)[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@lean
@triton.jit
def short_conv_bwd_kernel(
    x, cache, weight, bias, dy, dx, dcache, dw, db, cu_seqlens, chunk_indices, T, NT,
    D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    HAS_CACHE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, IS_VARLEN: tl.constexpr,
    STORE_DCACHE: tl.constexpr, STORE_DW: tl.constexpr, STORE_DB: tl.constexpr,
):
    # dw [P, D, W], db [P, D] (fp32): one partial per tile P = i_b * NT + i_t; dcache [N, D, W] is
    # zero-filled by the host, the first tile of each sequence writes its slots 1..W-1.
    i_d, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_c, bos, L = chunk_bounds(i_b, i_t, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_t, m_d = o_t < L, o_d < D
    m = m_t[:, None] & m_d[None, :]

    # dx_t = Σ_j w[:, j] dz_{t + W-1-j}
    b_dx = tl.zeros([BT, BD], dtype=tl.float32)
    for s in tl.static_range(W):
        b_dz = _conv_dz(x, cache, weight, bias, dy, i_n, bos, o_t + s, L, o_d, m_d, D, W, BT, BD, HAS_CACHE, HAS_BIAS, SILU)
        b_w = tl.load(weight + o_d * W + (W - 1 - s), mask=m_d, other=0).to(tl.float32)
        b_dx += b_w[None, :] * b_dz
        if s == 0:
            # this tile's own dz: its share of dw and db
            i_p = (i_b * NT + i_t).to(tl.int64)
            if STORE_DB:
                tl.store(db + i_p * D + o_d, tl.sum(b_dz, axis=0), mask=m_d)
            if STORE_DW:
                for j in tl.static_range(W):
                    b_x = _conv_input(x, cache, i_n, bos, o_t - (W - 1) + j, L, o_d, m_d, D, W, HAS_CACHE)
                    tl.store(dw + i_p * D * W + o_d * W + j, tl.sum(b_dz * b_x, axis=0), mask=m_d)
    tl.store(dx + (bos + o_t)[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)

    if STORE_DCACHE:
        if i_c == 0:
            # the W-1 prefix positions -(W-1)..-1 are cache slots 1..W-1
            o_c = tl.arange(0, BC) - (W - 1)
            m_c = o_c < 0
            b_dc = tl.zeros([BC, BD], dtype=tl.float32)
            for s in tl.static_range(W):
                # a name of its own: Triton's compiler rejects a variable whose tile shape changes
                # inside a runtime branch (b_dz is [BT, BD] above)
                b_dzc = _conv_dz(x, cache, weight, bias, dy, i_n, bos, o_c + s, L, o_d, m_d, D, W, BC, BD, HAS_CACHE,
                                 HAS_BIAS, SILU)
                b_w = tl.load(weight + o_d * W + (W - 1 - s), mask=m_d, other=0).to(tl.float32)
                b_dc += b_w[None, :] * b_dzc
            p_dc = dcache + i_n.to(tl.int64) * D * W + o_d[None, :] * W + (W + o_c)[:, None]
            tl.store(p_dc, b_dc.to(dcache.dtype.element_ty), mask=m_c[:, None] & m_d[None, :])


def _conv_grid(x: torch.Tensor, D: int, cu_seqlens):
    B, T = x.shape[:2]
    BT = min(BLOCK_T, next_pow2(T))
    BD = min(BLOCK_D, next_pow2(D))
    NT, chunk_indices = chunk_grid(cu_seqlens, T, BT)
    return BT, BD, NT, chunk_indices


def short_conv_fwd(x, weight, bias, cache, cu_seqlens, silu: bool) -> torch.Tensor:
    """Launch the forward kernel: ``x [B, T, D]`` contiguous, ``weight [D, W]``. Returns ``y`` like ``x``."""
    B, T, D = x.shape
    W = weight.shape[-1]
    BT, BD, NT, chunk_indices = _conv_grid(x, D, cu_seqlens)
    y = torch.empty_like(x)
    short_conv_fwd_kernel[(cdiv(D, BD), NT, B)](
        x, cache, weight, bias, y, cu_seqlens, chunk_indices, T,
        D=D, W=W, BT=BT, BD=BD, HAS_CACHE=cache is not None, HAS_BIAS=bias is not None, SILU=silu,
        IS_VARLEN=cu_seqlens is not None, num_warps=4,
    )
    return y


def short_conv_bwd(dy, x, weight, bias, cache, cu_seqlens, silu: bool, need_dw: bool, need_db: bool,
                   need_dcache: bool):
    """Launch the backward kernel. Returns ``(dx, dweight [D, W] or None, dbias or None, dcache or None)``."""
    B, T, D = x.shape
    W = weight.shape[-1]
    BT, BD, NT, chunk_indices = _conv_grid(x, D, cu_seqlens)
    P = B * NT
    dx = torch.empty_like(x)
    need_dcache = need_dcache and cache is not None
    dcache = torch.zeros_like(cache) if need_dcache else None
    dw = torch.empty(P, D, W, dtype=torch.float32, device=x.device) if need_dw else None
    db = torch.empty(P, D, dtype=torch.float32, device=x.device) if need_db else None
    short_conv_bwd_kernel[(cdiv(D, BD), NT, B)](
        x, cache, weight, bias, dy, dx, dcache, dw, db, cu_seqlens, chunk_indices, T, NT,
        D=D, W=W, BT=BT, BD=BD, BC=next_power_of_2(max(W - 1, 1)),
        HAS_CACHE=cache is not None, HAS_BIAS=bias is not None, SILU=silu, IS_VARLEN=cu_seqlens is not None,
        STORE_DCACHE=need_dcache and W > 1, STORE_DW=need_dw, STORE_DB=need_db, num_warps=4,
    )
    return dx, (dw.sum(0) if need_dw else None), (db.sum(0) if need_db else None), dcache


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cache, cu_seqlens, silu):
        x = x.contiguous()
        weight = weight.contiguous()
        cache = cache.contiguous() if cache is not None else None
        ctx.save_for_backward(x, weight, bias, cache, cu_seqlens)
        ctx.silu = silu
        return short_conv_fwd(x, weight, bias, cache, cu_seqlens, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, cache, cu_seqlens = ctx.saved_tensors
        dx, dw, db, dcache = short_conv_bwd(
            dy.contiguous(), x, weight, bias, cache, cu_seqlens, ctx.silu,
            need_dw=ctx.needs_input_grad[1], need_db=bias is not None and ctx.needs_input_grad[2],
            need_dcache=ctx.needs_input_grad[3],
        )
        return (dx, dw.to(weight.dtype) if dw is not None else None, db.to(bias.dtype) if db is not None else None,
                dcache, None, None)


def _final_cache(x: torch.Tensor, cache: torch.Tensor | None, cu_seqlens: torch.Tensor | None, W: int) -> torch.Tensor:
    """The last ``W`` inputs of every sequence ``[N, D, W]`` (oldest first; the cache, then zeros, before
    the start), gathered with autograd; in ``x``'s dtype."""
    B, T, D = x.shape
    if cu_seqlens is None:
        bos = torch.zeros(B, dtype=torch.long, device=x.device)
        eos = torch.full((B,), T, dtype=torch.long, device=x.device)
        rows = torch.arange(B, device=x.device)[:, None] * T
    else:
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        bos, eos = cu[:-1], cu[1:]
        rows = torch.zeros(1, dtype=torch.long, device=x.device)[:, None]
    rel = (eos - bos)[:, None] - W + torch.arange(W, device=x.device)  # [N, W] sequence-relative positions
    flat = x.reshape(B * T, D)
    out = flat[(rows + bos[:, None] + rel).clamp_min(0)]  # [N, W, D]
    out = torch.where((rel >= 0)[..., None], out, out.new_zeros(()))
    if cache is not None:
        from_cache = cache.to(x.dtype).gather(-1, (W + rel).clamp(0, W - 1)[:, None, :].expand(-1, D, -1))
        ok = ((rel < 0) & (rel > -W))[:, None, :]
        return torch.where(ok, from_cache, out.transpose(1, 2)).contiguous()
    return out.transpose(1, 2).contiguous()


class ShortConvolution(nn.Conv1d):
    """Causal depthwise ``conv1d`` over ``[B, T, D]`` with ``W`` taps, optional SiLU, and a decode cache.

    The parameters are those of ``nn.Conv1d(D, D, W, groups=D)``: ``weight [D, 1, W]`` (tap ``W − 1``
    multiplies the current token) and optional ``bias [D]``.

    Args:
        hidden_size: ``D``, the number of channels.
        kernel_size: ``W``, the number of taps (the current token and ``W − 1`` before it).
        bias: learn a bias.
        activation: ``"silu"`` (alias ``"swish"``) or ``None``.

    Shapes:
        ``forward(x [B, T, D], cache [N, D, W] = None, output_final_state=False, cu_seqlens [N+1] = None)``
        returns ``(y [B, T, D], final_cache [N, D, W] or None)``; ``N = B`` without ``cu_seqlens``.
        ``step(x [B, 1, D] or [B, D], cache [B, D, W])`` returns ``(y, new_cache)`` for one token.

    Example:
        >>> import torch
        >>> from fla_gsa.modules import ShortConvolution
        >>> conv = ShortConvolution(100, kernel_size=4)
        >>> x = torch.randn(2, 9, 100)
        >>> y, cache = conv(x, output_final_state=True)
        >>> y_next, cache = conv.step(torch.randn(2, 1, 100), cache)
        >>> y.shape, y_next.shape, cache.shape
        (torch.Size([2, 9, 100]), torch.Size([2, 1, 100]), torch.Size([2, 100, 4]))
    """

    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False, activation: str | None = "silu",
                 dtype=None, device=None):
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be 'silu', 'swish' or None, got {activation!r}")
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1,
                         bias=bias, dtype=dtype, device=device)
        self.hidden_size = hidden_size
        self.activation = activation

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"

    @property
    def width(self) -> int:
        return self.kernel_size[0]

    def _act(self, y):
        return F.silu(y) if self.activation is not None else y

    def _check(self, x, cache, N, name="x"):
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name} must have hidden size D = {self.hidden_size} in its last dimension, got {tuple(x.shape)}")
        if cache is not None:
            check_tensor(cache, "cache")
            expected = (N, self.hidden_size, self.width)
            if tuple(cache.shape) != expected:
                raise ValueError(f"cache must have shape [N, D, W] = {expected}, got {tuple(cache.shape)}")
            check_same_device({name: x, "cache": cache})

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, output_final_state: bool = False,
                cu_seqlens: torch.Tensor | None = None):
        check_tensor(x, "x", 3, "[B, T, D]")
        B, T, D = x.shape
        if T == 0:
            raise ValueError(f"x must have at least one time step, got shape {tuple(x.shape)}")
        N = check_cu_seqlens(cu_seqlens, B, T)
        self._check(x, cache, N)
        W = self.width
        if use_triton(x) and x.dtype != torch.float64:
            bias = self.bias if self.bias is not None else None
            cu = cu_seqlens.to(device=x.device, dtype=torch.int32) if cu_seqlens is not None else None
            y = ShortConvFunction.apply(x, self.weight.reshape(D, W), bias, cache, cu, self.activation is not None)
            return y, (_final_cache(x, cache, cu_seqlens, W) if output_final_state else None)
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        xt = x.transpose(1, 2)  # [B, D, T]
        if cu_seqlens is None:
            prefix = cache[..., 1:].to(x.dtype) if cache is not None else x.new_zeros(B, D, W - 1)
            xp = torch.cat([prefix, xt], -1)  # [B, D, W - 1 + T]
            y = F.conv1d(xp, weight, bias, groups=D)  # [B, D, T]
            final = xp[..., -W:].contiguous() if output_final_state else None
        else:
            cu = cu_seqlens.to(device=x.device, dtype=torch.long)
            seq = torch.arange(N, device=x.device)
            seq_of_token = torch.repeat_interleave(seq, cu[1:] - cu[:-1], output_size=T)
            # sequence n occupies [cu[n] + n(W-1), cu[n+1] + (n+1)(W-1)) of the padded layout,
            # its W-1 prefix slots first
            tok = torch.arange(T, device=x.device) + (seq_of_token + 1) * (W - 1)
            xp = x.new_zeros(D, T + N * (W - 1)).index_copy(1, tok, xt[0])
            if cache is not None:
                pre = ((cu[:-1] + seq * (W - 1))[:, None] + torch.arange(W - 1, device=x.device)).flatten()
                xp = xp.index_copy(1, pre, cache[..., 1:].to(x.dtype).permute(1, 0, 2).reshape(D, -1))
            # output i of an unpadded conv covers window [i, i + W - 1]: token at tok ends its window there
            y = F.conv1d(xp[None], weight, bias, groups=D)[..., tok - (W - 1)]  # [1, D, T]
            final = None
            if output_final_state:
                end = cu[1:] + (seq + 1) * (W - 1)
                final = xp[:, end[:, None] - W + torch.arange(W, device=x.device)].permute(1, 0, 2).contiguous()
        return self._act(y).transpose(1, 2).contiguous(), final

    def step(self, x: torch.Tensor, cache: torch.Tensor | None):
        """One decoding step: ``x [B, 1, D]`` (or ``[B, D]``) against ``cache [B, D, W]`` (``None``: zeros).

        Returns ``(y, new_cache)`` with ``y`` shaped like ``x``; ``cache`` is left untouched."""
        check_tensor(x, "x")
        if x.ndim == 3 and x.shape[1] != 1:
            raise ValueError(f"x must have shape [B, 1, D] (one token) in step, got {tuple(x.shape)}")
        if x.ndim not in (2, 3):
            raise ValueError(f"x must have shape [B, 1, D] or [B, D] in step, got {tuple(x.shape)}")
        x1 = x.reshape(x.shape[0], x.shape[-1])  # [B, D]
        B, D = x1.shape
        self._check(x1, cache, B)
        if cache is None:
            cache = x1.new_zeros(B, D, self.width)
        new_cache = torch.cat([cache[..., 1:].to(x.dtype), x1[..., None]], -1)  # [B, D, W]
        acc = torch.promote_types(x.dtype, torch.float32)
        y = (new_cache.to(acc) * self.weight[:, 0].to(acc)).sum(-1)
        if self.bias is not None:
            y = y + self.bias.to(acc)
        return self._act(y).to(x.dtype).view(x.shape), new_cache
