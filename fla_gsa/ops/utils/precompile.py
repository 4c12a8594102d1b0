"""Compiling a new call's kernels side by side, before the call.

A forward+backward of ``chunk_gsa`` launches about 15 distinct kernels, and in a fresh process each is
compiled the first time it is launched: one after another, each waiting for the last. The first call of
an op with a combination of shapes, dtypes and flags not seen before in the process therefore runs its
forward and backward once "dry" first (:func:`precompile`): the same Python code on the same tensors,
with every kernel launch replaced by a compilation handed to a pool of threads
(:func:`fla_gsa.ops.utils.launch.compile_only`). The real call then finds every kernel compiled.

The dry run launches no kernel, so the PyTorch work between kernels (allocations, a few small ops) runs
on uninitialized memory, and its results are thrown away. It is skipped while a CUDA graph is being
captured, under the Triton interpreter, and where ``FLA_GSA_PARALLEL_COMPILE=0``.
"""
from __future__ import annotations

import os
import warnings

import torch

from fla_gsa.ops.utils import launch
from fla_gsa.ops.utils.backend import triton_interpret

PARALLEL_COMPILE = os.environ.get("FLA_GSA_PARALLEL_COMPILE", "1") != "0"
# combinations seen (the keys precompile builds from _arg_key); past this many the set starts again
_MAX_SEEN = 1024
_seen: set = set()


def compile_workers() -> int:
    """Threads that compile side by side: one per core, at most 32."""
    return max(1, min(32, os.cpu_count() or 1))


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.device, tuple(a.shape), a.requires_grad, a.data_ptr() % 16 == 0
    if isinstance(a, float):
        return float  # a scale: a runtime argument, never part of a kernel's specialization
    return a


class _DryContext:
    """What an autograd Function's forward and backward use of their ``ctx``, outside autograd."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def precompile(function: type[torch.autograd.Function], *args) -> None:
    """Before ``function.apply(*args)``: the first time this combination of argument shapes, dtypes and
    flags is seen, run ``function``'s forward (and, if an input needs a gradient, its backward) with the
    kernels' launches replaced by compilations in parallel threads, and wait for them (see the module's
    doc). A repeated combination costs one dictionary lookup."""
    if not PARALLEL_COMPILE:
        return
    grad = torch.is_grad_enabled()
    key = (function, grad, *map(_arg_key, args))
    if key in _seen:
        return
    if len(_seen) >= _MAX_SEEN:
        _seen.clear()
    _seen.add(key)
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if triton_interpret() or capturing or launch.async_compile_mode() is None:
        return
    needs = tuple(grad and isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    try:
        with torch.no_grad(), launch.compile_only(compile_workers()):
            ctx = _DryContext(needs)
            outs = function.forward(ctx, *args)
            if any(needs):
                outs = outs if isinstance(outs, tuple) else (outs,)
                # autograd hands the backward zeros for tensor outputs left out of the loss, None for None
                function.backward(ctx, *(torch.empty_like(o) if isinstance(o, torch.Tensor) else None for o in outs))
    except Exception as e:  # the real call that follows compiles what is missing, and raises what is wrong
        warnings.warn(f"fla_gsa: compiling {function.__name__}'s kernels ahead of the call failed ({e!r}); "
                      "they compile as they are launched", RuntimeWarning, stacklevel=2)
