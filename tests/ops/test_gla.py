"""GLA ops and the gate cumsums: thin compositions over the generic primitives (tested in depth in
test_chunk_torch.py and test_fused_recurrent.py); here the names, their argument checks, the agreement
of chunk / recurrent / reference, and the state hand-over between them."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_rel, log_gates

from fla_gsa.ops import (chunk_gla, chunk_global_cumsum, chunk_local_cumsum, fused_recurrent_gla,
                         naive_recurrent_gla)
from fla_gsa.ops.utils.cumsum import cumsum_fwd, decay_fwd


def inputs(B=2, T=50, HQ=2, H=2, K=20, V=36, tau=1.0):
    return (torch.randn(B, T, HQ, K, device=DEVICE), torch.randn(B, T, H, K, device=DEVICE),
            torch.randn(B, T, H, V, device=DEVICE), log_gates(B, T, H, K, tau=tau))


@pytest.mark.triton
@pytest.mark.parametrize("tau", [0.1, 16.0])
def test_chunk_recurrent_reference_agree(tau):
    q, k, v, g = inputs(tau=tau)
    h0 = torch.randn(2, 2, 20, 36, device=DEVICE)
    o1, h1 = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=16)
    o2, h2 = fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, output_final_state=True)
    ro, rh = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), initial_state=h0.double(),
                                 output_final_state=True)
    for name, x, r in [("chunk o", o1, ro), ("chunk ht", h1, rh), ("recurrent o", o2, ro), ("recurrent ht", h2, rh)]:
        assert_rel(name, x, r, 1e-5)


@pytest.mark.triton
def test_prefill_then_recurrent():
    q, k, v, g = inputs(T=40)
    o, ht = chunk_gla(q, k, v, g, output_final_state=True, chunk_size=16)
    o1, h1 = chunk_gla(q[:, :25], k[:, :25], v[:, :25], g[:, :25], output_final_state=True, chunk_size=16)
    o2, h2 = fused_recurrent_gla(q[:, 25:], k[:, 25:], v[:, 25:], gk=g[:, 25:], initial_state=h1,
                                 output_final_state=True)
    assert_rel("o", torch.cat([o1, o2], 1), o, 1e-5)
    assert_rel("ht", h2, ht, 1e-5)


def test_gla_checks_name_the_gate():
    q, k, v, g = inputs()
    with pytest.raises(TypeError, match="g .*required"):
        chunk_gla(q, k, v, None)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H, K\]"):
        chunk_gla(q, k, v, g[..., :5])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\]"):
        chunk_gla(q, k, v, g, initial_state=torch.zeros(2, 2, 36, 20))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gla(q, k, v, g, chunk_size=48)


def _cumsum_ref(g, chunk, reverse, cu):
    out = torch.empty_like(g, dtype=torch.float64)
    bounds = [(0, g.shape[1])] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    for bos, eos in bounds:
        for c0 in range(bos, eos, chunk or (eos - bos)):
            c1 = min(c0 + (chunk or (eos - bos)), eos)
            x = g[:, c0:c1].double()
            out[:, c0:c1] = x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1)
    return out


@pytest.mark.triton
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_cumsums(reverse, scalar, varlen):
    B = 1 if varlen else 2
    shape = (B, 83, 3) if scalar else (B, 83, 3, 20)
    g = log_gates(*shape).requires_grad_()
    cu = torch.tensor([0, 1, 50, 83], device=DEVICE) if varlen else None
    loc = chunk_local_cumsum(g, 16, reverse=reverse, cu_seqlens=cu)
    glob = chunk_global_cumsum(g, reverse=reverse, cu_seqlens=cu, scale=0.5)
    assert loc.dtype == torch.float32 and loc.shape == g.shape
    assert_rel("local", loc, _cumsum_ref(g.detach(), 16, reverse, cu), 1e-6)
    assert_rel("global", glob, 0.5 * _cumsum_ref(g.detach(), None, reverse, cu), 1e-6)
    # gradient of a (reverse) cumsum is the opposite cumsum of the incoming gradient
    dy = torch.randn_like(loc)
    (loc * dy).sum().backward()
    assert_rel("dg", g.grad, _cumsum_ref(dy, 16, not reverse, cu), 1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("strong", [False, True])
def test_cumsum_decays(varlen, strong):
    # the scans' pre-decayed inputs: x * e^{G_L - G} with the in-chunk cumsum (made with it), x * e^G with
    # query heads sharing a gate head (GQA)
    B = 1 if varlen else 2
    g = log_gates(B, 83, 2, 20) - (19.5 if strong else 0)
    x = torch.randn(B, 83, 2, 20, device=DEVICE)
    cu = torch.tensor([0, 1, 50, 83], device=DEVICE) if varlen else None
    G, xd = cumsum_fwd(g, 16, cu_seqlens=cu, decay=x)
    ref = _cumsum_ref(g, 16, False, cu)
    last = torch.empty_like(ref)
    bounds = [(0, 83)] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    for bos, eos in bounds:
        for c0 in range(bos, eos, 16):
            c1 = min(c0 + 16, eos)
            last[:, c0:c1] = ref[:, c1 - 1:c1]
    assert_rel("G", G, ref, 1e-6)
    assert xd.dtype == x.dtype
    assert_rel("x decayed to the chunk end", xd, x.double() * (last - ref).exp(), 1e-6)
    _, xh = cumsum_fwd(g, 16, cu_seqlens=cu, decay=x, decay_dtype=torch.bfloat16)
    assert xh.dtype == torch.bfloat16
    assert_rel("in bf16", xh, x.double() * (last - ref).exp(), 1e-2)
    xq = torch.randn(B, 83, 4, 20, device=DEVICE)  # 4 query heads on the 2 gate heads
    y = decay_fwd(xq, G, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == xq.shape
    assert_rel("x * e^G", y, xq.double() * ref.repeat_interleave(2, dim=2).exp(), 1e-2)
    with pytest.raises(ValueError, match="decay needs chunk_size"):
        cumsum_fwd(g, None, decay=x)


def test_cumsum_checks():
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_local_cumsum(torch.zeros(1, 4, 1, 2), 20)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\]"):
        chunk_local_cumsum(torch.zeros(4, 2), 16)
    with pytest.raises(TypeError, match="output_dtype"):
        chunk_local_cumsum(torch.zeros(1, 4, 1, 2), 16, output_dtype=torch.int32)
