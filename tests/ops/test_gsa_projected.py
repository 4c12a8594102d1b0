"""``chunk_gsa_projected``: GSA from a layer's fused projection ``[q' | k' | v' | f]`` (the feature maps
and gates inside the op, the backward writing the projection's gradient), against the float64
step-by-step reference composed from the same definitions, with gradients of the projection and both
initial states."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_rel

from fla_gsa.ops import chunk_gsa_projected, naive_recurrent_gsa

TOL = 1e-4


def reference(x, sizes, K, tau, scale, h0, cu_seqlens):
    """float64: the definitions of gsa_inputs, then the recurrent GSA."""
    HQ, H = sizes[0] // K, sizes[1] // K
    q, k, v, f = x.double().split(list(sizes), dim=-1)
    g = F.logsigmoid(f) / tau
    q, k, v = F.silu(q).unflatten(-1, (HQ, K)), F.silu(k).unflatten(-1, (H, K)), F.silu(v).unflatten(-1, (H, -1))
    g = g.unflatten(-1, (H, -1))
    return naive_recurrent_gsa(q, k, v, 1 - g.exp(), g, scale=scale, initial_state=h0, output_final_state=True,
                               cu_seqlens=cu_seqlens)


def check(B, T, HQ, H, K, V, M, tau=8.0, scale=1.0, cu_seqlens=None, checkpoint_level=1, chunk_size=16, x_scale=2.0):
    sizes = (HQ * K, H * K, H * V, H * M)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    x = (torch.randn(B, T, sum(sizes), device=DEVICE) * x_scale).requires_grad_()
    h0 = tuple(torch.randn(*s, device=DEVICE).requires_grad_() for s in ((N, H, K, M), (N, H, M, V)))
    before = x.detach().clone()
    do = torch.randn(B, T, HQ, V, device=DEVICE)
    dhk, dhv = torch.randn(N, H, K, M, device=DEVICE), torch.randn(N, H, M, V, device=DEVICE)

    o, (hk, hv) = chunk_gsa_projected(x, sizes, K, tau, scale=scale, initial_state=h0, output_final_state=True,
                                      cu_seqlens=cu_seqlens, checkpoint_level=checkpoint_level, chunk_size=chunk_size)
    grads = torch.autograd.grad((o * do).sum() + (hk * dhk).sum() + (hv * dhv).sum(), (x, *h0))
    assert torch.equal(x.detach(), before)  # the projection is not modified

    rx, rh0 = x.detach().double().requires_grad_(), tuple(h.detach().double().requires_grad_() for h in h0)
    ro, (rhk, rhv) = reference(rx, sizes, K, tau, scale, rh0, cu_seqlens)
    rgrads = torch.autograd.grad((ro * do.double()).sum() + (rhk * dhk.double()).sum() + (rhv * dhv.double()).sum(),
                                 (rx, *rh0))
    assert o.dtype == x.dtype and o.shape == (B, T, HQ, V)
    for name, a, r in (("o", o, ro), ("hk", hk, rhk), ("hv", hv, rhv)):
        assert_rel(name, a, r, TOL)
    # each part of the projection's gradient on its own: a small part's error is not hidden by the rest
    edges = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    for name, a, b in zip(("dq'", "dk'", "dv'", "df"), edges, edges[1:]):
        assert_rel(name, grads[0][..., a:b], rgrads[0][..., a:b], TOL)
    assert_rel("dhk0", grads[1], rgrads[1], TOL)
    assert_rel("dhv0", grads[2], rgrads[2], TOL)


@pytest.mark.triton
@pytest.mark.parametrize("checkpoint_level", [0, 1])
def test_gqa_odd_sizes(checkpoint_level):
    # HQ = 2 H, T not a multiple of the chunk, K, V, M not powers of two
    check(2, 45, 4, 2, 24, 20, 12, checkpoint_level=checkpoint_level)


@pytest.mark.triton
@pytest.mark.parametrize("tau", [0.5, 16.0])
def test_gate_strength(tau):
    check(1, 70, 2, 2, 16, 16, 8, tau=tau, scale=None)


@pytest.mark.triton
def test_varlen():
    cu = torch.tensor([0, 1, 23, 40], dtype=torch.int32, device=DEVICE)
    check(1, 40, 2, 1, 16, 12, 10, cu_seqlens=cu)


@pytest.mark.triton
def test_wide_programs(monkeypatch):
    """The gradient kernels that write the projection's parts in their wide form (whole chunks, every
    column block per program): K and V past one block of 64 columns."""
    from fla_gsa.ops.common import chunk_o

    monkeypatch.setattr(chunk_o, "WIDE_MIN_PROGRAMS", 0)
    check(2, 93, 4, 2, 80, 144, 24, chunk_size=32)


@pytest.mark.triton
def test_state_gradients_only():
    # the projection needs no gradient, the initial states do
    sizes, K = (2 * 16, 2 * 16, 2 * 16, 2 * 8), 16
    x = torch.randn(2, 40, sum(sizes), device=DEVICE)
    h0 = tuple(torch.randn(*s, device=DEVICE).requires_grad_() for s in ((2, 2, 16, 8), (2, 2, 8, 16)))
    o, _ = chunk_gsa_projected(x, sizes, K, initial_state=h0, chunk_size=16)
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), h0)
    rh0 = tuple(h.detach().double().requires_grad_() for h in h0)
    ro, _ = reference(x, sizes, K, 8.0, None, rh0, None)
    rgrads = torch.autograd.grad((ro * do.double()).sum(), rh0)
    assert_rel("o", o, ro, TOL)
    for name, a, r in zip(("dhk0", "dhv0"), grads, rgrads):
        assert_rel(name, a, r, TOL)


def test_bad_arguments():
    x = torch.randn(2, 5, 4 * 8 + 2 * 8 + 2 * 8 + 2 * 4, device=DEVICE)
    sizes = (32, 16, 16, 8)
    with pytest.raises(ValueError, match="x must have shape"):
        chunk_gsa_projected(x[..., :-1], sizes, 8)
    with pytest.raises(ValueError, match="sizes must be four positive ints"):
        chunk_gsa_projected(x, (32, 16, 24), 8)
    with pytest.raises(ValueError, match="multiples of head_dim"):
        chunk_gsa_projected(x, sizes, 12)
    with pytest.raises(ValueError, match="multiples of the key/value heads"):
        chunk_gsa_projected(torch.randn(2, 5, 32 + 16 + 15 + 9, device=DEVICE), (32, 16, 15, 9), 8)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        chunk_gsa_projected(x, sizes, 0)
