"""fused_gsa_decode against a float64 step of the GSA formulas and against GSA as two gated linear
attention passes joined by a softmax. Cases marked ``triton`` also run the kernel under
``TRITON_INTERPRET=1``."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_rel, log_gates

from fla_gsa.ops.common.naive import naive_recurrent_linear_attn
from fla_gsa.ops import fused_recurrent_gsa
from fla_gsa.ops.gsa.decode import fused_gsa_decode, plain_decode_args
from fla_gsa.ops.gsa.utils import check_gsa


def reference_step(q, k, v, s, g, scale, hk, hv):
    """One GSA step in float64, written out from the formulas, per batch row and query head."""
    q, k, v, s, g = (x.double()[:, 0] for x in (q, k, v, s, g))
    B, HQ, K = q.shape
    H, M, V = k.shape[1], s.shape[-1], v.shape[-1]
    G = HQ // H
    hk = q.new_zeros(B, H, K, M) if hk is None else hk.double().clone()
    hv = q.new_zeros(B, H, M, V) if hv is None else hv.double().clone()
    o = q.new_zeros(B, 1, HQ, V)
    for b in range(B):
        for h in range(H):
            a = g[b, h].exp()
            hk[b, h] = hk[b, h] * a[None, :] + torch.outer(k[b, h], s[b, h])
            hv[b, h] = hv[b, h] * a[:, None] + torch.outer(s[b, h], v[b, h])
        for i in range(HQ):
            p = torch.softmax(scale * hk[b, i // G].T @ q[b, i], dim=0)
            o[b, 0, i] = hv[b, i // G].T @ p
    return o, hk, hv


def make_step(B, HQ, H, K, V, M, tau=1.0, dtype=torch.float32):
    g = log_gates(B, 1, H, M, tau=tau, dtype=dtype)
    return dict(
        q=torch.randn(B, 1, HQ, K, dtype=dtype, device=DEVICE),
        k=torch.randn(B, 1, H, K, dtype=dtype, device=DEVICE),
        v=torch.randn(B, 1, H, V, dtype=dtype, device=DEVICE),
        s=1 - g.exp(), g=g,
    )


@pytest.mark.triton
@pytest.mark.parametrize("B, HQ, H, K, V, M", [(2, 4, 2, 20, 36, 20), (1, 2, 2, 16, 16, 64), (2, 3, 1, 32, 24, 7)])
def test_consecutive_steps(B, HQ, H, K, V, M):
    hk = hv = ref_hk = ref_hv = None
    for step in range(4):
        x = make_step(B, HQ, H, K, V, M)
        o, (hk, hv) = fused_gsa_decode(**x, hk=hk, hv=hv)
        ref_o, ref_hk, ref_hv = reference_step(**x, scale=K ** -0.5, hk=ref_hk, hv=ref_hv)
        assert o.shape == (B, 1, HQ, V) and o.dtype == torch.float32
        assert hk.dtype == hv.dtype == torch.float32
        assert_rel(f"o (step {step})", o, ref_o, 1e-5)
        assert_rel(f"hk (step {step})", hk, ref_hk, 1e-5)
        assert_rel(f"hv (step {step})", hv, ref_hv, 1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("B", [130, 70])
def test_value_blocks_grouped(B):
    """Batches large enough that each program takes several value blocks (one group of 4 blocks at
    B=130, two groups of 2 at B=70, on the 128 SMs assumed off-GPU), V=200 leaving the last block
    partly masked."""
    from fla_gsa.ops.gsa.decode import _decode_config

    HQ, H, K, V, M = 4, 2, 16, 200, 16
    grid, meta = _decode_config(B, H, HQ // H, K, M, V, -1)
    assert meta["NVB"] > 1 and grid[0] * meta["NVB"] * meta["BV"] >= V
    x = make_step(B, HQ, H, K, V, M)
    hk0, hv0 = torch.randn(B, H, K, M, device=DEVICE), torch.randn(B, H, M, V, device=DEVICE)
    o, (hk, hv) = fused_gsa_decode(**x, hk=hk0, hv=hv0)
    ref_o, ref_hk, ref_hv = reference_step(**x, scale=K ** -0.5, hk=hk0, hv=hv0)
    assert_rel("o", o, ref_o, 1e-5)
    assert_rel("hk", hk, ref_hk, 1e-5)
    assert_rel("hv", hv, ref_hv, 1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("K, V, M", [(100, 130, 20), (16, 16, 200)])
def test_wide_dims(K, V, M):
    # K and V wider than one tile; M wider than 64 narrows the K/V tiles
    x = make_step(2, 2, 1, K, V, M)
    hk, hv = torch.randn(2, 1, K, M, device=DEVICE), torch.randn(2, 1, M, V, device=DEVICE)
    o, (hk_new, hv_new) = fused_gsa_decode(**x, scale=0.2, hk=hk, hv=hv)
    ref_o, ref_hk, ref_hv = reference_step(**x, scale=0.2, hk=hk, hv=hv)
    assert_rel("o", o, ref_o, 1e-5)
    assert_rel("hk", hk_new, ref_hk, 1e-5)
    assert_rel("hv", hv_new, ref_hv, 1e-5)


@pytest.mark.triton
def test_states_not_modified():
    x = make_step(2, 4, 2, 20, 36, 20)
    hk, hv = torch.randn(2, 2, 20, 20, device=DEVICE), torch.randn(2, 2, 20, 36, device=DEVICE)
    saved = {n: t.clone() for n, t in dict(x, hk=hk, hv=hv).items()}
    _, (hk_new, hv_new) = fused_gsa_decode(**x, hk=hk, hv=hv)
    assert hk_new.data_ptr() != hk.data_ptr() and hv_new.data_ptr() != hv.data_ptr()
    for name, t in dict(x, hk=hk, hv=hv).items():
        assert torch.equal(t, saved[name]), f"{name} was modified in place"


@pytest.mark.triton
def test_no_state_means_zeros():
    x = make_step(1, 2, 1, 16, 24, 20)
    o, (hk, hv) = fused_gsa_decode(**x)
    o0, (hk0, hv0) = fused_gsa_decode(**x, hk=torch.zeros_like(hk), hv=torch.zeros_like(hv))
    assert_rel("o", o, o0, 1e-6)
    assert_rel("hk", hk, hk0, 1e-6)
    assert_rel("hv", hv, hv0, 1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("tau", [0.1, 16.0])
def test_steps_equal_two_gla_passes(tau):
    # GSA over T steps = GLA(q, k, s; gv=g) -> softmax over slots -> GLA(p, s, v; gk=g, scale=1)
    B, T, HQ, H, K, V, M = 2, 6, 4, 2, 20, 24, 20
    steps = [make_step(B, HQ, H, K, V, M, tau=tau) for _ in range(T)]
    hk = hv = None
    outs = []
    for x in steps:
        o, (hk, hv) = fused_gsa_decode(**x, hk=hk, hv=hv)
        outs.append(o)
    q, k, v, s, g = (torch.cat([x[n] for x in steps], 1).double() for n in "qkvsg")
    ok, ref_hk = naive_recurrent_linear_attn(q, k, s, gv=g, output_final_state=True)
    ref_o, ref_hv = naive_recurrent_linear_attn(ok.softmax(-1), s, v, gk=g, scale=1.0, output_final_state=True)
    assert_rel("o", torch.cat(outs, 1), ref_o, 1e-5)
    assert_rel("hk", hk, ref_hk, 1e-5)
    assert_rel("hv", hv, ref_hv, 1e-5)


def test_bfloat16():
    x = make_step(2, 4, 2, 64, 64, 64, dtype=torch.bfloat16)
    hk, hv = torch.randn(2, 2, 64, 64, device=DEVICE), torch.randn(2, 2, 64, 64, device=DEVICE)
    o, (hk_new, hv_new) = fused_gsa_decode(**x, hk=hk, hv=hv)
    ref_o, ref_hk, ref_hv = reference_step(**x, scale=64 ** -0.5, hk=hk, hv=hv)
    assert o.dtype == torch.bfloat16 and hk_new.dtype == hv_new.dtype == torch.float32
    assert_rel("o", o, ref_o, 1e-2)
    assert_rel("hk", hk_new, ref_hk, 1e-2)
    assert_rel("hv", hv_new, ref_hv, 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    x = make_step(2, 4, 2, 64, 64, 64)
    hk, hv = torch.randn(2, 2, 64, 64, device=DEVICE), torch.randn(2, 2, 64, 64, device=DEVICE)
    expected = fused_gsa_decode(**x, hk=hk, hv=hv)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, (hk_new, hv_new) = fused_gsa_decode(**x, hk=hk, hv=hv)
    graph.replay()
    torch.cuda.synchronize()
    assert_rel("o", o, expected[0], 1e-6)
    assert_rel("hk", hk_new, expected[1][0], 1e-6)
    assert_rel("hv", hv_new, expected[1][1], 1e-6)


def _bad(**changes):
    x = dict(make_step(2, 4, 2, 8, 12, 10), hk=torch.zeros(2, 2, 8, 10, device=DEVICE),
             hv=torch.zeros(2, 2, 10, 12, device=DEVICE))
    x.update(changes)
    return x


BAD_INPUTS = [
    ("two tokens", lambda: _bad(q=torch.randn(2, 2, 4, 8, device=DEVICE), k=torch.randn(2, 2, 2, 8, device=DEVICE),
                                v=torch.randn(2, 2, 2, 12, device=DEVICE)), ValueError, r"one token.*\[B, 1, HQ, K\]"),
    ("k head dim", lambda: _bad(k=torch.randn(2, 1, 2, 9, device=DEVICE)), ValueError, "k must have shape"),
    ("s rank", lambda: _bad(s=torch.randn(2, 1, 2 * 10, device=DEVICE)), ValueError, "s must have 4 dimensions"),
    ("s heads", lambda: _bad(s=torch.randn(2, 1, 3, 10, device=DEVICE)), ValueError, "s must have shape"),
    ("g slots", lambda: _bad(g=torch.randn(2, 1, 2, 11, device=DEVICE)), ValueError,
     r"g must have shape \[B, 1, H, M\] = \(2, 1, 2, 10\)"),
    ("g missing", lambda: _bad(g=None), TypeError, "g must be a torch.Tensor"),
    ("hk shape", lambda: _bad(hk=torch.zeros(2, 2, 10, 8, device=DEVICE)), ValueError,
     r"hk must have shape \[B, H, K, M\] = \(2, 2, 8, 10\)"),
    ("hv shape", lambda: _bad(hv=torch.zeros(2, 2, 12, 10, device=DEVICE)), ValueError, "hv must have shape"),
    ("hv alone", lambda: _bad(hk=None), ValueError, "hk and hv must be given together"),
    ("integer v", lambda: _bad(v=torch.ones(2, 1, 2, 12, dtype=torch.int32, device=DEVICE)), TypeError,
     "v must be a floating-point"),
    ("integer hk", lambda: _bad(hk=torch.zeros(2, 2, 8, 10, dtype=torch.int64, device=DEVICE)), TypeError,
     "hk must be a floating-point"),
]


@pytest.mark.triton
@pytest.mark.parametrize("name, build, exc, match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(name, build, exc, match):
    with pytest.raises(exc, match=match):
        fused_gsa_decode(**build())


# -- fused_recurrent_gsa's plain decoding step: a short filter in place of the full checks ------------

def _plain_call(B=2, HQ=4, H=2, K=8, V=12, M=10, dtype=torch.float32, **changes):
    x = make_step(B, HQ, H, K, V, M, dtype=dtype)
    x = dict(x, scale=None, initial_state=(torch.randn(B, H, K, M, device=DEVICE), torch.randn(B, H, M, V, device=DEVICE)))
    x.update(changes)
    return x


@pytest.mark.parametrize("case", [dict(), dict(scale=0.3), dict(dtype=torch.bfloat16), dict(HQ=2, H=2),
                                  dict(B=1, HQ=6, H=3)], ids=["default", "scale", "bf16", "mha", "gqa3"])
def test_plain_decode_args_match_the_full_checks(case):
    x = _plain_call(**case)
    plain = plain_decode_args(**x)
    _, scale, hk, hv = check_gsa(x["q"], x["k"], x["v"], x["s"], x["g"], x["scale"], x["initial_state"], None)
    assert plain is not None
    assert plain[0] == scale and plain[1] is hk and plain[2] is hv


class _Sub(torch.Tensor):
    pass


# calls the filter must leave to the full path: bad ones (the full checks raise) and good ones it does
# not cover (the general path runs them)
NOT_PLAIN = [
    ("k head dim", dict(k=torch.randn(2, 1, 2, 9, device=DEVICE)), ValueError),
    ("k batch", dict(k=torch.randn(1, 1, 2, 8, device=DEVICE)), ValueError),
    ("v rank", dict(v=torch.randn(2, 1, 24, device=DEVICE)), ValueError),
    ("s heads", dict(s=torch.randn(2, 1, 3, 10, device=DEVICE)), ValueError),
    ("g slots", dict(g=torch.randn(2, 1, 2, 11, device=DEVICE)), ValueError),
    ("hk shape", dict(initial_state=(torch.zeros(2, 2, 10, 8, device=DEVICE), torch.zeros(2, 2, 10, 12, device=DEVICE))),
     ValueError),
    ("hv batch", dict(initial_state=(torch.zeros(2, 2, 8, 10, device=DEVICE), torch.zeros(1, 2, 10, 12, device=DEVICE))),
     ValueError),
    ("integer v", dict(v=torch.ones(2, 1, 2, 12, dtype=torch.int32, device=DEVICE)), TypeError),
    ("integer hk", dict(initial_state=(torch.zeros(2, 2, 8, 10, dtype=torch.int64, device=DEVICE),
                                       torch.zeros(2, 2, 10, 12, device=DEVICE))), TypeError),
    ("state not a pair", dict(initial_state=torch.zeros(2, 2, 8, 10, device=DEVICE)), TypeError),
    ("state of three", dict(initial_state=(torch.zeros(2, 2, 8, 10, device=DEVICE),) * 3), TypeError),
    ("heads not a multiple", dict(q=torch.randn(2, 1, 3, 8, device=DEVICE)), ValueError),
    ("non-contiguous q", dict(q=torch.randn(2, 1, 8, 4, device=DEVICE).transpose(2, 3)), None),
    ("integer scale", dict(scale=1), None),
    ("q needs grad", dict(q=torch.randn(2, 1, 4, 8, device=DEVICE, requires_grad=True)), None),
    ("q a subclass", dict(q=torch.randn(2, 1, 4, 8, device=DEVICE).as_subclass(_Sub)), None),
]
if torch.cuda.is_available():
    NOT_PLAIN.append(("hv on the CPU", dict(initial_state=(torch.zeros(2, 2, 8, 10, device=DEVICE),
                                                           torch.zeros(2, 2, 10, 12))), ValueError))


@pytest.mark.parametrize("name, changes, exc", NOT_PLAIN, ids=[c[0] for c in NOT_PLAIN])
def test_not_plain_calls_take_the_full_path(name, changes, exc):
    x = _plain_call(**changes)
    assert plain_decode_args(**x) is None
    if exc is not None:
        with pytest.raises(exc):
            fused_recurrent_gsa(**x)
        return
    # a good call the filter does not cover: the general path gives the step's result
    o, (hk, hv) = fused_recurrent_gsa(**x, output_final_state=True)
    q = x["q"].detach().contiguous() if isinstance(x["q"], torch.Tensor) else x["q"]
    ref_o, ref_hk, ref_hv = reference_step(q.as_subclass(torch.Tensor), x["k"], x["v"], x["s"], x["g"],
                                           float(x["scale"] or 8 ** -0.5), *x["initial_state"])
    assert_rel("o", o, ref_o, 1e-5)
    assert_rel("hk", hk, ref_hk, 1e-5)
    assert_rel("hv", hv, ref_hv, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct launch exists on the GPU only")
def test_direct_launch_equals_the_lean_launch():
    from fla_gsa.ops.gsa import decode as D
    from fla_gsa.ops.utils.launch import LeanKernel

    assert isinstance(D.fused_gsa_decode_kernel, LeanKernel)
    D._steps.clear()
    x = _plain_call(B=3, HQ=4, H=2, K=64, V=96, M=20, dtype=torch.bfloat16)
    first = fused_recurrent_gsa(**x, output_final_state=True)  # through the lean launcher: records the entry
    (key, step), = D._steps.items()
    assert step[2] is not None
    calls = []
    real = D.fused_gsa_decode_kernel.launch
    D.fused_gsa_decode_kernel.launch = lambda *a: calls.append(a) or real(*a)
    try:
        second = fused_recurrent_gsa(**x, output_final_state=True)  # direct
        assert calls == []
        # a pointer off the 16-byte grid goes through the lean launcher again
        q_off = torch.empty(x["q"].numel() + 1, dtype=x["q"].dtype, device=DEVICE)[1:].view_as(x["q"]).copy_(x["q"])
        third = fused_recurrent_gsa(**dict(x, q=q_off), output_final_state=True)
        assert len(calls) == 1
    finally:
        D.fused_gsa_decode_kernel.launch = real
    for a, b, c in zip((first[0], *first[1]), (second[0], *second[1]), (third[0], *third[1])):
        assert torch.equal(a, b) and torch.equal(a, c)
