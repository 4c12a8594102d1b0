"""fused_recurrent_linear_attn against the float64 reference loop: outputs, final states and the
gradients of every input, over gate modes, GQA, odd lengths, non-power-of-two dims, varlen and gate
strengths. Cases marked ``triton`` also run the Triton kernels under ``TRITON_INTERPRET=1``."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_rel, log_gates

from fla_gsa.ops.common import fused_recurrent as fused_recurrent_module
from fla_gsa.ops.common.fused_recurrent import fused_recurrent_linear_attn
from fla_gsa.ops.common.naive import naive_recurrent_linear_attn

GRAD_NAMES = ("q", "k", "v", "gk", "gv", "initial_state")


def make_inputs(B, T, HQ, H, K, V, gate="both", tau=1.0, N=None, h0=True, dtype=torch.float32):
    gk = log_gates(B, T, H, K, tau=tau, dtype=dtype) if gate in ("gk", "both") else None
    gv = log_gates(B, T, H, V, tau=tau, dtype=dtype) if gate in ("gv", "both") else None
    return dict(
        q=torch.randn(B, T, HQ, K, dtype=dtype, device=DEVICE),
        k=torch.randn(B, T, H, K, dtype=dtype, device=DEVICE),
        v=torch.randn(B, T, H, V, dtype=dtype, device=DEVICE),
        gk=gk, gv=gv,
        initial_state=torch.randn(N or B, H, K, V, device=DEVICE) if h0 else None,
    )


def check_against_reference(inputs, tol=1e-4, output_final_state=True, **kwargs):
    """Run the op and the float64 reference on the same inputs; compare o, the final state and every
    input gradient of ``(o * do).sum() + (ht * dht).sum()``. Also checks the inputs are left unchanged."""
    originals = {n: x.clone() for n, x in inputs.items() if x is not None}
    leaves = {n: x.clone().requires_grad_() if x is not None else None for n, x in inputs.items()}
    refs = {n: x.detach().double().requires_grad_() if x is not None else None for n, x in inputs.items()}

    o, ht = fused_recurrent_linear_attn(**leaves, output_final_state=output_final_state, **kwargs)
    ref_o, ref_ht = naive_recurrent_linear_attn(**refs, output_final_state=output_final_state, **kwargs)
    do = torch.randn_like(o)
    loss, ref_loss = (o * do).sum(), (ref_o * do.double()).sum()
    assert_rel("o", o, ref_o, tol)
    if output_final_state:
        assert ht.dtype == torch.float32
        assert_rel("final_state", ht, ref_ht, tol)
        dht = torch.randn_like(ht)
        loss, ref_loss = loss + (ht * dht).sum(), ref_loss + (ref_ht * dht.double()).sum()
    else:
        assert ht is None
    loss.backward()
    ref_loss.backward()
    for name in GRAD_NAMES:
        if leaves.get(name) is not None:
            assert_rel(f"d{name}", leaves[name].grad, refs[name].grad, tol)
    for name, x in originals.items():
        assert torch.equal(inputs[name], x), f"{name} was modified in place"
    return o, ht


@pytest.mark.triton
@pytest.mark.parametrize("gate", ["none", "gk", "gv", "both"])
def test_gate_modes(gate):
    check_against_reference(make_inputs(2, 9, 4, 2, 20, 36, gate=gate))


@pytest.mark.triton
@pytest.mark.parametrize("B, T, HQ, H, K, V", [(1, 1, 2, 2, 16, 16), (2, 13, 2, 1, 36, 20), (1, 24, 1, 1, 64, 64)])
def test_shapes(B, T, HQ, H, K, V):
    check_against_reference(make_inputs(B, T, HQ, H, K, V), scale=0.3)


@pytest.mark.parametrize("B, T, HQ, H, K, V", [(2, 50, 6, 3, 100, 72), (1, 37, 2, 2, 128, 128), (3, 5, 8, 1, 7, 130)])
def test_shapes_large(B, T, HQ, H, K, V):
    check_against_reference(make_inputs(B, T, HQ, H, K, V))


@pytest.mark.triton
@pytest.mark.parametrize("gate", ["gk", "both"])
def test_state_split_over_blocks(gate, monkeypatch):
    # 16-wide tiles split K = 20 into 2 blocks and V = 36 into 3, so partial outputs and gradients
    # are reduced across programs, at interpreter-friendly sizes.
    monkeypatch.setattr(fused_recurrent_module, "MAX_BLOCK", 16)
    cu_seqlens = torch.tensor([0, 1, 6, 10], dtype=torch.int32, device=DEVICE)
    check_against_reference(make_inputs(1, 10, 2, 1, 20, 36, gate=gate, N=3), cu_seqlens=cu_seqlens)


@pytest.mark.triton
@pytest.mark.parametrize("gate", ["gk", "gv", "both"])
def test_varlen(gate):
    # includes a length-1 sequence; every sequence starts from its own initial state
    cu_seqlens = torch.tensor([0, 1, 7, 12], dtype=torch.int64, device=DEVICE)
    check_against_reference(make_inputs(1, 12, 4, 2, 20, 36, gate=gate, N=3), cu_seqlens=cu_seqlens)


def test_varlen_equals_separate_calls():
    cu = [0, 5, 6, 23]
    x = make_inputs(1, 23, 2, 1, 16, 24, N=3)
    o, ht = fused_recurrent_linear_attn(**x, output_final_state=True,
                                        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEVICE))
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        part = {name: t[:, a:b] for name, t in x.items() if name != "initial_state"}
        o_n, ht_n = fused_recurrent_linear_attn(**part, initial_state=x["initial_state"][n:n + 1],
                                                output_final_state=True)
        assert_rel(f"o[{n}]", o[:, a:b], o_n, 1e-6)
        assert_rel(f"ht[{n}]", ht[n:n + 1], ht_n, 1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("tau", [0.1, 1.0, 16.0])
def test_gate_strength(tau):
    o, ht = check_against_reference(make_inputs(1, 32, 2, 1, 32, 32, tau=tau))
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()


@pytest.mark.parametrize("tau", [0.1, 16.0])
def test_long_sequence(tau):
    check_against_reference(make_inputs(1, 300, 2, 1, 32, 32, tau=tau))


@pytest.mark.triton
def test_without_states():
    # no initial state, no final state: gradients come from o alone
    check_against_reference(make_inputs(2, 9, 2, 1, 20, 16, h0=False), output_final_state=False)


@pytest.mark.triton
def test_final_state_only_loss():
    # o unused: its gradient reaches backward as None
    x = make_inputs(2, 7, 4, 2, 16, 20)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    refs = {n: t.double().requires_grad_() for n, t in x.items()}
    _, ht = fused_recurrent_linear_attn(**leaves, output_final_state=True)
    _, ref_ht = naive_recurrent_linear_attn(**refs, output_final_state=True)
    dht = torch.randn_like(ht)
    (ht * dht).sum().backward()
    (ref_ht * dht.double()).sum().backward()
    # q only reaches o, so its gradient is zero (None where autograd never reached it)
    assert leaves["q"].grad is None or not leaves["q"].grad.any()
    for name in GRAD_NAMES[1:]:
        assert_rel(f"d{name}", leaves[name].grad, refs[name].grad, 1e-4)


def test_bfloat16():
    x = make_inputs(2, 40, 4, 2, 32, 48, dtype=torch.bfloat16)
    x["initial_state"] = x["initial_state"].float()
    o, ht = fused_recurrent_linear_attn(**x, output_final_state=True)
    ref_o, ref_ht = naive_recurrent_linear_attn(**{n: t.double() for n, t in x.items()}, output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert_rel("o", o, ref_o, 1e-2)
    assert_rel("final_state", ht, ref_ht, 1e-2)
    o32, _ = fused_recurrent_linear_attn(**x, output_dtype=torch.float32)
    assert o32.dtype == torch.float32
    assert_rel("o (float32 output)", o32, ref_o, 1e-2)


def _bad(**changes):
    x = make_inputs(2, 5, 4, 2, 8, 12, N=2)
    x.update(changes)
    return x


BAD_INPUTS = [
    ("q rank", lambda: _bad(q=torch.randn(2, 5, 4 * 8, device=DEVICE)), ValueError, "q must have 4 dimensions"),
    ("k head dim", lambda: _bad(k=torch.randn(2, 5, 2, 9, device=DEVICE)), ValueError, "k must have shape"),
    ("v length", lambda: _bad(v=torch.randn(2, 6, 2, 12, device=DEVICE)), ValueError, "v must have shape"),
    ("GQA ratio", lambda: _bad(q=torch.randn(2, 5, 3, 8, device=DEVICE)), ValueError, "multiple"),
    ("gk shape", lambda: _bad(gk=torch.randn(2, 5, 2, 12, device=DEVICE)), ValueError, "gk must have shape"),
    ("gv shape", lambda: _bad(gv=torch.randn(2, 5, 2, 8, device=DEVICE)), ValueError, "gv must have shape"),
    ("state shape", lambda: _bad(initial_state=torch.randn(2, 2, 12, 8, device=DEVICE)), ValueError,
     "initial_state must have shape"),
    ("integer q", lambda: _bad(q=torch.ones(2, 5, 4, 8, dtype=torch.int64, device=DEVICE)), TypeError,
     "q must be a floating-point"),
    ("integer gk", lambda: _bad(gk=torch.zeros(2, 5, 2, 8, dtype=torch.int32, device=DEVICE)), TypeError,
     "gk must be a floating-point"),
]


@pytest.mark.triton
@pytest.mark.parametrize("name, build, exc, match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(name, build, exc, match):
    with pytest.raises(exc, match=match):
        fused_recurrent_linear_attn(**build())


BAD_CU_SEQLENS = [
    ([0, 3, 5], 2, ValueError, "batch size must be 1"),
    ([0, 3, 4], 1, ValueError, "cu_seqlens must start at 0 and end at T"),
    ([0, 3, 3, 5], 1, ValueError, "cu_seqlens must be strictly increasing"),
    ([0.0, 5.0], 1, TypeError, "cu_seqlens must have dtype"),
]


@pytest.mark.triton
@pytest.mark.parametrize("cu, B, exc, match", BAD_CU_SEQLENS)
def test_bad_cu_seqlens(cu, B, exc, match):
    x = make_inputs(B, 5, 2, 2, 8, 8, h0=False)
    with pytest.raises(exc, match=match):
        fused_recurrent_linear_attn(**x, cu_seqlens=torch.tensor(cu, device=DEVICE))


@pytest.mark.triton
def test_varlen_initial_state_per_sequence():
    x = make_inputs(1, 5, 2, 2, 8, 8, N=1)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\] = \(2, 2, 8, 8\)"):
        fused_recurrent_linear_attn(**x, cu_seqlens=torch.tensor([0, 2, 5], device=DEVICE))


@pytest.mark.triton
def test_bad_output_dtype():
    with pytest.raises(TypeError, match="output_dtype"):
        fused_recurrent_linear_attn(**make_inputs(1, 3, 1, 1, 8, 8), output_dtype=torch.int32)
