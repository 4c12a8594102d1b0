"""The state scans of ``chunk_h`` (forward states, backward state gradients, the gate gradients'
per-chunk terms) against a float64 loop over chunks, in one sequential pass and split into segments
(two launches: each segment's own end state, then the scan of every segment from the carried state).

Gates are chunk-local cumsums of log gates, weak or strong (about -20 per step). Needs the Triton
kernels: ``TRITON_INTERPRET=1 pytest -m triton`` or a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import DEVICE, INTERPRET, assert_rel

from fla_gsa.ops.common import chunk_h
from fla_gsa.ops.utils.cumsum import cumsum_fwd

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                 reason="runs the Triton kernels: TRITON_INTERPRET=1 or a GPU")]


def _gates(B, T, H, D, strong, BT):
    g = F.logsigmoid(torch.randn(B, T, H, D, device=DEVICE))
    return cumsum_fwd(g - 19.5 if strong else g, BT)


def _reference(k, v, q, do, Gk, Gv, h0, dht, scale, BT):
    """Float64 ``(h, ht, dh, dh0, hdk, hdv)`` by a loop over chunks (hdk / hdv summed over blocks)."""
    k, v, q, do = (x.double().cpu() for x in (k, v, q, do))
    B, T, H, K = k.shape
    HQ, V = q.shape[2], v.shape[-1]
    G = HQ // H
    Gk = Gk.double().cpu() if Gk is not None else torch.zeros(B, T, H, K, dtype=torch.float64)
    Gv = Gv.double().cpu() if Gv is not None else torch.zeros(B, T, H, V, dtype=torch.float64)
    starts = list(range(0, T, BT))
    hs, dhs, hdk, hdv, ht, dh0 = [], [], [], [], [], []
    for b in range(B):
        state = h0[b].double().cpu().clone() if h0 is not None else torch.zeros(H, K, V, dtype=torch.float64)
        row = []
        for t0 in starts:
            t1 = min(t0 + BT, T)
            row.append(state.clone())
            gkl, gvl = Gk[b, t1 - 1], Gv[b, t1 - 1]  # [H, K], [H, V]
            kd = k[b, t0:t1] * (gkl - Gk[b, t0:t1]).exp()
            vd = v[b, t0:t1] * (gvl - Gv[b, t0:t1]).exp()
            state = state * gkl.exp()[:, :, None] * gvl.exp()[:, None, :] + torch.einsum("thk,thv->hkv", kd, vd)
        hs += row
        ht.append(state)
        grad = dht[b].double().cpu().clone() if dht is not None else torch.zeros(H, K, V, dtype=torch.float64)
        rows = [None] * len(starts)
        for n in reversed(range(len(starts))):
            t0, t1 = starts[n], min(starts[n] + BT, T)
            rows[n] = grad.clone()
            gkl, gvl = Gk[b, t1 - 1], Gv[b, t1 - 1]
            grad = grad * gkl.exp()[:, :, None] * gvl.exp()[:, None, :]
            pair = row[n] * grad
            hdk.append(pair.sum(-1))
            hdv.append(pair.sum(-2))
            qd = q[b, t0:t1].view(t1 - t0, H, G, K) * Gk[b, t0:t1, :, None].exp()
            dod = do[b, t0:t1].view(t1 - t0, H, G, V) * Gv[b, t0:t1, :, None].exp()
            grad = grad + scale * torch.einsum("thgk,thgv->hkv", qd, dod)
        dhs += rows
        dh0.append(grad)
        # hdk / hdv were appended last chunk first: restore chunk order for this sequence
        n_seq = len(starts)
        hdk[-n_seq:], hdv[-n_seq:] = hdk[-n_seq:][::-1], hdv[-n_seq:][::-1]
    return tuple(torch.stack(x) for x in (hs, ht, dhs, dh0, hdk, hdv))


def _decayed(k, v, q, do, Gk, Gv, BT):
    """The scans' pre-decayed inputs, in float64 then fp32: ``k, v`` to their chunk's end, ``q, do`` from
    its start (query heads of a group share the gates)."""
    T = k.shape[1]
    G = q.shape[2] // k.shape[2]
    out = [x.double() for x in (k, v, q, do)]
    for i, (Gx, j) in enumerate(((Gk, 0), (Gv, 1))):
        if Gx is None:
            continue
        Gd = Gx.double()
        last = torch.cat([Gd[:, min(t0 + BT, T) - 1:min(t0 + BT, T)].expand(-1, min(BT, T - t0), -1, -1)
                          for t0 in range(0, T, BT)], 1)
        out[j] = out[j] * (last - Gd).exp()
        out[j + 2] = out[j + 2] * Gd.repeat_interleave(G, dim=2).exp()
    return [x.float() for x in out]


@pytest.mark.parametrize("decayed", [False, True])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("gates", ["k", "v", "kv"])
@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("B, T, H, G, K, V", [(2, 200, 2, 1, 24, 40), (1, 157, 1, 2, 40, 20)])
def test_scans_against_float64(monkeypatch, decayed, segments, gates, strong, B, T, H, G, K, V):
    BT = 16
    NT = triton_cdiv(T, BT)
    # force segments at interpreter sizes (at least 2 chunks each), or forbid them
    monkeypatch.setattr(chunk_h, "MIN_SEGMENT_CHUNKS", 2)
    monkeypatch.setattr(chunk_h, "SEGMENT_BELOW", 1 << 20 if segments else 0)
    monkeypatch.setattr(chunk_h, "DECAYED_SCAN_PROGRAMS", 1 << 20 if segments else 0)
    plan = chunk_h.scan_plan(K, V, B * H, NT, decayed)
    assert (plan[2] > 1) == segments, plan
    k = torch.randn(B, T, H, K, device=DEVICE)
    v = torch.randn(B, T, H, V, device=DEVICE)
    q = torch.randn(B, T, H * G, K, device=DEVICE)
    do = torch.randn(B, T, H * G, V, device=DEVICE)
    Gk = _gates(B, T, H, K, strong, BT) if "k" in gates else None
    Gv = _gates(B, T, H, V, strong, BT) if "v" in gates else None
    h0 = torch.randn(B, H, K, V, device=DEVICE)
    dht = torch.randn(B, H, K, V, device=DEVICE)
    scale = 0.3
    f32 = torch.float32
    # decayed: the kernels take the gated inputs already decayed (and read only the gates' last rows)
    kk, vv, qq, dd = _decayed(k, v, q, do, Gk, Gv, BT) if decayed else (k, v, q, do)
    h, ht = chunk_h.chunk_fwd_h(kk, vv, Gk, Gv, h0, True, None, BT, f32, f32, decayed=decayed)
    dh, dh0, hdk, hdv = chunk_h.chunk_bwd_dh(qq, dd, Gk, Gv, dht, scale, None, BT, H, True, f32, f32, h,
                                             Gk is not None, Gv is not None, decayed=decayed)
    r_h, r_ht, r_dh, r_dh0, r_hdk, r_hdv = _reference(k, v, q, do, Gk, Gv, h0, dht, scale, BT)
    tol = 1e-5
    assert_rel("h", h, r_h, tol)
    assert_rel("ht", ht, r_ht, tol)
    assert_rel("dh", dh, r_dh, tol)
    assert_rel("dh0", dh0, r_dh0, tol)
    if Gk is not None:
        assert_rel("hdk", hdk.sum(0), r_hdk, tol)
    if Gv is not None:
        assert_rel("hdv", hdv.sum(0), r_hdv, tol)


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("B, T, H, K, V, M, varlen", [(2, 200, 2, 24, 40, 20, False), (1, 157, 1, 72, 20, 70, False),
                                                     (1, 130, 2, 16, 48, 8, True)])
def test_slot_scans_against_float64(monkeypatch, segments, strong, B, T, H, K, V, M, varlen):
    # GSA's two forward scans in one launch: hk = k^T s (gate on the slots, the state's columns) and
    # hv = s^T v (gate on its rows), from s decayed to its chunk's end, against the float64 loop
    BT = 16
    cu = torch.tensor([0, 15, 79, 80, 130], dtype=torch.int32, device=DEVICE) if varlen else None
    monkeypatch.setattr(chunk_h, "MIN_SEGMENT_CHUNKS", 2)
    monkeypatch.setattr(chunk_h, "DECAYED_SCAN_PROGRAMS", 1 << 20 if segments else 0)
    k = torch.randn(B, T, H, K, device=DEVICE)
    v = torch.randn(B, T, H, V, device=DEVICE)
    s = torch.rand(B, T, H, M, device=DEVICE)
    g = F.logsigmoid(torch.randn(B, T, H, M, device=DEVICE))
    G, sd = cumsum_fwd(g - 19.5 if strong else g, BT, cu_seqlens=cu, decay=s)
    N = B if cu is None else len(cu) - 1
    hk0, hv0 = torch.randn(N, H, K, M, device=DEVICE), torch.randn(N, H, M, V, device=DEVICE)
    f32 = torch.float32
    hk, hv, hkt, hvt = chunk_h.chunk_fwd_h_slots(k, v, sd, G, hk0, hv0, True, cu, BT, f32)
    seqs = [(b, 0, T) for b in range(B)] if cu is None else [(0, int(a), int(e)) for a, e in zip(cu[:-1], cu[1:])]
    r_hk, r_hkt, r_hv, r_hvt = [], [], [], []
    for n, (b, bos, eos) in enumerate(seqs):
        x = [t[b:b + 1, bos:eos] for t in (k, v, s, G)]
        rk = _reference(x[0], x[2], x[0], x[2], None, x[3], hk0[n:n + 1], None, 1.0, BT)
        rv = _reference(x[2], x[1], x[2], x[1], x[3], None, hv0[n:n + 1], None, 1.0, BT)
        r_hk.append(rk[0]), r_hkt.append(rk[1]), r_hv.append(rv[0]), r_hvt.append(rv[1])
    tol = 1e-5
    assert_rel("hk", hk, torch.cat(r_hk), tol)
    assert_rel("hv", hv, torch.cat(r_hv), tol)
    assert_rel("hkt", hkt, torch.cat(r_hkt), tol)
    assert_rel("hvt", hvt, torch.cat(r_hvt), tol)
    # the plan split the fixed-length scans into segments, or did not
    assert (chunk_h._decayed_segments(1, None if varlen else triton_cdiv(T, BT))[0] > 1) == (segments and not varlen)


@pytest.mark.parametrize("K, V, NH, NT, segmented", [
    (512, 64, 4, 256, True), (64, 512, 8, 128, True), (64, 512, 16, 64, False), (256, 512, 4, 256, False),
    (512, 64, 32, 32, False), (512, 64, 4, None, False), (100, 30, 1, 3, False), (512, 64, 1, 12, False)])
def test_scan_plan(K, V, NH, NT, segmented):
    # segments only for fixed-length inputs that leave fewer than SEGMENT_BELOW programs with 64 x 64
    # tiles, each of at least MIN_SEGMENT_CHUNKS chunks; the segments cover the chunks exactly
    BK, BV, NS, L = chunk_h.scan_plan(K, V, NH, NT)
    assert (NS > 1) == segmented
    programs = triton_cdiv(K, BK) * triton_cdiv(V, BV) * NH
    if NS > 1:
        assert NT is not None and L >= chunk_h.MIN_SEGMENT_CHUNKS and NS <= chunk_h.MAX_SEGMENTS
        assert (NS - 1) * L < NT <= NS * L
        assert programs < chunk_h.SEGMENT_BELOW and (BK, BV) == (min(64, K), min(64, V))
    else:
        assert L >= (NT or 0)
        assert programs >= chunk_h.MIN_SCAN_PROGRAMS or max(BK, BV) <= 32


@pytest.mark.parametrize("K, V, NH, NT, NS", [
    (512, 64, 32, 32, 1), (512, 64, 16, 64, 4), (64, 512, 4, 256, 16), (512, 64, 16, None, 1), (512, 64, 16, 8, 1),
    (256, 512, 4, 256, 4), (100, 30, 1, 40, 4)])
def test_scan_plan_decayed(K, V, NH, NT, NS):
    # pre-decayed inputs: 64-wide tiles always; segments (4 or more, each of at least MIN_SEGMENT_CHUNKS
    # chunks) up to DECAYED_SCAN_PROGRAMS programs
    BK, BV, ns, L = chunk_h.scan_plan(K, V, NH, NT, decayed=True)
    assert (BK, BV) == (min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V)))
    assert ns == NS
    if ns > 1:
        assert (ns - 1) * L < NT <= ns * L and L >= chunk_h.MIN_SEGMENT_CHUNKS
        assert triton_cdiv(K, BK) * triton_cdiv(V, BV) * NH * ns <= chunk_h.DECAYED_SCAN_PROGRAMS


def triton_cdiv(a, b):
    return (a + b - 1) // b
