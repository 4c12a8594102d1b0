"""The lean launcher's cache: a compiled kernel is reused only under the specialization it was compiled
for, and its launcher gets every argument in the kernel's signature order. (CPU: the Triton side is
faked; the GPU tests run every kernel through the real thing.)"""
import pytest
import torch

from fla_gsa.ops.utils import launch
from fla_gsa.ops.utils.launch import LeanKernel, arg_key


def kernel_fn(x, y, n, scale, BLOCK: "tl.constexpr", FLAG: "tl.constexpr", EXTRA: "tl.constexpr" = 7):  # noqa: F821
    pass


class FakeCompiled:
    function, packed_metadata = "function-handle", "packed"

    def __init__(self, log):
        self.log = log

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream)

    def run(self, *a):
        self.log.append(("run", a))


class FakeJIT:
    """Stands in for a JITFunction: records Triton's own launches and hands back a compiled kernel."""
    arg_names = ["x", "y", "n", "scale", "BLOCK", "FLAG", "EXTRA"]
    constexprs = [4, 5, 6]
    fn = staticmethod(kernel_fn)

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            return FakeCompiled(self.log)
        return run


@pytest.fixture
def lean_kernel(monkeypatch):
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(launch, "_stream", lambda device: 1234)
    return LeanKernel(FakeJIT())


def kinds(log):
    return [e[0] for e in log]


def test_reuse_and_argument_order(lean_kernel):
    x, y = torch.zeros(64), torch.zeros(64)
    lean_kernel[(3,)](x, y, 100, 0.5, BLOCK=32, FLAG=True, num_warps=4)
    lean_kernel[(5, 2)](x, y, 100, 0.25, BLOCK=32, FLAG=True, num_warps=4)
    log = lean_kernel.fn.log
    assert kinds(log) == ["triton", "run"]
    assert log[0][1:] == ((3,), (x, y, 100, 0.5), {"BLOCK": 32, "FLAG": True, "num_warps": 4})
    grid_and_handles, args = log[1][1][:9], log[1][1][9:]
    # no launch hook set: no metadata and no hooks for the launcher to call
    assert grid_and_handles == (5, 2, 1, 1234, "function-handle", "packed", None, None, None)
    # runtime arguments as given (tensors as their device pointers), then the constexprs in signature
    # order, the default filled in
    assert args[:4] == (x.data_ptr(), y.data_ptr(), 100, 0.25) and args[4:] == (32, True, 7)


def test_launch_hooks_are_passed_on_when_set(lean_kernel):
    from triton import knobs

    x = torch.zeros(64)
    lean_kernel[(1,)](x, x, 100, 0.5, BLOCK=32, FLAG=True)  # compiles
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton's launch hooks are plain functions")
    hook = lambda metadata: None  # noqa: E731
    chain.add(hook)
    try:
        lean_kernel[(2,)](x, x, 100, 0.5, BLOCK=32, FLAG=True)
    finally:
        chain.remove(hook)
    handles = lean_kernel.fn.log[-1][1][:9]
    assert handles[6] == ("metadata", (2,), 1234) and handles[7] is chain
    assert handles[8] is knobs.runtime.launch_exit_hook


@pytest.mark.parametrize("change", ["dtype", "alignment", "int_one", "int_div16", "int_range", "none", "constexpr",
                                    "option"])
def test_new_specialization_goes_through_triton(lean_kernel, change):
    x, y = torch.zeros(64), torch.zeros(64)
    base = dict(args=[x, y, 96, 0.5], meta=dict(BLOCK=32, FLAG=True, num_warps=4))
    lean_kernel[(1,)](*base["args"], **base["meta"])
    args, meta = list(base["args"]), dict(base["meta"])
    if change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.bfloat16)
    elif change == "alignment":
        args[0] = torch.zeros(65)[1:]  # 4 bytes past a 16-byte boundary
    elif change == "int_one":
        args[2] = 1
    elif change == "int_div16":
        args[2] = 97
    elif change == "int_range":
        args[2] = 2**32
    elif change == "none":
        args[1] = None
    elif change == "constexpr":
        meta["FLAG"] = False
    else:
        meta["num_warps"] = 8
    lean_kernel[(1,)](*args, **meta)
    assert kinds(lean_kernel.fn.log) == ["triton", "triton"]


def test_same_specialization_other_values_reuse(lean_kernel):
    x, y = torch.zeros(64), torch.zeros(64)
    lean_kernel[(1,)](x, y, 96, 0.5, BLOCK=32, FLAG=True)
    lean_kernel[(1,)](torch.zeros(128), torch.zeros(16), 48, -3.0, BLOCK=32, FLAG=True)  # 48: i32, % 16 == 0
    lean_kernel[(1,)](x, y, 97, 0.5, BLOCK=32, FLAG=True)
    lean_kernel[(1,)](x, y, 99, 0.5, BLOCK=32, FLAG=True)  # 97, 99: i32, not % 16
    assert kinds(lean_kernel.fn.log) == ["triton", "run", "triton", "run"]


def test_runtime_argument_by_keyword_is_refused(lean_kernel):
    with pytest.raises(TypeError, match="scale"):
        lean_kernel[(1,)](torch.zeros(4), torch.zeros(4), 4, scale=0.5, BLOCK=32, FLAG=True)


def test_arg_key():
    assert arg_key(1) == 1 and arg_key(True) is bool and arg_key(2.0) is float and arg_key(None) is None
    assert arg_key(32) != arg_key(33) and arg_key(33) == arg_key(35) and arg_key(2**31) != arg_key(2**31 - 16)
    assert arg_key(torch.zeros(8)) == (torch.float32, True)
    assert arg_key(torch.zeros(9)[1:]) == (torch.float32, False)


def test_interpreted_kernels_stay_unwrapped():
    def f():
        pass
    assert launch.lean(f) is f
