"""``WeightCasts`` / ``half_weight``: a forward's weight casts made up front by one gathered launch are
exactly the casts the layers would make, and a stale or unplanned copy is never handed out."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, INTERPRET

from fla_gsa.modules import weight_cast
from fla_gsa.modules.weight_cast import WeightCasts, half_weight

# fp16 under the interpreter, whose bf16 cast truncates where the GPU (and PyTorch) round to nearest even
DTYPE = torch.float16 if INTERPRET else torch.bfloat16


def weights():
    # separately allocated sources of odd row counts (whole 16-element units), with blocks that end inside
    # a source; the 40000-element one spans several programs of the gathered launch
    return [[torch.randn(n, 48, device=DEVICE) * 100 for n in (37, 5, 64, 3)],
            [torch.randn(1250, 32, device=DEVICE)], [torch.randn(7, 16, device=DEVICE)]]


def forward(casts, groups):
    with casts.scope():
        return [half_weight(g, DTYPE) for g in groups]


@pytest.mark.triton
def test_precast_copies_equal_casts():
    groups = weights()
    before = [w.clone() for g in groups for w in g]
    casts = WeightCasts()
    first = forward(casts, groups)  # records
    assert casts.planned == 3 and casts._layout is None
    second = forward(casts, groups)  # the copies, made up front
    storage = {t.untyped_storage().data_ptr() for t in second}
    assert len(storage) == 1, "the second forward's copies come from one buffer"
    assert not {t.untyped_storage().data_ptr() for t in first} & storage
    for g, a, b in zip(groups, first, second):
        expected = torch.cat(g).to(DTYPE)
        assert torch.equal(a, expected) and torch.equal(b, expected)
        assert b.shape == expected.shape and b.is_contiguous()
    assert all(torch.equal(w, b) for w, b in zip((w for g in groups for w in g), before))
    layout = casts._layout
    third = forward(casts, groups)  # the launch table is reused while the plan and addresses stay
    assert casts._layout is layout
    assert all(torch.equal(a, b) for a, b in zip(second, third))


@pytest.mark.triton
def test_changed_weight_and_new_group_cast_where_used():
    groups = weights()
    casts = WeightCasts()
    forward(casts, groups)
    extra = torch.randn(16, 48, device=DEVICE)
    with casts.scope():
        groups[0][1].mul_(-3)  # after the up-front copy: that group's copy is stale
        out = [half_weight(g, DTYPE) for g in groups] + [half_weight([extra], DTYPE)]
    for g, o in zip(groups + [[extra]], out):
        assert torch.equal(o, torch.cat(g).to(DTYPE))
    assert casts.planned == 4  # the new group is made up front next time
    out = forward(casts, groups + [[extra]])
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1
    assert torch.equal(out[3], extra.to(DTYPE))


@pytest.mark.triton
def test_uncastable_weights_still_exact():
    # non-contiguous, not fp32, or not a whole number of 16-element units: cast where used, every time
    w = torch.randn(24, 40, device=DEVICE)
    groups = [[w.t()], [torch.randn(8, 16, device=DEVICE).half()], [torch.randn(3, 5, device=DEVICE)],
              [torch.randn(32, 16, device=DEVICE)]]
    casts = WeightCasts()
    for _ in range(2):
        out = forward(casts, groups)
        for g, o in zip(groups, out):
            assert torch.equal(o, torch.cat(g).to(DTYPE))
    assert casts._layout is not None and len(casts._layout.sources) == 1  # only the last group


def test_scope_off_nested_and_after_errors():
    w = torch.randn(32, 16, device=DEVICE)
    casts, inner = WeightCasts(), WeightCasts()
    with casts.scope(enabled=False):
        half_weight([w], DTYPE)
    assert casts.planned == 0
    with casts.scope():
        with inner.scope():  # a model inside a model: the outer scope records
            half_weight([w], DTYPE)
    assert casts.planned == 1 and inner.planned == 0
    with pytest.raises(RuntimeError, match="boom"):
        with casts.scope():
            raise RuntimeError("boom")
    assert weight_cast._local.active is None  # nothing left active after an error
    assert torch.equal(half_weight([w], DTYPE), w.to(DTYPE))
    with pytest.raises(ValueError, match="non-empty"):
        half_weight([], DTYPE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the casts are made under CUDA autocast")
def test_model_step_identical_with_and_without_precast(monkeypatch):
    # a few training steps of a small GSA LM: losses and every gradient bit-identical whether the
    # forward's casts are made up front or by each layer
    from fla_gsa.models import GSAConfig, GSAForCausalLM

    cfg = GSAConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_heads=4, num_slots=16)
    ids = torch.randint(0, 512, (2, 256), device=DEVICE)  # more tokens than the width: joined products
    runs = []
    for precast in (False, True):
        monkeypatch.setattr(weight_cast, "PRECAST", precast)
        torch.manual_seed(0)
        model = GSAForCausalLM(cfg).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        assert model._weight_casts.planned == (9 if precast else 0)  # per block [q|k|v|f], o, [gate|up], down; the head
        runs.append((losses, grads))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
