"""One-token GSA decoding: both state updates, the slot softmax and the readout in one launch.

Per key/value head, with ``a = exp(g)``::

    hk' = hk Diag(a) + k s^T                 hk [K, M]
    ok  = scale * hk'^T q                    [M], per query head of the group
    p   = softmax(ok)                        over the M slots, fp32
    hv' = Diag(a) hv + s v^T                 hv [M, V]
    o   = hv'^T p                            [V], per query head

This is one step of GSA's two gated-linear-attention passes (gate on the value side of ``hk``, on the
key side of ``hv``), fused so a decoding step costs a single kernel with no host synchronization (it can
be captured in a CUDA graph). The caller's states are never written: new ones are returned.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fla_gsa.ops.utils.backend import use_triton
from fla_gsa.ops.utils.checks import (FLOAT_DTYPES, check_gate, check_qkv, check_same_device, check_state, check_tensor,
                                      resolve_scale)
from fla_gsa.ops.utils.launch import LeanKernel, current_device, current_stream, direct_launch_ok, lean
from fla_gsa.ops.utils.triton_utils import cdiv, next_pow2, next_power_of_2

_Tensor = torch.Tensor
_FLOATS = frozenset(FLOAT_DTYPES)


@lean
@triton.jit
def fused_gsa_decode_kernel(
    q, k, v, s, g, o, hk0, hv0, hk, hv, scale,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, M: tl.constexpr, V: tl.constexpr,
    BG: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    # One program per (group of NVB value blocks, batch * kv head). Every group recomputes the cheap K
    # pass (the softmax needs all of it; only the first group stores hk'), so few groups when the batch
    # alone fills the GPU, one block per group when it does not.
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    HQ: tl.constexpr = H * G
    i_bh = i_bh.to(tl.int64)

    o_g = tl.arange(0, BG)
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    b_s = tl.load(s + i_bh * M + o_m, mask=m_m, other=0).to(tl.float32)  # [BM]
    b_a = tl.exp(tl.load(g + i_bh * M + o_m, mask=m_m, other=0).to(tl.float32))  # [BM]
    p_q = q + (i_b * HQ + i_h * G).to(tl.int64) * K

    # pass K: hk' and the slot logits of every query head of the group (unrolled: the loads of all
    # blocks are in flight together, a one-token step is latency-bound)
    b_ok = tl.zeros([BG, BM], dtype=tl.float32)
    for i_k in tl.static_range(0, (K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_hk = m_k[:, None] & m_m[None, :]
        o_hk = i_bh * K * M + o_k[:, None] * M + o_m[None, :]
        b_hk = tl.zeros([BK, BM], dtype=tl.float32)
        if USE_INITIAL_STATE:
            b_hk += tl.load(hk0 + o_hk, mask=m_hk, other=0).to(tl.float32)
        b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_hk = b_hk * b_a[None, :] + b_k[:, None] * b_s[None, :]  # [BK, BM]
        if i_v == 0:
            tl.store(hk + o_hk, b_hk, mask=m_hk)
        for i_g in tl.static_range(G):
            b_q = tl.load(p_q + i_g * K + o_k, mask=m_k, other=0).to(tl.float32)
            b_ok += tl.where(o_g[:, None] == i_g, tl.sum(b_hk * b_q[:, None], 0)[None, :], 0)

    # softmax over the slots; padded slots get -inf, padded query rows are never stored
    b_ok = tl.where(m_m[None, :], b_ok * scale, float("-inf"))
    b_p = tl.exp(b_ok - tl.max(b_ok, 1)[:, None])
    b_p = b_p / tl.sum(b_p, 1)[:, None]  # [BG, BM]

    # pass V: hv' and the readout, block by block
    p_o = o + (i_b * HQ + i_h * G).to(tl.int64) * V
    for j in tl.static_range(NVB):
        o_v = (i_v * NVB + j) * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_hv = m_m[:, None] & m_v[None, :]
        o_hv = i_bh * M * V + o_m[:, None] * V + o_v[None, :]
        b_hv = tl.zeros([BM, BV], dtype=tl.float32)
        if USE_INITIAL_STATE:
            b_hv += tl.load(hv0 + o_hv, mask=m_hv, other=0).to(tl.float32)
        b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0).to(tl.float32)
        b_hv = b_hv * b_a[:, None] + b_s[:, None] * b_v[None, :]  # [BM, BV]
        tl.store(hv + o_hv, b_hv, mask=m_hv)
        for i_g in tl.static_range(G):
            b_pg = tl.sum(tl.where(o_g[:, None] == i_g, b_p, 0), 0)  # [BM]
            tl.store(p_o + i_g * V + o_v, tl.sum(b_pg[:, None] * b_hv, 0).to(o.dtype.element_ty), mask=m_v)


@functools.lru_cache(maxsize=64)
def _decode_config(B, H, G, K, M, V, device_index):
    """Launch constants of one decode shape: tiles, value-block grouping, warps."""
    BM = next_pow2(M)
    # Keep each state tile near 4K fp32 values: wide slot counts get narrower K/V tiles.
    cap = max(16, min(64, 4096 // BM))
    BK, BV = min(next_pow2(K), cap), min(next_pow2(V), cap)
    NV = cdiv(V, BV)
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count if device_index >= 0 else 128
    groups = max(1, min(NV, cdiv(2 * sms, B * H)))  # about two programs per SM
    NVB = cdiv(NV, groups)
    return (cdiv(NV, NVB), B * H), dict(H=H, G=G, K=K, M=M, V=V, BG=next_power_of_2(G), BK=BK,
                                              BM=BM, BV=BV, NVB=NVB, num_warps=4 if BM * max(BK, BV) > 2048 else 2)


# The launch of a decoding step, per shape, dtypes and device: its grid and constants, and once a step
# has run with 16-byte aligned pointers, the compiled kernel and its trailing constants (lean's cache
# entry for that specialization). A step with the same key and aligned pointers then calls the compiled
# launcher directly: a step is ~10 us of GPU work, so each microsecond of host time shows at B=1.
_steps: dict = {}


def _decode_triton(q, k, v, s, g, scale, hk, hv):
    B, _, HQ, K = q.shape
    H, M, V = k.shape[2], s.shape[-1], v.shape[-1]
    # three allocations: one shared buffer and two views of it took twice the host time
    o = v.new_empty(B, 1, HQ, V)
    hk_new = q.new_empty(B, H, K, M, dtype=torch.float32)
    hv_new = q.new_empty(B, H, M, V, dtype=torch.float32)
    dev = q.get_device()
    args = (q.contiguous(), k.contiguous(), v.contiguous(), s.contiguous(), g.contiguous(), o,
            hk.contiguous() if hk is not None else None, hv.contiguous() if hv is not None else None,
            hk_new, hv_new)
    if hk is None or dev < 0:  # the first token, or the interpreter: no direct launch
        grid, meta = _decode_config(B, H, HQ // H, K, M, V, dev)
        fused_gsa_decode_kernel[grid](*args, scale, USE_INITIAL_STATE=hk is not None, **meta)
        return o, (hk_new, hv_new)
    key = (current_device(), dev, q.shape, H, M, V, q.dtype, k.dtype, v.dtype, s.dtype, g.dtype, hk.dtype, hv.dtype)
    step = _steps.get(key)
    if step is None:
        if len(_steps) >= 256:  # many shapes (batch sizes): start over rather than grow
            _steps.clear()
        step = _steps[key] = [*_decode_config(B, H, HQ // H, K, M, V, dev), None]
    grid, meta, entry = step
    ptrs = [t.data_ptr() for t in args]
    aligned = not (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3] | ptrs[4] | ptrs[5] | ptrs[6] | ptrs[7] | ptrs[8]
                   | ptrs[9]) & 15
    if entry is not None and aligned and direct_launch_ok():
        compiled, tail = entry
        compiled.run(grid[0], grid[1], 1, current_stream(key[0]), compiled.function, compiled.packed_metadata,
                     None, None, None, *ptrs, scale, *tail)
    else:
        fused_gsa_decode_kernel[grid](*args, scale, USE_INITIAL_STATE=True, **meta)
        if aligned and isinstance(fused_gsa_decode_kernel, LeanKernel):
            step[2] = fused_gsa_decode_kernel.entry((*args, scale), dict(USE_INITIAL_STATE=True, **meta))
    return o, (hk_new, hv_new)


def plain_decode_args(q, k, v, s, g, scale, initial_state):
    """``(scale, hk, hv)`` when a :func:`fla_gsa.ops.fused_recurrent_gsa` call is a plain decoding step,
    found in a few comparisons; None for every other call, which then takes the full checks (they name
    what is wrong) and the general path.

    Plain: ``q [B, 1, HQ, K]``, ``k [B, 1, H, K]``, ``v [B, 1, H, V]``, ``s`` and ``g [B, 1, H, M]``
    and ``initial_state`` a pair ``(hk [B, H, K, M], hv [B, H, M, V])``, all contiguous floating-point
    tensors (not subclasses) on one device, none of them needing a gradient, ``scale`` None or a float,
    and no size zero. Every plain call passes the full checks: tests compare the two on good and bad
    inputs."""
    if type(initial_state) not in (tuple, list) or len(initial_state) != 2:
        return None
    hk, hv = initial_state
    grad = torch.is_grad_enabled()
    for x in (q, k, v, s, g, hk, hv):
        if type(x) is not _Tensor or x.dtype not in _FLOATS or not x.is_contiguous() or (grad and x.requires_grad):
            return None
    qs, vs, ss = q.shape, v.shape, s.shape
    if len(qs) != 4 or len(vs) != 4 or len(ss) != 4:
        return None
    B, T, HQ, K = qs
    H, V, M = vs[2], vs[3], ss[3]
    if (T != 1 or not (B and H and K and V and M) or HQ % H or vs[0] != B or vs[1] != 1
            or k.shape != (B, 1, H, K) or ss != (B, 1, H, M) or g.shape != ss
            or hk.shape != (B, H, K, M) or hv.shape != (B, H, M, V)):
        return None
    dev = q.device
    if k.device != dev or v.device != dev or s.device != dev or g.device != dev or hk.device != dev or hv.device != dev:
        return None
    if scale is None:
        scale = K ** -0.5
    elif type(scale) is not float:
        return None
    return scale, hk, hv


def _decode_torch(q, k, v, s, g, scale, hk, hv):
    B, _, HQ, K = q.shape
    H, M, V = k.shape[2], s.shape[-1], v.shape[-1]
    dtype, out_dtype = torch.promote_types(q.dtype, torch.float32), v.dtype
    q, k, v, s, g = (x[:, 0].to(dtype) for x in (q, k, v, s, g))
    a = g.exp()  # [B, H, M]
    hk = hk.to(dtype) if hk is not None else q.new_zeros(B, H, K, M)
    hv = hv.to(dtype) if hv is not None else q.new_zeros(B, H, M, V)
    hk = hk * a[:, :, None, :] + k[..., :, None] * s[..., None, :]
    hv = hv * a[..., :, None] + s[..., :, None] * v[..., None, :]
    p = (torch.einsum("bhgk,bhkm->bhgm", q.view(B, H, HQ // H, K), hk) * scale).softmax(-1)
    o = torch.einsum("bhgm,bhmv->bhgv", p, hv).reshape(B, 1, HQ, V)
    return o.to(out_dtype), (hk.float(), hv.float())


def fused_gsa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    hk: torch.Tensor | None = None,
    hv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    r"""One decoding step of Gated Slot Attention, fused into a single kernel (no autograd).

    Per key/value head, with ``a = exp(g)``::

        hk' = hk Diag(a) + k s^T,    p = softmax(scale * hk'^T q),    hv' = Diag(a) hv + s v^T,    o = hv'^T p

    No host synchronization, so the call can be captured in a CUDA graph. ``hk`` / ``hv`` are read,
    never written: the updated states are new tensors.

    Args:
        q: queries ``[B, 1, HQ, K]``; ``HQ`` a multiple of ``H`` (GQA).
        k: keys ``[B, 1, H, K]``.
        v: values ``[B, 1, H, V]``.
        s: slot write weights ``[B, 1, H, M]``.
        g: log forget gates of the slots ``[B, 1, H, M]`` (``<= 0``).
        scale: factor on the slot logits, default ``K ** -0.5``.
        hk: key-side state ``[B, H, K, M]`` (float32), or None for zeros (the first token).
        hv: value-side state ``[B, H, M, V]`` (float32), or None for zeros. Give both states or neither.

    Returns:
        ``(o, (hk', hv'))``: ``o`` ``[B, 1, HQ, V]`` in ``v.dtype``; the new states ``[B, H, K, M]`` and
        ``[B, H, M, V]``, float32.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from fla_gsa.ops.gsa.decode import fused_gsa_decode
        >>> B, HQ, H, K, V, M = 2, 4, 2, 16, 32, 20
        >>> state = (None, None)
        >>> for _ in range(3):
        ...     q, k = torch.randn(B, 1, HQ, K), torch.randn(B, 1, H, K)
        ...     v, g = torch.randn(B, 1, H, V), F.logsigmoid(torch.randn(B, 1, H, M))
        ...     o, state = fused_gsa_decode(q, k, v, 1 - g.exp(), g, hk=state[0], hv=state[1])
        >>> o.shape, state[0].shape, state[1].shape
        (torch.Size([2, 1, 4, 32]), torch.Size([2, 2, 16, 20]), torch.Size([2, 2, 20, 32]))
    """
    B, T, HQ, H, K, V = check_qkv(q, k, v)
    if T != 1:
        raise ValueError(f"fused_gsa_decode takes one token: q must have shape [B, 1, HQ, K], got {tuple(q.shape)}")
    check_tensor(s, "s", 4, "[B, 1, H, M]")
    M = s.shape[3]
    check_gate(s, "s", (B, 1, H, M), "[B, 1, H, M]")
    check_tensor(g, "g", 4, "[B, 1, H, M]")
    check_gate(g, "g", (B, 1, H, M), "[B, 1, H, M]")
    if (hk is None) != (hv is None):
        raise ValueError(f"hk and hv must be given together (or both None), got hk={'None' if hk is None else 'a tensor'}, "
                         f"hv={'None' if hv is None else 'a tensor'}")
    check_state(hk, "hk", (B, H, K, M), "[B, H, K, M]")
    check_state(hv, "hv", (B, H, M, V), "[B, H, M, V]")
    check_same_device({"q": q, "s": s, "g": g, "hk": hk, "hv": hv})
    return gsa_decode_unchecked(q, k, v, s, g, resolve_scale(scale, K), hk, hv)


def gsa_decode_unchecked(q, k, v, s, g, scale, hk, hv):
    """:func:`fused_gsa_decode` for callers that validated the arguments already (``scale`` resolved):
    a decoding step is a few microseconds of GPU work, so checking twice would show."""
    if use_triton(q):  # a kernel launch records no autograd graph: no grad mode to enter
        return _decode_triton(q, k, v, s, g, scale, hk, hv)
    with torch.no_grad():
        return _decode_torch(q, k, v, s, g, scale, hk, hv)
