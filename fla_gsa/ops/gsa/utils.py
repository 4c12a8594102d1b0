"""Argument checks and the ABC slot normalization shared by the GSA ops."""
from __future__ import annotations

import torch

from fla_gsa.ops.gsa.abc_gates import abc_slot_gates_triton
from fla_gsa.ops.utils.backend import use_kernels
from fla_gsa.ops.utils.checks import (check_cu_seqlens, check_gate, check_qkv, check_same_device, check_state,
                                      check_tensor, resolve_scale)
from fla_gsa.ops.utils.index import seq_bounds


def check_gsa(q, k, v, s, g, scale, initial_state, cu_seqlens):
    """Validate a GSA call; return ``(N, scale, hk0, hv0)``."""
    B, T, HQ, H, K, V = check_qkv(q, k, v)
    check_tensor(s, "s", 4, "[B, T, H, M]")
    M = s.shape[-1]
    check_gate(s, "s", (B, T, H, M), "[B, T, H, M]")
    check_gate(g, "g", (B, T, H, M), "[B, T, H, M]")
    N = check_cu_seqlens(cu_seqlens, B, T)
    hk0 = hv0 = None
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError("initial_state must be a pair (hk [N, H, K, M], hv [N, H, M, V]), got "
                            f"{type(initial_state).__name__}" + (f" of length {len(initial_state)}"
                                                                  if isinstance(initial_state, (tuple, list)) else ""))
        hk0, hv0 = initial_state
        check_state(hk0, "initial_state[0] (hk)", (N, H, K, M), "[N, H, K, M]")
        check_state(hv0, "initial_state[1] (hv)", (N, H, M, V), "[N, H, M, V]")
    check_same_device({"q": q, "s": s, "g": g, "hk": hk0, "hv": hv0, "cu_seqlens": cu_seqlens})
    return N, resolve_scale(scale, K), hk0, hv0


def logcumsumexp_time(x: torch.Tensor) -> torch.Tensor:
    """``x.logcumsumexp(dim=1)`` for ``x [B, T, ...]``, computed with time as the innermost dimension.

    PyTorch's CUDA scan along the innermost dimension is parallel within each row; along an outer one
    it runs one thread per column through all T steps. Measured on an H100 for ABC's slot gates at
    ``[1, 16384, 4, 64]`` fp32, forward+backward: 18.4 ms along dim 1, 1.4 ms this way."""
    return x.movedim(1, -1).contiguous().logcumsumexp(-1).movedim(-1, 1)


def abc_slot_gates(s: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """ABC's slot writes: normalize ``s`` by a running softmax over **time**.

    ``z_t = logcumsumexp(s)_t`` (restarting at each sequence), ``g_t = z_{t-1} - z_t`` (``g = 0`` at a
    sequence's first step, so an initial state carries over) and ``s_t <- exp(s_t - z_t)``. Then the
    GSA recurrence with these gates keeps ``sum_j exp(s_j - z_t) k_j``: a softmax-weighted memory.

    Returns ``(s_normalized in s's dtype, g)``, both ``[B, T, H, M]``, contiguous, differentiable
    w.r.t. ``s``. ``g`` and the arithmetic are fp32, or float64 for float64 ``s`` (a reference run).

    CUDA tensors (and any under the Triton interpreter) run one Triton kernel forward and one backward
    (:mod:`fla_gsa.ops.gsa.abc_gates`); CPU tensors and float64 run PyTorch, scanning varlen
    sequences one after another.
    """
    if use_kernels(s):
        return abc_slot_gates_triton(s, cu_seqlens)
    x = s.to(torch.promote_types(s.dtype, torch.float32))
    spans = [(0, s.shape[1])] if cu_seqlens is None else [(b, e) for _, b, e in seq_bounds(cu_seqlens, *s.shape[:2])]
    outs, gates = [], []
    for bos, eos in spans:
        xs = x[:, bos:eos]
        z = logcumsumexp_time(xs)
        gates.append(torch.cat([z[:, :1], z[:, :-1]], dim=1) - z)
        outs.append((xs - z).exp())
    o, g = (t[0] if len(t) == 1 else torch.cat(t, 1) for t in (outs, gates))
    return o.to(s.dtype).contiguous(), g.contiguous()
