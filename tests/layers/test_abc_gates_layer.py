"""The ABC layer's slot normalizer (``fla_gsa.layers.abc.abc_slot_gates``) on its Triton path against
its PyTorch path run in float64: a carried log-sum-exp ``z0``, left and right padding (the padding logit
-1e4 and the rule g = 0 while the previous z is empty), decoding steps, several time tiles, and the
gradients of the logits (and of ``z0``) through ``s``, ``g`` and the returned ``z_T``."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, assert_rel

from fla_gsa.layers import abc as abc_layer
from fla_gsa.ops.gsa import abc_gates
from fla_gsa.ops.utils.backend import use_kernels

NEG = abc_layer.NEG


def _mask(B, T, pad):
    """``[B, T]`` bool: row 0 unpadded; then left (or right) padding of T // 3, of all but one token,
    and of everything (a row with no token in this call)."""
    m = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    if pad is None:
        return m
    for b, n in zip(range(1, B), (T // 3, T - 1, T)):
        if pad == "left":
            m[b, :n] = False
        else:
            m[b, T - n:] = False
    return m


def _z0(B, H, M):
    """A carried log-sum-exp; the last row is one left empty by a call that was all padding."""
    z0 = torch.randn(B, H, M, device=DEVICE) * 3 + 2
    z0[-1] = NEG + math.log(7)
    return z0


def _held(mask, z0, shape):
    """Where the previous z is empty (g held at 0), as a ``shape`` (``[B, T, H, M]``) mask."""
    empty = (mask.long().cumsum(1) - mask.long() == 0)[:, :, None, None]
    return (empty if z0 is None else empty & (z0 <= NEG / 2)[:, None]).expand(shape)


def _run(e, z0, mask, ups, kernel):
    """``(s, g, z_T, de, dz0)`` of the layer function, with the gradient of
    ``<s, ds> + <g, dg> + <z_T, dz>``; ``kernel`` asserts which path ran."""
    calls = []

    def spy(*args, **kw):
        calls.append(1)
        return abc_gates.abc_slot_gates_triton(*args, **kw)

    e = e.detach().requires_grad_()
    z0 = z0.detach().requires_grad_() if z0 is not None else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(abc_layer, "abc_slot_gates_triton", spy)
        s, g, z = abc_layer.abc_slot_gates(e, z0, mask)
    assert len(calls) == int(kernel)
    ds, dg, dz = ups
    loss = (s.double() * ds).sum() + (g.double() * dg).sum() + (z.double() * dz).sum()
    grads = torch.autograd.grad(loss, [e] if z0 is None else [e, z0])
    return s, g, z, grads[0], grads[1] if z0 is not None else None


def _check(B, T, H, M, pad, with_z0, logit_scale=8.0):
    e = (torch.randn(B, T, H, M, device=DEVICE) * logit_scale).clamp(-32, 32)
    if not use_kernels(e):
        pytest.skip("the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    mask = _mask(B, T, pad)
    z0 = _z0(B, H, M) if with_z0 else None
    ups = (torch.randn(B, T, H, M, dtype=torch.float64, device=DEVICE),
           torch.randn(B, T, H, M, dtype=torch.float64, device=DEVICE),
           torch.randn(B, H, M, dtype=torch.float64, device=DEVICE))
    s, g, z, de, dz0 = _run(e, z0, mask, ups, kernel=True)
    rs, rg, rz, rde, rdz0 = _run(e.double(), None if z0 is None else z0.double(), mask, ups, kernel=False)
    assert s.dtype == g.dtype == z.dtype == torch.float32 and de.dtype == e.dtype
    assert s.shape == g.shape == e.shape and z.shape == (B, H, M)
    # g = 0 exactly while the previous z is empty: up to a row's first real token, if z0 is empty too
    held = _held(mask, z0, g.shape)
    assert (g[held] == 0).all() and (rg[held] == 0).all()
    real = mask[:, :, None, None].expand_as(s)
    # fp32 rounding: z holds ulp(z) ~ 2e-6 at |z| ~ 32 (g = z_{t-1} - z_t holds two of them against
    # |g| ~ 1/t); measured over 4 seeds of every case here <= 9e-7 (s), 7e-7 (g), 3e-7 (z_T),
    # 3.5e-6 (de), 6e-7 (dz0)
    assert_rel("s", s[real], rs[real], 1e-5)
    assert_rel("g", g, rg, 3e-5)
    assert_rel("z_T", z, rz, 1e-5)
    assert_rel("de", de, rde, 3e-5)
    if z0 is not None:
        assert_rel("dz0", dz0[:-1], rdz0[:-1], 3e-5)
        # the empty z0 ~ -1e4 of the last row reaches the loss through z ~ -1e4 (ulp 1e-3) where the
        # row is padded; the PyTorch path in fp32 measures the same (4e-4), the kernels <= 6.5e-4
        assert_rel("dz0 (empty z0)", dz0[-1:], rdz0[-1:], 3e-3)
    if not real.all():
        # padding before any real token: s = exp(NEG - z) = 1 / (t + 1) with z ~ -1e4 holding
        # ulp(1e4) ~ 1e-3 in fp32 on either path; measured <= 6.5e-4
        assert_rel("s (padding)", s[~real], rs[~real], 2e-3)
        assert (de[~real] == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("with_z0", [False, True])
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("B, T, H, M", [(4, 37, 3, 5), (4, 1, 2, 7)])
def test_layer_slot_gates_kernel(B, T, H, M, pad, with_z0):
    _check(B, T, H, M, pad, with_z0)


@pytest.mark.triton
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_layer_slot_gates_kernel_tiles(pad, monkeypatch):
    # many 16-row tiles (padding longer than a tile, carries in both passes) and T not a multiple of
    # the tile; then the default tile with T past one tile
    monkeypatch.setattr(abc_gates, "BLOCK_T", 16)
    monkeypatch.setattr(abc_gates, "TARGET_PROGRAMS", 0)
    _check(4, 61, 2, 6, pad, True)
    _check(4, 61, 2, 6, pad, False)
    monkeypatch.undo()
    _check(4, abc_gates.BLOCK_T + 13, 1, 3, pad, True)


@pytest.mark.triton
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("split", [1, 9, 30])
def test_layer_slot_gates_kernel_continues(pad, split, monkeypatch):
    # two calls, the second continuing from the first's z_T, equal one call on the whole sequence
    # (left padding of T // 3 = 13 rows: the split falls inside it or after it)
    monkeypatch.setattr(abc_gates, "BLOCK_T", 16)
    B, T, H, M = 4, 40, 2, 5
    e = (torch.randn(B, T, H, M, device=DEVICE) * 8).clamp(-32, 32)
    if not use_kernels(e):
        pytest.skip("the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    mask = _mask(B, T, pad)
    for z0 in (None, _z0(B, H, M)):
        s, g, z = abc_layer.abc_slot_gates(e, z0, mask)
        s1, g1, z1 = abc_layer.abc_slot_gates(e[:, :split], z0, mask[:, :split])
        s2, g2, z2 = abc_layer.abc_slot_gates(e[:, split:], z1, mask[:, split:])
        s12, g12 = torch.cat([s1, s2], 1), torch.cat([g1, g2], 1)
        held = _held(mask, z0, g.shape)
        assert (g12[held] == 0).all() and (g[held] == 0).all() and (g12[~held] != 0).any()
        real = mask[:, :, None, None].expand_as(s)
        assert_rel("s continued", s12[real], s[real], 1e-5)
        if not real.all():  # padding before any token: z ~ -1e4 holds ulp(1e4) ~ 1e-3 (as above)
            assert_rel("s continued (padding)", s12[~real], s[~real], 2e-3)
        assert_rel("g continued", g12, g, 3e-5)
        assert_rel("z continued", z2, z, 1e-6)
