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


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host. (``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
    functions in recent Triton, several microseconds per call from Python; a call of an op makes dozens.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``), on the host."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(next_power_of_2(n), minimum)


@triton.jit
def load_tile(ptr, bos, o_t, m_t, head, NH: tl.constexpr, D: tl.constexpr, o_d, m_d):
    """Load rows ``o_t`` (relative to ``bos``) and columns ``o_d`` of head ``head`` from a contiguous
    ``[.., T, NH, D]`` tensor as a ``[len(o_t), len(o_d)]`` tile, zero outside the masks."""
    offs = ((bos + o_t) * NH + head)[:, None] * D + o_d[None, :]
    return tl.load(ptr + offs, mask=m_t[:, None] & m_d[None, :], other=0)


@triton.jit
def store_tile(ptr, value, bos, o_t, m_t, head, NH: tl.constexpr, D: tl.constexpr, o_d, m_d):
    store_rows(ptr, value, bos, o_t, m_t, head, NH * D, D, o_d, m_d)


@triton.jit
def dsilu(x):
    """``silu'(x) = σ(x) (1 + x (1 − σ(x)))`` (``σ = sigmoid``), elementwise on fp32 ``x``."""
    sig = tl.sigmoid(x)
    return sig * (1 + x * (1 - sig))


@triton.jit
def silu_grad(dy, pre, bos, o_t, m_t, head, SR: tl.constexpr, D: tl.constexpr, o_d, m_d):
    """``dy ⊙ silu'(x)`` for a ``[len(o_t), len(o_d)]`` tile ``dy`` (fp32), ``x`` read from ``pre``: rows
    ``o_t`` (relative to ``bos``) ``SR`` elements apart, head ``head`` of width ``D``, columns ``o_d``."""
    return dy * dsilu(load_rows(pre, bos, o_t, m_t, head, SR, D, o_d, m_d).to(tl.float32))


@triton.jit
def _row_offsets(bos, o_t, head, SR: tl.constexpr, D: tl.constexpr, o_d):
    # rows o_t (relative to bos) SR elements apart, head `head` of width D, columns o_d
    return ((bos + o_t) * SR)[:, None] + head * D + o_d[None, :]


@triton.jit
def load_rows(ptr, bos, o_t, m_t, head, SR: tl.constexpr, D: tl.constexpr, o_d, m_d):
    """:func:`load_tile` from rows ``SR`` elements apart (a view of wider rows, such as one part of a fused
    projection), zero outside the masks."""
    return tl.load(ptr + _row_offsets(bos, o_t, head, SR, D, o_d), mask=m_t[:, None] & m_d[None, :], other=0)


@triton.jit
def store_rows(ptr, value, bos, o_t, m_t, head, SR: tl.constexpr, D: tl.constexpr, o_d, m_d):
    """:func:`store_tile` into rows ``SR`` elements apart (a view of wider rows, such as one part of a
    fused projection's gradient)."""
    tl.store(ptr + _row_offsets(bos, o_t, head, SR, D, o_d), value.to(ptr.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])


@triton.jit
def load_row(ptr, bos, t, head, NH: tl.constexpr, D: tl.constexpr, o_d, m_d):
    """One row ``t`` of head ``head`` as a ``[len(o_d)]`` vector."""
    return tl.load(ptr + ((bos + t) * NH + head) * D + o_d, mask=m_d, other=0)


@triton.jit
def broadcast_lt(o, t, T):
    """``t < T`` for a scalar ``t``, broadcast to the shape of ``o``: Triton's interpreter rejects masks
    that combine a scalar condition with a vector one."""
    return (o * 0 + t) < T


_TL_DTYPES = {}


def tl_dtype(dtype):
    """The ``tl`` dtype matching a torch dtype (for compute-dtype constexprs)."""
    import torch

    if not _TL_DTYPES:
        _TL_DTYPES.update({torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                           torch.float32: tl.float32, torch.float64: tl.float64})
    return _TL_DTYPES[dtype]
