"""``linear`` / ``fused_linear``: several layers as one product, and fp32 weight gradients under
autocast, against float64 products."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import DEVICE, INTERPRET, assert_rel, rel_err

from fla_gsa.modules.linear import fused_linear, join_cast, linear, mm_fp32

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast's half-precision products run on a GPU")


def layers(D=24, outs=(16, 8, 5), bias=(True, False, True)):
    torch.manual_seed(0)
    return [nn.Linear(D, n, bias=b).to(DEVICE) for n, b in zip(outs, bias)]


def reference(x, lins):
    xd = x.detach().double().requires_grad_()
    params = [(lin.weight.detach().double().requires_grad_(),
               lin.bias.detach().double().requires_grad_() if lin.bias is not None else None) for lin in lins]
    y = torch.cat([xd @ w.T + (b if b is not None else 0) for w, b in params], -1)
    return y, xd, params


@pytest.mark.parametrize("tokens", [40, 3])  # one product / separate products (few tokens)
def test_fused_linear_values_and_gradients(tokens):
    lins = layers()
    x = torch.randn(tokens, 24, device=DEVICE, requires_grad=True)
    y = fused_linear(x, lins)
    ref, xd, params = reference(x, lins)
    assert_rel("y", y, ref, 1e-6)
    dy = torch.randn_like(ref)
    (y.double() * dy).sum().backward()
    (ref * dy).sum().backward()
    assert_rel("dx", x.grad, xd.grad, 1e-6)
    for lin, (w, b) in zip(lins, params):
        assert_rel("dw", lin.weight.grad, w.grad, 1e-6)
        if b is not None:
            assert_rel("db", lin.bias.grad, b.grad, 1e-6)


def test_linear_function():
    x, w, b = torch.randn(7, 5, 12, device=DEVICE), torch.randn(9, 12, device=DEVICE), torch.randn(9, device=DEVICE)
    assert_rel("one weight", linear(x, w, b), x.double() @ w.double().T + b.double(), 1e-6)
    assert_rel("list", linear(x, [w[:4], w[4:]]), x.double() @ w.double().T, 1e-6)


def test_linear_bad_inputs():
    x, w = torch.randn(3, 12), torch.randn(9, 12)
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \[N, 12\]"):
        linear(x, [w, torch.randn(4, 11)])
    with pytest.raises(ValueError, match=r"bias must have shape \[13\]"):
        linear(x, [w, torch.randn(4, 12)], torch.randn(9))
    with pytest.raises(TypeError, match="x"):
        linear(x.long(), w)
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        linear(x, [None])


def test_hooked_or_wrapped_layers_are_called():
    lins = layers()
    calls = []
    lins[1].register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(40, 24, device=DEVICE)
    ref = torch.cat([lin(x) for lin in lins], -1)
    calls.clear()
    assert torch.equal(fused_linear(x, lins), ref)
    assert calls == [1]

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(1)
    scaled = Scaled(24, 4).to(DEVICE)
    assert_rel("subclass", fused_linear(x, [lins[0], scaled]), torch.cat([lins[0](x), scaled(x)], -1), 1e-6)


@cuda
@pytest.mark.parametrize("tokens", [300, 4])
def test_autocast_fp32_weight_gradients(tokens):
    # Under bf16 autocast: the output is the half-precision product (as nn.Linear's), and every
    # gradient is fp32 and at least as close to float64 as autocast's, whose weight gradient is
    # rounded to bf16 first.
    lins = layers(D=256, outs=(128, 64, 32))
    x = torch.randn(tokens, 256, device=DEVICE, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fused_linear(x, lins)
        y_amp = torch.cat([lin(x) for lin in lins], -1)
    assert y.dtype == torch.bfloat16
    ref, xd, params = reference(x, lins)
    assert_rel("y", y, ref, 1e-2)
    dy = torch.randn_like(ref)
    ours = torch.autograd.grad((y.double() * dy).sum(), [x, *(lin.weight for lin in lins)])
    amp = torch.autograd.grad((y_amp.double() * dy).sum(), [x, *(lin.weight for lin in lins)])
    refs = torch.autograd.grad((ref * dy).sum(), [xd, *(w for w, _ in params)])
    for name, a, b, r in zip(["x", "w0", "w1", "w2"], ours, amp, refs):
        assert a.dtype == torch.float32
        assert_rel(f"d{name}", a, r, 1e-2)
        assert rel_err(a, r) <= rel_err(b, r) * 1.01 + 1e-6, f"d{name}: {rel_err(a, r):.2e} vs autocast {rel_err(b, r):.2e}"


@cuda
def test_mm_fp32():
    a = torch.randn(64, 300, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(300, 48, device="cuda", dtype=torch.bfloat16)
    ref = a.double() @ b.double()
    out = mm_fp32(a, b)
    assert out.dtype == torch.float32
    assert_rel("mm", out, ref, 1e-5)  # fp32 accumulation of exact bf16 products
    acc = torch.randn(64, 48, device="cuda")
    expected = acc.double() + ref
    assert mm_fp32(a, b, out=acc) is acc
    assert_rel("addmm", acc, expected, 1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("count", [1, 3, 4, 6])  # one launch of up to four sources, or two
def test_join_cast(count):
    # exactly torch.cat(weights).to(dtype): each source cast straight into its rows (odd sizes, blocks
    # that end inside a source). fp16 under the interpreter, whose bf16 cast truncates where the GPU
    # (and PyTorch) round to nearest even.
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    weights = [torch.randn(n, 19, device=DEVICE) * 100 for n in (37, 5, 64, 3, 11, 1)[:count]]
    before = [w.clone() for w in weights]
    out = join_cast(weights, dtype)
    assert out.dtype == dtype and out.shape == (sum(w.shape[0] for w in weights), 19)
    assert torch.equal(out, torch.cat(weights).to(dtype))
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[N, 19\]"):
        join_cast([weights[0], torch.randn(4, 18, device=DEVICE)], dtype)
    with pytest.raises(ValueError, match="non-empty"):
        join_cast([], dtype)
