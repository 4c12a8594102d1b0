"""Input validation shared by every public op.

Every message names the argument and gives the expected and the actual shape or dtype, so a caller
never has to read a kernel to find out what went wrong.
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(x, name: str, ndim: int | None = None, layout: str | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name} must have {ndim} dimensions{hint}, got shape {tuple(x.shape)}")


def check_shape(x: torch.Tensor, name: str, expected: Sequence[int], layout: str) -> None:
    if x.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}")


def check_same_device(name_tensors: dict) -> None:
    first = None
    for t in name_tensors.values():  # a loop, not a set of devices: a decoding step runs this every token
        if isinstance(t, torch.Tensor):
            if first is None:
                first = t.device
            elif t.device != first:
                listing = ", ".join(f"{n} on {x.device}" for n, x in name_tensors.items()
                                    if isinstance(x, torch.Tensor))
                raise ValueError(f"all inputs must be on one device, got {listing}")


def check_qkv(q, k, v, k_name: str = "k", v_name: str = "v") -> tuple[int, int, int, int, int, int]:
    """Check ``q [B, T, HQ, K]``, ``k [B, T, H, K]``, ``v [B, T, H, V]`` with ``HQ % H == 0``.

    Returns ``(B, T, HQ, H, K, V)``."""
    check_tensor(q, "q", 4, "[B, T, HQ, K]")
    check_tensor(k, k_name, 4, "[B, T, H, K]")
    check_tensor(v, v_name, 4, "[B, T, H, V]")
    B, T, HQ, K = q.shape
    H = k.shape[2]
    if k.shape[:2] != (B, T) or k.shape[3] != K:
        raise ValueError(f"{k_name} must have shape [B, T, H, K] = ({B}, {T}, H, {K}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"{v_name} must have shape [B, T, H, V] = ({B}, {T}, {H}, V) to match {k_name} {tuple(k.shape)}, got {tuple(v.shape)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"the number of query heads HQ={HQ} (q) must be a multiple of the number of key/value heads H={H} ({k_name})")
    if T == 0:
        raise ValueError(f"q must have at least one time step, got shape {tuple(q.shape)}")
    check_same_device({"q": q, k_name: k, v_name: v})
    return B, T, HQ, H, K, v.shape[3]


def check_gate(g, name: str, expected: Sequence[int], layout: str) -> None:
    if g is None:
        return
    check_tensor(g, name)
    check_shape(g, name, expected, layout)


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> int:
    """Check ``cu_seqlens`` (int ``[N + 1]``, from 0 to T, strictly increasing, B == 1); return N."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of integers, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [N + 1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got first={c[0]}, last={c[-1]}")
    if any(b <= a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {c}")
    return len(c) - 1


def check_state(h, name: str, expected: Sequence[int], layout: str) -> None:
    if h is None:
        return
    check_tensor(h, name)
    check_shape(h, name, expected, layout)


def resolve_scale(scale, K: int) -> float:
    if scale is None:
        return K ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    return float(scale)


def check_chunk_size(chunk_size) -> int:
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size!r}")
    return chunk_size


def check_checkpoint_level(checkpoint_level) -> int:
    if checkpoint_level not in (0, 1):
        raise ValueError(f"checkpoint_level must be 0 or 1, got {checkpoint_level!r}")
    return checkpoint_level


def check_linear_attn(q, k, v, gk, gv, scale, initial_state, cu_seqlens, gk_name="gk", gv_name="gv",
                      state_name="initial_state"):
    """All checks of a generic gated-linear-attention call. Returns ``(B, T, HQ, H, K, V, N, scale)``."""
    B, T, HQ, H, K, V = check_qkv(q, k, v)
    check_gate(gk, gk_name, (B, T, H, K), "[B, T, H, K]")
    check_gate(gv, gv_name, (B, T, H, V), "[B, T, H, V]")
    N = check_cu_seqlens(cu_seqlens, B, T)
    check_state(initial_state, state_name, (N, H, K, V), "[N, H, K, V]")
    check_same_device({"q": q, gk_name: gk, gv_name: gv, state_name: initial_state, "cu_seqlens": cu_seqlens})
    return B, T, HQ, H, K, V, N, resolve_scale(scale, K)
