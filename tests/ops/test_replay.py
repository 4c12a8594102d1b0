"""Replayed calls (fla_gsa.ops.utils.replay): a second call with the same key makes the same allocations
and launches with its own pointers, without running the op's Python; anything a replay could not
reproduce leaves the key to run the op's code. (CPU: the Triton side is faked as in test_launch; the GPU
tests compare replayed calls with the op's own code, bit for bit.)"""
import pytest
import torch
from triton import knobs

from fla_gsa.ops.utils import launch, replay
from fla_gsa.ops.utils.launch import LeanKernel

pytestmark = pytest.mark.skipif(not hasattr(knobs.runtime.launch_enter_hook, "add"),
                                reason="this Triton's launch hooks are plain functions: replay stays off")


def kernel_fn(x, y, n, scale, BLOCK: "tl.constexpr"):  # noqa: F821
    pass


class FakeCompiled:
    function, packed_metadata = "function-handle", "packed"

    def __init__(self, log):
        self.log = log

    def launch_metadata(self, grid, stream, *args):
        return "metadata"

    def run(self, gx, gy, gz, stream, function, packed, metadata, enter, leave, *args):
        if enter is not None:  # as Triton's launcher: the enter hook sees every launch
            enter(metadata)
        self.log.append(("run", (gx, gy, gz), args))


class FakeJIT:
    arg_names = ["x", "y", "n", "scale", "BLOCK"]
    constexprs = [4]
    fn = staticmethod(kernel_fn)

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            knobs.runtime.launch_enter_hook("metadata")  # Triton's own launch calls the hooks too
            self.log.append(("triton", grid, tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a
                                                   for a in args)))
            return FakeCompiled(self.log)
        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(launch, "_stream", lambda device: 1234)
    monkeypatch.setattr(replay, "ENABLED", True)
    monkeypatch.setattr(replay, "triton_interpret", lambda: False)
    replay.clear()
    yield LeanKernel(FakeJIT())
    replay.clear()


def replayed(forward_impl, backward_impl=None):
    """An autograd Function whose forward (and backward) go through ``replay.run``, as the ops' do."""
    return replay.function("Function", forward_impl, backward_impl)


def make_function(kernel, extra=None):
    """An autograd Function over the fake kernel: the forward allocates y and a [2, n] buffer, writes its
    row 1 from x, then y from that row; saves x and the row; the backward reads them into dx."""
    calls = {"fwd": 0, "bwd": 0}

    def forward(ctx, x, scale):
        calls["fwd"] += 1
        y = x.new_empty(x.shape)
        tmp = x.new_empty(2, x.numel())
        kernel[(3,)](x, tmp[1], x.numel(), scale, BLOCK=32)
        if extra is not None:
            extra(x, tmp)
        kernel[(4, 2)](tmp[1], y, x.numel(), scale, BLOCK=32)
        ctx.save_for_backward(x, tmp[1])
        ctx.meta = (scale, "fake")
        return y

    def backward(ctx, dy):
        calls["bwd"] += 1
        x, row = ctx.saved_tensors
        assert ctx.meta[1] == "fake"
        dx = torch.empty_like(x)
        kernel[(5,)](row, dx, x.numel(), ctx.meta[0], BLOCK=32)
        kernel[(6,)](dy, dx, x.numel(), ctx.meta[0], BLOCK=32)
        return dx, None

    return replayed(forward, backward), calls


def launches(kernel):
    return [e for e in kernel.fn.log if e[0] == "run"]


def test_second_call_replays_with_its_own_pointers(kernel):
    Function, calls = make_function(kernel)
    for i in range(3):
        x = torch.randn(16, requires_grad=True)
        dy = torch.randn(16)
        kernel.fn.log.clear()
        y = Function.apply(x, 0.5)
        (dx,) = torch.autograd.grad(y, x, dy)
        assert y.shape == x.shape and dx.shape == x.shape
        if i == 0:
            continue
        # the op's Python ran once; later calls are replays
        assert calls == {"fwd": 1, "bwd": 1}
        runs = launches(kernel)
        assert [r[1] for r in runs] == [(3, 1, 1), (4, 2, 1), (5, 1, 1), (6, 1, 1)]
        row = runs[0][2][1]
        # the forward's row 1 of a fresh [2, 16] fp32 buffer: its second launch reads it and writes y;
        # the backward gets it back (saved) and writes dx; dy and x are this call's own
        assert runs[0][2][0] == x.data_ptr() and runs[1][2][0] == row and runs[1][2][1] == y.data_ptr()
        assert runs[2][2][0] == row and runs[2][2][1] == dx.data_ptr()
        assert runs[3][2][0] == dy.data_ptr() and runs[3][2][1] == dx.data_ptr()
        # scalars, then the constexpr tail, as the lean launcher passes them
        assert runs[0][2][2:] == (16, 0.5, 32)


def test_saved_view_comes_back_as_a_view(kernel):
    seen = []

    def extra(x, tmp):
        seen.append(tmp)

    Function, _ = make_function(kernel, extra)
    x = torch.randn(8, requires_grad=True)
    Function.apply(x, 1.0)
    y = Function.apply(x, 1.0)  # replayed: extra() is not called again
    assert len(seen) == 1
    grad_fn_saved = y.grad_fn.saved_tensors
    assert grad_fn_saved[0] is x
    row = grad_fn_saved[1]
    assert row.shape == (8,) and row._base is not None and row._base.shape == (2, 8)
    assert row.data_ptr() == row._base.data_ptr() + 8 * 4


def test_new_key_records_again(kernel):
    Function, calls = make_function(kernel)
    Function.apply(torch.randn(16), 0.5)
    Function.apply(torch.randn(16), 0.5)
    assert calls["fwd"] == 1
    Function.apply(torch.randn(17), 0.5)  # shape
    Function.apply(torch.randn(16), 0.25)  # a scalar argument
    Function.apply(torch.randn(32)[::2], 0.5)  # strides
    Function.apply(torch.randn(17)[1:], 0.5)  # pointer alignment
    Function.apply(torch.randn(16, dtype=torch.float64), 0.5)  # dtype
    assert calls["fwd"] == 6


@pytest.mark.parametrize("what", ["compute", "foreign_tensor", "other_triton_launch"])
def test_not_replayable_calls_run_the_code(kernel, what):
    foreign = torch.zeros(4)

    def extra(x, tmp):
        if what == "compute":
            tmp.sum()
        elif what == "foreign_tensor":
            kernel[(1,)](foreign, tmp, 4, 1.0, BLOCK=32)
        else:
            knobs.runtime.launch_enter_hook("metadata")  # a Triton launch the lean launcher did not see

    Function, calls = make_function(kernel, extra)
    for _ in range(3):
        Function.apply(torch.randn(16), 0.5)
    assert calls["fwd"] == 3


def test_one_tensor_as_two_inputs_is_not_recorded(kernel):
    """With ``x`` given twice, a launch reading it could have meant either input: such a recording would
    replay the wrong pointer when the inputs differ, so it is not kept."""
    calls = []

    def forward(ctx, a, b):
        calls.append(1)
        out = a.new_empty(a.shape)
        kernel[(1,)](a, out, 1, 1.0, BLOCK=32)
        return out

    Function = replayed(forward)
    x = torch.randn(4)
    Function.apply(x, x)
    kernel.fn.log.clear()
    a, b = torch.randn(4), torch.randn(4)
    Function.apply(a, b)
    assert len(calls) == 2
    assert [e[2][0] for e in kernel.fn.log if e[0] == "run"] == [a.data_ptr()]


def test_off_while_a_launch_hook_is_set(kernel):
    Function, calls = make_function(kernel)
    Function.apply(torch.randn(16), 0.5)
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        Function.apply(torch.randn(16), 0.5)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert calls["fwd"] == 2
    Function.apply(torch.randn(16), 0.5)
    assert calls["fwd"] == 2


def test_off_when_disabled_or_compiling_only(kernel, monkeypatch):
    Function, calls = make_function(kernel)
    Function.apply(torch.randn(16), 0.5)
    monkeypatch.setattr(replay, "ENABLED", False)
    Function.apply(torch.randn(16), 0.5)
    assert calls["fwd"] == 2
    monkeypatch.setattr(replay, "ENABLED", True)
    launch._mode.compile_only = True
    try:
        Function.apply(torch.randn(16), 0.5)
    finally:
        launch._mode.compile_only = False
    assert calls["fwd"] == 3


def test_temporaries_are_released_after_their_last_launch(kernel):
    """A buffer neither returned nor saved is dropped after the last launch that uses it."""
    def forward(ctx, x):
        tmp = x.new_empty(1000)  # used by the first launch only
        out = x.new_empty(x.shape)
        kernel[(1,)](x, tmp, 1, 1.0, BLOCK=32)
        kernel[(1,)](x, out, 1, 1.0, BLOCK=32)
        return out

    Function = replayed(forward)
    Function.apply(torch.randn(4))
    (plan,) = replay._plans.values()
    allocations = [slot for slot, step, _ in plan.steps if step is None]
    frees = [free for _, step, free in plan.steps if step is not None]
    assert len(allocations) == 2 and frees[0] == (allocations[0],) and frees[1] == ()


# ---- GPU: replayed calls against the op's own code, bit for bit ----

def _gsa_inputs(B, T, HQ, H, K, V, M, dtype, state, gated=True):
    dev = "cuda"
    q = torch.randn(B, T, HQ, K, device=dev, dtype=dtype)
    k = torch.randn(B, T, H, K, device=dev, dtype=dtype)
    v = torch.randn(B, T, H, V, device=dev, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, M, device=dev)) / 4
    s = (1 - g.exp()).to(dtype) if gated else torch.randn(B, T, H, M, device=dev, dtype=dtype)
    args = [q, k, v, s, g.to(dtype) if gated else None]
    h0 = (torch.randn(B, H, K, M, device=dev), torch.randn(B, H, M, V, device=dev)) if state else None
    return args, h0


def _leaf(a):
    """A copy of ``a`` that needs a gradient, with ``a``'s strides and storage offset (``clone`` would
    make a slice contiguous and aligned): a view of a fresh leaf buffer."""
    base = torch.empty(a.untyped_storage().nbytes() // a.element_size(), dtype=a.dtype, device=a.device)
    base.as_strided(a.shape, a.stride(), a.storage_offset()).copy_(a)
    return base.requires_grad_().as_strided(a.shape, a.stride(), a.storage_offset())


def _run(op, args, h0, **kw):
    """One forward+backward of ``op`` under a fixed random loss: its output, its final states (when
    ``h0`` is given) and the gradients of every input and initial state. ``h0``: a tuple of states (one
    for GLA, ``(hk, hv)`` for GSA and ABC), or None."""
    leaves = [_leaf(a) for a in args if a is not None]
    states = [h.detach().clone().requires_grad_() for h in h0] if h0 is not None else []
    initial = None if not states else states[0] if len(states) == 1 else tuple(states)
    o, ht = op(*leaves, initial_state=initial, output_final_state=bool(states), **kw)
    finals = [] if ht is None else [ht] if isinstance(ht, torch.Tensor) else list(ht)
    gen = torch.Generator(device="cuda").manual_seed(1)
    loss = sum((x.float() * torch.randn(x.shape, device="cuda", generator=gen)).sum() for x in [o, *finals])
    return [o, *finals, *torch.autograd.grad(loss, leaves + states)]


GPU_CASES = [
    # (name, op, shape (B, T, HQ, H, K, V, M), dtype, initial state, extra: checkpoint level / layout)
    ("gsa-gqa-state", "gsa", (2, 100, 4, 2, 32, 48, 16), torch.bfloat16, True, dict(checkpoint_level=1)),
    ("gsa-level0-fp32", "gsa", (1, 257, 2, 2, 64, 64, 32), torch.float32, True, dict(checkpoint_level=0)),
    ("gsa-paper", "gsa", (2, 2048, 4, 4, 512, 512, 64), torch.bfloat16, False, {}),
    ("gsa-segments", "gsa", (1, 8192, 4, 4, 512, 512, 64), torch.bfloat16, True, {}),
    ("gsa-misaligned", "gsa", (1, 300, 2, 2, 64, 64, 32), torch.bfloat16, False, dict(misaligned=True)),
    ("abc", "abc", (2, 200, 2, 2, 64, 64, 32), torch.bfloat16, False, {}),
    ("gla-state", "gla", (2, 300, 2, 2, 64, 96, 0), torch.bfloat16, True, {}),
    ("gsa-noncontiguous", "gsa", (2, 130, 2, 2, 32, 32, 16), torch.bfloat16, False, dict(noncontiguous=True)),
    ("gsa-varlen", "gsa", (1, 300, 2, 2, 32, 32, 16), torch.bfloat16, False, dict(varlen=True)),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays real kernels: needs a GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_replayed_calls_equal_the_code(case, monkeypatch):
    name, op, (B, T, HQ, H, K, V, M), dtype, state, extra = case
    extra = dict(extra)
    misaligned, noncontiguous, varlen = (extra.pop(n, False) for n in ("misaligned", "noncontiguous", "varlen"))
    if varlen:
        extra["cu_seqlens"] = torch.tensor([0, 37, 200, T], device="cuda")
    replayable = not (noncontiguous or varlen)

    def inputs():
        if op == "gla":
            q, k = (torch.randn(B, T, HQ if i == 0 else H, K, device="cuda", dtype=dtype) for i in range(2))
            v = torch.randn(B, T, H, V, device="cuda", dtype=dtype)
            gk = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 8).to(dtype)
            h0 = (torch.randn(B, H, K, V, device="cuda"),) if state else None
            return [q, k, v, gk], h0
        args, h0 = _gsa_inputs(B, T, HQ, H, K, V, M, dtype, state, gated=op == "gsa")
        if misaligned:  # q one element past a 16-byte boundary
            buf = torch.empty(args[0].numel() + 1, device="cuda", dtype=dtype)
            args[0] = buf[1:].view(args[0].shape).copy_(args[0])
        if noncontiguous:  # k a slice of a wider tensor
            wide = torch.randn(B, T, H, 2 * K, device="cuda", dtype=dtype)
            args[1] = wide[..., :K]
        return args, h0

    def call(args, h0):
        from fla_gsa.ops import chunk_abc, chunk_gla, chunk_gsa

        return _run(dict(gsa=chunk_gsa, abc=chunk_abc, gla=chunk_gla)[op], args, h0, **extra)

    args, h0 = inputs()
    monkeypatch.setattr(replay, "ENABLED", False)
    ref = call(args, h0)
    monkeypatch.setattr(replay, "ENABLED", True)
    replay.clear()
    call(*inputs())  # recorded, on other values
    lean = []
    orig = LeanKernel.launch
    monkeypatch.setattr(LeanKernel, "launch", lambda self, *a: lean.append(self.fn.__name__) or orig(self, *a))
    out = call(args, h0)  # replayed
    plans = list(replay._plans.values())
    if replayable:
        # the forward and the backward of the chunked op were replayed: no lean launch ran but ABC's
        # slot-gate kernels (their own Function, not replayed)
        assert len(plans) == 2 and None not in plans
        assert all(n.startswith("abc_gates") for n in lean) and (op == "abc") == bool(lean)
    else:
        # the forward copies k (not contiguous) or reads cu_seqlens on the host: it runs the op's code
        assert plans[0] is None and lean
    assert len(out) == len(ref)
    for i, (x, r) in enumerate(zip(out, ref)):
        assert x.shape == r.shape and x.dtype == r.dtype, f"{name}: output {i}"
        assert torch.equal(x, r), f"{name}: output {i} differs from the op's own code"
