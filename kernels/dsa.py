"""DeepSeek Sparse Attention ops: ``dsc::indexer_topk`` (the lightning indexer's scores fused with
their top-k) and ``dsc::sparse_mla`` (absorbed MLA over the selected latents only). Spec §5, §4.6.

    I[b,s,t]   = Σ_h w[b,s,h] · ReLU(q[b,s,h,:] · k[b,t,:])            t visible iff t <= limit[b,s]
    indices    = the min(topk, visible) visible t of largest I, ties to the earlier t; -1 pads the rest
    out[b,s,h] = Σ_j softmax_j(scale · (q_abs·c_j + q_pe·r_j)) · c_j   over j in indices[b,s] (not -1)

All heads of a query share one selected set. A query with no valid slot gets zeros, never NaN.
Neither op materialises a (S, T) score matrix for the whole sequence: the CPU implementations work
on blocks of query rows (the indexer scores a block of rows against the keys, selects exactly, and
keeps only (rows, topk) indices; sparse attention gathers a block's selected latents at a time).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from dsc.kernels.mla_decode import HAVE_TRITON, mla_decode_triton
from dsc.kernels.triton_utils import tl, triton, warn_no_triton
from torch import Tensor

NEG_INF = float("-inf")
ROW_BLOCK_VALUES = 1 << 24  # values (fp32) of one block's score / gather intermediates: 64 MB
SORT_MAX_T = 4096  # rows up to this long select by one stable sort; longer ones by two top-k passes


def index_scores_ref(q: Tensor, w: Tensor, keys: Tensor) -> Tensor:
    """I (B, S, T) = Σ_h w_h · ReLU(q_h · k_t) in fp32."""
    return torch.einsum("bsht,bsh->bst", torch.einsum("bshd,btd->bsht", q.float(), keys.float()).relu(), w.float())


def indexer_topk_ref(q: Tensor, w: Tensor, keys: Tensor, limit: Tensor, topk: int) -> Tensor:
    """The specification: a stable descending sort of the visible scores (ties: earlier token first),
    the first ``topk``, slots past the visible count -1. Returns (B, S, topk) int64."""
    B, S = limit.shape
    T = keys.shape[1]
    scores = index_scores_ref(q, w, keys)
    visible = torch.arange(T, device=keys.device) <= limit.unsqueeze(-1)
    scores = scores.masked_fill(~visible, NEG_INF)
    padded = torch.cat((scores, scores.new_full((B, S, topk), NEG_INF)), dim=-1)
    vals, order = padded.sort(dim=-1, descending=True, stable=True)
    vals, order = vals[..., :topk], order[..., :topk]
    return torch.where((vals > NEG_INF) & (order < T), order, -1)


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def hadamard(d: int, dtype=torch.float32) -> Tensor:
    """The orthonormal Sylvester Walsh-Hadamard matrix of order d (a power of two): H Hᵀ = I, so
    (q H)·(k H) = q·k. The indexer rotates q and k by it before FP8 to spread outliers (spec §5.3)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / d**0.5).to(dtype)


def quantize_index_keys(k: Tensor, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """Index keys (..., D), already rotated -> (e4m3 values (..., D), fp32 scale (..., 1)): one scale
    per token, amax / 448 (rounded up to a power of two with ``ue8m0``), amax at least 1e-4 so an
    all-zero key gets a finite scale (spec §5.3 / §7.3)."""
    s = k.float().abs().amax(-1, keepdim=True).clamp_min(1e-4) / FP8_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return (k.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def fp8_index_topk_ref(q: Tensor, w: Tensor, keys: Tensor, limit: Tensor, topk: int, ue8m0: bool = False) -> Tensor:
    """The selection of an FP8 index-key cache (spec §5.3, §7.4): q and the keys rotated by the
    Hadamard matrix, the keys stored as e4m3 with a per-token scale, scored in fp32 on their dequantised values."""
    h = hadamard(keys.shape[-1])
    k8, s = quantize_index_keys(keys.float() @ h, ue8m0)
    return indexer_topk_ref(q.float() @ h, w, k8.float() * s, limit, topk)


_observers: list = []


@contextmanager
def observe_indexer(fn):
    """Calls ``fn(q, w, keys, limit, topk, indices)`` after every CPU ``dsc::indexer_topk`` while
    active: how a pass measures its selections on real activations (e.g. fuse_dsa's FP8 index
    cache recall on the verification inputs) without changing the graph."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)


def _select(scores: Tensor, topk: int) -> Tensor:
    """(R, T) scores, -inf where not visible -> (R, topk) indices in increasing order, -1 padded: the
    topk largest finite scores, ties to the earlier index. Exact, without sorting the row."""
    R, T = scores.shape
    k = min(topk, T)
    if T <= SORT_MAX_T:  # short rows: a stable sort keeps equal scores in index order, earliest first
        vals, order = scores.sort(dim=-1, descending=True, stable=True)
        top = torch.where(vals[:, :k] > NEG_INF, order[:, :k], T).sort(-1).values
        idx = top.masked_fill(top == T, -1)
        return torch.cat((idx, idx.new_full((R, topk - k), -1)), dim=-1) if k < topk else idx
    kth = scores.topk(k, dim=-1).values[:, -1:]  # the k-th largest value of each row
    finite = scores > NEG_INF
    above = (scores > kth) & finite
    tied = (scores == kth) & finite
    room = k - above.sum(-1, keepdim=True)  # how many of the tied values still fit, earliest first
    keep = above | (tied & (tied.cumsum(-1) <= room))
    # compact: the kept positions in increasing order (a top-k of distinct integer keys)
    pos = torch.arange(T, device=scores.device)
    key = torch.where(keep, T - pos, 0)
    got = key.topk(k, dim=-1).values
    idx = torch.where(got > 0, T - got, -1)
    if k < topk:
        idx = torch.cat((idx, idx.new_full((R, topk - k), -1)), dim=-1)
    return idx


def indexer_topk_cpu(q: Tensor, w: Tensor, keys: Tensor, limit: Tensor, topk: int) -> Tensor:
    B, S, H, D = q.shape
    T = keys.shape[1]
    if T <= topk:  # every visible key is selected: no scores needed (the same indices, in order)
        pos = torch.arange(topk, device=q.device)
        return torch.where(pos <= limit.unsqueeze(-1), pos, -1)
    rows = max(1, ROW_BLOCK_VALUES // max(1, H * T))
    out = torch.empty(B, S, topk, dtype=torch.int64, device=q.device)
    pos = torch.arange(T, device=q.device)
    kf = keys.float()
    for s0 in range(0, S, rows):
        qs, ws, ls = q[:, s0 : s0 + rows].float(), w[:, s0 : s0 + rows].float(), limit[:, s0 : s0 + rows]
        n = qs.shape[1]  # per-head products as one batched matmul, then the head weights as another
        per_head = torch.bmm(qs.reshape(B, n * H, D), kf.transpose(1, 2)).relu_().view(B * n, H, T)
        scores = torch.bmm(ws.reshape(B * n, 1, H), per_head).view(B, n, T)
        scores = scores.masked_fill_(pos > ls.unsqueeze(-1), NEG_INF)
        out[:, s0 : s0 + rows] = _select(scores.flatten(0, 1), topk).view(B, -1, topk)
    return out


@torch.library.custom_op("dsc::indexer_topk", mutates_args=())
def indexer_topk(q: Tensor, w: Tensor, keys: Tensor, limit: Tensor, topk: int) -> Tensor:
    """q (B, S, H, D) index queries, w (B, S, H) head weights (scales folded in), keys (B, T, D) the
    index-key cache, limit (B, S) the last visible key of each query -> (B, S, topk) int64."""
    out = indexer_topk_cpu(q, w, keys, limit, topk)
    for fn in _observers:
        fn(q, w, keys, limit, topk, out)
    return out


@indexer_topk.register_fake
def _(q, w, keys, limit, topk):
    return limit.new_empty((*limit.shape, topk), dtype=torch.int64)


if HAVE_TRITON:

    @triton.jit
    def _index_scores_kernel(
        Q, W, K, LIM, OUT, T, H, S,
        stride_qr, stride_qh, stride_wr, stride_kb, stride_kt, stride_or,
        D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        """One query row against a block of keys: I = Σ_h w_h · ReLU(q_h · k_t) in fp32, -inf past
        the row's limit; the per-head (H, BLOCK_T) products never leave registers."""
        row = tl.program_id(0)  # b * S + s over the rows of this call
        tb = tl.program_id(1)
        b = row // S
        offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        t_ok, d_ok = offs_t < T, offs_d < D
        k = tl.load(
            K + b * stride_kb + offs_t[:, None] * stride_kt + offs_d[None, :],
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_T, BLOCK_D)
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + offs_h
            h_ok = hh < H
            q = tl.load(
                Q + row * stride_qr + hh[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_H, BLOCK_D)
            w = tl.load(W + row * stride_wr + hh, mask=h_ok, other=0.0).to(tl.float32)
            qk = tl.maximum(tl.dot(q, tl.trans(k)), 0.0)  # (BLOCK_H, BLOCK_T)
            acc += tl.sum(qk * w[:, None], axis=0)
        lim = tl.load(LIM + row)
        acc = tl.where(offs_t <= lim, acc, float("-inf"))
        tl.store(OUT + row * stride_or + offs_t, acc, mask=t_ok)


def indexer_topk_triton(q: Tensor, w: Tensor, keys: Tensor, limit: Tensor, topk: int) -> Tensor:
    """Blocks of query rows: the Triton kernel scores a block against the whole index-key cache in
    one pass (no per-head scores in memory, only the block's (rows, T) fp32 index scores), then the
    exact selection of ``_select`` keeps (rows, topk) indices. Memory O(rows · T + S · topk)."""
    assert HAVE_TRITON, "triton is not installed (pip install 'dsc[gpu]')"
    B, S, H, D = q.shape
    T = keys.shape[1]
    assert keys.shape == (B, T, D) and w.shape == (B, S, H) and limit.shape == (B, S), (
        f"q {tuple(q.shape)} w {tuple(w.shape)} keys {tuple(keys.shape)} limit {tuple(limit.shape)}"
    )
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    rows = max(1, min(S, ROW_BLOCK_VALUES // max(1, T)))
    out = torch.empty(B, S, topk, dtype=torch.int64, device=q.device)
    BLOCK_H = max(16, min(64, triton.next_power_of_2(H)))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_T = 64
    for s0 in range(0, S, rows):
        qs = q[:, s0 : s0 + rows].contiguous()
        n = qs.shape[1]
        q2, w2 = qs.view(B * n, H, D), w[:, s0 : s0 + rows].contiguous().view(B * n, H)
        lim = limit[:, s0 : s0 + rows].contiguous().view(B * n)
        scores = torch.empty(B * n, T, dtype=torch.float32, device=q.device)
        grid = (B * n, triton.cdiv(T, BLOCK_T))
        _index_scores_kernel[grid](
            q2, w2, keys, lim, scores, T, H, n,
            q2.stride(0), q2.stride(1), w2.stride(0), keys.stride(0), keys.stride(1), scores.stride(0),
            D=D, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_T,
        )  # fmt: skip
        out[:, s0 : s0 + n] = _select(scores, topk).view(B, n, topk)
    return out


@indexer_topk.register_kernel("cuda")
def _(q, w, keys, limit, topk):
    if not HAVE_TRITON:
        warn_no_triton("indexer_topk")
        return indexer_topk_ref(q, w, keys, limit, topk)
    return indexer_topk_triton(q, w, keys, limit, topk)


def sparse_mla_ref(q_abs: Tensor, q_pe: Tensor, latent: Tensor, rope: Tensor, indices: Tensor, scale: float) -> Tensor:
    safe = indices.clamp(min=0)
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None, None]
    c, r = latent[rows, safe].float(), rope[rows, safe].float()  # (B, S, K, dc), (B, S, K, dr)
    scores = (
        torch.einsum("bshc,bskc->bshk", q_abs.float(), c) + torch.einsum("bshr,bskr->bshk", q_pe.float(), r)
    ) * scale
    valid = (indices >= 0).unsqueeze(2)
    scores = scores.masked_fill(~valid, NEG_INF)
    p = torch.where(valid.any(-1, keepdim=True), scores.softmax(-1), 0.0)  # no valid slot: zeros, not NaN
    return torch.einsum("bshk,bskc->bshc", p, c).to(q_abs.dtype)


def _fused_view(latent: Tensor, rope: Tensor) -> Tensor | None:
    """[latent ; rope] as one (B, T, dc + dr) view when they are adjacent columns of one tensor."""
    if (
        latent.untyped_storage().data_ptr() == rope.untyped_storage().data_ptr()
        and latent.stride() == rope.stride()
        and latent.stride(-1) == 1
        and rope.storage_offset() == latent.storage_offset() + latent.shape[-1]
    ):
        C = latent.shape[-1] + rope.shape[-1]
        return latent.as_strided((*latent.shape[:-1], C), latent.stride())
    return None


def sparse_mla_cpu(q_abs: Tensor, q_pe: Tensor, latent: Tensor, rope: Tensor, indices: Tensor, scale: float) -> Tensor:
    """Blocks of query rows: gather a block's selected latents (advanced indexing), then batched
    matmuls with the heads as the rows of each (query, K selected latents) product."""
    B, S, H, dc = q_abs.shape
    K, dr = indices.shape[-1], rope.shape[-1]
    rows = max(1, ROW_BLOCK_VALUES // max(1, K * (dc + dr)))
    out = torch.empty(B, S, H, dc, dtype=q_abs.dtype, device=q_abs.device)
    batch = torch.arange(B, device=indices.device)[:, None, None]
    kv = _fused_view(latent, rope)  # [c ; k_pe] adjacent in one cache: one gather, one score product
    for s0 in range(0, S, rows):
        idx = indices[:, s0 : s0 + rows]
        n = idx.shape[1]
        safe = idx.clamp(min=0)
        if kv is not None:
            ckr = kv[batch, safe].float().view(B * n, K, dc + dr)
            c = ckr[..., :dc]
            q = torch.cat((q_abs[:, s0 : s0 + rows], q_pe[:, s0 : s0 + rows]), -1).float().view(B * n, H, dc + dr)
            scores = torch.bmm(q, ckr.transpose(1, 2)).mul_(scale)  # (B n, H, K)
        else:
            c = latent[batch, safe].float().view(B * n, K, dc)
            r = rope[batch, safe].float().view(B * n, K, dr)
            qa = q_abs[:, s0 : s0 + rows].float().reshape(B * n, H, dc)
            qp = q_pe[:, s0 : s0 + rows].float().reshape(B * n, H, dr)
            scores = torch.baddbmm(torch.bmm(qp, r.transpose(1, 2)), qa, c.transpose(1, 2)).mul_(scale)
        valid = (idx >= 0).reshape(B * n, 1, K)
        scores = scores.masked_fill_(~valid, NEG_INF)
        p = torch.where(valid.any(-1, keepdim=True), scores.softmax(-1), 0.0)
        out[:, s0 : s0 + rows] = torch.bmm(p, c).view(B, n, H, dc).to(q_abs.dtype)
    return out


@torch.library.custom_op("dsc::sparse_mla", mutates_args=())
def sparse_mla(q_abs: Tensor, q_pe: Tensor, latent: Tensor, rope: Tensor, indices: Tensor, scale: float) -> Tensor:
    """q_abs (B, S, H, dc) = W_UKᵀ q_nope, q_pe (B, S, H, dr), latent (B, T, dc), rope (B, T, dr),
    indices (B, S, K) (-1: none) -> the latent output (B, S, H, dc), to be multiplied by W_UV."""
    return sparse_mla_cpu(q_abs, q_pe, latent, rope, indices, scale)


@sparse_mla.register_fake
def _(q_abs, q_pe, latent, rope, indices, scale):
    return q_abs.new_empty(q_abs.shape)


@sparse_mla.register_kernel("cuda")
def _(q_abs, q_pe, latent, rope, indices, scale):
    if not HAVE_TRITON:
        warn_no_triton("sparse_mla")
        return sparse_mla_ref(q_abs, q_pe, latent, rope, indices, scale)
    kv = _fused_view(latent, rope)
    if kv is None:
        kv = torch.cat((latent, rope), dim=-1)  # separate caches: one copy of the cache per call
    q = torch.cat((q_abs, q_pe), dim=-1)
    return mla_decode_triton(q, kv, None, scale, latent.shape[-1], indices=indices)
