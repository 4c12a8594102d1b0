"""ShortConvolution: causal depthwise conv against a float64 loop; decode with the cache equals the full
forward; packed sequences do not leak into each other.

Under ``TRITON_INTERPRET=1`` (or on CUDA) the ``triton``-marked cases must run the Triton kernels: spies
on the forward and backward launchers count their calls."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fla_gsa.modules.convolution as convolution
from fla_gsa.modules import ShortConvolution
from conftest import DEVICE, INTERPRET, assert_rel

TRITON = INTERPRET or DEVICE.type == "cuda"


@pytest.fixture(autouse=True)
def kernel_calls(request, monkeypatch):
    """Count launches of the forward and backward kernels; a ``triton`` case that should run the
    forward kernel and never did fails."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = convolution.short_conv_fwd, convolution.short_conv_bwd

    def spy_fwd(*args, **kwargs):
        calls["fwd"] += 1
        return fwd(*args, **kwargs)

    def spy_bwd(*args, **kwargs):
        calls["bwd"] += 1
        return bwd(*args, **kwargs)

    monkeypatch.setattr(convolution, "short_conv_fwd", spy_fwd)
    monkeypatch.setattr(convolution, "short_conv_bwd", spy_bwd)
    yield calls
    if TRITON and request.node.get_closest_marker("triton") is not None:
        assert calls["fwd"] > 0, "the Triton short-convolution kernel never ran"


def ref_conv(x, weight, bias, cache=None, activation="silu"):
    """float64 loop: y_t = act(sum_j w[:, j] x_{t-W+1+j} + b); returns (y [B, T, D], last W inputs)."""
    B, T, D = x.shape
    W = weight.shape[-1]
    prefix = cache[..., 1:].double().transpose(1, 2) if cache is not None else x.new_zeros(B, W - 1, D).double()
    xp = torch.cat([prefix, x.double()], 1)  # [B, W-1+T, D]
    w = weight[:, 0].double()  # [D, W]
    y = torch.stack([(xp[:, t:t + W] * w.t()).sum(1) for t in range(T)], 1)
    if bias is not None:
        y = y + bias.double()
    if activation is not None:
        y = F.silu(y)
    return y, xp[:, -W:].transpose(1, 2)


def make_conv(D, W, bias, activation="silu"):
    conv = ShortConvolution(D, kernel_size=W, bias=bias, activation=activation).to(DEVICE)
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv


@pytest.mark.triton
@pytest.mark.parametrize("W,bias,activation", [(4, False, "silu"), (3, True, None), (1, True, "silu")])
@pytest.mark.parametrize("use_cache", [False, True])
def test_forward_and_grads(W, bias, activation, use_cache, kernel_calls):
    B, T, D = 2, 13, 100
    conv = make_conv(D, W, bias, activation)
    x = torch.randn(B, T, D, device=DEVICE, requires_grad=True)
    cache = torch.randn(B, D, W, device=DEVICE, requires_grad=True) if use_cache else None
    cache0 = cache.detach().clone() if use_cache else None
    y, final = conv(x, cache=cache, output_final_state=True)
    ref, ref_final = ref_conv(x, conv.weight, conv.bias, cache, activation)
    assert_rel("y", y, ref, 1e-5)
    assert_rel("final", final, ref_final, 1e-6)
    dy, dfinal = torch.randn_like(ref), torch.randn_like(ref_final)
    named = {"x": x, "weight": conv.weight, "bias": conv.bias if bias else None, "cache": cache}
    named = {k: v for k, v in named.items() if v is not None}
    tracked = list(named.values())
    grads = torch.autograd.grad((y.double() * dy).sum() + (final.double() * dfinal).sum(), tracked)
    ref_grads = torch.autograd.grad((ref * dy).sum() + (ref_final * dfinal).sum(), tracked)
    for name, g, rg in zip(named, grads, ref_grads):
        assert_rel(f"d{name}", g, rg, 1e-5)
    if use_cache:
        assert torch.equal(cache.detach(), cache0)
    if TRITON:
        assert kernel_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.triton
def test_short_sequence_cache_is_zero_padded():
    conv = make_conv(8, 4, False)
    x = torch.randn(2, 2, 8, device=DEVICE)
    _, final = conv(x, output_final_state=True)
    assert torch.equal(final[..., :2], torch.zeros(2, 8, 2, device=DEVICE))
    assert torch.equal(final[..., 2:], x.transpose(1, 2))
    assert conv(x)[1] is None


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_full_forward(dtype):
    B, T, D, W, t0 = 2, 11, 100, 4, 5
    conv = make_conv(D, W, True).to(dtype)
    x = torch.randn(B, T, D, device=DEVICE, dtype=dtype)
    y_full, final_full = conv(x, output_final_state=True)
    y_pre, cache = conv(x[:, :t0], output_final_state=True)
    ys = [y_pre]
    for t in range(t0, T):
        before = cache.clone()
        y_t, new_cache = conv.step(x[:, t:t + 1], cache)
        assert torch.equal(cache, before), "step modified the cache in place"
        ys.append(y_t)
        cache = new_cache
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_rel("y", torch.cat(ys, 1), y_full, tol)
    assert torch.equal(cache, final_full)
    # prefill in two pieces through the cache
    y_a, c_a = conv(x[:, :3], output_final_state=True)
    y_b, c_b = conv(x[:, 3:], cache=c_a, output_final_state=True)
    assert_rel("y chunks", torch.cat([y_a, y_b], 1), y_full, tol)
    assert torch.equal(c_b, final_full)
    # step with 2-D input and no cache is the first token
    y0, _ = conv.step(x[:, 0], None)
    assert_rel("y0", y0, y_full[:, 0], tol)


@pytest.mark.triton
@pytest.mark.parametrize("use_cache", [False, True])
def test_varlen_no_leak(use_cache):
    D, W = 100, 4
    lens = [5, 1, 9, 2]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEVICE)
    conv = make_conv(D, W, True)
    x = torch.randn(1, sum(lens), D, device=DEVICE, requires_grad=True)
    cache = torch.randn(len(lens), D, W, device=DEVICE, requires_grad=True) if use_cache else None
    y, final = conv(x, cache=cache, output_final_state=True, cu_seqlens=cu)
    refs, ref_finals = [], []
    for n in range(len(lens)):
        xs = x[:, cu[n]:cu[n + 1]]
        r, rf = ref_conv(xs, conv.weight, conv.bias, cache[n:n + 1] if use_cache else None)
        refs.append(r)
        ref_finals.append(rf)
    ref, ref_final = torch.cat(refs, 1), torch.cat(ref_finals, 0)
    assert_rel("y", y, ref, 1e-5)
    assert_rel("final", final, ref_final, 1e-6)
    dy = torch.randn_like(ref)
    tracked = [x, conv.weight] + ([cache] if use_cache else [])
    grads = torch.autograd.grad((y.double() * dy).sum(), tracked)
    ref_grads = torch.autograd.grad((ref * dy).sum(), tracked)
    for name, g, rg in zip(["x", "weight", "cache"], grads, ref_grads):
        assert_rel(f"d{name}", g, rg, 1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("varlen", [False, True])
def test_many_tiles(varlen, monkeypatch, kernel_calls):
    """Small tiles (16 tokens × 16 channels): taps, dx and the cache gradient cross tile boundaries, and
    dw / db are summed over many per-tile partials."""
    monkeypatch.setattr(convolution, "BLOCK_T", 16)
    monkeypatch.setattr(convolution, "BLOCK_D", 16)
    D, W = 40, 4
    lens = [37, 3, 20] if varlen else [45, 45]
    conv = make_conv(D, W, True)
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEVICE) if varlen else None
    x = torch.randn(B, T, D, device=DEVICE, requires_grad=True)
    cache = torch.randn(len(lens), D, W, device=DEVICE, requires_grad=True)
    y, final = conv(x, cache=cache, output_final_state=True, cu_seqlens=cu)
    refs, ref_finals = [], []
    for n, L in enumerate(lens):
        xs = x[:, cu[n]:cu[n + 1]] if varlen else x[n:n + 1]
        r, rf = ref_conv(xs, conv.weight, conv.bias, cache[n:n + 1])
        refs.append(r)
        ref_finals.append(rf)
    ref = torch.cat(refs, 1 if varlen else 0)
    ref_final = torch.cat(ref_finals, 0)
    assert_rel("y", y, ref, 1e-5)
    assert torch.equal(final, ref_final.float())
    dy, dfinal = torch.randn_like(ref), torch.randn_like(ref_final)
    tracked = [x, conv.weight, conv.bias, cache]
    grads = torch.autograd.grad((y.double() * dy).sum() + (final.double() * dfinal).sum(), tracked)
    ref_grads = torch.autograd.grad((ref * dy).sum() + (ref_final * dfinal).sum(), tracked)
    for name, g, rg in zip(["x", "weight", "bias", "cache"], grads, ref_grads):
        assert_rel(f"d{name}", g, rg, 1e-5)
    if TRITON:
        assert kernel_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.triton
def test_bf16_grads_match_fp32():
    """bf16 inputs and weights (fp32 math inside): close to the fp32 result, gradients in bf16."""
    D, W = 24, 4
    conv = make_conv(D, W, True)
    conv16 = make_conv(D, W, True).to(torch.bfloat16)
    with torch.no_grad():
        conv16.weight.copy_(conv.weight)
        conv16.bias.copy_(conv.bias)
    x = torch.randn(2, 19, D, device=DEVICE).bfloat16()
    x16, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    y16, _ = conv16(x16)
    y32, _ = conv(x32)
    dy = torch.randn_like(y32)
    g16 = torch.autograd.grad(y16, (x16, conv16.weight, conv16.bias), dy.bfloat16())
    g32 = torch.autograd.grad(y32, (x32, conv.weight, conv.bias), dy)
    assert y16.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in g16)
    assert_rel("y", y16, y32, 1e-2)
    for name, g, rg in zip(["x", "weight", "bias"], g16, g32):
        assert_rel(f"d{name}", g, rg, 1e-2)


def test_bad_inputs():
    conv = ShortConvolution(16, 4)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        conv(torch.randn(16, 4))
    with pytest.raises(ValueError, match="hidden size"):
        conv(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="cache must have shape"):
        conv(torch.randn(2, 4, 16), cache=torch.randn(2, 16, 3))
    with pytest.raises(ValueError, match="batch size must be 1"):
        conv(torch.randn(2, 4, 16), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="one token"):
        conv.step(torch.randn(2, 3, 16), None)
    with pytest.raises(ValueError, match="activation"):
        ShortConvolution(16, activation="relu")
    assert ShortConvolution(16, 4).weight.shape == (16, 1, 4)
