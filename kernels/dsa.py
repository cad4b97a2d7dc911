"""DeepSeek Sparse Attention ops: ``dsc::indexer_topk`` (the lightning indexer's scores fused with
their top-k), ``dsc::sparse_mla`` (absorbed MLA over the selected latents only) and
``dsc::sparse_mha`` (the MHA form — per-head K/V, as a prefill computes them — over the selected
tokens only). Spec §5, §4.6.

    I[b,s,t]   = Σ_h w[b,s,h] · ReLU(q[b,s,h,:] · k[b,t,:])            t visible iff t <= limit[b,s]
    indices    = the min(topk, visible) visible t of largest I, ties to the earlier t; -1 pads the rest
    out[b,s,h] = Σ_j softmax_j(scale · (q_abs·c_j + q_pe·r_j)) · c_j   over j in indices[b,s] (not -1)
    out[b,s,h] = Σ_j softmax_j(scale · q[b,s,h]·k[b,j,h]) · v[b,j,h]   (sparse_mha)

All heads of a query share one selected set. A query with no valid slot gets zeros, never NaN.
Neither op materialises a (S, T) score matrix for the whole sequence. On CPU, calls over fp32 caches
run the native kernels (``dsa_cpu.c``, a query row at a time); the torch implementations work
on blocks of query rows (the indexer scores a block of rows against the keys, selects exactly, and
keeps only (rows, topk) indices; sparse attention gathers the latents a block of rows selected, once
each, and masks each row's scores to its own set).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from dsc.kernels import native
from dsc.kernels.mla_decode import HAVE_TRITON, mla_decode_triton
from dsc.kernels.registry import custom_op
from dsc.kernels.triton_utils import cuda_kernel, tl, triton
from torch import Tensor

NEG_INF = float("-inf")
ROW_BLOCK_VALUES = 1 << 24  # values (fp32) of one block's score / gather intermediates: 64 MB
# a selection of few short rows by one stable sort (fewer ops: faster where per-call overhead rules,
# a 128-token prefill); more or longer rows by top-k passes (O(T), not O(T log T): a 512-token
# prefill of the demo model 62 -> 46 ms, measured)
SORT_MAX_T = 2048
SORT_MAX_VALUES = 16384  # rows x T
KEYS_MAJOR_MIN_T = 8192  # the indexer's decode rows from this context on: K qᵀ (1.5x faster at 32K, slower at 1K)
FEW_ROWS = 4  # sparse_mla: up to this many query rows gather each row's selection on its own
# sparse_mla: a block of query rows attends over the union U of its selections while U <= K * max(2, H / this)
# (the union's products have H x rows query rows, each row's own only H: measured on 2 AVX2 cores,
# the union wins to U ~ 2K at 4 heads and to at least 4K at 16)
UNION_HEADS_PER_K = 4
# CPU calls over fp32 caches go to the native kernels (``dsa_cpu.c``) where they can be built: a decode step's
# few rows in one call instead of ~40 small ATen calls (0.2 ms -> 0.02 ms on the demo model), and faster than
# the torch composition at every size measured (prefills of 2K rows, 32K-token decodes at 16 heads); the
# torch composition below is the fallback (no compiler, another CPU, DSC_NATIVE=0, low-precision caches)
USE_NATIVE = True


def _native(*cached: Tensor) -> bool:
    """Whether the native kernel takes a call over these caches."""
    return USE_NATIVE and all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in cached) and native.usable(*cached)


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
    """(R, T) scores, -inf where not visible -> (R, topk) indices, -1 padded at the end: the topk
    largest finite scores, ties to the earlier index. Few short rows: one stable sort (the indices in
    descending score order, as the reference's); otherwise one top-k, and where ties at the k-th
    value cross the cut, exact selection without sorting the row (the indices in increasing
    order). Nothing downstream depends on the order within a set."""
    R, T = scores.shape
    k = min(topk, T)
    # few short rows: a stable sort keeps equal scores in index order, earliest first
    if T <= SORT_MAX_T and R * T <= SORT_MAX_VALUES:
        vals, order = scores.sort(dim=-1, descending=True, stable=True)
        idx = order[:, :k].masked_fill(vals[:, :k] == NEG_INF, -1)
        return torch.cat((idx, idx.new_full((R, topk - k), -1)), dim=-1) if k < topk else idx
    vals, top = scores.topk(k, dim=-1)
    kth = vals[:, -1:]  # the k-th largest value of each row
    # where no value equal to the k-th is left out (or fewer than k are visible), top-k's set is the
    # tie rule's set whatever order top-k met the ties in: one pass
    exact = ((scores == kth).sum(-1) == (vals == kth).sum(-1)) | (kth.squeeze(-1) == NEG_INF)
    if bool(exact.all()):
        idx = top.masked_fill(vals == NEG_INF, -1)
        return torch.cat((idx, idx.new_full((R, topk - k), -1)), dim=-1) if k < topk else idx
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
    """Rows that see at most ``topk`` keys select every visible key without scoring (the same indices,
    in order): at short contexts every row, in a prefill the first ``topk``. The others are scored in
    blocks of rows against the keys (per-head products as one matmul, the head weights as another)
    and select exactly (``_select``)."""
    B, S, H, D = q.shape
    T = keys.shape[1]
    if _native(keys):
        return native.indexer_topk(q.float(), w.float(), keys, limit, topk)
    pos = torch.arange(topk, device=q.device)
    out = torch.where(pos <= limit.clamp(max=T - 1).unsqueeze(-1), pos, -1)
    need = limit >= topk  # more than topk keys visible: a choice to make
    if T <= topk or not bool(need.any()):
        return out
    rows = max(1, ROW_BLOCK_VALUES // max(1, H * T))
    tpos = torch.arange(T, device=q.device)
    kf = keys.float()

    def select(qs: Tensor, ws: Tensor, ls: Tensor, k: Tensor) -> Tensor:  # (Bq, n, H, D) rows -> (Bq, n, topk)
        Bq, n = qs.shape[:2]
        T = min(k.shape[1], max(1, int(ls.max()) + 1))  # no row sees past its limit: a prefill's block, its prefix
        k = k[:, :T]
        if n == 1 and T >= KEYS_MAJOR_MIN_T:  # K qᵀ: the keys read row by row as they lie in the cache
            per_head = torch.matmul(k, qs.float().reshape(Bq, H, D).transpose(1, 2)).relu_()  # (Bq, T, H)
            scores = torch.bmm(per_head, ws.float().reshape(Bq, H, 1)).view(Bq, 1, T)
        else:  # q Kᵀ: the block's rows and heads as the rows of one product
            per_head = torch.bmm(qs.float().reshape(Bq, n * H, D), k.transpose(1, 2)).relu_().view(Bq * n, H, T)
            scores = torch.bmm(ws.float().reshape(Bq * n, 1, H), per_head).view(Bq, n, T)
        scores = scores.masked_fill_(tpos[:T] > ls.unsqueeze(-1), NEG_INF)
        return _select(scores.reshape(Bq * n, T), topk).view(Bq, n, topk)

    if bool(need.all()):  # decode steps and long extends: every row, all batch rows at once
        for s0 in range(0, S, rows):
            sl = slice(s0, s0 + rows)
            out[:, sl] = select(q[:, sl], w[:, sl], limit[:, sl], kf)
        return out
    for b in range(B):
        chosen = need[b].nonzero().squeeze(1)
        for s0 in range(0, chosen.numel(), rows):
            r = chosen[s0 : s0 + rows]
            out[b, r] = select(q[b, r][None], w[b, r][None], limit[b, r][None], kf[b : b + 1])[0]
    return out


@custom_op("dsc::indexer_topk")
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


cuda_kernel(indexer_topk, "indexer_topk", indexer_topk_triton, indexer_topk_ref)


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


def _rows(t: Tensor, cols: Tensor | slice) -> Tensor:
    """The rows ``cols`` of t (T, ...) in fp32: a view for a slice, else one ``index_select``, an
    order of magnitude faster on CPU than the same gather by advanced indexing."""
    return (t[cols] if isinstance(cols, slice) else t.index_select(0, cols)).float()


def _blocks(indices: Tensor, H: int, T: int):
    """(b, rows, idx, bias, cols, U) for each block of query rows of each batch row: as many rows as
    keep a block's (H, rows, T) scores within ROW_BLOCK_VALUES, with their union (``_block_union``)."""
    B, S = indices.shape[:2]
    n = max(1, ROW_BLOCK_VALUES // max(1, H * T))
    for b in range(B):
        for s0 in range(0, S, n):
            idx = indices[b, s0 : s0 + n]  # (n, K)
            yield (b, slice(s0, s0 + idx.shape[0]), idx, *_block_union(idx, T))


def _block_union(idx: Tensor, T: int) -> tuple[Tensor, Tensor | slice, int]:
    """A block of rows' selections idx (n, K) (-1: none) over T tokens as (bias (n, U), cols, U): the
    union U of the rows' tokens (``cols``: a slice when they are a prefix of the cache, as a causal
    prefill's are, else their indices) and each row's set over it as an additive 0 / -inf mask."""
    bias = torch.full((idx.shape[0], T + 1), NEG_INF, device=idx.device)
    bias = bias.scatter_(1, idx.masked_fill(idx < 0, T), 0.0)[:, :T]  # -1 slots: an extra column, cut off
    cols = (bias == 0).any(0).nonzero().squeeze(1)
    U = cols.numel()
    if U == 0 or int(cols[-1]) + 1 == U:
        return bias[:, :U], slice(0, U), U
    return bias[:, cols], cols, U


def _sparse_mla_rows(q_abs, q_pe, latent, rope, kv, indices, scale) -> Tensor:
    """Few query rows (decode and verify steps): each row's K selected latents gathered (one
    ``index_select`` per batch row), then batched matmuls over the rows with the heads as the rows
    of each product."""
    B, S, H, dc = q_abs.shape
    K = indices.shape[-1]
    safe = indices.clamp(min=0).view(B, S * K)
    valid = (indices >= 0).view(B * S, 1, K)

    def gather(t: Tensor) -> Tensor:
        g = t.new_empty(B, S * K, t.shape[-1])
        for b in range(B):
            torch.index_select(t[b], 0, safe[b], out=g[b])
        return g.float().view(B * S, K, -1)

    if kv is not None:
        g = gather(kv)
        c = g[..., :dc]
        scores = torch.bmm(torch.cat((q_abs, q_pe), -1).float().view(B * S, H, -1), g.transpose(1, 2))
    else:
        c, r = gather(latent), gather(rope)
        qa, qp = q_abs.float().reshape(B * S, H, dc), q_pe.float().reshape(B * S, H, -1)
        scores = torch.baddbmm(torch.bmm(qp, r.transpose(1, 2)), qa, c.transpose(1, 2))
    p = scores.mul_(scale).masked_fill_(~valid, NEG_INF).softmax(-1)
    empty = ~valid.any(-1).view(-1)
    if bool(empty.any()):  # a row with no valid slot: zeros, not the NaN of an all -inf softmax
        p[empty] = 0.0
    return torch.bmm(p, c).view(B, S, H, dc).to(q_abs.dtype)


def sparse_mla_cpu(q_abs: Tensor, q_pe: Tensor, latent: Tensor, rope: Tensor, indices: Tensor, scale: float) -> Tensor:
    """Decode and verify steps: ``_sparse_mla_rows``. More query rows: blocks of rows of one batch row,
    each attending over the union U of its rows' selections: one gather of those U latents (a view
    where they are a prefix of the cache), one score product for all the block's rows and heads, each row masked
    to its own set. A block reads each token its rows share once, where a gather per row would copy
    it once per row (K x 576 values each: more than the dense scores of the block); a block whose
    rows share little (U large against K) gathers per row instead."""
    B, S, H, dc = q_abs.shape
    T, K = latent.shape[1], indices.shape[-1]
    if _native(latent, rope):
        return native.sparse_mla(q_abs.float(), q_pe.float(), latent, rope, indices, scale).to(q_abs.dtype)
    kv = _fused_view(latent, rope)  # [c ; k_pe] adjacent in one cache: one gather, one score product
    if S <= FEW_ROWS:
        return _sparse_mla_rows(q_abs, q_pe, latent, rope, kv, indices, scale)
    out = torch.empty(B, S, H, dc, dtype=q_abs.dtype, device=q_abs.device)
    for b, sl, idx, bias, cols, U in _blocks(indices, H, T):
        n = idx.shape[0]
        if U > K * max(2, H // UNION_HEADS_PER_K):  # little shared: each row's own gather is cheaper
            out[b : b + 1, sl] = _sparse_mla_rows(
                q_abs[b : b + 1, sl], q_pe[b : b + 1, sl], latent[b : b + 1], rope[b : b + 1],
                None if kv is None else kv[b : b + 1], idx[None], scale,
            )  # fmt: skip
            continue
        qa = q_abs[b, sl].float().reshape(n * H, dc)
        qp = q_pe[b, sl].float().reshape(n * H, -1)
        if kv is not None:
            g = _rows(kv[b], cols)
            c = g[:, :dc]
            scores = torch.cat((qa, qp), -1) @ g.T
        else:
            c, r = _rows(latent[b], cols), _rows(rope[b], cols)
            scores = torch.addmm(qp @ r.T, qa, c.T)
        p = scores.mul_(scale).view(n, H, U).add_(bias.unsqueeze(1)).softmax(-1)
        empty = ~(idx >= 0).any(-1)
        if bool(empty.any()):  # a row with no valid slot: zeros, not the NaN of an all -inf softmax
            p[empty] = 0.0
        out[b, sl] = (p.view(n * H, U) @ c).view(n, H, dc).to(q_abs.dtype)
    return out


@custom_op("dsc::sparse_mla")
def sparse_mla(q_abs: Tensor, q_pe: Tensor, latent: Tensor, rope: Tensor, indices: Tensor, scale: float) -> Tensor:
    """q_abs (B, S, H, dc) = W_UKᵀ q_nope, q_pe (B, S, H, dr), latent (B, T, dc), rope (B, T, dr),
    indices (B, S, K) (-1: none) -> the latent output (B, S, H, dc), to be multiplied by W_UV."""
    return sparse_mla_cpu(q_abs, q_pe, latent, rope, indices, scale)


@sparse_mla.register_fake
def _(q_abs, q_pe, latent, rope, indices, scale):
    return q_abs.new_empty(q_abs.shape)


def sparse_mla_triton(
    q_abs: Tensor, q_pe: Tensor, latent: Tensor, rope: Tensor, indices: Tensor, scale: float
) -> Tensor:
    """Through ``mla_decode``'s kernel with indices, reading an adjacent [c ; k_pe] view in place."""
    kv = _fused_view(latent, rope)
    if kv is None:
        kv = torch.cat((latent, rope), dim=-1)  # separate caches: one copy of the cache per call
    q = torch.cat((q_abs, q_pe), dim=-1)
    return mla_decode_triton(q, kv, None, scale, latent.shape[-1], indices=indices)


def sparse_mha_ref(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float) -> Tensor:
    """The MHA form over the selected tokens: q (B, S, H, D), k (B, T, H, D), v (B, T, H, Dv),
    indices (B, S, K) shared by the heads (-1: none) -> (B, S, H, Dv) in fp32; no valid slot: zeros."""
    safe = indices.clamp(min=0)
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None, None]
    ks, vs = k[rows, safe].float(), v[rows, safe].float()  # (B, S, K, H, D), (B, S, K, H, Dv)
    scores = torch.einsum("bshd,bskhd->bshk", q.float(), ks) * scale
    valid = (indices >= 0).unsqueeze(2)
    scores = scores.masked_fill(~valid, NEG_INF)
    p = torch.where(valid.any(-1, keepdim=True), scores.softmax(-1), 0.0)
    return torch.einsum("bshk,bskhd->bshd", p, vs)


def sparse_mha_cpu(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float) -> Tensor:
    """Blocks of query rows of one batch row, each attending over the union U of its rows' selections
    (the per-head K/V of those U tokens read once, a slice where U is a prefix of the cache, as in a
    causal prefill's first top-k rows), each row masked to its own set: no (S, T) scores, per-head
    products of (rows, U). Selections of neighbouring rows overlap (a prefill's rows share most of
    their keys), so the union costs little over the rows' own K; per-row gathers would copy each
    selected token's H x (D + Dv) values once per row."""
    B, S, H, D = q.shape
    T, Dv = k.shape[1], v.shape[-1]
    out = torch.empty(B, S, H, Dv, dtype=torch.float32, device=q.device)
    for b, sl, idx, bias, cols, _ in _blocks(indices, H, T):
        kk, vv = _rows(k[b], cols), _rows(v[b], cols)  # (U, H, D), (U, H, Dv)
        qh = q[b, sl].float().transpose(0, 1)  # (H, n, D)
        scores = torch.bmm(qh, kk.permute(1, 2, 0))  # (H, n, U)
        p = scores.mul_(scale).add_(bias).softmax(-1)
        empty = ~(idx >= 0).any(-1)
        if bool(empty.any()):  # a row with no valid slot: zeros, not the NaN of an all -inf softmax
            p[:, empty] = 0.0
        out[b, sl] = torch.bmm(p, vv.transpose(0, 1)).transpose(0, 1)
    return out


@custom_op("dsc::sparse_mha")
def sparse_mha(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float) -> Tensor:
    """q (B, S, H, D), k (B, T, H, D), v (B, T, H, Dv) per-head keys and values, indices (B, S, K) the
    distinct tokens each query attends to (a top-k), shared by its heads (-1: none) -> (B, S, H, Dv) fp32."""
    return sparse_mha_cpu(q, k, v, indices, scale)


@sparse_mha.register_fake
def _(q, k, v, indices, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=torch.float32)


def sparse_mha_triton(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float) -> Tensor:
    """Through ``mla_decode``'s kernel: each (batch row, head) an MQA of one head over its own rows
    [v ; k] (the values first, so the kernel's P·kv[:Dv] is P·v), the query [0 ; q] (scores see k
    only), the selection the same for every head."""
    B, S, H, D = q.shape
    T, Dv = k.shape[1], v.shape[-1]
    kv = torch.cat((v, k), -1).transpose(1, 2).reshape(B * H, T, Dv + D)
    qq = torch.cat((q.new_zeros(B, S, H, Dv), q), -1).transpose(1, 2).reshape(B * H, S, 1, Dv + D)
    idx = indices.unsqueeze(1).expand(B, H, S, indices.shape[-1]).reshape(B * H, S, -1)
    o = mla_decode_triton(qq, kv, None, scale, Dv, indices=idx)  # (B·H, S, 1, Dv)
    return o.view(B, H, S, Dv).transpose(1, 2).float()


cuda_kernel(sparse_mla, "sparse_mla", sparse_mla_triton, sparse_mla_ref)
cuda_kernel(sparse_mha, "sparse_mha", sparse_mha_triton, sparse_mha_ref)
