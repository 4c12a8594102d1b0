"""``gsa_inputs``: the swish feature maps and tied gates of a fused GSA projection, forward and the
projection's gradient, against float64 PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_rel

import fla_gsa.ops.gsa.inputs as inputs_mod
from fla_gsa.ops.gsa.inputs import gsa_inputs


def reference(x, sizes, tau):
    q, k, v, f = x.double().split(list(sizes), dim=-1)
    g = F.logsigmoid(f) / tau
    return F.silu(q), F.silu(k), F.silu(v), 1 - g.exp(), g


def run_case(lead, sizes, tau, dtype, scale=1.0, tol=1e-5):
    x = (torch.randn(*lead, sum(sizes), device=DEVICE) * scale).to(dtype).requires_grad_()
    before = x.detach().clone()
    outs = gsa_inputs(x, sizes, tau)
    refs = reference(x, sizes, tau)
    names = "qkvsg"
    for name, o, r, d in zip(names, outs, refs, sizes[:3] + (sizes[3], sizes[3])):
        assert o.shape == (*lead, d), f"{name}: shape {tuple(o.shape)}"
        assert o.is_contiguous()
        expected = torch.promote_types(dtype, torch.float32) if name == "g" else dtype
        assert o.dtype == expected, f"{name}: dtype {o.dtype}"
        assert_rel(name, o, r, tol)
    grads_out = [torch.randn_like(r) for r in refs]
    loss = sum((o.double() * d).sum() for o, d in zip(outs, grads_out))
    ref_loss = sum((r * d).sum() for r, d in zip(refs, grads_out))
    (dx,) = torch.autograd.grad(loss, x)
    (ref_dx,) = torch.autograd.grad(ref_loss, x)
    assert dx.dtype == dtype
    assert_rel("dx", dx, ref_dx, tol)
    # each part of the gradient on its own (a small part's error is not hidden by the others)
    edges = [0, sizes[0], sum(sizes[:2]), sum(sizes[:3]), sum(sizes)]
    for name, a, b in zip("qkvf", edges, edges[1:]):
        assert_rel(f"d{name}'", dx[..., a:b], ref_dx[..., a:b], tol)
    assert torch.equal(x.detach(), before), "x was modified in place"


@pytest.mark.triton
@pytest.mark.parametrize("lead,sizes", [((2, 37), (64, 32, 32, 8)), ((300,), (20, 12, 12, 7)),
                                        ((3, 5, 7), (8, 8, 24, 130))])
@pytest.mark.parametrize("tau", [8.0, 1.0])
def test_fp32(lead, sizes, tau):
    run_case(lead, sizes, tau, torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("scale", [0.01, 30.0])
def test_weak_and_strong_logits(scale):
    # logits near 0 (s near 1/2 of its range) and far out (gates 0 or 1: logsigmoid's and 1 − e^g's
    # small-argument forms)
    run_case((41,), (16, 16, 16, 16), 8.0, torch.float32, scale=scale)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half(dtype):
    run_case((3, 29), (32, 16, 16, 8), 8.0, dtype, tol=1e-2)


def test_float64_and_cpu_path():
    run_case((2, 9), (4, 4, 6, 3), 2.0, torch.float64, tol=1e-12)


@pytest.mark.triton
def test_matches_the_torch_path():
    # the kernel path (CUDA or interpreter) and the PyTorch path give the same values
    x = torch.randn(5, 23, 40, device=DEVICE)
    sizes = (16, 8, 8, 8)
    for a, b in zip(gsa_inputs(x, sizes, 8.0), inputs_mod._gsa_inputs_torch(x, sizes, 8.0)):
        assert_rel("kernel vs torch", a, b, 1e-6)


def test_bad_inputs():
    x = torch.randn(4, 20)
    with pytest.raises(ValueError, match="sizes"):
        gsa_inputs(x, (8, 8, 4))
    with pytest.raises(ValueError, match="sizes"):
        gsa_inputs(x, (8, 8, 4, 0))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 21\]"):
        gsa_inputs(x, (8, 8, 4, 1))
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        gsa_inputs(x, (8, 4, 4, 4), 0.0)
    with pytest.raises(TypeError, match="x"):
        gsa_inputs(x.long(), (8, 4, 4, 4))
