"""swiglu and GatedMLP against float64 PyTorch (and Llama's MLP, weights copied by name)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fla_gsa.modules import GatedMLP, swiglu
from fla_gsa.modules.activations import swiglu_linear
from fla_gsa.modules.mlp import default_intermediate_size
from conftest import DEVICE, assert_rel

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(1027,), (3, 17, 100), (2, 2048 + 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu(shape, dtype):
    a = (3 * torch.randn(*shape, device=DEVICE)).to(dtype).requires_grad_()
    b = torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_()
    a0, b0 = a.detach().clone(), b.detach().clone()
    y = swiglu(a, b)
    ref = F.silu(a.double()) * b.double()
    assert y.dtype == dtype
    assert_rel("y", y, ref, TOL[dtype])
    dy = torch.randn_like(ref)
    da, db = torch.autograd.grad((y.double() * dy).sum(), (a, b))
    rda, rdb = torch.autograd.grad((ref * dy).sum(), (a, b))
    assert_rel("da", da, rda, TOL[dtype])
    assert_rel("db", db, rdb, TOL[dtype])
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)


@pytest.mark.triton
def test_swiglu_non_contiguous():
    a = torch.randn(20, 30, device=DEVICE).t()
    b = torch.randn(30, 20, device=DEVICE)
    assert_rel("y", swiglu(a, b), F.silu(a.double()) * b.double(), 1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("bias, frozen", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_linear(dtype, bias, frozen):
    # against float64 composition: the output and the gradients of a, b, weight, bias; the
    # intermediate swiglu(a, b) is recomputed in the backward (with da, db), never kept. A frozen
    # weight needs no recomputation.
    a = (3 * torch.randn(2, 37, 96, device=DEVICE)).to(dtype).requires_grad_()
    b = torch.randn(2, 37, 96, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(40, 96, device=DEVICE) / 10).requires_grad_(not frozen)  # fp32 weight, as under autocast
    bb = torch.randn(40, device=DEVICE).requires_grad_() if bias else None
    leaves = [x for x in (a, b, w, bb) if x is not None and x.requires_grad]
    y = swiglu_linear(a, b, w, bb)
    ref = F.linear(F.silu(a.double()) * b.double(), w.double(), bb.double() if bias else None)
    assert y.dtype == dtype and y.shape == (2, 37, 40)
    tol = 1e-6 if dtype == torch.float32 else 1.5e-2
    assert_rel("y", y, ref, tol)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad((y.double() * dy).sum(), leaves)
    rgrads = torch.autograd.grad((ref * dy).sum(), leaves)
    for name, g, r, x in zip("abwc" if not frozen else "ab", grads, rgrads, leaves):
        assert g.dtype == x.dtype
        assert_rel("d" + name, g, r, tol)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(3, 17, 2 * 100), (1, 2 * 1029), (5, 2 * 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_packed(shape, dtype):
    # b=None: a holds [gate | up]; the result and one gradient for the whole tensor, against float64
    ab = (2 * torch.randn(*shape, device=DEVICE)).to(dtype).requires_grad_()
    ab0 = ab.detach().clone()
    y = swiglu(ab)
    g, u = ab.double().chunk(2, -1)
    ref = F.silu(g) * u
    assert y.shape == ref.shape and y.dtype == dtype
    assert_rel("y", y, ref, TOL[dtype])
    dy = torch.randn_like(ref)
    (d,) = torch.autograd.grad((y.double() * dy).sum(), ab)
    (rd,) = torch.autograd.grad((ref * dy).sum(), ab)
    assert d.shape == ab.shape
    assert_rel("d[gate|up]", d, rd, TOL[dtype])
    assert torch.equal(ab.detach(), ab0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_linear_packed(dtype):
    # the packed form equals the pair form, values and every gradient, also from a strided [gate | up]
    a = (3 * torch.randn(2, 37, 96, device=DEVICE)).to(dtype)
    b = torch.randn(2, 37, 96, device=DEVICE).to(dtype)
    w = (torch.randn(40, 96, device=DEVICE) / 10).requires_grad_()
    wide = torch.cat([a, b, torch.randn_like(a)], -1)
    ab = wide[..., :192].detach().requires_grad_()  # a view with row stride 288
    y = swiglu_linear(ab, None, w)
    ref = F.linear(F.silu(a.double()) * b.double(), w.double())
    tol = 1e-6 if dtype == torch.float32 else 1.5e-2
    assert_rel("y", y, ref, tol)
    dy = torch.randn_like(ref)
    dab, dw = torch.autograd.grad((y.double() * dy).sum(), (ab, w))
    ad, bd = a.double().requires_grad_(), b.double().requires_grad_()
    rda, rdb, rdw = torch.autograd.grad((F.linear(F.silu(ad) * bd, w.double()) * dy).sum(), (ad, bd, w))
    assert dab.shape == ab.shape and dab.dtype == dtype and dw.dtype == w.dtype
    assert_rel("da", dab[..., :96], rda, tol)
    assert_rel("db", dab[..., 96:], rdb, tol)
    assert_rel("dw", dw, rdw, tol)
    with pytest.raises(ValueError, match=r"a must have shape \[..., 2C\]"):
        swiglu_linear(torch.randn(3, 7), None, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \[O, 4\]"):
        swiglu_linear(torch.randn(3, 8), None, torch.randn(5, 8))


def test_swiglu_linear_saves_no_intermediate():
    # what autograd keeps: a, b and the weight, nothing of the [.., I] product
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    w = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu_linear(a, b, w)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert ptrs <= {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}


def test_swiglu_linear_bad_inputs():
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        swiglu_linear(a, b, [[0.0] * 8])
    with pytest.raises(ValueError, match=r"weight must have shape \[O, 8\]"):
        swiglu_linear(a, b, torch.randn(5, 7))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        swiglu_linear(a, b, torch.randn(5, 8), 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \[5\]"):
        swiglu_linear(a, b, torch.randn(5, 8), torch.randn(4))
    with pytest.raises(ValueError, match="b must have the shape"):
        swiglu_linear(a, torch.randn(3, 7), torch.randn(5, 8))


def test_swiglu_bad_inputs():
    with pytest.raises(ValueError, match="b must have the shape"):
        swiglu(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(TypeError, match="dtype"):
        swiglu(torch.randn(3), torch.randn(3, dtype=torch.float64))


def test_intermediate_size_default():
    assert default_intermediate_size(100) == 512  # int(266.6) -> 512
    assert default_intermediate_size(4096) == 11008  # Llama-7B
    assert GatedMLP(2048).intermediate_size == default_intermediate_size(2048)
    assert GatedMLP(64, intermediate_size=100).intermediate_size == 100
    with pytest.raises(ValueError, match="hidden_act"):
        GatedMLP(64, hidden_act="gelu")


@pytest.mark.triton
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_matches_reference(bias):
    mlp = GatedMLP(100, intermediate_size=72, bias=bias).to(DEVICE)
    x = torch.randn(2, 11, 100, device=DEVICE, requires_grad=True)
    y = mlp(x)
    params = dict(mlp.named_parameters())
    xd = x.double()

    def lin(name, t):
        return F.linear(t, params[f"{name}.weight"].double(), params[f"{name}.bias"].double() if bias else None)

    ref = lin("down_proj", F.silu(lin("gate_proj", xd)) * lin("up_proj", xd))
    assert_rel("y", y, ref, 1e-5)
    dy = torch.randn_like(ref)
    tracked = [x] + list(params.values())
    grads = torch.autograd.grad((y.double() * dy).sum(), tracked)
    ref_grads = torch.autograd.grad((ref * dy).sum(), tracked)
    for name, g, rg in zip(["x"] + list(params), grads, ref_grads):
        assert_rel(f"d{name}", g, rg, 1e-5)


def test_gated_mlp_loads_llama_weights():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, hidden_act="silu")
    ref = llama.LlamaMLP(cfg).to(DEVICE)
    mlp = GatedMLP(64, intermediate_size=160).to(DEVICE)
    mlp.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 5, 64, device=DEVICE)
    assert_rel("y", mlp(x), ref(x), 1e-6)
