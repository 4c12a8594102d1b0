"""Small Triton helpers shared by every kernel."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_bounds(i_b, i_t, T, cu_seqlens, chunk_indices, IS_VARLEN: tl.constexpr):
    """Map a program's (batch, chunk) ids to ``(sequence, chunk within it, first row, length)``.

    Fixed length: the sequence is batch row ``i_b`` and starts at ``i_b * T``. Varlen: ``i_t`` indexes
    ``chunk_indices`` (``[NT, 2]``: sequence, chunk) and the rows come from ``cu_seqlens``.
    Row offsets are int64 so ``bos * H * D`` cannot overflow on long inputs."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        return i_n, i_c, bos, (eos - bos).to(tl.int32)
    else:
        return i_b, i_t, (i_b * T).to(tl.int64), T


@triton.jit
def seq_bounds(i_n, T, cu_seqlens, IS_VARLEN: tl.constexpr):
    """``(first row, length)`` of sequence ``i_n``."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        return bos, (eos - bos).to(tl.int32)
    else:
        return (i_n * T).to(tl.int64), T


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(triton.next_power_of_2(n), minimum)
