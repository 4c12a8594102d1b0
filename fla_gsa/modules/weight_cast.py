"""Half-precision copies of a model's fp32 weights for one forward, all made by its first launch.

Under autocast with fp32 weights every linear layer casts its weight to half precision when it runs
and keeps the copy for its backward. In a training step the host issues the forward's kernels only a
little ahead of the GPU, and after the previous step's sync (``loss.item()``) it starts behind: the
GPU waits while the host works through the embedding and the first layer. :class:`WeightCasts` makes
every cast of the forward at its start, in one launch: the GPU has the whole cast to do (about 2.6 ms
for a 1.3B model on an H100) while the host catches up, and each layer then takes its copy from the
result instead of launching its own cast. The copies hold the same values (a cast is a cast), and
each layer keeps its copy for its backward as before, so a step's peak memory (at the end of the
forward, where every copy is kept anyway) does not change.

Which weights: those the previous forward cast through :func:`half_weight` (where the layers cast),
in the groups the layers join them in (``[q | k | v | f]`` as one ``[sum N_i, D]`` copy). A weight
changed in place since the copy was made (its version counter moved), or a group the previous
forward did not cast, is cast where it is used, as it would be without the plan. So the first forward
records, and the copies start with the second.
"""
from __future__ import annotations

import contextlib
import itertools
import threading

import torch
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import check_tensor
from fla_gsa.ops.utils.launch import lean
from fla_gsa.ops.utils.triton_utils import cdiv

# Elements per program of the joined cast, and sources per launch.
CAST_BLOCK = 8192
CAST_SOURCES = 4


@lean
@triton.jit
def join_cast_kernel(dst, s0, s1, s2, s3, n0, n1, n2, n3, st1, st2, st3, BLOCK: tl.constexpr):
    # dst[start_j + i] = s_j[i] in dst's dtype; program (i_b, j) casts block i_b of source j (up to 4)
    i_b, i_s = tl.program_id(0), tl.program_id(1)
    o = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if i_s == 0:
        m = o < n0
        tl.store(dst + o, tl.load(s0 + o, mask=m).to(dst.dtype.element_ty), mask=m)
    elif i_s == 1:
        m = o < n1
        tl.store(dst + st1 + o, tl.load(s1 + o, mask=m).to(dst.dtype.element_ty), mask=m)
    elif i_s == 2:
        m = o < n2
        tl.store(dst + st2 + o, tl.load(s2 + o, mask=m).to(dst.dtype.element_ty), mask=m)
    else:
        m = o < n3
        tl.store(dst + st3 + o, tl.load(s3 + o, mask=m).to(dst.dtype.element_ty), mask=m)


def join_cast(weights, dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat(weights).to(dtype)`` without the fp32 concatenation: each weight is cast straight into
    its rows of the joined result, by one Triton launch per four weights (``torch._foreach_copy_`` took
    about 2.1 TB/s on an H100 for the 1.3B model's joined weights: it launches few programs).

    Args:
        weights: a non-empty list of ``[N_i, D]`` tensors on one device (one ``D``).
        dtype: the result's dtype.

    Returns:
        ``[sum N_i, D]`` in ``dtype``.
    """
    if not weights:
        raise ValueError("weights must be a non-empty list of [N_i, D] tensors")
    for i, w in enumerate(weights):
        check_tensor(w, f"weights[{i}]", 2, "[N, D]")
        if w.shape[1] != weights[0].shape[1] or w.device != weights[0].device:
            raise ValueError(f"weights[{i}] must be [N, {weights[0].shape[1]}] on {weights[0].device} like "
                             f"weights[0], got {tuple(w.shape)} on {w.device}")
    rows = [w.shape[0] for w in weights]
    out = torch.empty(sum(rows), weights[0].shape[1], dtype=dtype, device=weights[0].device)
    if not use_triton(out) or any(not w.is_contiguous() for w in weights):
        torch._foreach_copy_(list(out.split(rows)), list(weights))
        return out
    flat, start = out.view(-1), 0
    for i in range(0, len(weights), CAST_SOURCES):
        group = weights[i:i + CAST_SOURCES]
        sizes = [w.numel() for w in group]
        offsets = list(itertools.accumulate(sizes[:-1], initial=0))  # of each source in this group's rows
        pad = CAST_SOURCES - len(group)  # unused source slots: size 0, no program reads them
        join_cast_kernel[(cdiv(max(sizes), CAST_BLOCK), len(group))](
            flat[start:], *group, *[group[0]] * pad, *sizes, *[0] * pad, *(offsets[1:] + [0] * pad),
            BLOCK=CAST_BLOCK, num_warps=4)
        start += sum(sizes)
    return out


# Offsets and sizes in the gathered cast's launch table are counted in units of ALIGN elements (each
# group's copy starts at a multiple of ALIGN), so its loads and stores are 16-byte vectors; a program
# casts CAST_BLOCK elements, as join_cast's do.
ALIGN = 16
# Whether model forwards (fla_gsa.models) make their casts up front; off, every layer casts its own.
PRECAST = True

_local = threading.local()  # .active: the WeightCasts whose forward runs in this thread


@lean
@triton.jit
def gather_cast_kernel(dst, src, table, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # Program p casts `n` elements from `src + s` to `dst + d`, where (s, d, n) / ALIGN is row p of the
    # int64 table [P, 3]: `src` is the source at the lowest address, the others are reached by offsets
    # from it, so one launch reads any number of separately allocated weights.
    p = tl.program_id(0).to(tl.int64)
    s = tl.load(table + p * 3) * ALIGN
    d = tl.load(table + p * 3 + 1) * ALIGN
    n = tl.load(table + p * 3 + 2) * ALIGN
    o = tl.arange(0, BLOCK)
    m = o < n
    tl.store(dst + d + o, tl.load(src + s + o, mask=m).to(dst.dtype.element_ty), mask=m)


def _castable(ws) -> bool:
    # what the launch table can address: fp32 [N, D] weights of one D, contiguous, on one device, each a
    # whole number of ALIGN-element units starting on a 4 * ALIGN-byte boundary
    return (all(w.dtype == torch.float32 and w.ndim == 2 and w.is_contiguous() and w.numel() % ALIGN == 0
                and w.data_ptr() % (4 * ALIGN) == 0 and w.device == ws[0].device and w.shape[1] == ws[0].shape[1]
                for w in ws))


class _Layout:
    """Where each group's copy lies in the joined buffer, and the launch table that fills it: built
    when the plan or a weight's address changes, reused by every forward in between."""

    def __init__(self, plan):
        dtype = plan[0][0][0]
        groups = [(key, ws) for key, ws in plan if key[0] == dtype and _castable(ws)]
        # one launch reads from one device: groups on another (a model split over GPUs) are cast where used
        groups = [(key, ws) for key, ws in groups if ws[0].device == groups[0][1][0].device]
        self.keys = [key for key, _ in plan]
        self.dtype, self.groups = dtype, [ws for _, ws in groups]
        self.places = {}  # key -> (group index, element offset, rows, cols)
        sources, starts, offset = [], [], 0
        for i, (key, ws) in enumerate(groups):
            self.places[key] = (i, offset, sum(w.shape[0] for w in ws), ws[0].shape[1])
            for w in ws:
                sources.append(w)
                starts.append(offset)
                offset += w.numel()
            offset = -(-offset // ALIGN) * ALIGN
        self.total, self.sources, self.starts = offset, sources, starts
        self.ptrs = [w.data_ptr() for w in sources]
        if not sources:
            return
        self.device = sources[0].device
        base = min(self.ptrs)
        self.base = sources[self.ptrs.index(base)]
        rows = []
        for w, start in zip(sources, starts):
            first = torch.arange(0, w.numel(), CAST_BLOCK, dtype=torch.int64)
            src = (w.data_ptr() - base) // 4 + first
            rows.append(torch.stack([src, start + first, (w.numel() - first).clamp(max=CAST_BLOCK)], 1))
        self.table = (torch.cat(rows) // ALIGN).to(self.device) if use_triton(sources[0]) else None

    def current(self, plan) -> bool:
        """Whether this layout still serves ``plan``: the same groups, each weight where it was."""
        return (len(plan) == len(self.keys) and all(a[0] == b for a, b in zip(plan, self.keys))
                and [w.data_ptr() for w in self.sources] == self.ptrs)

    def cast(self) -> torch.Tensor | None:
        if not self.sources:
            return None
        buf = torch.empty(self.total, dtype=self.dtype, device=self.device)
        if self.table is None:
            torch._foreach_copy_([buf[s:s + w.numel()] for w, s in zip(self.sources, self.starts)],
                                 [w.view(-1) for w in self.sources])
        else:
            gather_cast_kernel[(self.table.shape[0],)](buf, self.base, self.table, BLOCK=CAST_BLOCK,
                                                       ALIGN=ALIGN, num_warps=8)
        return buf


class WeightCasts:
    """The half-precision copies of a model's fp32 weights, made at the start of each forward (see the
    module's notes). A model holds one and runs its forward inside :meth:`scope`.

    Example:
        >>> import torch
        >>> from fla_gsa.modules.weight_cast import WeightCasts, half_weight
        >>> casts, w = WeightCasts(), torch.randn(32, 16)
        >>> for step in range(2):
        ...     with casts.scope():
        ...         copy = half_weight([w], torch.bfloat16)   # step 0 casts here; step 1 found it made
        >>> torch.equal(copy, w.to(torch.bfloat16)), casts.planned
        (True, 1)
    """

    def __init__(self):
        self.plan = []  # [(key, weights)]: what the last forward cast, in order
        self.recorded = None  # the same, for the forward running now
        self.buf = None  # this forward's copies, joined
        self.versions = None  # each planned group's weights' versions when they were copied
        self._layout = None

    @property
    def planned(self) -> int:
        """How many weight groups the next forward casts up front."""
        return len(self.plan)

    @contextlib.contextmanager
    def scope(self, enabled: bool = True):
        """Run a forward: cast what the previous forward cast, and record what this one casts. Inside
        another scope of this thread (a model inside a model) this one does nothing."""
        if not enabled or getattr(_local, "active", None) is not None:
            yield
            return
        self.recorded = []
        try:
            self._precast()
            _local.active = self
            yield
        finally:
            _local.active = None
            self.plan, self.recorded, self.buf, self.versions = self.recorded, None, None, None

    def _precast(self):
        # as little host work as possible before the launch: the GPU waits for it
        if not self.plan:
            return
        if self._layout is None or not self._layout.current(self.plan):
            self._layout = _Layout(self.plan)
        self.buf = self._layout.cast()
        self.versions = [tuple(w._version for w in ws) for ws in self._layout.groups]

    def lookup(self, weights, dtype: torch.dtype) -> torch.Tensor | None:
        """This forward's copy of ``cat(weights).to(dtype)`` if made up front and still current, else
        None; records the request for the next forward either way."""
        key = (dtype, *map(id, weights))
        self.recorded.append((key, tuple(weights)))
        if self.buf is None:
            return None
        place = self._layout.places.get(key)
        if place is None:
            return None
        i, offset, rows, cols = place
        if any(w._version != v for w, v in zip(weights, self.versions[i])):
            return None  # changed in place since the copy was made
        return self.buf[offset:offset + rows * cols].view(rows, cols)


def half_weight(weights, dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat(weights).to(dtype)`` for ``[N_i, D]`` weights: the copy made at the start of the
    running forward (:class:`WeightCasts`) when there is one, else cast now (one launch per four
    weights, :func:`join_cast`, or ``.to`` for one weight)."""
    casts = getattr(_local, "active", None)
    if casts is not None:
        copy = casts.lookup(weights, dtype)
        if copy is not None:
            return copy
    return join_cast(list(weights), dtype) if len(weights) != 1 else weights[0].to(dtype)
