"""RotaryEmbedding against a float64 rotate-half / interleaved reference, offsets, varlen, and HF Llama.

Under ``TRITON_INTERPRET=1`` (or on CUDA) the ``triton``-marked cases must run the Triton kernel: a spy
on the launcher counts forward and backward (reverse-rotation) launches."""
from __future__ import annotations

import pytest
import torch

import fla_gsa.modules.rotary as rotary
from fla_gsa.modules import RotaryEmbedding, apply_rotary
from conftest import DEVICE, INTERPRET, assert_rel

TRITON = INTERPRET or DEVICE.type == "cuda"


@pytest.fixture(autouse=True)
def kernel_calls(request, monkeypatch):
    """Count launches of the rotary kernel (``{"fwd": n, "bwd": n}``); a ``triton`` case that should run
    the kernel and never did fails."""
    calls = {"fwd": 0, "bwd": 0}
    launch = rotary.rotary_fwd

    def spy(x, cos, sin, interleaved, reverse=False):
        calls["bwd" if reverse else "fwd"] += 1
        return launch(x, cos, sin, interleaved, reverse)

    monkeypatch.setattr(rotary, "rotary_fwd", spy)
    yield calls
    if TRITON and request.node.get_closest_marker("triton") is not None:
        assert calls["fwd"] > 0, "the Triton rotary kernel never ran"


def ref_rotary(x, pos, dim, base=10000.0, interleaved=False):
    """float64: x [B, T, H, D], pos [B, T] -> rotated first `dim` features."""
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)
    ang = pos.double()[..., None, None] * inv  # [B, T, 1, dim/2]
    cos, sin = ang.cos(), ang.sin()
    xd = x.double()
    xr, rest = xd[..., :dim], xd[..., dim:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:
        # Llama / HF: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)
        x1, x2 = xr.chunk(2, -1)
        rot = torch.cat([-x2, x1], -1)
        out = xr * torch.cat([cos, cos], -1) + rot * torch.cat([sin, sin], -1)
    return torch.cat([out, rest], -1)


@pytest.mark.triton
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,dim", [(64, 64), (100, 40)])
def test_forward_and_grads(interleaved, D, dim, kernel_calls):
    B, T, HQ, H = 2, 13, 4, 2
    rope = RotaryEmbedding(dim, interleaved=interleaved)
    q = torch.randn(B, T, HQ, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, T, H, D, device=DEVICE, requires_grad=True)
    q0, k0 = q.detach().clone(), k.detach().clone()
    qr, kr = rope(q, k, seqlen_offset=3)
    pos = torch.arange(T, device=DEVICE).expand(B, T) + 3
    ref_q, ref_k = ref_rotary(q, pos, dim, interleaved=interleaved), ref_rotary(k, pos, dim, interleaved=interleaved)
    assert_rel("q", qr, ref_q, 1e-6)
    assert_rel("k", kr, ref_k, 1e-6)
    dq, dk = torch.randn_like(ref_q), torch.randn_like(ref_k)
    grads = torch.autograd.grad((qr.double() * dq).sum() + (kr.double() * dk).sum(), (q, k))
    ref_grads = torch.autograd.grad((ref_q * dq).sum() + (ref_k * dk).sum(), (q, k))
    assert_rel("dq", grads[0], ref_grads[0], 1e-6)
    assert_rel("dk", grads[1], ref_grads[1], 1e-6)
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)
    if TRITON:
        assert kernel_calls == {"fwd": 2, "bwd": 2}
    # the pass-through features are copied bit for bit
    assert torch.equal(qr[..., dim:].detach(), q0[..., dim:]) and torch.equal(kr[..., dim:].detach(), k0[..., dim:])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_kernel_matches_torch(dtype, interleaved, kernel_calls):
    """The kernel against the PyTorch path of ``apply_rotary`` (per-batch tables, many heads, odd sizes)."""
    B, T, H, D, R = 3, 5, 37, 24, 10
    x = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
    ang = torch.randn(B, T, 1, R, dtype=torch.float64, device=DEVICE) * 100
    cos, sin = ang.cos().float(), ang.sin().float()
    y = apply_rotary(x, cos, sin, interleaved)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    if TRITON:
        assert kernel_calls == {"fwd": 1, "bwd": 1}
    # reference: the PyTorch path (cos requiring a gradient is the one case the kernel does not take)
    xr = x.detach().clone().requires_grad_()
    y_ref = apply_rotary(xr, cos.requires_grad_(), sin, interleaved)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, dy)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and dx.dtype == dtype
    assert_rel("y", y, y_ref, tol)
    assert_rel("dx", dx, dx_ref, tol)


@pytest.mark.triton
def test_bf16():
    rope = RotaryEmbedding(64)
    q = torch.randn(1, 9, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    qr, kr = rope(q, q)
    assert qr.dtype == torch.bfloat16
    assert_rel("q", qr, ref_rotary(q, torch.arange(9, device=DEVICE)[None], 64), 1e-2)


@pytest.mark.triton
def test_offset_equals_slice_of_full():
    B, T, t, n = 3, 40, 17, 6
    rope = RotaryEmbedding(32)
    q, k = torch.randn(B, T, 4, 32, device=DEVICE), torch.randn(B, T, 1, 32, device=DEVICE)
    qf, kf = rope(q, k)
    qs, ks = rope(q[:, t:t + n], k[:, t:t + n], seqlen_offset=t)
    assert_rel("q", qs, qf[:, t:t + n], 1e-6)
    assert_rel("k", ks, kf[:, t:t + n], 1e-6)
    # a different offset for each batch row (cached decoding of ragged batches)
    offsets = torch.tensor([0, 5, 30], device=DEVICE)
    q1, k1 = rope(q[:, :1], k[:, :1], seqlen_offset=offsets)
    for b, o in enumerate(offsets.tolist()):
        qo, ko = rope(q[b:b + 1, :1], k[b:b + 1, :1], seqlen_offset=o)
        assert_rel(f"q[{b}]", q1[b:b + 1], qo, 1e-6)
        assert_rel(f"k[{b}]", k1[b:b + 1], ko, 1e-6)


@pytest.mark.triton
def test_large_offset_precision():
    rope = RotaryEmbedding(64)
    q = torch.randn(1, 4, 2, 64, device=DEVICE)
    qr, _ = rope(q, q, seqlen_offset=65536)
    pos = torch.arange(4, device=DEVICE)[None] + 65536
    assert_rel("q", qr, ref_rotary(q, pos, 64), 1e-6)


@pytest.mark.triton
def test_varlen_positions_restart():
    lens = [5, 1, 8]
    cu = torch.tensor([0, 5, 6, 14], device=DEVICE)
    rope = RotaryEmbedding(32)
    q, k = torch.randn(1, 14, 2, 32, device=DEVICE), torch.randn(1, 14, 2, 32, device=DEVICE)
    offsets = torch.tensor([0, 7, 2], device=DEVICE)
    for off in (0, offsets):
        qv, kv = rope(q, k, seqlen_offset=off, cu_seqlens=cu)
        for n in range(len(lens)):
            s, e = cu[n].item(), cu[n + 1].item()
            o = off if isinstance(off, int) else off[n].item()
            qs, ks = rope(q[:, s:e], k[:, s:e], seqlen_offset=o)
            assert_rel(f"q seq {n}", qv[:, s:e], qs, 1e-6)
            assert_rel(f"k seq {n}", kv[:, s:e], ks, 1e-6)


def test_matches_hf_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    B, T, H, D = 2, 10, 3, 64
    rope = RotaryEmbedding(D, base=10000.0)
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    qr, kr = rope(q, k)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = torch.arange(T).float()[None, :, None] * inv  # [1, T, D/2]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().expand(B, T, D), emb.sin().expand(B, T, D)
    # HF works on [B, H, T, D]
    hq, hk = llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert_rel("q", qr, hq.transpose(1, 2), 1e-5)
    assert_rel("k", kr, hk.transpose(1, 2), 1e-5)


def test_bad_inputs():
    rope = RotaryEmbedding(64)
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(ValueError, match="k must have shape"):
        rope(q, torch.randn(1, 4, 2, 32))
    with pytest.raises(ValueError, match="rotary dim"):
        RotaryEmbedding(128)(q, q)
    with pytest.raises(ValueError, match="seqlen_offset"):
        rope(q, q, seqlen_offset=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="seqlen_offset"):
        rope(q, q, seqlen_offset=1.5)
    with pytest.raises(ValueError, match="dim"):
        RotaryEmbedding(63)
