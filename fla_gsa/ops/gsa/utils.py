"""Argument checks and the ABC slot normalization shared by the GSA ops."""
from __future__ import annotations

import torch

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


def abc_slot_gates(s: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """ABC's slot writes: normalize ``s`` by a running softmax over **time**.

    ``z_t = logcumsumexp(s)_t`` (restarting at each sequence), ``g_t = z_{t-1} - z_t`` (``g = 0`` at a
    sequence's first step, so an initial state carries over) and ``s_t <- exp(s_t - z_t)``. Then the
    GSA recurrence with these gates keeps ``sum_j exp(s_j - z_t) k_j``: a softmax-weighted memory.

    Returns ``(s_normalized in s's dtype, g fp32)``, both ``[B, T, H, M]``, differentiable.
    """
    sf = s.float()
    if cu_seqlens is None:
        parts = [sf]
    else:
        parts = [sf[:, bos:eos] for _, bos, eos in seq_bounds(cu_seqlens, s.shape[0], s.shape[1])]
    outs, gates = [], []
    for x in parts:
        z = x.logcumsumexp(dim=1)
        gates.append(torch.cat([z[:, :1], z[:, :-1]], dim=1) - z)
        outs.append((x - z).exp())
    return torch.cat(outs, 1).to(s.dtype), torch.cat(gates, 1)
