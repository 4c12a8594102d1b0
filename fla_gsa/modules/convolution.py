"""Causal depthwise short convolution over time, with a rolling cache for decoding.

    y_t = act( Σ_{j<W} w[:, j] · x_{t−W+1+j} + b )        (x_s = cache or 0 before the sequence start)

The cache ``[N, D, W]`` holds the last ``W`` inputs of each sequence (oldest first, zero-padded when
fewer were seen), so a decode step is ``cache ← [cache[..., 1:], x_t]``, ``y_t = act(Σ cache · w + b)``.

Packed sequences (``cu_seqlens``) are handled by scattering the tokens into a layout where each
sequence is preceded by its own ``W − 1`` prefix slots (zeros or its cache), then running one
ordinary convolution: no window ever reaches into the previous sequence, with no per-sequence loop.
This is plain PyTorch on every device (``F.conv1d`` is already a fused kernel on GPU).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla_gsa.ops.utils.checks import check_cu_seqlens, check_same_device, check_tensor

_ACTIVATIONS = (None, "silu", "swish")


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
