"""GSA and ABC ops (chunk, fused recurrent, one-token decode) against the float64 step-by-step reference.

Each case checks the output, both final states and the gradients of q, k, v, s, g and both initial
states, with gradients flowing into the final states too. Cases marked ``triton`` also run the Triton
kernels (under ``TRITON_INTERPRET=1`` on CPU, or on a GPU).
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, INTERPRET, assert_rel, log_gates

from fla_gsa.ops import chunk_abc, chunk_gsa, fused_recurrent_abc, fused_recurrent_gsa, naive_recurrent_gsa

TOL = 1e-4
OPS = {"chunk": chunk_gsa, "recurrent": fused_recurrent_gsa}


def make_inputs(B, T, HQ, H, K, V, M, tau=1.0, abc=False, N=None, h0=True, dtype=torch.float32):
    N = B if N is None else N
    g = None if abc else log_gates(B, T, H, M, tau=tau, dtype=dtype)
    # s is an independent input of the op (the layer ties it to g as 1 - exp(g))
    s = torch.randn(B, T, H, M, dtype=dtype, device=DEVICE) if abc else torch.rand(B, T, H, M, dtype=dtype, device=DEVICE)
    x = dict(
        q=torch.randn(B, T, HQ, K, dtype=dtype, device=DEVICE),
        k=torch.randn(B, T, H, K, dtype=dtype, device=DEVICE),
        v=torch.randn(B, T, H, V, dtype=dtype, device=DEVICE),
        s=s, g=g,
        hk0=torch.randn(N, H, K, M, device=DEVICE) if h0 else None,
        hv0=torch.randn(N, H, M, V, device=DEVICE) if h0 else None,
    )
    return {n: t.requires_grad_() if t is not None else None for n, t in x.items()}


def run(fn, x, do, dhk, dhv, **kw):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if t is not None}
    get = leaves.get
    h0 = (get("hk0"), get("hv0")) if "hk0" in leaves else None
    o, (hk, hv) = fn(get("q"), get("k"), get("v"), get("s"), get("g"), initial_state=h0, output_final_state=True,
                     **kw)
    ((o.to(do.dtype) * do).sum() + (hk * dhk).sum() + (hv * dhv).sum()).backward()
    return o, hk, hv, {n: t.grad for n, t in leaves.items()}


def check(fn, x, tol=TOL, cu_seqlens=None, **kw):
    B, T, HQ, K = x["q"].shape
    H, V, M = x["k"].shape[2], x["v"].shape[-1], x["s"].shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    do = torch.randn(B, T, HQ, V, device=DEVICE)
    dhk, dhv = torch.randn(N, H, K, M, device=DEVICE), torch.randn(N, H, M, V, device=DEVICE)
    o, hk, hv, grads = run(fn, x, do, dhk, dhv, cu_seqlens=cu_seqlens, **kw)
    ref = {n: t.detach().double() if t is not None else None for n, t in x.items()}
    ro, rhk, rhv, rgrads = run(naive_recurrent_gsa, ref, do.double(), dhk.double(), dhv.double(),
                               cu_seqlens=cu_seqlens)
    assert o.dtype == x["v"].dtype and hk.dtype == hv.dtype == torch.float32
    assert_rel("o", o, ro, tol)
    assert_rel("hk", hk, rhk, tol)
    assert_rel("hv", hv, rhv, tol)
    for n, r in rgrads.items():
        assert_rel(f"d{n}", grads[n], r, tol)


@pytest.mark.parametrize("mode", [pytest.param("chunk", marks=pytest.mark.triton),
                                  pytest.param("recurrent", marks=pytest.mark.triton)])
def test_gqa_odd_sizes(mode):
    # HQ = 2 H, T not a multiple of the chunk, K/V/M not powers of two (M = 20)
    check(OPS[mode], make_inputs(2, 45, 4, 2, 24, 20, 20), **({"chunk_size": 16} if mode == "chunk" else {}))


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 16.0])
def test_gate_strength(mode, tau):
    check(OPS[mode], make_inputs(1, 150, 2, 2, 32, 32, 16, tau=tau))


@pytest.mark.parametrize("mode", [pytest.param("chunk", marks=pytest.mark.triton), "recurrent"])
def test_abc(mode):
    # g=None: slot writes normalized by a running softmax over time
    check(OPS[mode], make_inputs(1, 40, 2, 1, 16, 16, 12, abc=True), **({"chunk_size": 16} if mode == "chunk" else {}))


def test_abc_names_and_normalization():
    x = make_inputs(1, 70, 2, 2, 16, 16, 8, abc=True, h0=False)
    args = [x[n].detach() for n in ("q", "k", "v", "s")]
    o1, _ = chunk_abc(*args)
    o2, _ = chunk_gsa(*args[:4], None)
    o3, _ = fused_recurrent_abc(*args)
    assert torch.equal(o1, o2)
    assert_rel("recurrent vs chunk", o3, o1, 1e-5)


@pytest.mark.parametrize("mode", [pytest.param("chunk", marks=pytest.mark.triton), "recurrent"])
@pytest.mark.parametrize("abc", [False, True])
def test_varlen(mode, abc):
    # a length-1 sequence, one initial state per sequence; ABC's normalizer restarts at each sequence
    cu = torch.tensor([0, 1, 23, 40], dtype=torch.int32, device=DEVICE)
    check(OPS[mode], make_inputs(1, 40, 2, 1, 16, 12, 10, N=3, abc=abc), cu_seqlens=cu,
          **({"chunk_size": 16} if mode == "chunk" else {}))


@pytest.mark.triton
@pytest.mark.parametrize("tau, varlen", [(0.1, False), (8.0, False), (1.0, True)])
def test_wide_programs(tau, varlen, monkeypatch):
    """Whole chunks with every column block per program (chunk_o's wide launches: pass V forward, both dk
    kernels and pass K's dq, where M <= 64 < K, V), forced at small sizes: GQA for the upper kernel's
    per-head scores, V past two column blocks and K past one, T not a multiple of the chunk."""
    from fla_gsa.ops.common import chunk_o
    from fla_gsa.ops.utils import precompile

    monkeypatch.setattr(chunk_o, "WIDE_MIN_PROGRAMS", 0)
    monkeypatch.setattr(precompile, "PARALLEL_COMPILE", False)  # its dry run would count the launches twice
    taken = []
    wide = chunk_o._wide
    monkeypatch.setattr(chunk_o, "_wide", lambda *a: taken.append(wide(*a)) or taken[-1])
    cu = torch.tensor([0, 19, 70, 93], dtype=torch.int32, device=DEVICE) if varlen else None
    B, N = (1, 3) if varlen else (2, 2)
    check(chunk_gsa, make_inputs(B, 93, 4, 2, 80, 144, 24, tau=tau, N=N), cu_seqlens=cu, chunk_size=32)
    if DEVICE.type == "cuda" or INTERPRET:
        assert taken.count(True) == 4, taken


@pytest.mark.parametrize("checkpoint_level", [0, 1])
def test_checkpoint_levels(checkpoint_level):
    check(chunk_gsa, make_inputs(2, 70, 2, 2, 16, 16, 8), checkpoint_level=checkpoint_level)


@pytest.mark.triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused-softmax", "torch-softmax"])
def test_no_states_no_gate_grad(fused, monkeypatch):
    # The kernel path's autograd function without initial or final states and with g a constant (no dg):
    # the slot softmax fused into the kernels (M = 20: masked columns in the row) or PyTorch's (more
    # slots than the fused limit); large logits (scale 4) so the softmax is far from uniform.
    from fla_gsa.ops.gsa import chunk as gsa_chunk

    if not fused:
        monkeypatch.setattr(gsa_chunk, "FUSED_SOFTMAX_MAX_SLOTS", 16)
    x = make_inputs(2, 45, 4, 2, 24, 20, 20, h0=False)
    x["g"] = x["g"].detach()
    leaves = [x[n] for n in "q k v s".split()]
    do = torch.randn(2, 45, 4, 20, device=DEVICE)
    o, st = chunk_gsa(*leaves, x["g"], scale=4.0, chunk_size=16)
    assert st is None
    grads = torch.autograd.grad((o * do).sum(), leaves)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ro, _ = naive_recurrent_gsa(*ref, x["g"].double(), scale=4.0)
    rgrads = torch.autograd.grad((ro * do.double()).sum(), ref)
    assert_rel("o", o, ro, TOL)
    for n, a, r in zip("qkvs", grads, rgrads):
        assert_rel(f"d{n}", a, r, TOL)


@pytest.mark.triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused-softmax", "torch-softmax"])
def test_softmax_fusion_paths(fused, monkeypatch):
    # every input's gradient, both states, through each softmax path
    from fla_gsa.ops.gsa import chunk as gsa_chunk

    if not fused:
        monkeypatch.setattr(gsa_chunk, "FUSED_SOFTMAX_MAX_SLOTS", 8)
    check(chunk_gsa, make_inputs(2, 45, 4, 2, 24, 20, 20), chunk_size=16)


@pytest.mark.triton
def test_split_state_carry():
    # chunk on a prefix, then recurrent from its final state == one chunk pass
    x = {n: t.detach() if t is not None else None for n, t in make_inputs(2, 37, 2, 1, 16, 16, 8, h0=False).items()}
    q, k, v, s, g = (x[n] for n in "q k v s g".split())
    o, (hk, hv) = chunk_gsa(q, k, v, s, g, output_final_state=True, chunk_size=16)
    t = 21
    o1, st = chunk_gsa(q[:, :t], k[:, :t], v[:, :t], s[:, :t], g[:, :t], output_final_state=True, chunk_size=16)
    o2, (hk2, hv2) = fused_recurrent_gsa(q[:, t:], k[:, t:], v[:, t:], s[:, t:], g[:, t:], initial_state=st,
                                         output_final_state=True)
    assert_rel("o (split)", torch.cat([o1, o2], 1), o, 1e-5)
    assert_rel("hk (split)", hk2, hk, 1e-5)
    assert_rel("hv (split)", hv2, hv, 1e-5)


@pytest.mark.triton
def test_decode_steps_equal_one_pass():
    # T one-token steps (fused decode kernel: no grad, T == 1) == one chunked pass
    x = {n: t.detach() if t is not None else None for n, t in make_inputs(2, 12, 4, 2, 16, 24, 20).items()}
    q, k, v, s, g = (x[n] for n in "q k v s g".split())
    o, (hk, hv) = chunk_gsa(q, k, v, s, g, initial_state=(x["hk0"], x["hv0"]), output_final_state=True, chunk_size=16)
    state = (x["hk0"].clone(), x["hv0"].clone())
    outs = []
    with torch.no_grad():
        for t in range(q.shape[1]):
            prev = tuple(h.clone() for h in state)
            ot, state = fused_recurrent_gsa(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], s[:, t:t + 1],
                                            g[:, t:t + 1], initial_state=state, output_final_state=True)
            outs.append(ot)
    assert torch.equal(prev[0], x["hk0"]) or t > 0  # states are returned anew, never written in place
    assert_rel("o (decode)", torch.cat(outs, 1), o, 1e-5)
    assert_rel("hk (decode)", state[0], hk, 1e-5)
    assert_rel("hv (decode)", state[1], hv, 1e-5)


@pytest.mark.triton
def test_decode_never_writes_caller_state():
    x = {n: t.detach() if t is not None else None for n, t in make_inputs(1, 1, 2, 2, 16, 16, 8).items()}
    hk0, hv0 = x["hk0"].clone(), x["hv0"].clone()
    with torch.no_grad():
        _, (hk, hv) = fused_recurrent_gsa(x["q"], x["k"], x["v"], x["s"], x["g"], initial_state=(x["hk0"], x["hv0"]),
                                          output_final_state=True)
    assert torch.equal(x["hk0"], hk0) and torch.equal(x["hv0"], hv0)
    assert hk.data_ptr() != x["hk0"].data_ptr() and hv.data_ptr() != x["hv0"].data_ptr()


def test_inputs_not_modified():
    x = make_inputs(1, 33, 2, 2, 16, 16, 8)
    before = {n: t.detach().clone() for n, t in x.items()}
    check(chunk_gsa, x)
    for n, t in x.items():
        assert torch.equal(t.detach(), before[n]), n


@pytest.mark.parametrize("mode", ["torch", pytest.param("kernels", marks=pytest.mark.triton)])
def test_bad_checkpoint_level(mode):
    # both paths of chunk_gsa reject it before any work (float64 runs the PyTorch path)
    x = make_inputs(1, 20, 2, 2, 16, 16, 8, dtype=torch.float64 if mode == "torch" else torch.float32)
    with pytest.raises(ValueError, match="checkpoint_level must be 0 or 1, got 2"):
        chunk_gsa(x["q"], x["k"], x["v"], x["s"], x["g"], checkpoint_level=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    x = make_inputs(2, 64, 2, 2, 32, 32, 16, dtype=dtype)
    ref = {n: t.detach().float() if t is not None else None for n, t in x.items()}
    o, _ = chunk_gsa(x["q"], x["k"], x["v"], x["s"], x["g"], initial_state=(x["hk0"], x["hv0"]))
    ro, _ = chunk_gsa(ref["q"], ref["k"], ref["v"], ref["s"], ref["g"], initial_state=(ref["hk0"], ref["hv0"]))
    assert o.dtype == dtype
    assert_rel("o (half vs fp32)", o, ro, 1e-2)


def _args(**over):
    x = {n: t.detach() if t is not None else None for n, t in make_inputs(2, 10, 4, 2, 8, 8, 4).items()}
    a = dict(q=x["q"], k=x["k"], v=x["v"], s=x["s"], g=x["g"])
    a.update(over)
    return a


@pytest.mark.parametrize("bad, err, match", [
    (dict(q=torch.randn(2, 10, 4)), ValueError, r"q must have 4 dimensions"),
    (dict(q=torch.randn(2, 10, 3, 8)), ValueError, r"multiple of the number of key/value heads"),
    (dict(k=torch.randn(2, 11, 2, 8)), ValueError, r"k must have shape"),
    (dict(v=torch.randn(2, 10, 3, 8)), ValueError, r"v must have shape"),
    (dict(s=torch.randn(2, 10, 2)), ValueError, r"s must have 4 dimensions"),
    (dict(g=torch.randn(2, 10, 2, 5)), ValueError, r"g must have shape \[B, T, H, M\]"),
    (dict(s=torch.ones(2, 10, 2, 4, dtype=torch.int64)), TypeError, r"s must be a floating-point tensor"),
    (dict(initial_state=torch.zeros(2, 2, 8, 4)), TypeError, r"initial_state must be a pair"),
    (dict(initial_state=(torch.zeros(2, 2, 8, 5), torch.zeros(2, 2, 4, 8))), ValueError, r"initial_state\[0\] \(hk\)"),
    (dict(initial_state=(torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 4, 9))), ValueError, r"initial_state\[1\] \(hv\)"),
    (dict(cu_seqlens=torch.tensor([0, 10])), ValueError, r"batch size must be 1"),
    (dict(g=torch.zeros(2, 10, 2, 4, device="meta")), ValueError, r"one device, got q on .*, g on meta"),
])
@pytest.mark.parametrize("fn", [chunk_gsa, fused_recurrent_gsa])
def test_input_checks(fn, bad, err, match):
    with pytest.raises(err, match=match):
        fn(**_args(**bad))


@pytest.mark.parametrize("cu, match", [
    ([0, 5, 5, 10], "strictly increasing"), ([1, 10], "start at 0"), ([0, 9], "end at T"),
])
def test_cu_seqlens_checks(cu, match):
    a = {n: t[:1] for n, t in _args().items()}
    with pytest.raises(ValueError, match=match):
        chunk_gsa(**a, cu_seqlens=torch.tensor(cu, device=DEVICE))


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_float64_reference_mode(mode):
    # float64 inputs are a reference run: the slot logits and everything else stay in float64
    x = {n: t.detach().double() if t is not None else None for n, t in make_inputs(1, 70, 2, 1, 16, 12, 10).items()}
    args = [x[n] for n in "q k v s g".split()]
    o, (hk, hv) = OPS[mode](*args, initial_state=(x["hk0"], x["hv0"]), output_final_state=True)
    ro, (rhk, rhv) = naive_recurrent_gsa(*args, initial_state=(x["hk0"], x["hv0"]), output_final_state=True)
    assert o.dtype == torch.float64
    assert_rel("o", o, ro, 1e-12)
    assert_rel("hk", hk, rhk, 1e-12)
    assert_rel("hv", hv, rhv, 1e-12)


def _slot_gates_reference(s, cu_seqlens=None):
    # the plain formula, one sequence at a time, scanning along dim 1 (in float64 for float64 inputs)
    x = s.to(torch.promote_types(s.dtype, torch.float32))
    cu = [0, s.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    outs, gates = [], []
    for bos, eos in zip(cu[:-1], cu[1:]):
        z = x[:, bos:eos].logcumsumexp(dim=1)
        gates.append(torch.cat([z[:, :1], z[:, :-1]], dim=1) - z)
        outs.append((x[:, bos:eos] - z).exp())
    return torch.cat(outs, 1).to(s.dtype), torch.cat(gates, 1)


@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
@pytest.mark.parametrize("B, T, cu", [(2, 131, None), (1, 1, None), (3, 64, None), (1, 1100, None),
                                      (1, 100, [0, 7, 57, 100]), (1, 100, [0, 1, 2, 70, 100]), (1, 77, [0, 77])])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_abc_slot_gates(dtype, B, T, cu, logit_scale):
    # the scan along the innermost dimension against the plain one along dim 1: outputs and the
    # gradient of s through both outputs
    from fla_gsa.ops.gsa import utils
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    s64 = torch.randn(B, T, 2, 3, dtype=torch.float64, device=DEVICE) * logit_scale
    do, dg = torch.randn_like(s64), torch.randn_like(s64)

    def run(fn, s):
        s = s.detach().requires_grad_()
        o, g = fn(s, cu)
        (ds,) = torch.autograd.grad((o.double() * do).sum() + (g.double() * dg).sum(), s)
        return o, g, ds

    o, g, ds = run(utils.abc_slot_gates, s64.to(dtype))
    assert o.dtype == dtype and g.dtype == dtype and o.shape == g.shape == (B, T, 2, 3)
    assert o.is_contiguous() and g.is_contiguous()
    starts = [0] if cu is None else cu[:-1].tolist()
    assert (g[:, starts] == 0).all()
    # float32 is checked against the float64 reference (the plain float32 scan is no more accurate)
    ro, rg, rds = run(_slot_gates_reference, s64)
    # float32 g = z_{t-1} - z_t is exact for the rounded z but holds their rounding (ulp(z) vs g ~ -1/t)
    # (PyTorch's fp32 logcumsumexp backward rounds more with T: 2.5e-4 at T = 1100 with logits x 30)
    tols = (1e-10,) * 3 if dtype == torch.float64 else (1e-5, 3e-5, 1e-3)
    if T == 1:  # o = 1 and g = 0 exactly; ds = 0 up to rounding
        assert (o == 1).all() and (g == 0).all() and ds.abs().max() < 1e-5
        return
    for name, x, r, tol in zip(("o", "g", "ds"), (o, g, ds), (ro, rg, rds), tols):
        assert_rel(name, x, r, tol)


def test_abc_slot_gates_dtypes_and_varlen_restart():
    from fla_gsa.ops.gsa.utils import abc_slot_gates
    s = torch.randn(1, 90, 2, 4, device=DEVICE) * 5
    o, g = abc_slot_gates(s.bfloat16())
    assert o.dtype == torch.bfloat16 and g.dtype == torch.float32
    # packed sequences give what each gives alone
    cu = torch.tensor([0, 30, 31, 90], device=DEVICE)
    o, g = abc_slot_gates(s.double(), cu)
    for bos, eos in [(0, 30), (30, 31), (31, 90)]:
        o1, g1 = abc_slot_gates(s[:, bos:eos].double())
        assert torch.allclose(o[:, bos:eos], o1, rtol=1e-12, atol=1e-14)
        assert torch.allclose(g[:, bos:eos], g1, rtol=1e-12, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
@pytest.mark.parametrize("B, T, H, M, cu", [
    (1, 1, 1, 5, None), (2, 63, 2, 12, None), (1, 64, 3, 5, None), (2, 65, 1, 12, None), (1, 131, 2, 5, None),
    (1, 1100, 1, 5, None), (1, 100, 2, 12, [0, 1, 2, 70, 100]), (1, 300, 1, 5, [0, 1, 129, 130, 131, 300]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_abc_slot_gates_kernel(dtype, B, T, H, M, cu, logit_scale, monkeypatch, block=None):
    # the Triton kernels (forward and backward) against the float64 formula on the same rounded logits:
    # odd lengths around the 128-row tile, varlen with length-1 sequences, M not a power of two
    from fla_gsa.ops.gsa import abc_gates
    from fla_gsa.ops.gsa.utils import abc_slot_gates
    from fla_gsa.ops.utils.backend import use_kernels
    if block is not None:
        monkeypatch.setattr(abc_gates, "BLOCK_T", block[0])
        monkeypatch.setattr(abc_gates, "MAX_BLOCK_M", block[1])
        monkeypatch.setattr(abc_gates, "TARGET_PROGRAMS", 0)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    s = (torch.randn(B, T, H, M, device=DEVICE) * logit_scale).to(dtype)
    if not use_kernels(s):
        pytest.skip("the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    do, dg = torch.randn(2, B, T, H, M, dtype=torch.float64, device=DEVICE)
    s_k = s.detach().requires_grad_()
    o, g = abc_slot_gates(s_k, cu)
    assert o.dtype == dtype and g.dtype == torch.float32 and o.is_contiguous() and g.is_contiguous()
    (ds,) = torch.autograd.grad((o.double() * do).sum() + (g.double() * dg).sum(), s_k)
    assert ds.dtype == dtype
    starts = [0] if cu is None else cu[:-1].tolist()
    assert (g[:, starts] == 0).all()
    if T == 1:  # o = 1 and g = 0 exactly, and then ds = dso - dso = 0 exactly
        assert (o == 1).all() and (g == 0).all() and (ds == 0).all()
        return
    s64 = s.detach().double().requires_grad_()
    ro, rg = _slot_gates_reference(s64, cu)
    (rds,) = torch.autograd.grad((ro * do).sum() + (rg * dg).sum(), s64)
    # fp32: measured <= 1.4e-6 (o), 4.2e-6 (g: ulp(z) against g ~ -1/t), 3.4e-6 (ds). bf16: o and ds are
    # rounded to bf16 (<= 2^-9 each) and the upstream dso arrives rounded to bf16 too: measured
    # <= 2.4e-3 (o), 3.7e-3 (ds); g stays fp32.
    tols = (1e-5, 3e-5, 3e-5) if dtype == torch.float32 else (5e-3, 3e-5, 8e-3)
    for name, x, r, tol in zip(("o", "g", "ds"), (o, g, ds), (ro, rg, rds), tols):
        assert_rel(name, x, r, tol)


@pytest.mark.triton
@pytest.mark.parametrize("block", [(16, 16), (32, 8)])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_abc_slot_gates_kernel_tiles(block, logit_scale, monkeypatch):
    # other tile shapes than the launch heuristic picks at these sizes: many time tiles (carries across
    # tiles, in both passes) and slot blocks wider than M
    test_abc_slot_gates_kernel(torch.float32, 1, 200, 2, 12, [0, 1, 17, 33, 34, 200], logit_scale, monkeypatch, block)
    test_abc_slot_gates_kernel(torch.float32, 2, 70, 1, 5, None, logit_scale, monkeypatch, block)


@pytest.mark.triton
def test_abc_slot_gates_kernel_logit_jumps():
    # logits that jump by hundreds inside one tile (each exp(s - max) alone would underflow) and a
    # gradient through g alone
    from fla_gsa.ops.gsa.utils import abc_slot_gates
    from fla_gsa.ops.utils.backend import use_kernels
    s = torch.randn(1, 150, 1, 6, device=DEVICE)
    s[:, ::7] += 400
    s[:, 3::11] -= 300
    if not use_kernels(s):
        pytest.skip("the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    s_k = s.clone().requires_grad_()
    o, g = abc_slot_gates(s_k)
    (ds,) = torch.autograd.grad(g.sum(), s_k)
    s64 = s.double().requires_grad_()
    ro, rg = _slot_gates_reference(s64)
    (rds,) = torch.autograd.grad(rg.sum(), s64)
    # z ~ 400 holds ulp(400) = 3e-5 in fp32 (the PyTorch fp32 scan measures the same, 0.6-2.5e-5)
    for name, x, r in (("o", o, ro), ("g", g, rg), ("ds", ds, rds)):
        assert_rel(name, x, r, 1e-4)
