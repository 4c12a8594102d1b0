"""``chunk_linear_attn`` against the float64 step-by-step reference.

On CPU tensors the public op runs the PyTorch chunked backend (``chunk_torch``); the cases marked
``triton`` are small enough to run the Triton kernels too (``TRITON_INTERPRET=1 pytest -m triton``, or a GPU).
Every case checks the output, the final state and the gradients of every input, with a gradient flowing
into the final state as well as into the output.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_rel, log_gates

from fla_gsa.ops.common.chunk import chunk_linear_attn
from fla_gsa.ops.common.naive import naive_recurrent_linear_attn
from fla_gsa.ops.utils.backend import use_triton

# One tolerance for outputs, states and every gradient. The loosest quantity is the gate gradient with
# strong gates (tau = 0.1): a sum of cancelling terms whose exponents are differences of fp32
# within-chunk cumsums of size ~100s (ulp ~1e-5), measured at 1e-5 .. 3e-5 relative.
FP32_TOL = 1e-4


def make_inputs(B, T, HQ, H, K, V, gates="both", tau=1.0, h0=True, N=None, dtype=torch.float32):
    """Fresh random leaf tensors by argument name; ``gates`` is ``"gk" | "gv" | "both" | "none"``, drawn
    as ``log_gates(tau=tau)``."""
    def gate(*shape):
        return log_gates(*shape, tau=tau, dtype=dtype, device=DEVICE)

    N = B if N is None else N
    x = dict(
        q=torch.randn(B, T, HQ, K, dtype=dtype, device=DEVICE),
        k=torch.randn(B, T, H, K, dtype=dtype, device=DEVICE),
        v=torch.randn(B, T, H, V, dtype=dtype, device=DEVICE),
        gk=gate(B, T, H, K) if gates in ("gk", "both") else None,
        gv=gate(B, T, H, V) if gates in ("gv", "both") else None,
        initial_state=torch.randn(N, H, K, V, dtype=torch.float32, device=DEVICE) if h0 else None,
    )
    return {n: t.requires_grad_() if t is not None else None for n, t in x.items()}


def run(fn, inputs, do, dht, **kw):
    """Forward, then backward of ``(o * do).sum() + (ht * dht).sum()``; returns ``(o, ht, grads)``."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    full = {n: leaves.get(n) for n in inputs}
    o, ht = fn(**full, output_final_state=True, **kw)
    loss = (o.to(do.dtype) * do).sum() + (ht * dht).sum()
    loss.backward()
    return o, ht, {n: t.grad for n, t in leaves.items()}


def check(inputs, tol=FP32_TOL, grad_tol=FP32_TOL, cu_seqlens=None, **kw):
    """Compare the chunked op on ``inputs`` with the reference run on float64 copies of them."""
    B, T, HQ, _ = inputs["q"].shape
    V = inputs["v"].shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    H, K = inputs["k"].shape[2:]
    do = torch.randn(B, T, HQ, V, device=DEVICE)
    dht = torch.randn(N, H, K, V, device=DEVICE)

    o, ht, grads = run(chunk_linear_attn, inputs, do, dht, cu_seqlens=cu_seqlens, **kw)
    ref64 = {n: t.detach().double() if t is not None else None for n, t in inputs.items()}
    ro, rht, rgrads = run(naive_recurrent_linear_attn, ref64, do.double(), dht.double(), cu_seqlens=cu_seqlens)

    assert o.dtype == inputs["v"].dtype and ht.dtype == torch.float32
    assert_rel("o", o, ro, tol)
    assert_rel("final_state", ht, rht, tol)
    for n, ref in rgrads.items():
        assert grads[n].dtype == inputs[n].dtype, n
        assert_rel(f"d{n}", grads[n], ref, grad_tol)


@pytest.mark.parametrize("gates", [
    pytest.param("gk", marks=pytest.mark.triton),
    pytest.param("gv", marks=pytest.mark.triton),
    pytest.param("both", marks=pytest.mark.triton),
    pytest.param("none", marks=pytest.mark.triton),
])
def test_gate_modes(gates):
    check(make_inputs(2, 100, 2, 2, 32, 32, gates=gates))


@pytest.mark.parametrize("T", [
    pytest.param(1, marks=pytest.mark.triton),
    63,
    64,
    pytest.param(130, marks=pytest.mark.triton),
    257,
])
def test_lengths(T):
    # T not a multiple of the chunk (and T < one chunk, T = 1); 257 spans five chunks.
    check(make_inputs(1, T, 2, 2, 16, 32, gates="both"))


@pytest.mark.triton
def test_odd_dims_gqa():
    # Non-power-of-two K and V, GQA (each key/value head serves two query heads).
    check(make_inputs(1, 100, 4, 2, 20, 36, gates="both"))


@pytest.mark.parametrize("gates", ["gk", "gv", "none"])
def test_gqa(gates):
    check(make_inputs(2, 70, 6, 2, 16, 24, gates=gates))


@pytest.mark.parametrize("gates", [pytest.param("both", marks=pytest.mark.triton), "gk", "gv"])
def test_varlen(gates):
    # A length-1 sequence, lengths not multiples of the chunk, one initial state per sequence, GQA.
    cu_seqlens = torch.tensor([0, 1, 40, 97], dtype=torch.int32, device=DEVICE)
    check(make_inputs(1, 97, 4, 2, 20, 36, gates=gates, N=3), cu_seqlens=cu_seqlens)


def test_varlen_equals_separate_calls():
    # Packing must not leak state between sequences: each sequence alone gives the same result.
    cu = [0, 5, 70, 200]
    x = make_inputs(1, 200, 2, 2, 16, 16, gates="both", N=3)
    o, ht = chunk_linear_attn(**x, output_final_state=True, cu_seqlens=torch.tensor(cu, device=DEVICE))
    for n in range(3):
        bos, eos = cu[n], cu[n + 1]
        part = {name: t[:, bos:eos] for name, t in x.items() if name != "initial_state"}
        o_n, ht_n = chunk_linear_attn(**part, initial_state=x["initial_state"][n:n + 1], output_final_state=True)
        assert_rel(f"o[{n}]", o[:, bos:eos], o_n, 1e-6)
        assert_rel(f"ht[{n}]", ht[n:n + 1], ht_n, 1e-6)


@pytest.mark.parametrize("tau", [pytest.param(0.1, marks=pytest.mark.triton), 1.0, 16.0])
def test_gate_strength(tau):
    # tau = 0.1: strong gates (exp(-G) over a chunk would overflow fp32); tau = 16: weak ones, the state
    # carries across chunks.
    check(make_inputs(1, 130, 2, 2, 32, 32, gates="both", tau=tau))


@pytest.mark.parametrize("gates", ["gk", "gv", pytest.param("both", marks=pytest.mark.triton)])
def test_extreme_gates(gates):
    # g = -20 every step: exp(-G) reaches exp(1280) inside a chunk. Outputs and every gradient must stay
    # finite and match, including the gate gradients, whose true size is ~exp(-20).
    x = make_inputs(1, 100, 2, 2, 16, 16, gates=gates)
    x = {n: (torch.full_like(t, -20.0).requires_grad_() if n in ("gk", "gv") and t is not None else t)
         for n, t in x.items()}
    check(x)


def test_long_strong_gates():
    # Many chunks with strong gates: the chunk scan and the per-chunk normalization stay finite.
    check(make_inputs(1, 1000, 1, 1, 16, 16, gates="both", tau=0.1))


@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_chunk_sizes(chunk_size):
    check(make_inputs(1, 150, 2, 1, 16, 16, gates="both"), chunk_size=chunk_size)


def test_no_states():
    x = make_inputs(2, 40, 2, 2, 16, 16, gates="gk", h0=False)
    o, ht = chunk_linear_attn(**x)
    ro, _ = naive_recurrent_linear_attn(**{n: t.detach().double() if t is not None else None for n, t in x.items()})
    assert ht is None
    assert_rel("o", o, ro, FP32_TOL)


def test_float64_is_exact():
    # float64 inputs run the whole algorithm in float64: it matches the reference to rounding.
    x = make_inputs(1, 100, 2, 1, 16, 20, gates="both", tau=0.1, dtype=torch.float64)
    o, ht = chunk_linear_attn(**x, output_final_state=True)
    ro, rht = naive_recurrent_linear_attn(**{n: t.detach().double() for n, t in x.items()}, output_final_state=True)
    assert o.dtype == torch.float64 and ht.dtype == torch.float64
    assert_rel("o", o, ro, 1e-12)
    assert_rel("final_state", ht, rht, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    # Half-precision inputs: o comes back in the input dtype, the state in fp32. The PyTorch backend
    # computes in fp32 (1e-4); the kernels multiply in the input precision on the tensor cores, where
    # DESIGN's half-precision bar (1e-2) applies.
    x = make_inputs(1, 100, 2, 2, 16, 16, gates="both", dtype=dtype)
    fp32_tol = 1e-2 if use_triton(x["q"]) else 1e-4
    o, ht = chunk_linear_attn(**x, output_final_state=True)
    ro, rht = naive_recurrent_linear_attn(**{n: t.detach().double() for n, t in x.items()}, output_final_state=True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_rel("o", o, ro, 1e-2)
    assert_rel("final_state", ht, rht, fp32_tol)
    o, _ = chunk_linear_attn(**x, output_dtype=torch.float32)
    assert o.dtype == torch.float32
    assert_rel("o fp32", o, ro, fp32_tol)


def test_inputs_not_modified():
    x = make_inputs(1, 70, 2, 2, 16, 16, gates="both")
    before = {n: t.detach().clone() for n, t in x.items()}
    o, ht = chunk_linear_attn(**x, output_final_state=True)
    (o.sum() + ht.sum()).backward()
    for n, t in x.items():
        assert torch.equal(t.detach(), before[n]), f"{n} was modified"
