"""The intra-chunk score kernel of ``chunk_scores`` against a float64 formula:
``A[i, j] = scale * sum_d q_i[d] k_j[d] e^{G_i[d] - G_j[d]}`` for ``j <= i`` in one chunk, else 0.

Gates are in-chunk cumsums of log gates: weak, strong (about -20 per step), at either side of the limit
up to which the diagonal 16 x 16 block is one product (``DIAG_DOT_MAX_DECAY``), or absent. Needs the
Triton kernels: ``TRITON_INTERPRET=1 pytest -m triton`` or a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, INTERPRET, assert_rel

from fla_gsa.ops.common import chunk_scores
from fla_gsa.ops.utils.backend import DIAG_DOT_MAX_DECAY
from fla_gsa.ops.utils.cumsum import cumsum_fwd
from fla_gsa.ops.utils.index import seq_bounds

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                 reason="runs the Triton kernels: TRITON_INTERPRET=1 or a GPU")]


def log_gates(B, T, H, D, kind):
    if kind == "weak":
        return F.logsigmoid(torch.randn(B, T, H, D, device=DEVICE))
    if kind == "strong":
        return F.logsigmoid(torch.randn(B, T, H, D, device=DEVICE)) - 19.5
    side = {"below": -0.5, "above": 0.5}[kind]  # a block of 16 rows decays by 15 steps
    return torch.full((B, T, H, D), -(DIAG_DOT_MAX_DECAY + side) / 15, device=DEVICE)


def reference(q, k, G, scale, cu_seqlens, BT):
    q, k = q.double().cpu(), k.double().cpu()
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = G.double().cpu() if G is not None else torch.zeros(B, T, H, D, dtype=torch.float64)
    A = torch.zeros(B, T, HQ, BT, dtype=torch.float64)
    for b, bos, eos in seq_bounds(cu_seqlens, B, T):
        for t0 in range(bos, eos, BT):
            t1 = min(t0 + BT, eos)
            L = t1 - t0
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            for hq in range(HQ):
                h = hq // (HQ // H)
                ratio = torch.where(causal[:, :, None], G[b, t0:t1, None, h] - G[b, None, t0:t1, h], float("-inf"))
                A[b, t0:t1, hq, :L] = scale * torch.einsum("id,jd,ijd->ij", q[b, t0:t1, hq], k[b, t0:t1, h], ratio.exp())
    return A


def check(T, BT, kind, B=1, H=1, G=1, D=40, cu_seqlens=None, dtype=torch.float32, tol=1e-5):
    q = torch.randn(B, T, H * G, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype)
    Gc = cumsum_fwd(log_gates(B, T, H, D, kind), BT, cu_seqlens=cu_seqlens) if kind is not None else None
    A = chunk_scores.chunk_scores(q, k, Gc, 0.3, cu_seqlens, BT, dtype)
    assert_rel("A vs float64", A, reference(q, k, Gc, 0.3, cu_seqlens, BT), tol)


@pytest.mark.parametrize("kind", ["weak", "strong", "below", "above", None])
@pytest.mark.parametrize("T, BT", [(1, 16), (37, 16), (100, 64), (130, 32)])
def test_against_float64(kind, T, BT):
    check(T, BT, kind)


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_gqa_batch_varlen_wide(kind):
    # two query heads per key head, several D tiles (64 each), packed sequences of odd lengths
    cu = torch.tensor([0, 15, 79, 80, 130], dtype=torch.int32, device=DEVICE)
    check(130, 64, kind, H=2, G=2, D=72, cu_seqlens=cu)
    check(70, 32, kind, B=2, H=2, G=2, D=72)


def test_exact_diagonal_with_weak_gates(monkeypatch):
    # the exact loop (always taken for fp16) with weak gates, where fp32 and bf16 would take the product
    monkeypatch.setattr(chunk_scores, "diag_dot_limit", lambda dtype: -1.0)
    check(100, 64, "weak", H=2, G=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half(dtype):
    # products in half precision, against the float64 formula of the same rounded inputs
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter gets bfloat16 wrong")
    check(100, 64, "weak", H=2, G=2, dtype=dtype, tol=1e-2)
