"""Compiling a new call's kernels ahead of it (fla_gsa.ops.utils.precompile): the dry run submits every
kernel its forward and backward would launch, launches none, and is made once per combination of
shapes. On CPU the Triton side is faked; on the GPU the real ops go through it."""
import pytest
import torch

from conftest import DEVICE, log_gates
from fla_gsa.ops.utils import launch, precompile as pc
from fla_gsa.ops.utils.launch import LeanKernel


def kernel_fn(x, n, BLOCK: "tl.constexpr"):  # noqa: F821
    pass


class FakeJIT:
    """Stands in for a JITFunction: records launches (``[grid](...)``) and compilations (``warmup``)."""
    arg_names = ["x", "n", "BLOCK"]
    constexprs = [2]
    fn = staticmethod(kernel_fn)

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("launch", args[1], meta["BLOCK"]))
            raise AssertionError("a dry run must not launch")
        return run

    def warmup(self, *args, grid, **meta):
        self.log.append(("compile", args[1], meta["BLOCK"]))


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(pc, "triton_interpret", lambda: False)
    monkeypatch.setattr(pc, "_seen", set())
    log = []
    return log, LeanKernel(FakeJIT(log)), LeanKernel(FakeJIT(log))


def make_function(fwd_kernel, bwd_kernel, calls):
    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, n, flag):
            calls.append(("forward", ctx.needs_input_grad))
            fwd_kernel[(1,)](x, n, BLOCK=16 if flag else 32)
            ctx.save_for_backward(x)
            return x.new_empty(x.shape), None

        @staticmethod
        def backward(ctx, do, dnone):
            (x,) = ctx.saved_tensors
            calls.append(("backward", do.shape, dnone))
            bwd_kernel[(2,)](x, 7, BLOCK=64)
            return x.new_empty(x.shape), None, None
    return Op


def test_dry_run_compiles_forward_and_backward_once(fake):
    log, fwd, bwd = fake
    calls = []
    Op = make_function(fwd, bwd, calls)
    x = torch.zeros(8, requires_grad=True)
    pc.precompile(Op, x, 5, True)
    assert calls == [("forward", (True, False, False)), ("backward", (8,), None)]
    assert log == [("compile", 5, 16), ("compile", 7, 64)]
    pc.precompile(Op, x, 5, True)  # seen: nothing more
    pc.precompile(Op, torch.zeros(8, requires_grad=True), 5, True)  # other values, same combination
    assert len(calls) == 2 and len(log) == 2
    pc.precompile(Op, x, 5, False)  # another constexpr: a new combination
    assert log[2:] == [("compile", 5, 32), ("compile", 7, 64)]
    assert not getattr(launch._mode, "compile_only", False)


def test_dry_run_without_gradient_skips_backward(fake):
    log, fwd, bwd = fake
    calls = []
    Op = make_function(fwd, bwd, calls)
    x = torch.zeros(4, requires_grad=True)
    with torch.no_grad():
        pc.precompile(Op, x, 3, True)
    pc.precompile(Op, torch.zeros(4), 3, True)
    assert [c[0] for c in calls] == ["forward", "forward"] and calls[0][1] == (False, False, False)
    assert log == [("compile", 3, 16)] * 2


def test_compiled_specializations_are_not_submitted(fake):
    log, fwd, _ = fake
    fwd.cache[(0, *map(launch.arg_key, (torch.zeros(4), 9)), ("BLOCK", 16))] = ("compiled", ())
    with launch.compile_only(2):
        fwd[(1,)](torch.zeros(4), 9, BLOCK=16)  # compiled: nothing to do
        fwd[(1,)](torch.zeros(4), 9, BLOCK=32)  # not compiled: submitted
    assert log == [("compile", 9, 32)]


def test_failure_in_dry_run_warns_and_leaves_launches_on(fake):
    log, fwd, bwd = fake

    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            fwd[(1,)](x, 1, BLOCK=16)
            raise ValueError("bad input")

    with pytest.warns(RuntimeWarning, match="Broken"):
        pc.precompile(Broken, torch.zeros(2))
    assert not getattr(launch._mode, "compile_only", False)


def test_switched_off(fake, monkeypatch):
    log, fwd, bwd = fake
    monkeypatch.setattr(pc, "PARALLEL_COMPILE", False)
    calls = []
    pc.precompile(make_function(fwd, bwd, calls), torch.zeros(2, requires_grad=True), 1, True)
    assert calls == [] and log == []


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiles real kernels: needs a GPU")
@pytest.mark.parametrize("op", ["gsa", "gla"])
def test_first_call_finds_its_kernels_compiled(op, monkeypatch):
    """A shape combination new to the process: every kernel its forward+backward needs is compiled in
    the dry run, none by the real call, and the results are those of a call without the dry run."""
    from triton.runtime.jit import JITFunction

    from fla_gsa.ops import chunk_gla, chunk_gsa

    compiled = []
    orig = JITFunction._do_compile

    def spy(self, *a, **kw):
        compiled.append(getattr(launch._mode, "compile_only", False))
        return orig(self, *a, **kw)

    monkeypatch.setattr(JITFunction, "_do_compile", spy)
    B, T, H, K, V, M = 2, 83, 2, 40, 56, 24  # sizes no other test uses: new specializations
    q, k = (torch.randn(B, T, H, K, device=DEVICE, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, V, device=DEVICE, requires_grad=True)
    if op == "gsa":
        g = log_gates(B, T, H, M).requires_grad_()
        s = torch.rand(B, T, H, M, device=DEVICE, requires_grad=True)
        inputs = (q, k, v, s, g)
        run = lambda: chunk_gsa(q, k, v, s, g)[0]  # noqa: E731
    else:
        g = log_gates(B, T, H, K).requires_grad_()
        inputs = (q, k, v, g)
        run = lambda: chunk_gla(q, k, v, g)[0]  # noqa: E731
    do = torch.randn(B, T, H, V, device=DEVICE)
    o = run()
    grads = torch.autograd.grad(o, inputs, do)
    assert compiled and all(compiled), f"{compiled.count(False)} of {len(compiled)} kernels compiled by the call"
    monkeypatch.setattr(pc, "PARALLEL_COMPILE", False)
    o2 = run()
    grads2 = torch.autograd.grad(o2, inputs, do)
    assert torch.equal(o, o2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
