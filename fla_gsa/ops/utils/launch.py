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
before any launch, so the launcher's own check of each pointer is not repeated. Launch hooks (a
profiler's) are passed on only where one is set (:func:`launch_hooks`). Under the interpreter
(``TRITON_INTERPRET=1``) the kernel is returned unwrapped.

:func:`compile_only` turns launches into compilations handed to a pool of threads; see
:mod:`fla_gsa.ops.utils.precompile`.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from triton import knobs
from triton.runtime.jit import JITFunction

_I32 = 2**31
_I64 = 2**63
_NONE = type(None)


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
        if getattr(_mode, "compile_only", False):
            return self.submit_compile(grid, args, meta)
        # one pass over the runtime arguments: their key, and each tensor as its device pointer, which
        # Triton's launcher takes as it is (given the tensor it calls data_ptr() and asks the driver
        # about the pointer, for every tensor of every launch)
        key, full = [_device()], []
        add_key, add_arg = key.append, full.append
        for a in args:  # arg_key, its commonest cases first and inline (a launch passes 10-30 arguments)
            cls = a.__class__
            if cls is _NONE:
                add_key(None)
                add_arg(None)
            elif cls is float:
                add_key(float)
                add_arg(a)
            elif isinstance(a, torch.Tensor):  # one data_ptr() call for the key and the argument
                ptr = a.data_ptr()
                add_key((a.dtype, ptr % 16 == 0))
                add_arg(ptr)
            else:
                add_key(arg_key(a))
                add_arg(a)
        key = (*key, *meta.items())
        entry = self.cache.get(key)
        recorder = getattr(_mode, "recorder", None)
        n = len(grid)
        grid3 = (grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1)
        if entry is None:
            compiled = self.first_launch(key, grid, args, meta)
            if recorder is not None:
                recorder.launch(compiled, grid3, args, self.cache[key][1])
            return compiled
        compiled, tail = entry
        if recorder is not None:
            recorder.launch(compiled, grid3, args, tail)
        full = (*full, *tail)
        stream = _stream(key[0])  # inside on_side_stream: the side stream
        enter, leave = launch_hooks()
        compiled.run(*grid3, stream, compiled.function, compiled.packed_metadata,
                     None if enter is None and leave is None else compiled.launch_metadata(grid, stream, *full),
                     enter, leave, *full)
        return compiled

    def submit_compile(self, grid, args, meta):
        """Under :func:`compile_only`: hand a compilation this launch would need to Triton's pool, and
        launch nothing. A specialization compiled already needs nothing."""
        if (_device(), *map(arg_key, args), *meta.items()) not in self.cache:
            self.fn.warmup(*args, grid=grid, **meta)

    def entry(self, args, meta):
        """``(compiled, tail)`` for the specialization of ``args`` / ``meta`` once a launch has compiled it
        (None before): what :func:`direct_launch_ok` callers pass to ``compiled.run`` themselves, with the
        tensors as pointers followed by ``tail``."""
        return self.cache.get((_device(), *map(arg_key, args), *meta.items()))

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


current_device, current_stream = _device, _stream


def _no_hook(hook) -> bool:
    return hook is None or getattr(hook, "calls", None) == []


def launch_hooks():
    """Triton's launch enter / exit hooks, or ``(None, None)`` where neither has a function to call.
    In Triton 3.6 the hooks are chains of functions, never None: given the empty chains, Triton's
    launcher builds each launch's metadata and calls both chains from C, for nothing."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return (None, None) if _no_hook(enter) and _no_hook(leave) else (enter, leave)


# per thread: whether lean launches only submit compilations (compile_only), and the recorder that sees
# them while a call is recorded for replay (fla_gsa.ops.utils.replay)
_mode = threading.local()


# Side streams, one per device: an op may run a few launches beside the ones on the current stream
# (on_side_stream, join_side_stream)
_side_streams: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device)
    return stream


@contextlib.contextmanager
def on_side_stream(x: torch.Tensor):
    """Inside, a side stream of ``x``'s device is PyTorch's current stream, so launches (and PyTorch ops)
    go there; it first waits for everything queued on the current stream so far (a fork), and
    :func:`join_side_stream` makes the current stream wait for it again. For latency-bound launches that
    depend on nothing of the ones queued beside them and together fill the GPU better.

    Tensors made inside come from the side stream's memory pool: a temporary that a launch function frees
    before the side stream has run its launches goes back to that pool, whose next use is queued after
    that work (side work always starts with a fork). The caller keeps the tensors it gave the side
    launches until it has joined. A recorded call (``replay``) records the fork, which launches ran on the
    side (``_mode.side``) and the join; its replay makes the allocations on the current stream and
    releases the buffers last used on the side at the join. Does nothing for CPU tensors (the
    interpreter) or while kernels are only compiled."""
    if not x.is_cuda or getattr(_mode, "compile_only", False):
        yield
        return
    side = _side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    recorder = getattr(_mode, "recorder", None)
    if recorder is not None:
        recorder.stream_step("fork")
    _mode.side = side
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        _mode.side = None


def join_side_stream(x: torch.Tensor) -> None:
    """The current stream of ``x``'s device waits for everything queued on its side stream (see
    :func:`on_side_stream`)."""
    if not x.is_cuda or getattr(_mode, "compile_only", False):
        return
    torch.cuda.current_stream(x.device).wait_stream(_side_stream(x.device))
    recorder = getattr(_mode, "recorder", None)
    if recorder is not None:
        recorder.stream_step("join")


def direct_launch_ok() -> bool:
    """Whether a caller may call a compiled launcher itself (one from :meth:`LeanKernel.entry`, or a
    replayed recording's): no launch hook is set and this thread neither only compiles nor records."""
    return (launch_hooks() == (None, None) and not getattr(_mode, "compile_only", False)
            and getattr(_mode, "recorder", None) is None)


def async_compile_mode():
    """Triton's ``AsyncCompileMode`` class, or None where this Triton has none (before 3.4) or one is
    active already in this thread."""
    try:
        from triton.runtime import _async_compile
    except ImportError:  # pragma: no cover - an older Triton
        return None
    return None if _async_compile.active_mode.get() is not None else _async_compile.AsyncCompileMode


@contextlib.contextmanager
def compile_only(workers: int):
    """Inside, lean launches of this thread launch nothing: a specialization not compiled yet is handed
    to Triton's ``AsyncCompileMode`` with a pool of ``workers`` threads; leaving waits for every
    compilation. On a 16-core H100 host the kernels of a first GSA forward+backward (4 x 4096) compiled
    this way in 7.5 s, against 14.9 s one after another."""
    mode = async_compile_mode()
    if mode is None:
        raise RuntimeError("compile_only needs Triton's AsyncCompileMode (Triton >= 3.4), not active already")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fla_gsa-compile") as pool, mode(pool):
        _mode.compile_only = True
        try:
            yield
        finally:
            _mode.compile_only = False


def lean(fn):
    """Wrap a ``@triton.jit`` kernel for lean launches; an interpreted kernel is returned as it is."""
    return LeanKernel(fn) if isinstance(fn, JITFunction) else fn
