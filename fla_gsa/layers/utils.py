"""What every layer does around its op: read the padding mask, pack the real tokens for the varlen op
and put the outputs back, gather and scatter per-sequence states, and compute token positions.

Padding never reaches a recurrent state: the tokens a ``[B, T]`` mask keeps are packed into one
sequence of ``total`` tokens with ``cu_seqlens`` (the ops' varlen mode), and the outputs are scattered
back to ``[B, T]`` with zeros at the padded positions. Rows with no real token in this call (possible
only with unusual masks) are left out of the op and keep their state.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fla_gsa.modules.rotary import RotaryEmbedding, apply_rotary


def check_layer_input(hidden_states, attention_mask, hidden_size: int):
    """Validate ``hidden_states [B, T, D]`` and an optional ``[B, S]`` 0/1 mask (``S >= T``: the last ``T``
    columns are this call's tokens). Returns the mask of this call's tokens, ``[B, T]`` bool, or None."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must have shape [B, T, {hidden_size}] (hidden_size), got {tuple(hidden_states.shape)}")
    B, T, _ = hidden_states.shape
    if T == 0:
        raise ValueError(f"hidden_states must have at least one time step, got shape {tuple(hidden_states.shape)}")
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor [B, T] of 0/1, got {type(attention_mask).__name__}")
    if attention_mask.ndim != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(f"attention_mask must have shape [B, S] = ({B}, S >= {T}) with 1 for tokens and 0 for padding "
                         f"(4D masks are not supported), got {tuple(attention_mask.shape)}")
    return attention_mask[:, -T:].to(device=hidden_states.device, dtype=torch.bool)


@dataclasses.dataclass
class Packing:
    """Where the real tokens of a ``[B, T]`` batch go in the packed ``[1, total]`` layout."""

    batch_size: int
    seq_len: int
    indices: torch.Tensor          # [total] positions of the real tokens in the flattened [B * T]
    cu_seqlens: torch.Tensor       # [N + 1] int32 over the rows that have tokens
    rows: torch.Tensor | None      # [N] the rows that have tokens; None when every row has some

    @property
    def empty(self) -> bool:
        return self.indices.numel() == 0


def pack_mask(mask: torch.Tensor | None) -> Packing | None:
    """From this call's ``[B, T]`` mask, the packing of its real tokens; None when there is no padding
    (the op then runs on the batch as it is)."""
    if mask is None or bool(mask.all()):
        return None
    B, T = mask.shape
    lens = mask.sum(-1)
    indices = mask.flatten().nonzero().squeeze(-1)
    nonempty = lens > 0
    rows = None
    if not bool(nonempty.all()):
        rows = nonempty.nonzero().squeeze(-1)
        lens = lens[rows]
    cu_seqlens = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return Packing(B, T, indices, cu_seqlens, rows)


def pack(x: torch.Tensor, p: Packing | None) -> torch.Tensor:
    """``[B, T, ...]`` to ``[1, total, ...]`` (unchanged when ``p`` is None)."""
    if p is None:
        return x
    return x.flatten(0, 1).index_select(0, p.indices)[None]


def unpack(x: torch.Tensor, p: Packing | None) -> torch.Tensor:
    """``[1, total, ...]`` back to ``[B, T, ...]``, zeros at padded positions."""
    if p is None:
        return x
    out = x.new_zeros(p.batch_size * p.seq_len, *x.shape[2:])
    return out.index_copy(0, p.indices, x[0]).view(p.batch_size, p.seq_len, *x.shape[2:])


def _map(x, fn):
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(_map(t, fn) for t in x)
    return fn(x)


def gather_rows(state, p: Packing | None):
    """The rows of a per-sequence state (tensor or tuple of tensors, batch first) that the op sees."""
    if state is None or p is None or p.rows is None:
        return state
    return _map(state, lambda t: t.index_select(0, p.rows))


def scatter_rows(old, new, p: Packing | None):
    """The full-batch state after the op: ``new`` for the rows that had tokens, ``old`` (or zeros) for
    the others."""
    if new is None or p is None or p.rows is None:
        return new
    if isinstance(new, (tuple, list)):
        olds = old if old is not None else (None,) * len(new)
        return type(new)(scatter_rows(o, n, p) for o, n in zip(olds, new))
    base = old if old is not None else new.new_zeros(p.batch_size, *new.shape[1:])
    return base.to(new.dtype).index_copy(0, p.rows, new)


def token_positions(state, mask: torch.Tensor | None, B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions of this call's tokens ``[B, T]`` (real tokens counted per sequence, so a
    left-padded prompt starts at 0) and the per-sequence count after this call ``[B]``."""
    prev = state.positions if state is not None and state.positions is not None else None
    if prev is None:
        prev = torch.zeros(B, dtype=torch.long, device=device)
    if mask is None:
        return prev[:, None] + torch.arange(T, device=device), prev + T
    steps = mask.long().cumsum(-1)
    return (prev[:, None] + steps - 1).clamp_min(0), prev + steps[:, -1]


def rotate(rope: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
    """Rotary embedding of ``q [B, T, HQ, D]``, ``k [B, T, H, D]`` at integer ``positions [B, T]``."""
    cos, sin = rope.cos_sin(positions)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return apply_rotary(q, cos, sin, rope.interleaved), apply_rotary(k, cos, sin, rope.interleaved)


def require_layer_idx(layer, past_key_values, use_cache: bool) -> None:
    if (past_key_values is not None or use_cache) and layer.layer_idx is None:
        raise ValueError(f"{type(layer).__name__} needs a layer_idx to read or write a cache; pass layer_idx=... "
                         "when building it")


def check_mode(mode: str) -> str:
    if mode not in ("chunk", "fused_recurrent"):
        raise ValueError(f"mode must be 'chunk' or 'fused_recurrent', got {mode!r}")
    return mode


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def resolve_heads(hidden_size, num_heads, num_kv_heads, head_dim) -> tuple[int, int, int]:
    """Validate the head layout; returns ``(num_heads, num_kv_heads, head_dim)``."""
    check_positive_int(hidden_size, "hidden_size")
    check_positive_int(num_heads, "num_heads")
    num_kv_heads = num_heads if num_kv_heads is None else check_positive_int(num_kv_heads, "num_kv_heads")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}) "
                             "unless head_dim is given")
        head_dim = hidden_size // num_heads
    return num_heads, num_kv_heads, check_positive_int(head_dim, "head_dim")
