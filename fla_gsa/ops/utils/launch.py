"""Launching Triton kernels with less host time.

``kernel[grid](*args, **meta)`` makes Triton bind every argument, work out its specialization (dtype
and 16-byte alignment of each pointer; range, divisibility by 16 and ``== 1`` of each integer), build a
string cache key and look the compiled kernel up, all in Python, on every call. On the H100 hosts we
measure on that is about 26 us per launch against about 10 us for the launch itself, and one GSA
forward+backward makes 21 launches: the host, not the GPU, sets the pace below a few thousand tokens.

:func:`lean` wraps a ``@triton.jit`` kernel so that ``kernel[grid](...)`` looks the compiled kernel up
under a key of the same facts, computed in a few tuple operations, and calls its launcher directly.
A key not seen before goes through Triton's own path, which compiles (or finds) the kernel. The key is
never coarser than Triton's specialization, so a cached kernel is only reused where Triton itself would
reuse it. Runtime arguments go positionally; keywords are the kernel's constexprs and launch options
(``num_warps``...). Tensors reach the launcher as device pointers: the ops check their inputs' device
before any launch, so the launcher's own check of each pointer is not repeated. Under the interpreter
(``TRITON_INTERPRET=1``) the kernel is returned unwrapped.
"""
from __future__ import annotations

import inspect

import torch
from triton import knobs
from triton.runtime.jit import JITFunction

_I32 = 2**31
_I64 = 2**63


def arg_key(a):
    """What Triton's specialization of a runtime argument depends on."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if a is None:
        return None
    if isinstance(a, bool):
        return bool
    if isinstance(a, int):
        # 1 becomes a constant; otherwise i32 / i64 / u64 by range, and divisibility by 16
        return 1 if a == 1 else (-_I32 <= a < _I32, -_I64 <= a < _I64, a % 16 == 0)
    if isinstance(a, float):
        return float
    return type(a), a  # anything else: its value (finer than Triton's key, never coarser)


class LeanKernel:
    """A ``@triton.jit`` kernel launched through a per-specialization cache (see the module's doc)."""

    def __init__(self, fn: JITFunction):
        self.fn = fn
        self.names = list(fn.arg_names)
        self.constexprs = {self.names[i] for i in fn.constexprs}
        self.cache = {}

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def __repr__(self):
        return f"LeanKernel({self.fn})"

    def launch(self, grid, args, meta):
        # one pass over the runtime arguments: their key, and each tensor as its device pointer, which
        # Triton's launcher takes as it is (given the tensor it calls data_ptr() and asks the driver
        # about the pointer, for every tensor of every launch)
        key, full = [_device()], []
        for a in args:
            if isinstance(a, torch.Tensor):  # arg_key's tensor case, with one data_ptr() call for both
                ptr = a.data_ptr()
                key.append((a.dtype, ptr % 16 == 0))
                full.append(ptr)
            else:
                key.append(arg_key(a))
                full.append(a)
        key = (*key, *meta.items())
        entry = self.cache.get(key)
        if entry is None:
            return self.first_launch(key, grid, args, meta)
        compiled, tail = entry
        full = (*full, *tail)
        stream = _stream(key[0])
        n = len(grid)
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
                     compiled.packed_metadata, compiled.launch_metadata(grid, stream, *full),
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *full)
        return compiled

    def first_launch(self, key, grid, args, meta):
        tail_names = self.names[len(args):]
        runtime_kw = [n for n in meta if n in self.names and n not in self.constexprs]
        if runtime_kw:
            raise TypeError(f"{self.fn}: pass runtime arguments {runtime_kw} positionally")
        compiled = self.fn[grid](*args, **meta)
        if hasattr(compiled, "result"):  # an asynchronous compile
            compiled = compiled.result()
        # every later parameter is a keyword or has a default: Triton's call above raised otherwise
        params = inspect.signature(self.fn.fn).parameters
        tail = tuple(meta[name] if name in meta else params[name].default for name in tail_names)
        self.cache[key] = (compiled, tail)
        return compiled


# the current device and its current stream, as Triton's CUDA driver gets them (without the Python
# wrappers around them, several microseconds per call)
try:
    _device = torch._C._cuda_getDevice
    _stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - a build of torch without CUDA
    _device = torch.cuda.current_device

    def _stream(device):
        return torch.cuda.current_stream(device).cuda_stream


def lean(fn):
    """Wrap a ``@triton.jit`` kernel for lean launches; an interpreted kernel is returned as it is."""
    return LeanKernel(fn) if isinstance(fn, JITFunction) else fn
