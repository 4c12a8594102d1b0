"""Real sizes on a GPU (skipped without CUDA): bf16 against an fp32 run of the same op, fp32 chunked
against fp32 recurrent (two independent algorithms), and long inputs with strong gates free of inf/NaN.

Run on a GPU with ``python -m pytest -q tests/ops/test_gpu_sizes.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel, rel_err

from fla_gsa.ops import chunk_gla, chunk_gsa, chunk_gsa_projected, fused_recurrent_gla, fused_recurrent_gsa, gsa_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


def _grads(out, leaves):
    do = torch.randn_like(out)
    return torch.autograd.grad(out, leaves, do)


def _compare(fn_a, fn_b, leaves, tol, names):
    """Run two callables on the same leaves (cast inside), compare outputs and all input gradients."""
    torch.manual_seed(1)
    oa = fn_a(*leaves)
    ga = _grads(oa, leaves)
    torch.manual_seed(1)
    ob = fn_b(*leaves)
    gb = _grads(ob, leaves)
    pairs = [("o", oa, ob)] + [(f"d{n}", a, b) for n, a, b in zip(names, ga, gb)]
    print(" ".join(f"{n}={rel_err(a, b):.1e}" for n, a, b in pairs))  # shown with pytest -s
    for n, a, b in pairs:
        assert_rel(n, a.float(), b.float(), tol)


def _leaves(*xs):
    # bf16-representable fp32 values: the bf16 and fp32 runs then compute the same function, and the
    # comparison measures the kernels' precision, not the rounding of the inputs (with strong gates a
    # bf16 rounding of g alone moves exp(G_i - G_j) by percents).
    return [x.bfloat16().float().requires_grad_() for x in xs]


def _gla_inputs(B, T, H, K, V, tau):
    q, k = (torch.randn(B, T, H, K, device=DEV) for _ in range(2))
    v = torch.randn(B, T, H, V, device=DEV)
    g = F.logsigmoid(torch.randn(B, T, H, K, device=DEV)) / tau
    return _leaves(q, k, v, g)


def _gsa_inputs(B, T, H, K, V, M, tau):
    q, k = (torch.randn(B, T, H, K, device=DEV) for _ in range(2))
    v = torch.randn(B, T, H, V, device=DEV)
    g = F.logsigmoid(torch.randn(B, T, H, M, device=DEV)) / tau
    s = 1 - g.exp()
    return _leaves(q, k, v, s, g)


@pytest.mark.parametrize("tau", [0.1, 16.0])
def test_gla_bf16_vs_fp32_real_size(tau):
    # B=4, T=4096, H=4, K=256, V=512 (the shape): bf16 run vs fp32 run < 1e-2
    x = _gla_inputs(4, 4096, 4, 256, 512, tau)
    bf = lambda q, k, v, g: chunk_gla(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16())[0]  # noqa: E731
    f32 = lambda q, k, v, g: chunk_gla(q, k, v, g)[0]  # noqa: E731
    _compare(bf, f32, x, 1e-2, "q k v g".split())


def test_gla_chunk_vs_recurrent_fp32():
    x = _gla_inputs(2, 1000, 4, 128, 256, 4.0)
    h0 = _leaves(torch.randn(2, 4, 128, 256, device=DEV))[0]
    chunk = lambda q, k, v, g, h: chunk_gla(q, k, v, g, initial_state=h)[0]  # noqa: E731
    rec = lambda q, k, v, g, h: fused_recurrent_gla(q, k, v, gk=g, initial_state=h)[0]  # noqa: E731
    _compare(chunk, rec, x + [h0], 1e-4, "q k v g h0".split())


def test_gla_long_strong_gates_finite():
    q, k, v, g = _gla_inputs(1, 65536, 4, 256, 512, 0.1)
    o, ht = chunk_gla(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16(), output_final_state=True)
    grads = torch.autograd.grad(o, (q, k, v, g), torch.randn_like(o))
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert all(torch.isfinite(d).all() for d in grads)


@pytest.mark.parametrize("tau", [0.5, 8.0])
def test_gsa_bf16_vs_fp32_paper_shape(tau):
    # the paper's 1.3B shape: B=4, T=4096, H=4, K=V=512, M=64
    x = _gsa_inputs(4, 4096, 4, 512, 512, 64, tau)
    bf = lambda q, k, v, s, g: chunk_gsa(*(t.bfloat16() for t in (q, k, v, s, g)))[0]  # noqa: E731
    f32 = lambda q, k, v, s, g: chunk_gsa(q, k, v, s, g)[0]  # noqa: E731
    _compare(bf, f32, x, 1e-2, "q k v s g".split())


def test_gsa_chunk_vs_recurrent_fp32_gqa():
    q, k, v, s, g = _gsa_inputs(2, 777, 2, 128, 128, 64, 2.0)
    q = _leaves(torch.randn(2, 777, 8, 128, device=DEV))[0]  # GQA: 8 query heads on 2
    chunk = lambda q, k, v, s, g: chunk_gsa(q, k, v, s, g)[0]  # noqa: E731
    rec = lambda q, k, v, s, g: fused_recurrent_gsa(q, k, v, s, g)[0]  # noqa: E731
    _compare(chunk, rec, [q, k, v, s, g], 1e-4, "q k v s g".split())


@pytest.mark.parametrize("tau", [1.0, 8.0])
def test_gsa_projected_paper_shape(tau):
    # the 1.3B layer's projection [q' | k' | v' | f] (H = 4, K = V = 512, M = 64), 4 x 4096: bf16 against
    # fp32, and fp32 against gsa_inputs then chunk_gsa (the same function by the other route)
    sizes, H, K = (2048, 2048, 2048, 256), 4, 512
    x = _leaves(torch.randn(4, 4096, sum(sizes), device=DEV) * 2)
    def proj(x, dtype=torch.float32):
        return chunk_gsa_projected(x.to(dtype), sizes, K, tau, checkpoint_level=0)[0]

    def composed(x):
        q, k, v, s, g = (t.unflatten(-1, (H, -1)) for t in gsa_inputs(x, sizes, tau))
        return chunk_gsa(q, k, v, s, g)[0]

    _compare(lambda x: proj(x, torch.bfloat16), proj, x, 1e-2, ["x"])
    _compare(proj, composed, x, 1e-4, ["x"])


def test_gsa_long_strong_gates_finite():
    q, k, v, s, g = _gsa_inputs(1, 65536, 4, 512, 512, 64, 0.5)
    o, (hk, hv) = chunk_gsa(*(t.bfloat16() for t in (q, k, v, s, g)), output_final_state=True)
    grads = torch.autograd.grad(o, (q, k, v, s, g), torch.randn_like(o))
    assert torch.isfinite(o).all() and torch.isfinite(hk).all() and torch.isfinite(hv).all()
    assert all(torch.isfinite(d).all() for d in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cu", [None, [0, 1, 6000, 6001, 16384]])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_abc_slot_gates_real_size(logit_scale, cu, dtype):
    # ABC's normalizer kernels at 1 x 16384 x 4 x 64 against float64, no less accurate than the PyTorch
    # fp32 scan (run on the CPU copy): fp32 g = z_{t-1} - z_t holds ulp(z) against |g| ~ 1/t
    from fla_gsa.ops.gsa.utils import abc_slot_gates
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    s = (torch.randn(1, 16384, 4, 64, device=DEV) * logit_scale).to(dtype)
    do, dg = torch.randn(2, *s.shape, dtype=torch.float64, device=DEV)

    def run(s, cu):
        x = s.detach().requires_grad_()
        o, g = abc_slot_gates(x, cu)
        (ds,) = torch.autograd.grad((o.double() * do.to(o.device)).sum() + (g.double() * dg.to(o.device)).sum(), x)
        return [t.to(DEV) for t in (o, g, ds)]

    new, cpu, ref = run(s, cu), run(s.cpu(), None if cu is None else cu.cpu()), run(s.double(), cu)
    errs = [(n, rel_err(a, r), rel_err(b, r)) for n, a, b, r in zip(("o", "g", "ds"), new, cpu, ref)]
    print(" ".join(f"{n}={e:.1e} (torch {t:.1e})" for n, e, t in errs))  # shown with pytest -s
    for (n, e, t), x in zip(errs, new):
        assert torch.isfinite(x).all(), n
        assert e <= 2 * t + 1e-6, f"{n}: kernel {e:.2e} against the PyTorch scan's {t:.2e}"
