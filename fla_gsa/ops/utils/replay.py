"""Replaying an autograd Function's kernel launches instead of running the Python that makes them.

A ``chunk_gsa`` forward+backward is about 16 kernel launches and 31 allocations, and the Python around
them (argument checks, launch plans, tile sizes, each launch's specialization key) costs about 1.4 ms
of host time per call on the lent H100's host: as much as the GPU's work at 16K tokens, so the GPU
waits. Given the same shapes, strides, dtypes, flags and pointer alignment, that Python makes the
same allocations and the same launches every time; only the pointers change.

So the first call with a combination not seen before runs the op's own code under a recorder (a
``TorchDispatchMode`` that sees every PyTorch op, and a hook in the lean launcher): each allocation
becomes a slot, each tensor a kernel is given becomes (slot, byte offset), each launch its compiled
kernel, grid and arguments. A later call with the same key makes the same allocations and calls the
same compiled launchers with its own pointers, in the same order on the current stream, then hands
back the same outputs and saved tensors. Buffers that are neither returned nor saved are released
after their last launch.

A recording is kept only if everything in it can be replayed: PyTorch ops other than allocations and
views (a copy, a reduction, ``.item()``...), a tensor from elsewhere given to a kernel, a Triton launch
that did not go through the lean launcher, or an argument that is not a tensor, None or a plain value
make the key "not replayable", and such calls run the op's code as before. ``cu_seqlens`` (read on the
host) is such a case. Replay is off under the Triton interpreter, while kernels are only compiled
(:func:`fla_gsa.ops.utils.launch.compile_only`), while a launch hook (a profiler's) is set, and where
``FLA_GSA_REPLAY=0``. Module-level tuning constants are read when a key is recorded: after changing
one, call :func:`clear`.
"""
from __future__ import annotations

import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fla_gsa.ops.utils import launch
from fla_gsa.ops.utils.backend import triton_interpret

ENABLED = os.environ.get("FLA_GSA_REPLAY", "1") != "0"
_MAX_PLANS = 512
_plans: dict = {}  # key -> _Plan, or None where the calls are not replayable

_aten = torch.ops.aten
_ALLOCATIONS = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.new_empty.default,
                _aten.new_empty_strided.default, _aten.empty_like.default}


def clear() -> None:
    """Forget every recorded call (they are recorded again on their next call)."""
    _plans.clear()


class NotReplayable(Exception):
    """Something in a recording that a replay could not reproduce."""


def function(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd Function named ``name`` whose forward is ``forward(ctx, *inputs)`` and backward
    ``backward(ctx, *grads)``, each run through :func:`run` (replayed where recorded)."""

    def fwd(ctx, *args):
        return run(forward, ctx, args)

    def bwd(ctx, *grads):
        return run(backward, ctx, grads, backward=True)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def _key(ctx, args, backward):
    """What the recorded Python may depend on: each tensor's shape, strides, dtype, device and pointer
    alignment, every other argument's type and value, grad mode, which inputs need gradients (forward)
    or what the forward left in ``ctx.meta`` (backward). None: not replayable."""
    parts = [backward, torch.is_grad_enabled(), launch._device()]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((a.shape, a.stride(), a.dtype, a.get_device(), a.data_ptr() % 16))
        elif a is None or isinstance(a, (bool, int, float, str, torch.dtype)):
            parts.append((type(a), a))
        else:
            return None
    parts.append(getattr(ctx, "meta", None) if backward else tuple(ctx.needs_input_grad))
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def run(impl, ctx, args, backward=False):
    """``impl(ctx, *args)``, an autograd Function's forward (``args``: its inputs) or backward (``args``:
    the gradients of its outputs; ``ctx.saved_tensors`` are inputs too), replayed where a call with the
    same key was recorded (see the module's doc)."""
    if not ENABLED or triton_interpret() or not launch.direct_launch_ok():
        return impl(ctx, *args)
    inputs = tuple(ctx.saved_tensors) + tuple(args) if backward else tuple(args)
    key = _key(ctx, inputs, backward)
    if key is None:
        return impl(ctx, *args)
    plan = _plans.get(key, False)
    if plan is None:
        return impl(ctx, *args)
    if plan is not False:
        return plan.replay(ctx, inputs)
    out, plan = _record(impl, ctx, args, inputs, backward)
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    return out


class _Ctx:
    """The ``ctx`` a recorded forward or backward sees: saved tensors and attributes are kept here,
    then set on the real ``ctx``; anything else is read from the real one."""

    def __init__(self, ctx, backward):
        self._ctx = ctx
        self._saved = None
        self._attrs = {}
        self.saved_tensors = ctx.saved_tensors if backward else ()

    @property
    def needs_input_grad(self):
        return self._ctx.needs_input_grad

    def save_for_backward(self, *tensors):
        self._saved = tensors
        self.saved_tensors = tensors

    def __setattr__(self, name, value):
        if not name.startswith("_") and name != "saved_tensors":
            self._attrs[name] = value
        object.__setattr__(self, name, value)

    def __getattr__(self, name):  # what the forward left (backward); a call on the real ctx is not recorded
        return getattr(self._ctx, name)


def _record(impl, ctx, args, inputs, backward):
    rec = _Recorder(inputs)
    proxy = _Ctx(ctx, backward)
    launch._mode.recorder = rec
    hooks = _count_triton_launches(rec)
    try:
        with rec:
            out = impl(proxy, *args)
    finally:
        launch._mode.recorder = None
        hooks()
    if proxy._saved is not None:
        ctx.save_for_backward(*proxy._saved)
    for name, value in proxy._attrs.items():
        setattr(ctx, name, value)
    try:
        plan = rec.plan(out, proxy._saved, proxy._attrs)
    except NotReplayable:
        plan = None
    return out, plan


def _count_triton_launches(rec):
    """Count every launch through Triton's launcher while recording (a launch enter hook), so that a
    kernel launched other than through the lean launcher makes the recording not replayable. Returns
    the function that removes the hook (a no-op where this Triton has no hook chains)."""
    from triton import knobs

    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        rec.invalid = True  # cannot tell: do not replay
        return lambda: None

    def hook(metadata):
        rec.triton_launches += 1

    chain.add(hook)
    return lambda: chain.remove(hook)


class _Recorder(TorchDispatchMode):
    """Sees every PyTorch op and every lean launch of a recorded call (see the module's doc). Tensors
    are held by weak references (a recorded call frees its buffers when the op's code does)."""

    def __init__(self, inputs):
        super().__init__()
        self.inputs = inputs
        self.roots = []  # per slot: (data pointer, shape, strides, dtype, device) of its tensor, inputs first
        self.known = {}  # id(tensor) -> (weak reference, slot, byte offset from the slot's pointer)
        self.steps = []  # ("alloc", slot) or ("launch", the launch's record)
        self.invalid = False
        self.triton_launches = 0
        self.lean_launches = 0
        for a in inputs:
            if isinstance(a, torch.Tensor):
                if id(a) in self.known:
                    # one tensor given as two inputs: its launches could not tell which input they read
                    self.invalid = True
                self._add_root(a)
            else:
                self.roots.append(None)

    def _add_root(self, t):
        slot = len(self.roots)
        self.roots.append((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device))
        self.known[id(t)] = (weakref.ref(t), slot, 0)
        return slot

    def _find(self, t):
        """``(slot, byte offset)`` of a tensor made in (or given to) the recorded call, or None."""
        entry = self.known.get(id(t))
        if entry is None or entry[0]() is not t:  # an id reused by a tensor made elsewhere
            return None
        return entry[1], entry[2]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATIONS:
            self.steps.append(("alloc", self._add_root(out)))
        elif getattr(func, "is_view", False) and args and isinstance(args[0], torch.Tensor):
            base = self._find(args[0])
            for r in (out if isinstance(out, (tuple, list)) else (out,)):
                if base is not None and isinstance(r, torch.Tensor):
                    slot = base[0]
                    self.known[id(r)] = (weakref.ref(r), slot, r.data_ptr() - self.roots[slot][0])
        else:
            self.invalid = True  # computes something: not a pure sequence of allocations and launches
        return out

    def launch(self, compiled, grid3, args, tail):
        """A lean launch (called by the lean launcher, with its grid as three sizes)."""
        self.lean_launches += 1
        base, refs = [], []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                found = self._find(a)
                if found is None:
                    self.invalid = True
                    return
                refs.append((i, *found))
                base.append(0)
            else:
                base.append(a)
        side = getattr(launch._mode, "side", None) is not None
        self.steps.append(("launch", (compiled.run, *grid3, compiled.function, compiled.packed_metadata,
                                      base + list(tail), refs, side)))

    def stream_step(self, kind):
        """A fork to the side stream or a join from it (``launch.on_side_stream``), at this point."""
        self.steps.append((kind, None))

    def _ref(self, t):
        """How a replay gets tensor ``t`` back: None, ``("in", i)`` (input i itself), or a slot's tensor
        (``(slot, None)``) or a view of it (``(slot, (size, strides, element offset))``)."""
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise NotReplayable
        for i, a in enumerate(self.inputs):
            if a is t:
                return ("in", i)
        found = self._find(t)
        if found is None:
            raise NotReplayable
        slot, offset = found
        _, shape, stride, dtype, _ = self.roots[slot]
        if t.dtype != dtype or offset % t.element_size():
            raise NotReplayable
        if offset == 0 and tuple(t.shape) == shape and t.stride() == stride:
            return (slot, None)
        return (slot, (tuple(t.shape), t.stride(), offset // t.element_size()))

    def plan(self, out, saved, attrs):
        if self.invalid or self.lean_launches == 0 or self.triton_launches != self.lean_launches:
            raise NotReplayable
        multi = isinstance(out, tuple)
        outs = tuple(self._ref(t) for t in (out if multi else (out,)))
        saved_refs = None if saved is None else tuple(self._ref(t) for t in saved)
        return _Plan(self, outs, multi, saved_refs, attrs)


class _Plan:
    """A recorded call, ready to replay with other tensors of the same key."""

    def __init__(self, rec, outs, multi, saved, attrs):
        n_in = len(rec.inputs)
        keep = {r[0] for r in (*outs, *(saved or ())) if r is not None and r[0] != "in"}
        last = {}
        for i, (kind, step) in enumerate(rec.steps):
            if kind == "launch":
                for _, slot, _ in step[-2]:
                    last[slot] = i
        self.allocs, self.steps = {}, []
        deferred = []  # buffers last used on the side stream: released at the next join
        for i, (kind, step) in enumerate(rec.steps):
            if kind == "alloc":
                if step not in keep and step not in last:
                    continue  # never used: not made again
                self.allocs[step] = rec.roots[step][1:]
                self.steps.append((step, None, ()))
            elif kind in ("fork", "join"):
                self.steps.append((None, kind, tuple(deferred) if kind == "join" else ()))
                if kind == "join":
                    deferred = []
            else:
                free = tuple(s for s, j in last.items() if j == i and s >= n_in and s not in keep)
                if step[-1]:
                    deferred += free
                    free = ()
                self.steps.append((None, step, free))
        if deferred:  # a side launch with no join after it
            raise NotReplayable
        self.n_slots = len(rec.roots)
        self.outs, self.multi, self.saved, self.attrs = outs, multi, saved, attrs

    def replay(self, ctx, inputs):
        ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else 0 for a in inputs]
        ptrs += [0] * (self.n_slots - len(ptrs))
        tensors = list(inputs) + [None] * (self.n_slots - len(inputs))
        device = launch._device()
        stream = side = launch._stream(device)
        for slot, step, free in self.steps:
            if step is None:
                size, stride, dtype, device_ = self.allocs[slot]
                t = torch.empty_strided(size, stride, dtype=dtype, device=device_)
                tensors[slot] = t
                ptrs[slot] = t.data_ptr()
                continue
            if step == "fork" or step == "join":
                main, side_stream = torch.cuda.current_stream(device), launch._side_stream(torch.device("cuda", device))
                if step == "fork":
                    side_stream.wait_stream(main)
                    side = side_stream.cuda_stream
                else:
                    main.wait_stream(side_stream)
            else:
                run, gx, gy, gz, function, packed, args, refs, on_side = step
                args = args.copy()
                for i, slot_, offset in refs:
                    args[i] = ptrs[slot_] + offset
                run(gx, gy, gz, side if on_side else stream, function, packed, None, None, None, *args)
            for s in free:
                tensors[s] = None
        if self.saved is not None:
            ctx.save_for_backward(*(_get(tensors, inputs, r) for r in self.saved))
        for name, value in self.attrs.items():
            setattr(ctx, name, value)
        outs = tuple(_get(tensors, inputs, r) for r in self.outs)
        return outs if self.multi else outs[0]


def _get(tensors, inputs, ref):
    if ref is None:
        return None
    if ref[0] == "in":
        return inputs[ref[1]]
    slot, view = ref
    t = tensors[slot]
    if view is None:
        return t
    size, stride, offset = view
    return t.as_strided(size, stride, t.storage_offset() + offset)
