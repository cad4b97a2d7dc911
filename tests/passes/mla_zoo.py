"""A zoo of naive ("MHA mode") Multi-head Latent Attention modules, each spelled differently.

Every module decompresses the per-head K/V from the latent c_kv through the kv up-projection
(W_UK || W_UV) -- none of them is written in the absorbed form.  Common interface:

* ``forward(x, positions, *caches)``: x (B, S, d) fp32, positions (B, S) int64 absolute positions.
  Cache-writing modules update their caches in place and return ``out`` (B, S, d); the functional
  module takes the old cache and returns ``(out, new_cache)``.
* ``example_inputs(B, S, T, start)``: forward args for S new tokens at start..start+S-1.
* ``reference(x_all)``: the same attention over a whole sequence with no cache.

Class attributes used by the self-check: ``cache_time_dims`` (time axis of each cache arg),
``per_row_positions`` (whether rows may carry different positions), ``functional``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _causal(positions: torch.Tensor, T: int) -> torch.Tensor:
    """(B, S, T) bool: slot t visible to the query at positions[b, s] iff t <= positions[b, s]."""
    return torch.arange(T, device=positions.device)[None, None, :] <= positions[:, :, None]


# ---------------------------------------------------------------------------------------------
class DemoLatentMLA(nn.Module):
    """Inference-demo flavour.

    cache: two latent buffers kv_cache (B,T,dc) [normed c_kv] and pe_cache (B,T,dr) [roped k_pe],
    the whole cache re-decompressed every step; write: ``index_put_((rows, positions), new)``
    (per-row positions OK); contractions: einsum, up-projection as einsum against a VIEW + SLICE of
    ``wkv_b.weight``; scores: SUM of nope einsum and shared-k_pe einsum 'bshr,btr->bsht' (not
    broadcast), multiplied by softmax_scale with a YaRN-style mscale**2; mask: additive -inf via
    torch.where; softmax with dtype=float32; RoPE: interleaved pairs (x[0::2], x[1::2]) + stack;
    q LoRA (wq_a, nn.RMSNorm, wq_b); nn.RMSNorm on c_kv.  dn == dv here.
    """

    cache_time_dims = (1, 1)
    per_row_positions = True
    functional = False

    def __init__(
        self,
        dim=32,
        n_heads=2,
        q_lora_rank=12,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        mscale=1.3689,
        rope_theta=10000.0,
    ):
        super().__init__()
        torch.manual_seed(0)
        self.dim, self.n_heads, self.kv_lora_rank = dim, n_heads, kv_lora_rank
        self.dn, self.dr, self.dv = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        H, dn, dr, dv, dc = n_heads, self.dn, self.dr, self.dv, kv_lora_rank
        self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
        self.q_norm = nn.RMSNorm(q_lora_rank, eps=1e-6)
        self.wq_b = nn.Linear(q_lora_rank, H * (dn + dr), bias=False)
        self.wkv_a = nn.Linear(dim, dc + dr, bias=False)
        self.kv_norm = nn.RMSNorm(dc, eps=1e-6)
        self.wkv_b = nn.Linear(dc, H * (dn + dv), bias=False)
        self.wo = nn.Linear(H * dv, dim, bias=False)
        with torch.no_grad():
            self.q_norm.weight.uniform_(0.5, 1.5)
            self.kv_norm.weight.uniform_(0.5, 1.5)
        self.softmax_scale = (dn + dr) ** -0.5 * mscale * mscale
        inv = rope_theta ** (-torch.arange(0, dr, 2, dtype=torch.float32) / dr)
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rope(self, x, pos):  # x (B,S,dr) or (B,S,H,dr)
        ang = pos[..., None].float() * self.inv_freq
        cos, sin = ang.cos(), ang.sin()
        if x.dim() == 4:
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def _project(self, x, pos):
        B, S, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))).view(B, S, self.n_heads, self.dn + self.dr)
        q_nope, q_pe = torch.split(q, [self.dn, self.dr], dim=-1)
        kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.dr], dim=-1)
        return q_nope, self._rope(q_pe, pos), self.kv_norm(kv), self._rope(k_pe, pos)

    def _attend(self, q_nope, q_pe, kv, pe, visible):
        W = self.wkv_b.weight.view(self.n_heads, self.dn + self.dv, self.kv_lora_rank)
        k_nope = torch.einsum("btc,hdc->bthd", kv, W[:, : self.dn])
        v = torch.einsum("btc,hdc->bthd", kv, W[:, self.dn :])
        scores = (
            torch.einsum("bshd,bthd->bsht", q_nope, k_nope) + torch.einsum("bshr,btr->bsht", q_pe, pe)
        ) * self.softmax_scale
        scores = scores + torch.where(visible, 0.0, float("-inf"))[:, :, None, :]
        p = scores.softmax(dim=-1, dtype=torch.float32)
        o = torch.einsum("bsht,bthd->bshd", p, v)
        return self.wo(o.flatten(2))

    def forward(self, x, positions, kv_cache, pe_cache):
        q_nope, q_pe, kv, k_pe = self._project(x, positions)
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(positions)
        kv_cache.index_put_((rows, positions), kv)
        pe_cache.index_put_((rows, positions), k_pe)
        return self._attend(q_nope, q_pe, kv_cache, pe_cache, _causal(positions, kv_cache.shape[1]))

    def reference(self, x_all):
        B, L, _ = x_all.shape
        pos = torch.arange(L).expand(B, L)
        q_nope, q_pe, kv, k_pe = self._project(x_all, pos)
        return self._attend(q_nope, q_pe, kv, k_pe, _causal(pos, L))

    def example_inputs(self, B, S, T, start):
        kv_cache, pe_cache = torch.zeros(B, T, self.kv_lora_rank), torch.zeros(B, T, self.dr)
        kv_cache[:, :start] = torch.randn(B, start, self.kv_lora_rank)
        pe_cache[:, :start] = torch.randn(B, start, self.dr)
        pos = torch.arange(start, start + S).expand(B, S).clone()
        return (torch.randn(B, S, self.dim), pos, kv_cache, pe_cache)


# ---------------------------------------------------------------------------------------------
class HeadsFirstSdpaMLA(nn.Module):
    """HF-transformers-like flavour (written from the math, not from HF code).

    cache: decompressed per-head K (B,H,T,dn+dr) and V (B,H,T,dv), heads-first; write:
    ``cache.index_copy_(2, positions[0], new)`` (same positions for every row); contractions:
    nn.Linear + view/transpose; scores: q = cat(q_nope, q_pe) vs k = cat(k_nope, k_pe.expand over
    heads) in ONE contraction inside F.scaled_dot_product_attention with a boolean attn_mask and an
    explicit scale; RoPE: half-split (rotate_half, pairs (j, j+dr/2)); single q_proj; hand-written
    RMSNorm on c_kv; weights drawn from a torch.Generator.  dn == dv here.
    """

    cache_time_dims = (2, 2)
    per_row_positions = False
    functional = False

    def __init__(
        self,
        hidden_size=32,
        num_heads=4,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        rope_theta=10000.0,
        eps=1e-6,
    ):
        super().__init__()
        self.hidden_size, self.num_heads, self.kv_lora_rank = hidden_size, num_heads, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.q_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.eps = eps
        self.q_proj = nn.Linear(hidden_size, num_heads * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_layernorm_weight = nn.Parameter(torch.ones(kv_lora_rank))
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=False)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 1:
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        self.scaling = self.q_head_dim**-0.5
        inv = 1.0 / rope_theta ** (torch.arange(0, qk_rope_head_dim, 2, dtype=torch.float32) / qk_rope_head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    @staticmethod
    def _rotate_half(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat((-t2, t1), dim=-1)

    def _qkv(self, x, position_ids):  # -> q, k (B,H,S,dn+dr), v (B,H,S,dv)
        bsz, q_len, _ = x.shape
        q = self.q_proj(x).view(bsz, q_len, self.num_heads, self.q_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps) * self.kv_a_layernorm_weight
        kv = self.kv_b_proj(c).view(bsz, q_len, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        freqs = position_ids[:, None, :, None].float() * self.inv_freq  # (B,1,S,dr/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q_pe = q_pe * cos + self._rotate_half(q_pe) * sin
        k_pe = k_pe.view(bsz, 1, q_len, -1)
        k_pe = k_pe * cos + self._rotate_half(k_pe) * sin
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return q, k, v

    def _sdpa(self, q, k, v, position_ids):
        mask = _causal(position_ids, k.shape[2])[:, None]  # (B,1,S,T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.o_proj(o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))

    def forward(self, hidden_states, position_ids, k_cache, v_cache):
        q, k, v = self._qkv(hidden_states, position_ids)
        k_cache.index_copy_(2, position_ids[0], k)
        v_cache.index_copy_(2, position_ids[0], v)
        return self._sdpa(q, k_cache, v_cache, position_ids)

    def reference(self, x_all):
        pos = torch.arange(x_all.shape[1]).expand(x_all.shape[0], -1)
        return self._sdpa(*self._qkv(x_all, pos), pos)

    def example_inputs(self, B, S, T, start):
        k = torch.zeros(B, self.num_heads, T, self.q_head_dim)
        v = torch.zeros(B, self.num_heads, T, self.v_head_dim)
        k[:, :, :start] = torch.randn(B, self.num_heads, start, self.q_head_dim)
        v[:, :, :start] = torch.randn(B, self.num_heads, start, self.v_head_dim)
        pos = torch.arange(start, start + S).expand(B, S).clone()
        return (torch.randn(B, S, self.hidden_size), pos, k, v)


# ---------------------------------------------------------------------------------------------
class PackedLatentBmmMLA(nn.Module):
    """Kernel-engineer flavour, raw parameters + F.linear + bmm.

    cache: ONE latent buffer (B,T,dc+dr) holding [c_kv ; k_pe], re-decompressed every step;
    write: ``cache.scatter_(1, positions[..., None].expand(..., dc+dr), new)`` (per-row positions
    OK); contractions: F.linear against raw nn.Parameters, torch.bmm with heads folded into batch
    (b*H + h); scores: ONE contraction of cat(q_nope, q_pe) vs cat(k_nope, k_pe.repeat_interleave
    over heads), DIVIDED by sqrt(dn+dr); mask: boolean masked_fill(-1e9) with the mask
    repeat_interleave'd over heads; plain softmax (no upcast); RoPE: interleaved via
    view(..., dr/2, 2).unbind(-1); q LoRA with a hand-written RMSNorm.  dn=8 != dv=4.
    """

    cache_time_dims = (1,)
    per_row_positions = True
    functional = False

    def __init__(self, d_model=32, heads=4, q_rank=16, kv_rank=16, d_nope=8, d_rope=8, d_v=4, base=10000.0):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.d_model, self.h, self.dc, self.dn, self.dr, self.dv = d_model, heads, kv_rank, d_nope, d_rope, d_v

        def w(o, i):
            return nn.Parameter(torch.randn(o, i, generator=gen) * i**-0.5)

        self.w_dq, self.w_uq = w(q_rank, d_model), w(heads * (d_nope + d_rope), q_rank)
        self.g_q = nn.Parameter(1 + 0.2 * torch.randn(q_rank, generator=gen))
        self.w_dkv_kr = w(kv_rank + d_rope, d_model)
        self.g_kv = nn.Parameter(1 + 0.2 * torch.randn(kv_rank, generator=gen))
        self.w_ukv = w(heads * (d_nope + d_v), kv_rank)
        self.w_o = w(d_model, heads * d_v)
        self.register_buffer("theta", base ** (-torch.arange(0, d_rope, 2).float() / d_rope), persistent=False)

    @staticmethod
    def _rms(t, g):
        return t * (t.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * g

    def _rope(self, t, pos):  # t (..., dr), pos broadcastable to t[..., 0, 0]
        a = pos.float()[..., None] * self.theta
        while a.dim() < t.dim():
            a = a.unsqueeze(-2)
        re, im = t.view(*t.shape[:-1], self.dr // 2, 2).unbind(-1)
        c, s = a.cos(), a.sin()
        return torch.stack([re * c - im * s, re * s + im * c], dim=-1).view(t.shape)

    def _q_and_latent(self, x, pos):
        B, S, _ = x.shape
        q = F.linear(self._rms(F.linear(x, self.w_dq), self.g_q), self.w_uq).view(B, S, self.h, -1)
        q = torch.cat([q[..., : self.dn], self._rope(q[..., self.dn :], pos[:, :, None])], dim=-1)
        lat = F.linear(x, self.w_dkv_kr)
        lat = torch.cat([self._rms(lat[..., : self.dc], self.g_kv), self._rope(lat[..., self.dc :], pos)], -1)
        return q, lat

    def _attn(self, q, lat, visible):
        B, S, H, Dq = q.shape
        T = lat.shape[1]
        kv = F.linear(lat[..., : self.dc], self.w_ukv).view(B, T, H, self.dn + self.dv)
        k_pe = lat[..., self.dc :].unsqueeze(2).repeat_interleave(H, dim=2)
        k = torch.cat([kv[..., : self.dn], k_pe], dim=-1)
        qf = q.permute(0, 2, 1, 3).reshape(B * H, S, Dq)
        kf = k.permute(0, 2, 1, 3).reshape(B * H, T, Dq)
        vf = kv[..., self.dn :].permute(0, 2, 1, 3).reshape(B * H, T, self.dv)
        s = torch.bmm(qf, kf.transpose(1, 2)) / math.sqrt(Dq)
        s = s.masked_fill(~visible.repeat_interleave(H, dim=0), -1e9)
        o = torch.bmm(torch.softmax(s, dim=-1), vf)
        o = o.view(B, H, S, self.dv).permute(0, 2, 1, 3).reshape(B, S, H * self.dv)
        return F.linear(o, self.w_o)

    def forward(self, x, positions, latent_cache):
        q, lat = self._q_and_latent(x, positions)
        idx = positions[:, :, None].expand(-1, -1, lat.shape[-1])
        latent_cache.scatter_(1, idx, lat)
        return self._attn(q, latent_cache, _causal(positions, latent_cache.shape[1]))

    def reference(self, x_all):
        pos = torch.arange(x_all.shape[1]).expand(x_all.shape[0], -1)
        q, lat = self._q_and_latent(x_all, pos)
        return self._attn(q, lat, _causal(pos, x_all.shape[1]))

    def example_inputs(self, B, S, T, start):
        cache = torch.zeros(B, T, self.dc + self.dr)
        cache[:, :start] = torch.randn(B, start, self.dc + self.dr)
        pos = torch.arange(start, start + S).expand(B, S).clone()
        return (torch.randn(B, S, self.d_model), pos, cache)


# ---------------------------------------------------------------------------------------------
class SliceWriteMatmulMLA(nn.Module):
    """Research-code flavour.

    cache: decompressed per-head K (B,T,H,dn+dr) and V (B,T,H,dv), time-major; write: slice
    assignment ``k_cache[:, start:start+S] = k`` with ``start = positions[0, 0].item()`` (same
    positions for every row; bounds made known to export via torch._check); contractions:
    nn.Linear + torch.matmul / ``@`` on (B,H,S,D); scores: ONE contraction of cat(q_nope, q_pe) vs
    cat(k_nope, k_pe broadcast via expand), multiplied by 1/sqrt(dn+dr); mask: boolean
    torch.where(visible, s, finfo.min); softmax with explicit fp32 upcast and cast back; RoPE:
    interleaved, spelled as x*cos_rep + rotate_every_two(x)*sin_rep (repeat_interleave'd cos/sin);
    single q proj; hand-written RMSNorm.  dn=8 != dv=12.
    """

    cache_time_dims = (1, 1)
    per_row_positions = False
    functional = False

    def __init__(self, dim=24, heads=3, latent=16, nope=8, rope=8, vdim=12):
        super().__init__()
        torch.manual_seed(3)
        self.dim, self.heads, self.latent, self.nope, self.rope, self.vdim = dim, heads, latent, nope, rope, vdim
        self.to_q = nn.Linear(dim, heads * (nope + rope), bias=False)
        self.to_kv_latent = nn.Linear(dim, latent + rope, bias=False)
        self.kv_norm_scale = nn.Parameter(torch.rand(latent) + 0.5)
        self.kv_up = nn.Linear(latent, heads * (nope + vdim), bias=False)
        self.to_out = nn.Linear(heads * vdim, dim, bias=False)
        self.register_buffer("freqs", 1.0 / 10000 ** (torch.arange(0, rope, 2).float() / rope), persistent=False)

    def _rot(self, t, pos):  # t (B,S,H,r) ; pos (B,S)
        ang = (pos.float()[..., None] * self.freqs).repeat_interleave(2, dim=-1)[:, :, None, :]
        t2 = torch.stack((-t[..., 1::2], t[..., 0::2]), dim=-1).reshape(t.shape)
        return t * ang.cos() + t2 * ang.sin()

    def _kqv(self, x, pos):
        b, s, _ = x.shape
        q = self.to_q(x).reshape(b, s, self.heads, self.nope + self.rope)
        q = torch.cat([q[..., : self.nope], self._rot(q[..., self.nope :], pos)], dim=-1)
        lat = self.to_kv_latent(x)
        c, kr = lat[..., : self.latent], lat[..., self.latent :]
        c = c / torch.sqrt(c.square().mean(dim=-1, keepdim=True) + 1e-6) * self.kv_norm_scale
        kr = self._rot(kr.unsqueeze(2), pos)  # (b,s,1,r)
        kv = self.kv_up(c).reshape(b, s, self.heads, self.nope + self.vdim)
        k = torch.cat([kv[..., : self.nope], kr.expand(b, s, self.heads, self.rope)], dim=-1)
        return q, k, kv[..., self.nope :]

    def _attend(self, q, k, v, pos):  # q (b,s,h,D); k,v (b,t,h,*)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        visible = _causal(pos, k.shape[2]).unsqueeze(1)
        s = torch.where(visible, s, torch.finfo(s.dtype).min)
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        o = torch.matmul(p, v).transpose(1, 2)
        return self.to_out(o.reshape(o.shape[0], o.shape[1], -1))

    def forward(self, x, positions, k_cache, v_cache):
        q, k, v = self._kqv(x, positions)
        start, n = positions[0, 0].item(), x.shape[1]
        torch._check(start >= 0)
        torch._check(start + n <= k_cache.shape[1])
        k_cache[:, start : start + n] = k
        v_cache[:, start : start + n] = v
        return self._attend(q, k_cache, v_cache, positions)

    def reference(self, x_all):
        pos = torch.arange(x_all.shape[1]).expand(x_all.shape[0], -1)
        return self._attend(*self._kqv(x_all, pos), pos)

    def example_inputs(self, B, S, T, start):
        kc = torch.zeros(B, T, self.heads, self.nope + self.rope)
        vc = torch.zeros(B, T, self.heads, self.vdim)
        kc[:, :start] = torch.randn(B, start, self.heads, self.nope + self.rope)
        vc[:, :start] = torch.randn(B, start, self.heads, self.vdim)
        pos = torch.arange(start, start + S).expand(B, S).clone()
        return (torch.randn(B, S, self.dim), pos, kc, vc)


# ---------------------------------------------------------------------------------------------
class FunctionalCatMLA(nn.Module):
    """Functional / stateless-serving flavour.

    cache: functional latent cache (B,T_old,dc+dr) = [k_pe ; c_kv] (rope part FIRST); write:
    ``torch.cat((old, new), dim=1)``, returns (out, new_cache); positions are T_old..T_old+S-1;
    contractions: nn.Linear, the up-projection output split with ``unflatten`` + ``split``; scores/attention: F.scaled_dot_product_attention with an
    ADDITIVE float mask (large negative) and the DEFAULT scale (= (dn+dr)^-0.5), q = cat(q_nope,
    q_pe), k = cat(k_nope, k_pe.expand over heads), heads moved with movedim; RoPE: interleaved via
    torch.view_as_complex * torch.polar; q LoRA with nn.RMSNorm.  dn=8 != dv=10.
    """

    cache_time_dims = (1,)
    per_row_positions = False
    functional = True

    def __init__(self, d=40, n_head=2, q_lora=20, kv_lora=16, nope=8, rope=8, v=10):
        super().__init__()
        torch.manual_seed(4)
        self.d, self.n_head, self.kv_lora, self.nope, self.rope, self.v = d, n_head, kv_lora, nope, rope, v
        self.q_down = nn.Linear(d, q_lora, bias=False)
        self.q_ln = nn.RMSNorm(q_lora, eps=1e-5)
        self.q_up = nn.Linear(q_lora, n_head * (nope + rope), bias=False)
        self.kv_down = nn.Linear(d, rope + kv_lora, bias=False)  # rope part first
        self.kv_ln = nn.RMSNorm(kv_lora, eps=1e-5)
        self.kv_up = nn.Linear(kv_lora, n_head * (nope + v), bias=False)
        self.out = nn.Linear(n_head * v, d, bias=False)
        with torch.no_grad():
            self.q_ln.weight.normal_(1.0, 0.2)
            self.kv_ln.weight.normal_(1.0, 0.2)
        self.register_buffer("inv_freq", 10000.0 ** (-torch.arange(0, rope, 2).float() / rope), persistent=False)

    def _rope(self, t, pos):  # t (B,S,...,rope) ; pos (B,S)
        ang = pos.float()[..., None] * self.inv_freq
        cis = torch.polar(torch.ones_like(ang), ang)
        tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        cis = cis.view(*cis.shape[:2], *([1] * (tc.dim() - 3)), cis.shape[-1])
        return torch.view_as_real(tc * cis).flatten(-2)

    def _new_entries(self, x, pos):
        q = self.q_up(self.q_ln(self.q_down(x))).unflatten(-1, (self.n_head, self.nope + self.rope))
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        k_pe, c = self.kv_down(x).split([self.rope, self.kv_lora], dim=-1)
        q = torch.cat([q_nope, self._rope(q_pe, pos)], dim=-1)
        return q, torch.cat([self._rope(k_pe, pos), self.kv_ln(c)], dim=-1)

    def _attend(self, q, cache, pos):
        B, T, _ = cache.shape
        k_pe, c = cache.split([self.rope, self.kv_lora], dim=-1)
        k_nope, val = self.kv_up(c).unflatten(-1, (self.n_head, self.nope + self.v)).split([self.nope, self.v], -1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, T, self.n_head, self.rope)], dim=-1)
        bias = (~_causal(pos, T)).float().mul(-1e30)[:, None]  # (B,1,S,T)
        o = F.scaled_dot_product_attention(q.movedim(2, 1), k.movedim(2, 1), val.movedim(2, 1), attn_mask=bias)
        return self.out(o.movedim(1, 2).flatten(2))

    def forward(self, x, positions, cache):
        q, new = self._new_entries(x, positions)
        cache = torch.cat((cache, new), dim=1)
        return self._attend(q, cache, positions), cache

    def reference(self, x_all):
        pos = torch.arange(x_all.shape[1]).expand(x_all.shape[0], -1)
        q, lat = self._new_entries(x_all, pos)
        return self._attend(q, lat, pos)

    def example_inputs(self, B, S, T, start):
        """T is ignored: the functional cache holds exactly the `start` old tokens."""
        cache = torch.randn(B, start, self.rope + self.kv_lora)
        pos = torch.arange(start, start + S).expand(B, S).clone()
        return (torch.randn(B, S, self.d), pos, cache)


ZOO = [DemoLatentMLA, HeadsFirstSdpaMLA, PackedLatentBmmMLA, SliceWriteMatmulMLA, FunctionalCatMLA]
