"""Variable-length helpers: from ``cu_seqlens`` to the per-chunk work lists the kernels read."""
from __future__ import annotations

import functools

import torch


def prepare_lens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Length of each sequence, ``[N]``."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def _cached(fn):
    # Layers call the ops several times per step with the same cu_seqlens; key on the tensor's identity
    # and version (and the other arguments) so the host round trip happens once. cu_seqlens may be None.
    cache: dict = {}

    @functools.wraps(fn)
    def wrapper(cu_seqlens: torch.Tensor | None, *args):
        ident = None if cu_seqlens is None else (id(cu_seqlens), cu_seqlens._version, cu_seqlens.device)
        key = (ident, args)
        hit = cache.get(key)
        if hit is not None and hit[0] is cu_seqlens:
            return hit[1]
        out = fn(cu_seqlens, *args)
        if len(cache) > 16:
            cache.clear()
        cache[key] = (cu_seqlens, out)
        return out

    return wrapper


@_cached
def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[NT, 2]`` int32 rows ``(sequence, chunk within the sequence)`` for every chunk of every
    sequence, in order: the grid of the chunked kernels in varlen mode."""
    lens = prepare_lens(cu_seqlens).tolist()
    rows = [(n, c) for n, L in enumerate(lens) for c in range((L + chunk_size - 1) // chunk_size)]
    return torch.tensor(rows, dtype=torch.int32, device=cu_seqlens.device).reshape(-1, 2)


@_cached
def prepare_chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[N + 1]`` int32: index of each sequence's first chunk among all chunks (and the total)."""
    nchunks = (prepare_lens(cu_seqlens) + chunk_size - 1) // chunk_size
    return torch.cat([nchunks.new_zeros(1), nchunks.cumsum(0)]).to(torch.int32)


def seq_bounds(cu_seqlens: torch.Tensor | None, B: int, T: int) -> list[tuple[int, int, int]]:
    """``(batch index, start, end)`` of every sequence, for the PyTorch paths that loop over sequences."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    c = cu_seqlens.tolist()
    return [(0, c[n], c[n + 1]) for n in range(len(c) - 1)]


def chunk_grid(cu_seqlens: torch.Tensor | None, T: int, chunk_size: int) -> tuple[int, torch.Tensor | None]:
    """``(NT, chunk_indices)`` for a per-chunk kernel launch: ``NT`` chunks per batch row (fixed length,
    no index list) or in all (varlen, with ``prepare_chunk_indices``)."""
    if cu_seqlens is None:
        return (T + chunk_size - 1) // chunk_size, None
    indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    return len(indices), indices
