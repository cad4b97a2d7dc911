"""A zoo of naive ("MHA mode") MLA steps WITH the DSA lightning indexer, each spelled differently.

Written from the math of the spec (§4 MLA, §4.6 DSA selection, §5 lightning indexer) only, in plain
fp32 PyTorch; no Hadamard rotation, no FP8, plain RoPE (no YaRN).  Every module decompresses the
per-head K/V from the cached latent through the kv up-projection -- none is written in the
absorbed form.  Common interface:

* ``forward(x, positions, latent_cache, index_cache)``: x (B, S, D) fp32, positions (B, S) int64
  absolute positions (rows may be at different positions), latent_cache (B, T, dc + dr) holding
  [RMSNorm(c_kv) ; RoPE_interleaved(k_pe)], index_cache (B, T, dI) holding the indexer keys
  [RoPE_nonint(LN(wk x))[:dr] ; LN(wk x)[dr:]].  Both caches are written in place at ``positions``,
  then the indexer scores all T cached keys, masks the invisible ones (slot t visible to the query
  at position p iff t <= p), keeps the top ``index_topk`` visible keys per query (ties broken
  towards the earlier token; all visible keys when fewer are visible), and MLA attends over the
  selected keys only.  Returns (B, S, D).
* ``example_inputs(B, S, T, start)``: random x, positions start..start+S-1 in every row, zero
  caches of length T.
* ``reference(x_all)``: the same DSA attention over a whole sequence from position 0 with fresh
  zero caches of length L (no cache reuse); returns (B, L, D).

Class attributes (same convention as ``mla_zoo``): ``cache_time_dims`` (time axis of each cache
arg), ``per_row_positions``, ``functional``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
class EinsumDSAMLA(nn.Module):
    """Demo-like flavour: nn.Linear / nn.RMSNorm / nn.LayerNorm submodules, an ``indexer`` child
    module, einsum for every contraction, token-major (B, S, H, T) scores.

    RoPE: cos/sin buffers (max_len, dr/2); interleaved via unflatten(-1, (dr/2, 2)) + unbind +
    stack; non-interleaved via slicing halves + cat.  Cache write: ``index_put_``.  Top-k:
    ``masked_fill`` invisible with -inf, ``torch.cat`` k columns of -inf, stable descending
    ``torch.sort``, first k.  Mask: ``scatter_`` into a zeros bool tensor, then ``masked_fill``.
    """

    cache_time_dims = (1, 1)
    per_row_positions = True
    functional = False

    def __init__(
        self,
        dim=32,
        n_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        index_n_heads=2,
        index_head_dim=8,
        index_topk=4,
        max_len=64,
        rope_theta=10000.0,
        seed=0,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim, self.n_heads, self.kv_lora_rank = dim, n_heads, kv_lora_rank
        self.dn, self.dr, self.dv = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.index_n_heads, self.index_head_dim, self.index_topk = index_n_heads, index_head_dim, index_topk
        H, dn, dr, dv, dc = n_heads, self.dn, self.dr, self.dv, kv_lora_rank
        nI, dI = index_n_heads, index_head_dim

        self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
        self.q_norm = nn.RMSNorm(q_lora_rank, eps=1e-6)
        self.wq_b = nn.Linear(q_lora_rank, H * (dn + dr), bias=False)
        self.wkv_a = nn.Linear(dim, dc + dr, bias=False)
        self.kv_norm = nn.RMSNorm(dc, eps=1e-6)
        self.wkv_b = nn.Linear(dc, H * (dn + dv), bias=False)
        self.wo = nn.Linear(H * dv, dim, bias=False)
        self.indexer = nn.Module()
        self.indexer.wq_b = nn.Linear(q_lora_rank, nI * dI, bias=False)
        self.indexer.wk = nn.Linear(dim, dI, bias=False)
        self.indexer.k_norm = nn.LayerNorm(dI, eps=1e-6)
        self.indexer.weights_proj = nn.Linear(dim, nI, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 2:  # Linear weights: uniform(-1/sqrt(in), 1/sqrt(in))
                    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * p.shape[1] ** -0.5)
            self.q_norm.weight.copy_(0.5 + torch.rand(q_lora_rank, generator=g))
            self.kv_norm.weight.copy_(0.5 + torch.rand(dc, generator=g))
            self.indexer.k_norm.weight.copy_(0.5 + torch.rand(dI, generator=g))
            self.indexer.k_norm.bias.copy_(0.1 * torch.randn(dI, generator=g))

        self.softmax_scale = (dn + dr) ** -0.5
        inv = rope_theta ** (-torch.arange(0, dr, 2, dtype=torch.float32) / dr)  # (dr/2,)
        ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]  # (max_len, dr/2)
        self.register_buffer("rope_cos", ang.cos(), persistent=False)
        self.register_buffer("rope_sin", ang.sin(), persistent=False)

    # -- RoPE ---------------------------------------------------------------------------------
    def _cos_sin(self, pos, like):  # -> cos, sin broadcastable to like[..., :dr/2]
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (B, S, dr/2)
        while cos.dim() < like.dim():
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return cos, sin

    def _rope_interleaved(self, x, pos):  # pairs (x_2j, x_2j+1)
        cos, sin = self._cos_sin(pos, x)
        a, b = x.unflatten(-1, (self.dr // 2, 2)).unbind(-1)
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    def _rope_half(self, x, pos):  # pairs (x_j, x_j+dr/2)
        cos, sin = self._cos_sin(pos, x)
        h = self.dr // 2
        a, b = x[..., :h], x[..., h:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

    # -- projections --------------------------------------------------------------------------
    def _new_entries(self, x, pos):
        B, S, _ = x.shape
        c_q = self.q_norm(self.wq_a(x))
        q = self.wq_b(c_q).view(B, S, self.n_heads, self.dn + self.dr)
        q = torch.cat((q[..., : self.dn], self._rope_interleaved(q[..., self.dn :], pos)), dim=-1)
        kv = self.wkv_a(x)
        latent = torch.cat(
            (self.kv_norm(kv[..., : self.kv_lora_rank]), self._rope_interleaved(kv[..., self.kv_lora_rank :], pos)),
            dim=-1,
        )
        iq = self.indexer.wq_b(c_q).view(B, S, self.index_n_heads, self.index_head_dim)
        iq = torch.cat((self._rope_half(iq[..., : self.dr], pos), iq[..., self.dr :]), dim=-1)
        ik = self.indexer.k_norm(self.indexer.wk(x))
        ik = torch.cat((self._rope_half(ik[..., : self.dr], pos), ik[..., self.dr :]), dim=-1)
        w = self.indexer.weights_proj(x) * self.index_n_heads**-0.5 * self.index_head_dim**-0.5
        return q, latent, iq, ik, w

    # -- DSA selection ------------------------------------------------------------------------
    def _index_mask(self, iq, w, index_cache, visible):  # -> additive (B, S, T) mask
        B, S = iq.shape[:2]
        T, k = index_cache.shape[1], self.index_topk
        logits = torch.einsum("bshd,btd->bsht", iq, index_cache)
        score = torch.einsum("bsht,bsh->bst", F.relu(logits), w)
        score = score.masked_fill(~visible, NEG_INF)
        score = torch.cat((score, score.new_full((B, S, k), NEG_INF)), dim=-1)  # (B, S, T + k)
        idx = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]
        chosen = torch.zeros(B, S, T + k, dtype=torch.bool, device=iq.device)
        chosen.scatter_(-1, idx, True)
        keep = chosen[..., :T] & visible
        return torch.zeros(B, S, T, dtype=iq.dtype, device=iq.device).masked_fill(~keep, NEG_INF)

    # -- naive MLA over the whole cache -------------------------------------------------------
    def _attend(self, q, latent_cache, mask):
        H, dn, dc = self.n_heads, self.dn, self.kv_lora_rank
        c_kv, k_pe = latent_cache[..., :dc], latent_cache[..., dc:]
        kvb = torch.einsum("btc,oc->bto", c_kv, self.wkv_b.weight).unflatten(-1, (H, dn + self.dv))
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, H, -1)), dim=-1)  # (B, T, H, dn+dr)
        scores = torch.einsum("bshd,bthd->bsht", q, k) * self.softmax_scale
        scores = scores + mask[:, :, None, :]
        p = F.softmax(scores, dim=-1, dtype=torch.float32)
        o = torch.einsum("bsht,bthd->bshd", p, v)
        return self.wo(o.flatten(2))

    def forward(self, x, positions, latent_cache, index_cache):
        q, latent, iq, ik, w = self._new_entries(x, positions)
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(positions)
        latent_cache.index_put_((rows, positions), latent)
        index_cache.index_put_((rows, positions), ik)
        T = latent_cache.shape[1]
        visible = torch.arange(T, device=x.device)[None, None, :] <= positions[:, :, None]
        mask = self._index_mask(iq, w, index_cache, visible)
        return self._attend(q, latent_cache, mask)

    def reference(self, x_all):
        B, L, _ = x_all.shape
        pos = torch.arange(L, device=x_all.device).expand(B, L)
        latent = x_all.new_zeros(B, L, self.kv_lora_rank + self.dr)
        index = x_all.new_zeros(B, L, self.index_head_dim)
        return self.forward(x_all, pos, latent, index)

    def example_inputs(self, B, S, T, start):
        x = torch.randn(B, S, self.dim)
        pos = torch.arange(start, start + S).expand(B, S).clone()
        return (
            x,
            pos,
            torch.zeros(B, T, self.kv_lora_rank + self.dr),
            torch.zeros(B, T, self.index_head_dim),
        )


# ---------------------------------------------------------------------------------------------
class HeadsFirstMatmulDSAMLA(nn.Module):
    """Hand-rolled flavour: raw nn.Parameters applied with ``@ W.T`` / ``torch.matmul``, hand-written
    RMSNorm (rsqrt) and LayerNorm (mean/var), heads-first (B, H, S, T) scores for both the
    indexer and the attention, the kv up-projection split per head into W_UK / W_UV views.

    RoPE: full-width cos/sin buffers (max_len, dr), ``repeat_interleave`` + rotate-every-two for the
    interleaved MLA rope, ``cat`` + rotate-half for the indexer rope.  Cache write: advanced-index
    assignment ``cache[rows, positions] = new``.  Top-k: ``torch.where`` invisible -> -inf,
    ``F.pad`` k columns of -inf, stable ascending ``argsort`` of the negated scores, first k.
    Mask: one-hot comparison ``idx[..., None] == arange(T)`` reduced with ``any``, then
    ``torch.where``.
    """

    cache_time_dims = (1, 1)
    per_row_positions = True
    functional = False

    def __init__(
        self,
        d_model=32,
        heads=2,
        q_rank=16,
        kv_rank=16,
        d_nope=8,
        d_rope=4,
        d_v=8,
        idx_heads=2,
        idx_dim=8,
        topk=4,
        max_len=64,
        base=10000.0,
        seed=1,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d_model, self.heads, self.kv_rank = d_model, heads, kv_rank
        self.d_nope, self.d_rope, self.d_v = d_nope, d_rope, d_v
        self.idx_heads, self.idx_dim, self.topk = idx_heads, idx_dim, topk

        def w(o, i):
            return nn.Parameter((torch.rand(o, i, generator=g) * 2 - 1) * i**-0.5)

        self.W_dq = w(q_rank, d_model)
        self.g_q = nn.Parameter(0.5 + torch.rand(q_rank, generator=g))
        self.W_uq = w(heads * (d_nope + d_rope), q_rank)
        self.W_dkv = w(kv_rank + d_rope, d_model)
        self.g_kv = nn.Parameter(0.5 + torch.rand(kv_rank, generator=g))
        self.W_ukv = w(heads * (d_nope + d_v), kv_rank)
        self.W_o = w(d_model, heads * d_v)
        self.W_iq = w(idx_heads * idx_dim, q_rank)
        self.W_ik = w(idx_dim, d_model)
        self.ln_w = nn.Parameter(0.5 + torch.rand(idx_dim, generator=g))
        self.ln_b = nn.Parameter(0.1 * torch.randn(idx_dim, generator=g))
        self.W_iw = w(idx_heads, d_model)

        self.scale = 1.0 / (d_nope + d_rope) ** 0.5
        self.w_scale = 1.0 / (idx_heads * idx_dim) ** 0.5
        freqs = 1.0 / base ** (torch.arange(0, d_rope, 2, dtype=torch.float32) / d_rope)  # (dr/2,)
        theta = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)  # (max_len, dr/2)
        self.register_buffer("cos_pairs", theta.cos().repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("sin_pairs", theta.sin().repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("cos_halves", torch.cat((theta.cos(), theta.cos()), dim=-1), persistent=False)
        self.register_buffer("sin_halves", torch.cat((theta.sin(), theta.sin()), dim=-1), persistent=False)

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _rms(t, g, eps=1e-6):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * g

    @staticmethod
    def _ln(t, g, b, eps=1e-6):
        mu = t.mean(-1, keepdim=True)
        var = (t - mu).pow(2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * g + b

    @staticmethod
    def _every_two(t):  # (.., 2j, 2j+1) -> (.., -x_2j+1, x_2j)
        return torch.stack((-t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2)

    @staticmethod
    def _half(t):
        h = t.shape[-1] // 2
        return torch.cat((-t[..., h:], t[..., :h]), dim=-1)

    def _rope_pairs(self, t, pos):  # t (B, H, S, dr) or (B, S, dr); pos (B, S)
        c, s = self.cos_pairs[pos], self.sin_pairs[pos]
        if t.dim() == 4:
            c, s = c[:, None], s[:, None]
        return t * c + self._every_two(t) * s

    def _rope_halves(self, t, pos):
        c, s = self.cos_halves[pos], self.sin_halves[pos]
        if t.dim() == 4:
            c, s = c[:, None], s[:, None]
        return t * c + self._half(t) * s

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x, positions, latent_cache, index_cache):
        B, S, _ = x.shape
        T = latent_cache.shape[1]
        H, dn, dr, dv, dc = self.heads, self.d_nope, self.d_rope, self.d_v, self.kv_rank
        nI, dI, k = self.idx_heads, self.idx_dim, self.topk

        # new cache entries
        ckv_kpe = x @ self.W_dkv.T
        new_latent = torch.cat(
            (self._rms(ckv_kpe[..., :dc], self.g_kv), self._rope_pairs(ckv_kpe[..., dc:], positions)), dim=-1
        )
        k_idx = self._ln(x @ self.W_ik.T, self.ln_w, self.ln_b)
        new_index = torch.cat((self._rope_halves(k_idx[..., :dr], positions), k_idx[..., dr:]), dim=-1)
        rows = torch.arange(B, device=x.device).unsqueeze(1).expand(B, S)
        latent_cache[rows, positions] = new_latent
        index_cache[rows, positions] = new_index

        # queries, heads first
        c_q = self._rms(x @ self.W_dq.T, self.g_q)
        q = (c_q @ self.W_uq.T).view(B, S, H, dn + dr).transpose(1, 2)  # (B, H, S, dn+dr)
        q = torch.cat((q[..., :dn], self._rope_pairs(q[..., dn:], positions)), dim=-1)
        qi = (c_q @ self.W_iq.T).view(B, S, nI, dI).transpose(1, 2)  # (B, nI, S, dI)
        qi = torch.cat((self._rope_halves(qi[..., :dr], positions), qi[..., dr:]), dim=-1)
        wts = (x @ self.W_iw.T).transpose(1, 2).unsqueeze(-1) * self.w_scale  # (B, nI, S, 1)

        # lightning indexer + top-k selection
        keys_t = torch.arange(T, device=x.device)
        visible = keys_t.view(1, 1, T) <= positions.unsqueeze(-1)  # (B, S, T)
        per_head = torch.relu(torch.matmul(qi, index_cache.unsqueeze(1).transpose(-1, -2)))  # (B, nI, S, T)
        score = (per_head * wts).sum(dim=1)  # (B, S, T)
        score = torch.where(visible, score, torch.full_like(score, NEG_INF))
        score = F.pad(score, (0, k), value=NEG_INF)  # (B, S, T + k)
        idx = torch.argsort(-score, dim=-1, stable=True)[..., :k]  # (B, S, k)
        picked = (idx.unsqueeze(-1) == keys_t.view(1, 1, 1, T)).any(dim=-2)  # (B, S, T)
        mask = torch.where(picked & visible, 0.0, NEG_INF)  # (B, S, T)

        # naive MLA over the whole cache, heads first
        c_kv = latent_cache[..., :dc].unsqueeze(1)  # (B, 1, T, dc)
        k_pe = latent_cache[..., dc:].unsqueeze(1)  # (B, 1, T, dr)
        W = self.W_ukv.view(H, dn + dv, dc)
        W_uk, W_uv = W[:, :dn, :], W[:, dn:, :]
        k_nope = torch.matmul(c_kv, W_uk.transpose(-1, -2))  # (B, H, T, dn)
        v = torch.matmul(c_kv, W_uv.transpose(-1, -2))  # (B, H, T, dv)
        key = torch.cat((k_nope, k_pe.expand(B, H, T, dr)), dim=-1)  # (B, H, T, dn+dr)
        att = torch.matmul(q, key.transpose(-1, -2)) * self.scale  # (B, H, S, T)
        att = torch.softmax(att + mask.unsqueeze(1), dim=-1)
        o = torch.matmul(att, v)  # (B, H, S, dv)
        return o.transpose(1, 2).reshape(B, S, H * dv) @ self.W_o.T

    def reference(self, x_all):
        B, L, _ = x_all.shape
        pos = torch.arange(L, device=x_all.device).unsqueeze(0).repeat(B, 1)
        return self.forward(
            x_all,
            pos,
            torch.zeros(B, L, self.kv_rank + self.d_rope, dtype=x_all.dtype, device=x_all.device),
            torch.zeros(B, L, self.idx_dim, dtype=x_all.dtype, device=x_all.device),
        )

    def example_inputs(self, B, S, T, start):
        return (
            torch.randn(B, S, self.d_model),
            (start + torch.arange(S)).unsqueeze(0).repeat(B, 1),
            torch.zeros(B, T, self.kv_rank + self.d_rope),
            torch.zeros(B, T, self.idx_dim),
        )


DSA_ZOO = [EinsumDSAMLA, HeadsFirstMatmulDSAMLA]
