"""The apply kernels of ``chunk_o`` with a gate on the summed side, against a float64 formula of the
lower / upper definitions (the op tests cover them through ``chunk_linear_attn``; these isolate them).

Inputs are random (scores ``A``, states ``m``), the gate cumsums chunk-local cumsums of log gates, weak or
strong (about -20 per step). Needs the Triton kernels: ``TRITON_INTERPRET=1 pytest -m triton`` or a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, INTERPRET, assert_rel

from fla_gsa.ops.common import chunk_o
from fla_gsa.ops.utils.backend import DIAG_DOT_MAX_DECAY
from fla_gsa.ops.utils.cumsum import cumsum_fwd
from fla_gsa.ops.utils.index import seq_bounds

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                 reason="runs the Triton kernels: TRITON_INTERPRET=1 or a GPU")]

TOL = 1e-5


def gates(B, T, H, D, strong, BT, cu_seqlens):
    """In-chunk cumsums of random log gates; ``strong`` True subtracts 19.5 per step, a number sets
    every step's log gate to ``-strong`` exactly."""
    if strong is not False and strong is not True:
        g = torch.full((B, T, H, D), -float(strong), device=DEVICE)
    else:
        g = F.logsigmoid(torch.randn(B, T, H, D, device=DEVICE)) - (19.5 if strong else 0.0)
    return cumsum_fwd(g, BT, cu_seqlens=cu_seqlens)


def make_inputs(upper, B, T, H, G, DP, DY, BT, strong=False, cu_seqlens=None, use_gp=True, transpose_m=False,
                dtype=torch.float32):
    HQ = H * G
    NT = sum((e - s + BT - 1) // BT for _, s, e in seq_bounds(cu_seqlens, B, T))
    m = torch.randn(NT, H, DY, DP) if transpose_m else torch.randn(NT, H, DP, DY)
    return dict(
        p=torch.randn(B, T, H if upper else HQ, DP, device=DEVICE, dtype=dtype),
        gp=gates(B, T, H, DP, strong, BT, cu_seqlens) if use_gp else None,
        m=m.to(device=DEVICE, dtype=dtype),
        x=torch.randn(B, T, HQ if upper else H, DY, device=DEVICE, dtype=dtype),
        gy=gates(B, T, H, DY, strong, BT, cu_seqlens),
        A=torch.randn(B, T, HQ, BT, device=DEVICE, dtype=dtype),
    )


def apply(upper, inp, scale, cu_seqlens, BT, no_diag, transpose_m=False):
    fn = chunk_o.chunk_apply_upper if upper else chunk_o.chunk_apply_lower
    out = fn(inp["p"], inp["gp"], inp["m"], inp["x"], inp["gy"], inp["A"], scale, cu_seqlens, BT,
             torch.float32, inp["p"].dtype, transpose_m=transpose_m, no_diag=no_diag)
    return out if no_diag else (out,)


def reference(upper, inp, scale, cu_seqlens, BT, transpose_m=False):
    """Float64 ``(y, y_nd[, y_st])`` straight from the definitions, chunk by chunk."""
    p, x, A = (inp[n].double().cpu() for n in ("p", "x", "A"))
    gy = inp["gy"].double().cpu()
    gp = inp["gp"].double().cpu() if inp["gp"] is not None else torch.zeros(*p.shape[:2], gy.shape[2], p.shape[-1])
    m = inp["m"].double().cpu()
    m = m.transpose(-1, -2) if transpose_m else m  # [NT, H, DP, DY]
    B, T, HQ = A.shape[:3]
    H, DY = gy.shape[2], x.shape[-1]
    G = HQ // H
    heads = H if upper else HQ
    y_st, y_nd, y_dg = (torch.zeros(B, T, heads, DY, dtype=torch.float64) for _ in range(3))
    n = 0
    for b, bos, eos in seq_bounds(cu_seqlens, B, T):
        for t0 in range(bos, eos, BT):
            t1 = min(t0 + BT, eos)
            L = t1 - t0
            Gy, Gp = gy[b, t0:t1], gp[b, t0:t1]  # [L, H, D]
            o = torch.arange(L)
            i_ge_j = o[:, None] >= o[None, :]  # [i, j]: lower sums rows j into row i, upper rows i into row j
            # E[i, j] = e^{Gy_i - Gy_j} for i >= j (zero elsewhere: those exponents would overflow)
            E = torch.where(i_ge_j[:, :, None, None], Gy[:, None] - Gy[None, :], float("-inf")).exp()
            for hy in range(heads):
                if upper:
                    h = hy
                    gl, gyl = Gp[L - 1, h], Gy[L - 1, h]
                    pe = p[b, t0:t1, h] * (gl - Gp[:, h]).exp()
                    y_st[b, t0:t1, h] = scale * (pe @ m[n, h]) * (gyl - Gy[:, h]).exp()
                    for g in range(G):
                        hq = h * G + g
                        W = A[b, t0:t1, hq, :L]  # [i, j]
                        term = torch.einsum("ij,ijd,id->ijd", W, E[:, :, h], x[b, t0:t1, hq])
                        y_nd[b, t0:t1, h] += term.sum(0) - term.diagonal(dim1=0, dim2=1).T
                        y_dg[b, t0:t1, h] += term.diagonal(dim1=0, dim2=1).T
                else:
                    hq, h = hy, hy // G
                    pe = p[b, t0:t1, hq] * Gp[:, h].exp()
                    y_st[b, t0:t1, hq] = scale * (pe @ m[n, h]) * Gy[:, h].exp()
                    W = A[b, t0:t1, hq, :L]
                    term = torch.einsum("ij,ijd,jd->ijd", W, E[:, :, h], x[b, t0:t1, h])
                    dg = term.diagonal(dim1=0, dim2=1).T
                    y_nd[b, t0:t1, hq] += term.sum(1) - dg
                    y_dg[b, t0:t1, hq] += dg
            n += 1
    if upper:
        return y_st + y_nd + y_dg, y_nd, y_st
    return y_st + y_nd + y_dg, y_st + y_nd


def check(upper, T, BT, G, no_diag, strong, B=1, H=1, DP=20, DY=12, cu_seqlens=None, use_gp=True,
          transpose_m=False, dtype=torch.float32, ref_tol=TOL):
    inp = make_inputs(upper, B, T, H, G, DP, DY, BT, strong, cu_seqlens, use_gp, transpose_m, dtype)
    scale = 0.7
    out = apply(upper, inp, scale, cu_seqlens, BT, no_diag, transpose_m)
    ref = reference(upper, inp, scale, cu_seqlens, BT, transpose_m)
    assert len(out) == (len(ref) if no_diag else 1)
    for name, a, r in zip(("y", "y_nd", "y_st"), out, ref):
        assert_rel(f"{name} vs float64", a, r, ref_tol)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("BT", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 15, 64, 100, 130])
def test_against_float64(upper, T, BT):
    # G, no_diag and the gate strength vary with the case, each value over every (T, BT)
    k = [1, 15, 64, 100, 130].index(T) + BT // 16
    check(upper, T, BT, G=1 + k % 2, no_diag=k % 3 != 0, strong=k % 4 >= 2)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("side", [-0.5, 0.5], ids=["below", "above"])
def test_block_decay_at_the_limit(upper, side):
    # Every step decays by the same amount, so a block of 16 rows decays by 15 steps' worth: just below
    # DIAG_DOT_MAX_DECAY the diagonal block is one product whose factors reach e^19.5; just above, the
    # exact loop. Both must match float64 to fp32 accuracy (also rows past the end: T = 100).
    step = (DIAG_DOT_MAX_DECAY + side) / 15
    check(upper, 100, 64, G=2, no_diag=True, strong=step, DP=20, DY=40)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_exact_diagonal_with_weak_gates(upper, monkeypatch):
    # the exact loop (always taken for fp16) with weak gates, where fp32 and bf16 would take the product
    monkeypatch.setattr(chunk_o, "diag_dot_limit", lambda dtype: -1.0)
    check(upper, 100, 64, G=2, no_diag=True, strong=False)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("no_diag", [False, True])
def test_gqa_batch(upper, no_diag):
    # several batch rows and key/value heads, each with two query heads
    check(upper, 40, 32, G=2, no_diag=no_diag, strong=no_diag, B=2, H=2)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("BT", [16, 64])
def test_varlen(upper, BT):
    cu = torch.tensor([0, 15, 79, 80, 130], dtype=torch.int32, device=DEVICE)
    check(upper, 130, BT, G=2, no_diag=True, strong=BT == 64, cu_seqlens=cu)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_wide_transposed_no_gp(upper):
    # several DP and DY tiles (64 each), the state read transposed, no gate on the state side
    check(upper, 40, 32, G=1, no_diag=True, strong=False, DP=72, DY=80, use_gp=False, transpose_m=True)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half(upper, dtype):
    # products in half precision: against the float64 formula of the same (rounded) inputs. Weak gates:
    # with strong ones the block-to-block factors (e^-20 and less) underflow in fp16 (y_nd then differs by
    # ~15%; y does not).
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter gets bfloat16 wrong")
    check(upper, 50, 32, G=2, no_diag=True, strong=False, dtype=dtype, ref_tol=2e-2)


@pytest.mark.parametrize("softmax", [None, True, "grad"])
@pytest.mark.parametrize("strong", [False, True])
def test_lower_decayed_output(softmax, strong):
    # decayed_dtype: the lower kernel also stores y * e^{gy} (of y as stored, GQA heads reading their
    # group's gates), with y plain, a softmax over its row, or the gradient through a given softmax
    cu = torch.tensor([0, 15, 79, 80, 130], dtype=torch.int32, device=DEVICE)
    inp = make_inputs(False, 1, 130, 2, 2, 20, 12, 16, strong, cu)
    sp = torch.softmax(torch.randn(1, 130, 4, 12, device=DEVICE), -1)
    sm = sp if softmax == "grad" else softmax
    y, y_nd, yd = chunk_o.chunk_apply_lower(inp["p"], inp["gp"], inp["m"], inp["x"], inp["gy"], inp["A"], 0.7, cu,
                                            16, torch.float32, torch.float32, no_diag=True, softmax=sm,
                                            decayed_dtype=torch.float32)
    y2 = chunk_o.chunk_apply_lower(inp["p"], inp["gp"], inp["m"], inp["x"], inp["gy"], inp["A"], 0.7, cu, 16,
                                   torch.float32, torch.float32, softmax=sm)
    assert torch.equal(y, y2)
    ref = reference(False, inp, 0.7, cu, 16)[0]
    if softmax is True:
        ref = ref.softmax(-1)
    elif softmax == "grad":
        ref = sp.double().cpu() * (ref - (sp.double().cpu() * ref).sum(-1, keepdim=True))
    assert_rel("y vs float64", y, ref, TOL)
    gq = inp["gy"].double().cpu().repeat_interleave(2, dim=2)
    assert_rel("yd vs float64", yd, ref * gq.exp(), TOL)
    with pytest.raises(ValueError, match="decayed_dtype needs gy"):
        chunk_o.chunk_apply_lower(inp["p"], inp["gp"], inp["m"], inp["x"], None, inp["A"], 0.7, cu, 16,
                                  torch.float32, torch.float32, decayed_dtype=torch.float32)


@pytest.mark.parametrize("gated", [False, "weak", "strong"])
@pytest.mark.parametrize("softmax", [None, True])
def test_lower_makes_its_scores(gated, softmax):
    # scores_from: the lower kernel makes the ungated scores scale * p k^T itself (GQA, varlen, rows past
    # the end), writes them where chunk_scores would, and uses them: same y, same A
    from fla_gsa.ops.common.chunk_scores import chunk_scores, scores_buffer

    cu = torch.tensor([0, 15, 79, 80, 130], dtype=torch.int32, device=DEVICE)
    BT, scale = 32, 0.7
    inp = make_inputs(False, 1, 130, 2, 2, 72, 12, BT, gated == "strong", cu, use_gp=False)
    gy = inp["gy"] if gated else None
    k = torch.randn(1, 130, 2, 72, device=DEVICE)
    A_ref = chunk_scores(inp["p"], k, None, scale, cu, BT, torch.float32)
    args = (inp["p"], None, inp["m"], inp["x"], gy)
    y_ref = chunk_o.chunk_apply_lower(*args, A_ref, scale, cu, BT, torch.float32, torch.float32, no_diag=True,
                                      softmax=softmax)
    A = scores_buffer(inp["p"], BT)
    y = chunk_o.chunk_apply_lower(*args, A, scale, cu, BT, torch.float32, torch.float32, no_diag=True,
                                  softmax=softmax, scores_from=k)
    assert_rel("A", A, A_ref, TOL)
    for name, a, r in zip(("y", "y_nd"), y, y_ref):
        assert_rel(name, a, r, TOL)
    assert chunk_o.lower_fuses_scores(64) and not chunk_o.lower_fuses_scores(65)
    assert chunk_o.lower_fuses_scores(256, softmax=True)
    with pytest.raises(ValueError, match="scores_from needs gp None"):
        chunk_o.chunk_apply_lower(inp["p"], inp["p"][:, :, ::2], inp["m"], inp["x"], gy, A, scale, cu, BT,
                                  torch.float32, torch.float32, scores_from=k)
