"""``dsc::mla_decode`` — MLA in MQA mode: attention of every query head over one shared latent cache.

    scores[b,s,h,t] = scale · q[b,s,h,:] · kv[b,t,:]  (+ mask[b,s,t])
    out[b,s,h,:]    = Σ_t softmax_t(scores) · kv[b,t,:dv]

q: (B, S, H, C) — the absorbed query [W_UKᵀ q_nope ; q_pe], C = kv_lora_rank + qk_rope_head_dim;
kv: (B, T, C) — the latent cache [c_kv ; k_pe] (576 wide at full size), shared by all heads;
mask: optional (B, S, T) additive (0 / -inf: causality, DSA selection, validity);
indices: optional (B, S, K) int64 token slots to attend to (-1: none) instead of all T (mask unused);
returns (B, S, H, dv) with dv = kv_lora_rank: the latent output, to be multiplied by W_UV.

Per-head K/V is never materialised: the CPU implementation is batched matmuls with the heads
folded into the query rows (one K/V head shared by all query heads) over blocks of the context with
an online softmax, and the Triton kernel splits the context like flash-decoding (one program per
(query row, head block, context split), online softmax, then a log-sum-exp merge of the splits).
"""

from __future__ import annotations

import torch
from dsc.kernels.registry import custom_op
from dsc.kernels.triton_utils import HAVE_TRITON, cuda_kernel, tl, triton
from torch import Tensor


def mla_decode_ref(
    q: Tensor, kv: Tensor, mask: Tensor | None, scale: float, dv: int, indices: Tensor | None = None
) -> Tensor:
    qf, kvf = q.float(), kv.float()
    if indices is not None:
        B, S, K = indices.shape
        safe = indices.clamp(min=0)
        sel = kvf.gather(1, safe.reshape(B, S * K, 1).expand(B, S * K, kv.shape[-1])).view(B, S, K, -1)
        scores = torch.einsum("bshc,bskc->bshk", qf, sel) * scale
        scores = scores.masked_fill((indices < 0).unsqueeze(2), float("-inf"))
        return torch.einsum("bshk,bskc->bshc", scores.softmax(-1), sel[..., :dv]).to(q.dtype)
    scores = torch.einsum("bshc,btc->bsht", qf, kvf) * scale
    if mask is not None:
        scores = scores + mask.float().unsqueeze(2)
    return torch.einsum("bsht,btc->bshc", scores.softmax(-1), kvf[..., :dv]).to(q.dtype)


@custom_op("dsc::mla_decode")
def mla_decode(
    q: Tensor, kv: Tensor, mask: Tensor | None, scale: float, dv: int, indices: Tensor | None = None
) -> Tensor:
    if indices is not None:
        return mla_decode_ref(q, kv, mask, scale, dv, indices)
    return mla_decode_cpu(q, kv, mask, scale, dv)


CPU_BLOCK = 2048  # context tokens per block: 2048 x 576 fp32 latents = 4.7 MB, read once per block


def mla_decode_cpu(q: Tensor, kv: Tensor, mask: Tensor | None, scale: float, dv: int, block: int = CPU_BLOCK) -> Tensor:
    """Batched matmuls with the heads folded into the query rows (one shared K/V head), over the
    context in blocks with an online softmax: each block of latents is read once for its scores and
    its share of P·V while it is still in cache, and no (rows, T) score matrix is materialised."""
    B, S, H, C = q.shape
    T = kv.shape[1]
    qf = q.float().reshape(B, S * H, C)
    kvf = kv.float()
    m_all = mask.float().expand(B, S, T) if mask is not None else None
    m = qf.new_full((B, S * H, 1), float("-inf"))
    denom = qf.new_zeros(B, S * H, 1)
    acc = qf.new_zeros(B, S * H, dv)
    for t0 in range(0, T, block):
        k = kvf[:, t0 : t0 + block]
        s = torch.bmm(qf, k.transpose(1, 2)).mul_(scale)  # (B, S*H, blk)
        if m_all is not None:
            s = (s.view(B, S, H, -1) + m_all[:, :, t0 : t0 + block].unsqueeze(2)).view(B, S * H, -1)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # a row that has seen only -inf so far
        p = torch.exp(s - m_safe)
        alpha = torch.exp(m - m_safe)
        denom = denom * alpha + p.sum(-1, keepdim=True)
        acc = torch.baddbmm(acc * alpha, p, k[..., :dv])
        m = m_new
    return (acc / denom).view(B, S, H, dv).to(q.dtype)


@mla_decode.register_fake
def _(q, kv, mask, scale, dv, indices=None):
    return q.new_empty((*q.shape[:3], dv))


if HAVE_TRITON:

    @triton.jit
    def _mla_decode_kernel(
        Q, KV, M, IDX, O_part, LSE_part, T, H, scale, tokens_per_split,
        stride_qr, stride_qh, stride_kvb, stride_kvt, stride_mr, stride_ir, stride_or, stride_os, stride_oh,
        stride_lr, stride_ls,
        S: tl.constexpr, C: tl.constexpr, DV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IDX: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # b * S + s
        hb = tl.program_id(1)
        split = tl.program_id(2)
        b = row // S
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, BLOCK_C)
        h_ok = offs_h < H
        c_ok = offs_c < C
        q = tl.load(
            Q + row * stride_qr + offs_h[:, None] * stride_qh + offs_c[None, :],
            mask=h_ok[:, None] & c_ok[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        t_start = split * tokens_per_split
        t_end = tl.minimum(t_start + tokens_per_split, T)
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)  # context positions, or slots of IDX with HAS_IDX
            t_ok = offs_t < t_end
            tok = offs_t
            if HAS_IDX:  # DSA: gather the selected tokens' latents, slot -1 attends to nothing
                tok = tl.load(IDX + row * stride_ir + offs_t, mask=t_ok, other=-1)
                t_ok = t_ok & (tok >= 0)
                tok = tl.where(t_ok, tok, 0)
            kv = tl.load(
                KV + b * stride_kvb + tok[:, None] * stride_kvt + offs_c[None, :],
                mask=t_ok[:, None] & c_ok[None, :], other=0.0,
            ).to(tl.float32)  # (BLOCK_T, BLOCK_C)  # fmt: skip
            s = tl.dot(q, tl.trans(kv)) * scale  # (BLOCK_H, BLOCK_T)
            if HAS_MASK:
                mk = tl.load(M + row * stride_mr + offs_t, mask=t_ok, other=float("-inf"))
                s = s + mk[None, :]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, kv)
            m_i = m_new
        lse = tl.where(l_i > 0, tl.log(l_i) + tl.where(m_i == float("-inf"), 0.0, m_i), float("-inf"))
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        dv_ok = offs_c < DV
        tl.store(
            O_part + row * stride_or + split * stride_os + offs_h[:, None] * stride_oh + offs_c[None, :], out,
            mask=h_ok[:, None] & dv_ok[None, :],
        )  # fmt: skip
        tl.store(LSE_part + row * stride_lr + split * stride_ls + offs_h, lse, mask=h_ok)


def mla_decode_triton(
    q: Tensor,
    kv: Tensor,
    mask: Tensor | None,
    scale: float,
    dv: int,
    splits: int | None = None,
    indices: Tensor | None = None,
) -> Tensor:
    """Flash-decoding over the latent cache: context splits in parallel, then a log-sum-exp merge.
    With ``indices`` (B, S, K) the splits run over the K selected slots (DSA) and ``mask`` is unused."""
    assert HAVE_TRITON, "triton is not installed (pip install 'dsc[gpu]')"
    B, S, H, C = q.shape
    T = kv.shape[1]
    assert kv.shape == (B, T, C) and dv <= C, f"q {tuple(q.shape)} kv {tuple(kv.shape)} dv {dv}"
    q2 = q.contiguous().view(B * S, H, C)
    if kv.stride(-1) != 1:  # the kernel reads rows by their strides: a window view of the cache needs no copy
        kv = kv.contiguous()
    if indices is not None:
        assert indices.shape[:2] == (B, S), f"indices {tuple(indices.shape)} for q {tuple(q.shape)}"
        idx, mask = indices.contiguous().view(B * S, -1), None
        length = idx.shape[1]
    else:
        idx, length = q2, T
    splits = splits or max(1, min(64, triton.cdiv(length, 256)))
    per_split = triton.cdiv(length, splits)
    o_part = torch.empty(B * S, splits, H, C, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * S, splits, H, dtype=torch.float32, device=q.device)
    m = mask.float().contiguous().view(B * S, T) if mask is not None else q2
    BLOCK_H = max(16, min(64, triton.next_power_of_2(H)))
    grid = (B * S, triton.cdiv(H, BLOCK_H), splits)
    _mla_decode_kernel[grid](
        q2, kv, m, idx, o_part, lse_part, length, H, scale, per_split,
        q2.stride(0), q2.stride(1), kv.stride(0), kv.stride(1), m.stride(0) if mask is not None else 0,
        idx.stride(0) if indices is not None else 0,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        S=S, C=C, DV=dv, HAS_MASK=mask is not None, HAS_IDX=indices is not None,
        BLOCK_H=BLOCK_H, BLOCK_T=32, BLOCK_C=triton.next_power_of_2(C),
    )  # fmt: skip
    w = torch.softmax(lse_part, dim=1).nan_to_num(0.0)  # (B*S, splits, H): each split's share
    out = (o_part[..., :dv] * w.unsqueeze(-1)).sum(1)
    return out.view(B, S, H, dv).to(q.dtype)


cuda_kernel(
    mla_decode, "mla_decode",
    lambda q, kv, mask, scale, dv, indices=None: mla_decode_triton(q, kv, mask, scale, dv, indices=indices),
    mla_decode_ref,
)  # fmt: skip
