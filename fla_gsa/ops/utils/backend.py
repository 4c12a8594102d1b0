"""Which implementation runs: Triton kernels for CUDA tensors (or any tensor under the Triton
interpreter), vectorized PyTorch otherwise."""
from __future__ import annotations

import os

import torch


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly), which is how
    the kernel code is tested on machines with no GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Run the Triton kernels for ``x``: it lives on a CUDA device, or the interpreter is on."""
    return x.is_cuda or triton_interpret()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 products for fp32 inputs, so a fp32 call is a
    fp32 reference; half-precision inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Largest decay of the gates across one block of rows (``G_first - G_last``, the in-block sum of a
# log gate) for which the kernels form the block's diagonal part by one matrix product factored through
# the block's first (or last) row, as they do between blocks. Its factors ``e^{G_r - G_j}`` are then at
# most e^20, which bf16 and fp32 hold with room to spare; past the limit (strong gates) the diagonal
# block is formed exactly, one row at a time. fp16 (largest value 65504) always takes the exact path.
DIAG_DOT_MAX_DECAY = 20.0


def diag_dot_limit(dtype: torch.dtype) -> float:
    """The in-block gate decay up to which the diagonal block is one product (-1: never) for kernels
    whose products run in ``dtype``."""
    return -1.0 if dtype == torch.float16 else DIAG_DOT_MAX_DECAY


def use_kernels(*tensors) -> bool:
    """Run an op's Triton kernels: the first tensor is on CUDA (or the interpreter is on) and no input
    is float64 — float64 is a reference mode, run by the PyTorch algorithm exactly, on any device."""
    return use_triton(tensors[0]) and all(t is None or t.dtype != torch.float64 for t in tensors)
