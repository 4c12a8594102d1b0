"""RMSNorm (fused residual add, prenorm) and its swish-gated variant against float64 PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fla_gsa.modules import FusedRMSNormGated, RMSNorm, rms_norm, rms_norm_gated
from fla_gsa.ops.utils.backend import use_triton
from conftest import DEVICE, assert_rel

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def ref_norm(x, weight, eps, residual=None, gate=None, act=None):
    """float64 reference: returns (y, act(x) + residual)."""
    h = F.silu(x.double()) if act == "silu" else x.double()
    h = h + (residual.double() if residual is not None else 0)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if gate is not None:
        y = y * F.silu(gate.double())
    return y, h


def leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()


def run_case(shape, dtype, use_residual, prenorm, affine, gated, res_dtype=None, act=None):
    D = shape[-1]
    x = leaf(*shape, dtype=dtype)
    residual = leaf(*shape, dtype=res_dtype or dtype) if use_residual else None
    gate = leaf(*shape, dtype=dtype) if gated else None
    weight = (1 + 0.1 * torch.randn(D, device=DEVICE)).to(dtype).requires_grad_() if affine else None
    inputs = {"x": x, "residual": residual, "gate": gate, "weight": weight}
    before = {k: v.detach().clone() for k, v in inputs.items() if v is not None}

    if gated:
        out = rms_norm_gated(x, gate, weight, 1e-6, residual=residual, prenorm=prenorm)
    else:
        out = rms_norm(x, weight, 1e-6, residual=residual, prenorm=prenorm, activation=act)
    y, new_res = out if prenorm else (out, None)
    ref_y, ref_res = ref_norm(x, weight, 1e-6, residual, gate, act)
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert_rel("y", y, ref_y, tol)
    if prenorm:
        expected = torch.float32 if (residual is not None and residual.dtype == torch.float32) else dtype
        assert new_res.dtype == expected
        assert_rel("residual_out", new_res, ref_res, 1e-6 if expected == torch.float32 else tol)

    dy = torch.randn_like(ref_y)
    dres = torch.randn_like(ref_res)
    loss = (y.double() * dy).sum() + ((new_res.double() * dres).sum() if prenorm else 0)
    ref_loss = (ref_y * dy).sum() + ((ref_res * dres).sum() if prenorm else 0)
    tracked = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad(loss, list(tracked.values()))
    ref_grads = torch.autograd.grad(ref_loss, list(tracked.values()))
    for (name, t), g, rg in zip(tracked.items(), grads, ref_grads):
        assert g.dtype == t.dtype, f"d{name} dtype {g.dtype} != {t.dtype}"
        assert_rel(f"d{name}", g, rg, tol if dtype != torch.float32 else 1e-5)
    for k, v in before.items():
        assert torch.equal(inputs[k].detach(), v), f"{k} was modified in place"


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 37, 100), (300, 100), (5, 3000), (3, 64)])
@pytest.mark.parametrize("use_residual,prenorm", [(False, False), (True, False), (True, True), (False, True)])
def test_rms_norm_fp32(shape, use_residual, prenorm):
    run_case(shape, torch.float32, use_residual, prenorm, affine=True, gated=False)


@pytest.mark.triton
@pytest.mark.parametrize("dtype,res_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float16, None)])
def test_rms_norm_half(dtype, res_dtype):
    run_case((3, 29, 100), dtype, True, True, affine=True, gated=False, res_dtype=res_dtype)


@pytest.mark.triton
def test_rms_norm_no_affine():
    run_case((41, 100), torch.float32, True, True, affine=False, gated=False)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 19, 4, 100), (300, 48)])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_gated_fp32(shape, affine):
    run_case(shape, torch.float32, False, False, affine=affine, gated=True)


@pytest.mark.triton
def test_rms_norm_gated_residual_bf16():
    run_case((2, 23, 100), torch.bfloat16, True, True, affine=True, gated=True)


@pytest.mark.triton
@pytest.mark.parametrize("shape,dtype", [((2, 19, 4, 100), torch.float32), ((300, 48), torch.float32),
                                         ((3, 7, 4, 512), torch.bfloat16)])
@pytest.mark.parametrize("use_residual,prenorm", [(False, False), (True, True), (False, True)])
def test_rms_norm_silu_input(shape, dtype, use_residual, prenorm):
    # the input activation (GSA's norm(silu(o))): gradients through silu' of the raw input; the
    # residual's gradient is the norm's, without silu'
    run_case(shape, dtype, use_residual, prenorm, affine=True, gated=False, act="silu")


@pytest.mark.triton
@pytest.mark.parametrize("M,D", [(1000, 2048), (4099, 512), (70, 16384)])
def test_rms_norm_backward_tiles(M, D):
    # the backward's tiles of about 8K elements at the 1.3B model's sizes (rows split unevenly over
    # the programs), with an fp32 residual as in a model's stream
    run_case((M, D), torch.bfloat16, True, True, affine=True, gated=False, res_dtype=torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_prenorm_backward_keeps_the_sum_not_x(x_dtype):
    # with an fp32 stream the backward reads the returned sum: x itself is not saved (a half-precision
    # branch output is freed after the forward); a bf16 stream keeps x and the residual
    x = torch.randn(64, 256, device=DEVICE).to(x_dtype).requires_grad_()
    w = torch.randn(256, device=DEVICE).requires_grad_()
    if not use_triton(x):
        pytest.skip("what the kernels' backward keeps (the PyTorch path's autograd keeps its own)")
    for res_dtype, keeps_x in ((torch.float32, False), (x_dtype, True)):
        r = torch.randn(64, 256, device=DEVICE).to(res_dtype).requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y, new_r = rms_norm(x, w, residual=r, prenorm=True)
        ptrs = {t.untyped_storage().data_ptr() for t in saved}
        if res_dtype == torch.float32 and x_dtype == torch.float32:
            keeps_x = False
        assert (x.untyped_storage().data_ptr() in ptrs) == keeps_x
        if not keeps_x:
            assert new_r.untyped_storage().data_ptr() in ptrs
        dy, dr = torch.randn_like(y, dtype=torch.float64), torch.randn_like(new_r, dtype=torch.float64)
        grads = torch.autograd.grad((y.double() * dy).sum() + (new_r.double() * dr).sum(), (x, r, w))
        ref_y, ref_r = ref_norm(x, w, 1e-6, r)
        ref = torch.autograd.grad((ref_y * dy).sum() + (ref_r * dr).sum(), (x, r, w))
        for name, g, rg in zip(("x", "residual", "weight"), grads, ref):
            assert g.dtype == {"x": x.dtype, "residual": r.dtype, "weight": w.dtype}[name]
            assert_rel("d" + name, g, rg, TOL[x_dtype])


@pytest.mark.triton
def test_modules_match_functional():
    norm = RMSNorm(100, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(2, 5, 100, device=DEVICE), torch.randn(2, 5, 100, device=DEVICE)
    y, res = norm(x, r, prenorm=True)
    ref_y, ref_res = ref_norm(x, norm.weight, 1e-5, r)
    assert_rel("y", y, ref_y, 1e-5)
    assert_rel("residual", res, ref_res, 1e-6)
    gated = FusedRMSNormGated(100).to(DEVICE)
    g = torch.randn_like(x)
    assert_rel("gated", gated(x, g), ref_norm(x, gated.weight, 1e-6, gate=g)[0], 1e-5)
    act = RMSNorm(100, activation="silu").to(DEVICE)
    assert_rel("silu", act(x), ref_norm(x, act.weight, 1e-6, act="silu")[0], 1e-5)
    assert "activation='silu'" in repr(act)
    assert RMSNorm(8, elementwise_affine=False).weight is None
    assert RMSNorm(8, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


def test_prenorm_without_residual_returns_x():
    x = torch.randn(3, 10, device=DEVICE)
    y, res = rms_norm(x, None, prenorm=True)
    assert res is x
    assert_rel("y", y, ref_norm(x, None, 1e-6)[0], 1e-5)


def test_float64_runs_in_pytorch():
    x = torch.randn(4, 100, dtype=torch.float64, device=DEVICE)
    w = torch.randn(100, dtype=torch.float64, device=DEVICE)
    assert_rel("y", rms_norm(x, w), ref_norm(x, w, 1e-6)[0], 1e-12)


def test_bad_inputs():
    x = torch.randn(4, 100)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(99))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(100), residual=torch.randn(4, 99))
    with pytest.raises(ValueError, match="gate"):
        rms_norm_gated(x, torch.randn(3, 100), torch.ones(100))
    with pytest.raises(TypeError, match="gate"):
        rms_norm_gated(x, None, torch.ones(100))
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.long(), None)
    with pytest.raises(ValueError, match="hidden_size"):
        RMSNorm(100)(torch.randn(4, 64))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, None, eps=-1.0)
    with pytest.raises(ValueError, match="activation"):
        rms_norm(x, None, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        RMSNorm(100, activation="relu")
