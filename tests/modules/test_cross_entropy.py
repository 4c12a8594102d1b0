"""Fused cross entropy (precomputed logits) and the chunked linear + cross entropy against
``F.cross_entropy`` in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fla_gsa.modules import (
    FusedCrossEntropyLoss,
    FusedLinearCrossEntropyLoss,
    fused_cross_entropy,
    fused_linear_cross_entropy,
)
from fla_gsa.modules.cross_entropy import LabelCheck
from fla_gsa.modules.linear_cross_entropy import linear_cross_entropy_checked
from conftest import DEVICE, assert_rel


def make_labels(N, V, ignore_frac=0.25, ignore_index=-100):
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.rand(N, device=DEVICE) < ignore_frac] = ignore_index
    return labels


def ref_ce(logits, labels, ignore_index=-100, reduction="mean"):
    """float64 F.cross_entropy; 'mean' over non-ignored rows, 0 when none."""
    loss = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="none").view(labels.shape)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / (labels != ignore_index).sum().clamp_min(1) if reduction == "mean" else total


# ---------------------------------------------------------------- precomputed logits

@pytest.mark.triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,V", [(37, 333), (5, 5000)])
def test_cross_entropy_fp32(reduction, N, V):
    logits = (3 * torch.randn(N, V, device=DEVICE)).requires_grad_()
    labels = make_labels(N, V)
    logits0 = logits.detach().clone()
    loss = fused_cross_entropy(logits, labels, reduction=reduction)
    ref = ref_ce(logits, labels, reduction=reduction)
    assert loss.dtype == torch.float32
    assert_rel("loss", loss, ref, 1e-5)
    dl = torch.randn_like(ref)
    (g,) = torch.autograd.grad((loss.double() * dl).sum(), logits)
    (rg,) = torch.autograd.grad((ref * dl).sum(), logits)
    assert_rel("dlogits", g, rg, 1e-5)
    assert torch.equal(logits.detach(), logits0), "logits were modified in place"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_half(dtype):
    logits = (2 * torch.randn(2, 9, 1000, device=DEVICE)).to(dtype).requires_grad_()
    labels = make_labels(18, 1000).view(2, 9)
    loss = FusedCrossEntropyLoss()(logits, labels)
    ref = ref_ce(logits, labels)
    assert_rel("loss", loss, ref, 1e-5)  # the math is fp32 on the given (rounded) logits
    (g,) = torch.autograd.grad(loss, logits)
    (rg,) = torch.autograd.grad(ref, logits)
    assert g.dtype == dtype
    assert_rel("dlogits", g, rg, 1e-2)


@pytest.mark.triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored(reduction):
    logits = torch.randn(6, 50, device=DEVICE, requires_grad=True)
    labels = torch.full((6,), -1, device=DEVICE)
    loss = fused_cross_entropy(logits, labels, ignore_index=-1, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.triton
def test_cross_entropy_non_contiguous_rows():
    base = torch.randn(20, 64, device=DEVICE)
    logits = base[::2]  # row stride 128, last dim contiguous
    labels = make_labels(10, 64)
    assert_rel("loss", fused_cross_entropy(logits, labels), ref_ce(logits, labels), 1e-5)


def test_cross_entropy_bad_inputs():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="labels must be in"):
        fused_cross_entropy(logits, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_cross_entropy(logits, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="labels"):
        fused_cross_entropy(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="reduction"):
        FusedCrossEntropyLoss(reduction="avg")


# ---------------------------------------------------------------- linear + cross entropy

def ref_linear_ce(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean"):
    logits = F.linear(hidden.double(), weight.double(), bias.double() if bias is not None else None)
    return ref_ce(logits, labels, ignore_index, reduction)


@pytest.mark.triton
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("reduction,chunk_size", [("mean", 8), ("sum", None), ("mean", 1000)])
def test_linear_cross_entropy_fp32(use_bias, reduction, chunk_size):
    N, D, V = 37, 100, 333
    hidden = torch.randn(N, D, device=DEVICE, requires_grad=True)
    weight = (torch.randn(V, D, device=DEVICE) / D ** 0.5).requires_grad_()
    bias = torch.randn(V, device=DEVICE, requires_grad=True) if use_bias else None
    labels = make_labels(N, V)
    tracked = [hidden, weight] + ([bias] if use_bias else [])
    before = [t.detach().clone() for t in tracked]
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, chunk_size=chunk_size)
    ref = ref_linear_ce(hidden, weight, labels, bias, reduction=reduction)
    assert_rel("loss", loss, ref, 1e-5)
    grads = torch.autograd.grad(loss * 1.5, tracked)
    ref_grads = torch.autograd.grad(ref * 1.5, tracked)
    for name, g, rg in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert_rel(f"d{name}", g, rg, 1e-5)
    for t, b in zip(tracked, before):
        assert torch.equal(t.detach(), b)


@pytest.mark.triton
def test_linear_cross_entropy_bf16():
    N, D, V = 2 * 13, 64, 500
    hidden = torch.randn(2, 13, D, device=DEVICE).bfloat16().requires_grad_()
    weight = (torch.randn(V, D, device=DEVICE) / D ** 0.5).bfloat16().requires_grad_()
    labels = make_labels(N, V).view(2, 13)
    loss = FusedLinearCrossEntropyLoss(chunk_size=8)(hidden, weight, labels)
    ref = ref_linear_ce(hidden, weight, labels)
    assert_rel("loss", loss, ref, 1e-2)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for name, g, rg in zip(["hidden", "weight"], grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert_rel(f"d{name}", g, rg, 2e-2)


@pytest.mark.triton
def test_linear_cross_entropy_all_ignored_and_no_grad():
    hidden = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    labels = torch.full((9,), -100, device=DEVICE)
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    labels = make_labels(9, 40)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    assert_rel("no-grad loss", loss, ref_linear_ce(hidden, weight, labels), 1e-5)
    # only the weight requires grad (frozen backbone): hidden gets none
    loss = fused_linear_cross_entropy(hidden.detach(), weight, labels, chunk_size=4)
    (gw,) = torch.autograd.grad(loss, weight)
    (rgw,) = torch.autograd.grad(ref_linear_ce(hidden.detach(), weight, labels), weight)
    assert_rel("dweight", gw, rgw, 1e-5)


def test_linear_cross_entropy_bad_inputs():
    h, w = torch.randn(4, 16), torch.randn(30, 16)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="weight must have shape"):
        fused_linear_cross_entropy(h, torch.randn(30, 8), y)
    with pytest.raises(TypeError, match="weight must have the dtype"):
        fused_linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_cross_entropy(h, w, y, bias=torch.randn(29))
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 30]))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(h, w, y, chunk_size=0)


@pytest.mark.parametrize("bad", [None, 30, -5])
def test_label_check_begun_early(bad):
    # a LabelCheck begun before other work is finished by the loss: the same ValueError for a bad
    # label (naming it), the loss itself otherwise
    h, w = torch.randn(6, 16, device=DEVICE), torch.randn(30, 16, device=DEVICE)
    y = torch.tensor([0, 1, -100, 3, 29, 7], device=DEVICE)
    if bad is not None:
        y[3] = bad
    check = LabelCheck(y, 30, -100)
    if bad is None:
        loss = linear_cross_entropy_checked(h, w, y, label_check=check)
        assert_rel("loss", loss, ref_linear_ce(h, w, y), 1e-5)
    else:
        with pytest.raises(ValueError, match=f"labels must be in \\[0, 30\\) or equal ignore_index=-100, got {bad}"):
            linear_cross_entropy_checked(h, w, y, label_check=check)
    # a check of other labels (or another vocabulary) is not taken for these
    other = LabelCheck(y.clone(), 30, -100)
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy_checked(h, w[:5], y, label_check=other)


def test_default_chunk_size():
    from fla_gsa.modules import linear_cross_entropy as lce

    # the 1.3B model's head: a buffer the size of h would be 1024 rows; 4096 rows keep the fp32 weight
    # gradient's traffic per chunk small next to the chunk's product
    assert lce.default_chunk_size(16384, 2048, 32000) == lce.MIN_CHUNK_ROWS == 4096
    assert lce.default_chunk_size(16384, 2048, 128256) == 4096  # 1.05e9 bytes of bf16 logits
    assert lce.default_chunk_size(16384, 2048, 262144) == 2048  # 4096 rows would pass the memory cap
    assert lce.default_chunk_size(16384, 2048, 262144, element_size=4) == 1024
    assert lce.default_chunk_size(65536, 8192, 32000) == 16384  # the size of h when that is larger
    assert lce.default_chunk_size(1024, 64, 4096) == 1024  # never more than N (rounded up)
    assert lce.default_chunk_size(1000, 64, 4096) == 1024 and lce.default_chunk_size(1, 64, 4096) == 1
    assert lce.default_chunk_size(16384, 64, 2**31) == 1  # a vocabulary larger than the cap: one row


def test_linear_cross_entropy_never_forms_full_logits(monkeypatch):
    from fla_gsa.modules import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "MIN_CHUNK_ROWS", 1)  # the size of h: 2 rows here
    assert lce.default_chunk_size(64, 8, 256) == 2
    shapes = []
    linear = F.linear

    def spy(x, w, b=None):
        out = linear(x, w, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(lce.F, "linear", spy)
    N, D, V = 64, 8, 256
    hidden = torch.randn(N, D, device=DEVICE, requires_grad=True)
    weight = torch.randn(V, D, device=DEVICE, requires_grad=True)
    labels = make_labels(N, V)
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    assert max(s[0] for s in shapes) == lce.default_chunk_size(N, D, V) == 2
    monkeypatch.undo()
    assert_rel("loss", loss, ref_linear_ce(hidden, weight, labels), 1e-5)
    # 32 chunks: the first writes the weight gradient, the others add to it
    got = torch.autograd.grad(loss, (hidden, weight))
    ref = torch.autograd.grad(ref_linear_ce(hidden, weight, labels), (hidden, weight))
    for name, g, r in zip(("dhidden", "dweight"), got, ref):
        assert_rel(name, g, r, 1e-5)


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_under_autocast(hidden_dtype):
    # Training in bf16 autocast: fp32 weights, and hidden states in fp32 (a 340M model hit this) or in
    # bf16 (the models' final norm writes the compute dtype); products in bf16.
    N, D, V = 70, 48, 300
    h = torch.randn(N, D, device=DEVICE).to(hidden_dtype).requires_grad_()
    w = (0.1 * torch.randn(V, D, device=DEVICE)).requires_grad_()
    y = torch.randint(0, V, (N,), device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, y)
    loss.backward()
    h2, w2 = h.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h2, w2), y)
    ref.backward()
    assert h.grad.dtype == hidden_dtype and w.grad.dtype == torch.float32
    assert_rel("loss", loss.float(), ref, 2e-2)
    assert_rel("dh", h.grad, h2.grad, 3e-2)
    assert_rel("dw", w.grad, w2.grad, 3e-2)

