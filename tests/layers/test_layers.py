"""The four token mixers through their common interface: shapes, gradients to every parameter, padding
masks (a padded batch equals each sequence alone), cached step-by-step decoding equals the full
forward, and the GSA layer equals the paper's formulas run through the float64 reference."""
from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_rel

from fla_gsa.layers import ABCAttention, Attention, Cache, GatedLinearAttention, GatedSlotAttention
from fla_gsa.layers.abc import abc_slot_gates
from fla_gsa.ops import naive_recurrent_gsa
from fla_gsa.ops.gsa.utils import abc_slot_gates as op_abc_slot_gates

D = 32
KINDS = {
    "gsa": lambda **kw: GatedSlotAttention(hidden_size=D, num_heads=4, num_kv_heads=2, num_slots=6, **kw),
    "gla": lambda **kw: GatedLinearAttention(hidden_size=D, num_heads=4, num_kv_heads=2, **kw),
    "abc": lambda **kw: ABCAttention(hidden_size=D, num_heads=4, num_kv_heads=2, num_slots=6, **kw),
    "attention": lambda **kw: Attention(hidden_size=D, num_heads=4, num_kv_heads=2, **kw),
    "gsa-conv": lambda **kw: GatedSlotAttention(hidden_size=D, num_heads=2, num_slots=5, use_short_conv=True, **kw),
    "gla-conv": lambda **kw: GatedLinearAttention(hidden_size=D, num_heads=2, head_dim=12, use_short_conv=True, **kw),
    "abc-conv": lambda **kw: ABCAttention(hidden_size=D, num_heads=2, num_slots=5, use_short_conv=True, **kw),
    "gsa-mha-bias": lambda **kw: GatedSlotAttention(hidden_size=D, num_heads=2, head_dim=20, num_slots=7,
                                                    attention_bias=True, gate_bias=True, **kw),
}
BASIC = ["gsa", "gla", "abc", "attention"]


def make(kind, **kw):
    torch.manual_seed(0)
    layer = KINDS[kind](layer_idx=0, **kw).to(DEVICE)
    with torch.no_grad():  # livelier weights than the default init, so differences show
        for p in layer.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    return layer


def x_of(B, T):
    return torch.randn(B, T, D, device=DEVICE)


def decode(layer, x, prefill, mask=None):
    """Prefill ``x[:, :prefill]`` then one token at a time, through a cache."""
    cache = Cache()
    m = mask[:, :prefill] if mask is not None else None
    outs = [layer(x[:, :prefill], attention_mask=m, past_key_values=cache, use_cache=True)[0]]
    for t in range(prefill, x.shape[1]):
        if mask is not None:
            m = mask[:, :t + 1]
        outs.append(layer(x[:, t:t + 1], attention_mask=m, past_key_values=cache, use_cache=True)[0])
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_shapes_and_cache(kind):
    layer = make(kind)
    x = x_of(2, 9)
    o, attn, cache = layer(x)
    assert o.shape == x.shape and attn is None and cache is None
    o, _, cache = layer(x, use_cache=True)
    assert isinstance(cache, Cache) and cache.get_seq_length() == 9 and cache.batch_size == 2
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_reach_every_parameter(kind):
    layer = make(kind)
    x = x_of(2, 21).requires_grad_()
    o, _, _ = layer(x, attention_mask=torch.tensor([[1] * 21, [0] * 4 + [1] * 17], device=DEVICE))
    (o * torch.randn_like(o)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{kind}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{kind}: non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"{kind}: zero gradient for {name}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_left_padding_equals_unpadded(kind):
    layer = make(kind)
    lengths = [23, 9, 16]
    T = max(lengths)
    xs = [x_of(1, L) for L in lengths]
    x = torch.zeros(len(lengths), T, D, device=DEVICE)
    mask = torch.zeros(len(lengths), T, dtype=torch.long, device=DEVICE)
    for i, (xi, L) in enumerate(zip(xs, lengths)):
        x[i, T - L:] = xi[0] + 0  # left padding
        x[i, :T - L] = 100.0  # garbage in the padded positions must not matter
        mask[i, T - L:] = 1
    o = layer(x, attention_mask=mask)[0]
    for i, (xi, L) in enumerate(zip(xs, lengths)):
        assert_rel(f"{kind} sequence {i}", o[i, T - L:], layer(xi)[0][0], 1e-5)


@pytest.mark.parametrize("kind", BASIC)
def test_padding_anywhere_and_empty_rows(kind):
    # right padding, holes, and a row with no token at all in this call
    layer = make(kind)
    x = x_of(3, 12)
    mask = torch.ones(3, 12, dtype=torch.long, device=DEVICE)
    mask[0, 8:] = 0
    mask[1] = 0
    o, _, cache = layer(x, attention_mask=mask, use_cache=True)
    assert torch.isfinite(o).all()
    assert_rel(f"{kind} right-padded", o[0, :8], layer(x[:1, :8])[0][0], 1e-5)
    assert_rel(f"{kind} full row", o[2], layer(x[2:])[0][0], 1e-5)
    # the empty row continues as if it were fresh
    y = x_of(3, 5)
    o2 = layer(y, attention_mask=torch.cat([mask, torch.ones(3, 5, dtype=torch.long, device=DEVICE)], 1),
               past_key_values=cache, use_cache=True)[0]
    assert_rel(f"{kind} empty row, next call", o2[1], layer(y[1:2])[0][0], 1e-5)


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_decode_equals_full_forward(kind, mode):
    layer = make(kind, **({} if kind == "attention" else {"mode": mode}))
    x = x_of(2, 75)  # the prefill crosses a chunk boundary
    full = layer(x)[0]
    stepped, cache = decode(layer, x, prefill=67)
    assert_rel(f"{kind} decode", stepped, full, 1e-4)
    assert cache.get_seq_length() == 75


@pytest.mark.parametrize("kind", BASIC)
def test_chunked_prefill_equals_full_forward(kind):
    layer = make(kind)
    x = x_of(2, 50)
    cache = Cache()
    outs = [layer(x[:, a:b], past_key_values=cache, use_cache=True)[0] for a, b in ((0, 20), (20, 37), (37, 50))]
    assert_rel(f"{kind} chunked prefill", torch.cat(outs, 1), layer(x)[0], 1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_left_padded_prefill_then_decode(kind):
    layer = make(kind)
    x = x_of(2, 30)
    mask = torch.ones(2, 30, dtype=torch.long, device=DEVICE)
    mask[1, :11] = 0
    stepped, _ = decode(layer, x, prefill=20, mask=mask)
    assert_rel(f"{kind} padded row", stepped[1, 11:], layer(x[1:, 11:])[0][0], 1e-4)
    assert_rel(f"{kind} full row", stepped[0], layer(x[:1])[0][0], 1e-4)


@pytest.mark.parametrize("kind", ["gsa", "gla", "abc"])
def test_fused_recurrent_mode_equals_chunk(kind):
    x = x_of(2, 40)
    assert_rel(kind, make(kind, mode="fused_recurrent")(x)[0], make(kind, mode="chunk")(x)[0], 1e-4)


@pytest.mark.parametrize("B,T,kind,kw", [(2, 19, "gsa", {}), (3, 1, "gsa", {}), (2, 23, "gsa-mha-bias", {}),
                                         (2, 23, "gsa", {"attention_bias": True})])
def test_gsa_layer_is_the_paper_formula(B, T, kind, kw):
    """q, k = swish(W_q x), swish(W_k x); v = silu(W_v x); g = logsigmoid(W_f x)/τ; s = 1 − exp(g);
    y = W_o RMSNorm(silu(o)), with GQA and the float64 reference recurrence; outputs and the gradients
    of x and every parameter. 38 or 46 tokens run the fused projection (concatenated weights, biases
    with zeros for f's when only q, k, v have them), 3 tokens the separate products."""
    layer = make(kind, gate_logit_normalizer=4.0, **kw)
    assert layer.scale == 1.0  # the paper's softmax(K̃ q) has no scale
    x = x_of(B, T).requires_grad_()
    params = dict(layer.named_parameters())
    ref_params = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    P = ref_params
    HQ, H = layer.num_heads, layer.num_kv_heads

    def lin(name, t):
        y = t @ P[f"{name}.weight"].T
        return y + P[f"{name}.bias"] if f"{name}.bias" in P else y

    xd = x.detach().double().requires_grad_()
    q = F.silu(lin("q_proj", xd)).unflatten(-1, (HQ, -1))
    k = F.silu(lin("k_proj", xd)).unflatten(-1, (H, -1))
    v = F.silu(lin("v_proj", xd)).unflatten(-1, (H, -1))
    g = F.logsigmoid(lin("f_proj", xd)).unflatten(-1, (H, -1)) / 4.0
    o, _ = naive_recurrent_gsa(q, k, v, 1 - g.exp(), g, scale=1.0)
    o = F.silu(o)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.g_norm.eps) * P["g_norm.weight"]
    ref = lin("o_proj", o.flatten(-2))
    y = layer(x)[0]
    assert_rel("gsa layer", y, ref, 1e-5)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad((y.double() * dy).sum(), [x, *params.values()])
    ref_grads = torch.autograd.grad((ref * dy).sum(), [xd, *ref_params.values()])
    for name, a, b in zip(["x", *params], grads, ref_grads):
        assert_rel(f"d{name}", a, b, 1e-4)


def test_abc_slot_gates_match_the_op():
    e = torch.randn(2, 33, 3, 5, device=DEVICE) * 3
    s, g, z = abc_slot_gates(e, None, None)
    s_ref, g_ref = op_abc_slot_gates(e)
    assert_rel("s", s, s_ref, 1e-6)
    assert_rel("g", g, g_ref, 1e-6)
    # continuing from the running log-sum-exp equals one pass over the whole sequence
    s1, g1, z1 = abc_slot_gates(e[:, :20], None, None)
    s2, g2, z2 = abc_slot_gates(e[:, 20:], z1, None)
    assert_rel("s continued", torch.cat([s1, s2], 1), s_ref, 1e-6)
    assert_rel("g continued", torch.cat([g1, g2], 1), g_ref, 1e-5)
    assert_rel("z", z2, z, 1e-6)


def test_bad_inputs_raise():
    layer = make("gsa")
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(2, 5, D + 1, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x_of(2, 5), attention_mask=torch.ones(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x_of(2, 5), attention_mask=torch.ones(2, 1, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="layer_idx"):
        GatedSlotAttention(hidden_size=D, num_heads=2, num_slots=4)(x_of(1, 3), use_cache=True)
    with pytest.raises(ValueError, match="num_kv_heads"):
        GatedSlotAttention(hidden_size=D, num_heads=3, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="mode"):
        GatedLinearAttention(hidden_size=D, num_heads=2, mode="parallel")
    for kind in ("gsa", "gla", "abc"):
        with pytest.raises(ValueError, match="checkpoint_level must be 0 or 1, got 2"):
            KINDS[kind](checkpoint_level=2)


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["gsa", "gla", "abc", "gsa-conv"])
def test_checkpoint_levels_agree(kind):
    # keeping the chunk states (0, the layers' default) or recomputing them (1): same output, same
    # gradients of x and of every parameter
    layer = make(kind)
    assert layer.checkpoint_level == 0
    x = x_of(2, 70).requires_grad_()
    dy = torch.randn(2, 70, D, device=DEVICE)
    runs = []
    for level in (0, 1):
        layer.checkpoint_level = level
        o = layer(x)[0]
        leaves = [x] + list(layer.parameters())
        runs.append((o, torch.autograd.grad((o * dy).sum(), leaves)))
    (o0, g0), (o1, g1) = runs
    assert_rel("o", o1, o0, 1e-6)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], g1, g0):
        assert_rel("d" + name, a, b, 1e-6)


def test_cache_batch_ops():
    layer = make("gsa")
    attn = make("attention")
    x = x_of(3, 7)
    cache = Cache()
    layer(x, past_key_values=cache, use_cache=True)
    attn.layer_idx = 1
    attn(x, past_key_values=cache, use_cache=True)
    assert len(cache) == 2 and cache.is_linear == [True, False] and not cache.is_croppable
    reordered = Cache([s for s in cache])
    reordered.reorder_cache(torch.tensor([2, 0, 1], device=DEVICE))
    assert torch.equal(reordered[0].recurrent_state[0][0], cache[0].recurrent_state[0][2])
    assert torch.equal(reordered[1].attn_state[0][1], cache[1].attn_state[0][0])
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6
    cache.crop(0)
    with pytest.raises(ValueError, match="cropped"):
        cache.crop(-1)
    with pytest.raises(NotImplementedError):
        cache.update(None, None, 0)


def test_attention_cache_crop():
    attn = make("attention")
    x = x_of(2, 12)
    cache = Cache()
    attn(x, past_key_values=cache, use_cache=True)
    cache.crop(-3)
    assert cache.get_seq_length() == 9 and cache[0].attn_state[0].shape[1] == 9
    o = attn(x[:, 9:], past_key_values=cache, use_cache=True)[0]
    assert_rel("after crop", o, attn(x)[0][:, 9:], 1e-5)


@pytest.mark.parametrize("name", ["gsa", "gla", "abc", "attn", "cache"])
def test_docstring_examples(name):
    module = importlib.import_module(f"fla_gsa.layers.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["gsa", "gla", "abc"])
def test_triton_decode_small(kind):
    """Cheap enough for the Triton interpreter: a short prefill and two decoding steps."""
    layer = make(kind)
    x = x_of(2, 18)
    stepped, _ = decode(layer, x, prefill=16)
    assert_rel(f"{kind} decode", stepped, layer(x)[0], 1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("pad", [5, 13])
def test_triton_abc_padded_prefill_then_decode(pad):
    """ABC's slot normalizer on its kernel path through padding and the cache (its running log-sum-exp
    carried from call to call), cheap enough for the interpreter: a left-padded prefill of 12 tokens, the
    padded row empty in it when ``pad = 13``, then three decoding steps."""
    layer = make("abc")
    x = x_of(2, 15)
    mask = torch.ones(2, 15, dtype=torch.long, device=DEVICE)
    mask[1, :pad] = 0
    stepped, _ = decode(layer, x, prefill=12, mask=mask)
    assert_rel("abc padded row", stepped[1, pad:], layer(x[1:, pad:])[0][0], 1e-4)
    assert_rel("abc full row", stepped[0], layer(x[:1])[0][0], 1e-4)
