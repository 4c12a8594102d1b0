"""Vectorized PyTorch version of the chunked gated-linear-attention op: the CPU backend of
:func:`fla_gsa.ops.common.chunk.chunk_linear_attn`.

    S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) + k_t v_t^T,     o_t = scale * S_t^T q_t

Same algorithm as the Triton kernels (DESIGN.md §2), written in differentiable torch ops so autograd
provides the backward. Time is cut into chunks of ``BT`` steps and every chunk into sub-chunks of ``BC``:

    G          within-chunk cumulative sum of the log-gates (``G_i - G_j <= 0`` for ``j <= i``)
    h[n]       state entering chunk n: a sequential scan over chunks
    o_inter    (q ⊙ exp(Gk)) h[n] ⊙ exp(Gv)
    o_intra    sum_{j <= i} (q_i ⊙ k_j · exp(Gk_i - Gk_j)) v_j ⊙ exp(Gv_i - Gv_j)

Numerics: ``exp(-G)`` is never formed, since strong gates (g ≈ -20 per step) overflow it inside one
chunk. Between sub-chunks the ratio is split at the first row ``r`` of the later sub-chunk,
``exp(G_i - G_j) = exp(G_i - G_r) · exp(G_r - G_j)``, both factors ``<= 1``. Inside a sub-chunk the exact
ratio is formed on a ``[BC, BC, D]`` broadcast. Masked exponents are set to ``-inf`` *before* the exp, so
no factor overflows and no ``inf * 0`` reaches the forward or the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fla_gsa.ops.utils.index import seq_bounds

SUB_CHUNK = 16


def chunk_linear_attn_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None,
    gv: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
    output_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated linear attention in PyTorch, differentiable by autograd in every input.

    Args:
        q: ``[B, T, HQ, K]``, ``HQ = G * H``; query head ``hq`` reads key/value head ``hq // G``.
        k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        gk: ``[B, T, H, K]`` log-gates (``<= 0``) on the key side of the state, or None.
        gv: ``[B, T, H, V]`` log-gates on the value side of the state, or None.
        scale: the (already resolved) factor applied to ``q``.
        initial_state: ``[N, H, K, V]`` or None; N = B, or the number of sequences with ``cu_seqlens``.
        output_final_state: also return the state after the last step of every sequence.
        cu_seqlens: ``[N + 1]`` int offsets of sequences packed along T (then B == 1), or None.
        chunk_size: ``BT``, a power of two ``>= 16``.
        output_dtype: dtype of ``o``.

    Returns:
        ``o [B, T, HQ, V]`` in ``output_dtype`` and the final state ``[N, H, K, V]`` (float32, float64
        for float64 inputs) or None. Inputs are validated by the caller and never modified.
    """
    B, T, HQ, K = q.shape
    # float64 inputs give a float64 computation (a reference); anything else accumulates in float32.
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32

    outs, finals = [], []
    for n, (b, bos, eos) in enumerate(seq_bounds(cu_seqlens, B, T)):
        # Without cu_seqlens the whole batch goes through at once; with it, each sequence is its own
        # batch of one, so its chunks (and the gate normalization) start at its first step.
        rows = slice(None) if cu_seqlens is None else slice(b, b + 1)
        h0 = None
        if initial_state is not None:
            h0 = initial_state if cu_seqlens is None else initial_state[n:n + 1]
        o, ht = _chunk_fwd(
            q[rows, bos:eos], k[rows, bos:eos], v[rows, bos:eos],
            None if gk is None else gk[rows, bos:eos], None if gv is None else gv[rows, bos:eos],
            scale, h0, chunk_size, dtype,
        )
        outs.append(o.to(output_dtype))
        finals.append(ht)
        if cu_seqlens is None:
            break
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def _chunk_fwd(q, k, v, gk, gv, scale, h0, chunk_size, dtype):
    """One batch of equal-length sequences: ``q [B, L, HQ, K]`` ... ``h0 [B, H, K, V]`` or None.
    Returns ``o [B, L, HQ, V]`` and ``ht [B, H, K, V]``, both in ``dtype``."""
    B, L, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    G = HQ // H
    # A sequence shorter than a chunk needs no more than one (padded) power-of-two chunk; the result
    # does not depend on BT, only the work does.
    BT = min(chunk_size, max(SUB_CHUNK, 1 << (L - 1).bit_length()))
    BC = min(SUB_CHUNK, BT)
    NT = -(-L // BT)
    pad = NT * BT - L

    def chunked(x, grouped=False):
        # [B, L, H, D] -> [B, H, NT, BT, D]; q -> [B, H, G, NT, BT, K] (GQA as a broadcast dim, so
        # k, v and the gates are never repeated). The padding goes *before* the first step: padded
        # steps have q = k = v = 0 and g = 0, so they neither write nor decay the state, and the last
        # row of every chunk is a real step, which _ratio_to_last relies on. Padding after the end would
        # leave the last real step of the last chunk with a difference G_last - G_j that is 0 in value
        # but not in gradient.
        x = F.pad(x.to(dtype), (0, 0, 0, 0, pad, 0))
        if grouped:
            return x.unflatten(2, (H, G)).unflatten(1, (NT, BT)).permute(0, 3, 4, 1, 2, 5)
        return x.unflatten(1, (NT, BT)).permute(0, 3, 1, 2, 4)

    q, k, v = chunked(q * scale, grouped=True), chunked(k), chunked(v)
    Gk = None if gk is None else chunked(gk).cumsum(-2)  # [B, H, NT, BT, K]
    Gv = None if gv is None else chunked(gv).cumsum(-2)  # [B, H, NT, BT, V]

    # Inter-chunk: what each chunk writes, decayed to its last step, then the scan over chunks.
    k_w = k if Gk is None else k * _ratio_to_last(Gk)
    v_w = v if Gv is None else v * _ratio_to_last(Gv)
    U = torch.einsum("bhntk,bhntv->bhnkv", k_w, v_w)  # [B, H, NT, K, V]
    h = h0.to(dtype) if h0 is not None else q.new_zeros(B, H, K, V)
    states = []
    for n in range(NT):
        states.append(h)
        if Gk is not None:
            h = h * Gk[:, :, n, -1, :, None].exp()
        if Gv is not None:
            h = h * Gv[:, :, n, -1, None, :].exp()
        h = h + U[:, :, n]
    hs = torch.stack(states, dim=2)  # [B, H, NT, K, V], the state entering each chunk

    q_h = q if Gk is None else q * Gk.exp().unsqueeze(2)
    o = torch.einsum("bhgntk,bhnkv->bhgntv", q_h, hs)
    if Gv is not None:
        o = o * Gv.exp().unsqueeze(2)

    o = o + _intra(q, k, v, Gk, Gv, BC)

    o = o.permute(0, 3, 4, 1, 2, 5).reshape(B, NT * BT, HQ, V)[:, pad:]
    return o, h


def _ratio_to_last(Gx):
    """``exp(G_last - G_j)`` for every step j of a chunk: ``[.., BT, D]``, ``<= 1``.

    The last step's ratio is the constant 1 rather than ``exp(G_last - G_last)``: that difference is
    exactly 0 but its gradient is not, and the two O(1) gradients it sends into ``G_last`` cancel only up
    to rounding, which swamps the true gate gradient when the gates are strong (of order exp(g), e.g.
    1e-9 at g = -20)."""
    return F.pad((Gx[..., -1:, :] - Gx[..., :-1, :]).exp(), (0, 0, 0, 1), value=1.0)


def _intra(q, k, v, Gk, Gv, BC):
    """Causal attention inside each chunk, ``sum_{j <= i}`` of the chunk's own steps: pairs of distinct
    sub-chunks through a reference row, diagonal sub-chunks exactly.

    ``q [B, H, G, NT, BT, K]``, ``k [B, H, NT, BT, K]``, ``v [B, H, NT, BT, V]``, ``Gk``/``Gv`` the
    within-chunk gate cumsums like ``k``/``v`` or None. Returns ``[B, H, G, NT, BT, V]``."""
    BT = k.shape[-2]
    NC = BT // BC
    sub = lambda x: x.unflatten(-2, (NC, BC))  # noqa: E731  [.., BT, D] -> [.., NC, BC, D]
    q_c, k_c, v_c = sub(q), sub(k), sub(v)
    dev = k.device
    # Row i of sub-chunk I sees the earlier sub-chunks' columns j < r_I = I * BC.
    t = torch.arange(BT, device=dev)
    before = (t[None, :] < (torch.arange(NC, device=dev) * BC)[:, None])  # [NC, BT]
    causal = torch.ones(BC, BC, dtype=torch.bool, device=dev).tril()  # [BC, BC]
    strict = causal.tril(-1)
    fill = torch.zeros(BC, BC, dtype=k.dtype, device=dev).masked_fill(~causal, -torch.inf)

    def to_ref(Gx):
        # exp(G_r - G_j) for the reference row r of every sub-chunk and every earlier column j:
        # [B, H, NT, NC, BT, D]; later columns get -inf (exp = 0) before any exp can overflow.
        G_r = Gx[..., ::BC, :]  # [B, H, NT, NC, D]
        diff = G_r.unsqueeze(-2) - Gx.unsqueeze(-3)
        return torch.where(before[..., None], diff, -torch.inf).exp()

    def from_ref(Gx):
        # exp(G_i - G_r) for every row i of a sub-chunk: [B, H, NT, NC, BC, D], <= 1. Row r itself is
        # the constant 1 (see _ratio_to_last).
        Gc = sub(Gx)
        return F.pad((Gc[..., 1:, :] - Gc[..., :1, :]).exp(), (0, 0, 1, 0), value=1.0)

    def diag(Gx):
        # Exact exp(G_i - G_j) inside a sub-chunk: [B, H, NT, NC, BC, BC, D]. Only j < i goes through
        # G; the diagonal is the constant exp(0) = 1 and j > i the constant exp(-inf) = 0.
        Gc = sub(Gx)
        diff = Gc.unsqueeze(-2) - Gc.unsqueeze(-3)
        return torch.where(strict[..., None], diff, fill[..., None]).exp()

    # Off-diagonal sub-chunk pairs: A[I, i, j] = (q_i ⊙ exp(Gk_i - Gk_r)) · (k_j ⊙ exp(Gk_r - Gk_j)).
    if Gk is None:
        A = torch.einsum("bhgncik,bhnjk->bhgncij", q_c, k) * before[:, None, :]
    else:
        A = torch.einsum("bhgncik,bhncjk->bhgncij", q_c * from_ref(Gk).unsqueeze(2), k.unsqueeze(3) * to_ref(Gk))
    if Gv is None:
        o = torch.einsum("bhgncij,bhnjv->bhgnciv", A, v)
    else:
        o = torch.einsum("bhgncij,bhncjv->bhgnciv", A, v.unsqueeze(3) * to_ref(Gv)) * from_ref(Gv).unsqueeze(2)

    # Diagonal sub-chunks.
    if Gk is None:
        A = torch.einsum("bhgncik,bhncjk->bhgncij", q_c, k_c) * causal
    else:
        A = torch.einsum("bhgncik,bhncijk->bhgncij", q_c, k_c.unsqueeze(-3) * diag(Gk))
    if Gv is None:
        o = o + torch.einsum("bhgncij,bhncjv->bhgnciv", A, v_c)
    else:
        o = o + torch.einsum("bhgncij,bhncijv->bhgnciv", A, v_c.unsqueeze(-3) * diag(Gv))
    return o.flatten(-3, -2)
