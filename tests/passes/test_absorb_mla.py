"""absorb_mla: fires per MLA layer on the reference model and on independently written MLAs
(latent-cache style, matmul/chunk spellings), keeps the numbers over long decodes, and does not fire
when a precondition fails."""

import math

import pytest
import torch
from dsc.model import DeepseekV32ForCausalLM, preset
from torch import nn

from dsc.frontends.reference import capture
from dsc.pass_manager import run_pipeline, select_passes
from tests.passes.helpers import DEFAULT_PASSES, apply, ops, toy_program
from tests.tolerances import TOL

MLA_OP = "dsc.mla_decode.default"


def _rope_half(x, pos, heads_first=False):
    d = x.shape[-1] // 2
    inv = 1.0 / (10000 ** (torch.arange(d, dtype=torch.float32) / d))
    ang = pos[..., None].float() * inv  # (B, S, d)
    if heads_first:  # x: (B, H, S, 2d)
        ang = ang.unsqueeze(1)
    while ang.ndim < x.ndim:
        ang = ang.unsqueeze(-2)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()), -1)


class LatentCacheMLA(nn.Module):
    """Another team's MLA: caches the latent [c ; k_rope] and re-decompresses it through wkv_b every step
    (cache style b); half-split RoPE; causal mask from positions; no normalisation on the latent."""

    def __init__(self, d=32, H=3, dc=16, dr=8, dn=8, dv=12):
        super().__init__()
        self.H, self.dc, self.dr, self.dn, self.dv = H, dc, dr, dn, dv
        self.wq = nn.Linear(d, H * (dn + dr), bias=False)
        self.wkv_a = nn.Linear(d, dc + dr, bias=False)
        self.wkv_b = nn.Linear(dc, H * (dn + dv), bias=False)
        self.wo = nn.Linear(H * dv, d, bias=False)

    def forward(self, x, pos, cache, w=None):
        B, S, _ = x.shape
        T = cache.shape[1]
        q = self.wq(x).view(B, S, self.H, self.dn + self.dr)
        q_nope, q_rope = torch.split(q, [self.dn, self.dr], dim=-1)
        q = torch.cat([q_nope, _rope_half(q_rope, pos)], dim=-1)
        c, kr = self.wkv_a(x).split([self.dc, self.dr], -1)
        rows = torch.arange(B).unsqueeze(1).expand(B, S)
        cache.index_put_((rows, pos), torch.cat([c, _rope_half(kr, pos)], -1))
        up = self.wkv_b if w is None else (lambda c: torch.nn.functional.linear(c, w))  # w: a run-time weight
        kvb = up(cache[..., : self.dc]).view(B, T, self.H, self.dn + self.dv)
        k_nope, v = kvb.split([self.dn, self.dv], -1)
        k = torch.cat([k_nope, cache[..., self.dc :].unsqueeze(2).expand(B, T, self.H, self.dr)], -1)
        att = torch.einsum("bqhc,bkhc->bqhk", q, k) / math.sqrt(self.dn + self.dr)
        causal = torch.where(torch.arange(T) <= pos[..., None], 0.0, float("-inf"))  # (B, S, T)
        p = (att + causal[:, :, None, :]).softmax(-1)
        o = torch.einsum("bqhk,bkhc->bqhc", p, v)
        return self.wo(o.reshape(B, S, self.H * self.dv))


class PerHeadMatmulMLA(nn.Module):
    """A third spelling: per-head K/V caches (style a), the up-projection as matmul with W.t(),
    K/V split with chunk, the rope key broadcast with expand."""

    def __init__(self, d=32, H=2, dc=16, dr=8, dh=8):
        super().__init__()
        self.H, self.dc, self.dr, self.dh = H, dc, dr, dh
        self.q_proj = nn.Linear(d, H * (dh + dr), bias=False)
        self.kv_down = nn.Linear(d, dc + dr, bias=False)
        self.kv_up = nn.Parameter(torch.randn(H * 2 * dh, dc) * 0.2)
        self.out = nn.Linear(H * dh, d, bias=False)

    def forward(self, x, pos, k_cache, v_cache):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.H, self.dh + self.dr)
        latent, k_rope = self.kv_down(x).split([self.dc, self.dr], -1)
        kv = torch.matmul(latent, self.kv_up.t()).view(B, S, self.H, 2 * self.dh)
        k_nope, v = kv.chunk(2, dim=-1)
        k = torch.cat([k_nope, _rope_half(k_rope, pos).unsqueeze(2).expand(B, S, self.H, self.dr)], -1)
        rows = torch.arange(B).unsqueeze(1).expand(B, S)
        k_cache.index_put_((rows, pos), k)
        v_cache.index_put_((rows, pos), v)
        q = torch.cat([q[..., : self.dh], _rope_half(q[..., self.dh :], pos)], -1)
        s = torch.einsum("bshd,bthd->bsht", q, k_cache) * 0.3
        o = torch.einsum("bsht,bthd->bshd", s.softmax(-1), v_cache)
        return self.out(o.flatten(2))


class HeadsFirstMatmulMLA(nn.Module):
    """The layout of the Hugging Face modeling code: (B, H, S, D) after a transpose, the split after the
    transpose, scores as matmul(q, k.transpose(2, 3)), a (B, 1, S, T) mask, softmax in fp32, P·V by
    matmul, heads merged by transpose + reshape. Caches the latent (style b); q through a LoRA pair."""

    def __init__(self, d=32, H=3, dc=16, dr=8, dn=8, dv=12, ql=24):
        super().__init__()
        self.H, self.dc, self.dr, self.dn, self.dv = H, dc, dr, dn, dv
        self.q_a, self.q_b = nn.Linear(d, ql, bias=False), nn.Linear(ql, H * (dn + dr), bias=False)
        self.kv_a = nn.Linear(d, dc + dr, bias=False)
        self.kv_b = nn.Linear(dc, H * (dn + dv), bias=False)
        self.o = nn.Linear(H * dv, d, bias=True)

    def forward(self, x, pos, cache):
        B, S, _ = x.shape
        T, H = cache.shape[1], self.H
        q = self.q_b(self.q_a(x)).view(B, S, H, self.dn + self.dr).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.dn, self.dr], dim=-1)
        q = torch.cat([q_nope, _rope_half(q_pe, pos, heads_first=True)], dim=-1)
        c, kr = self.kv_a(x).split([self.dc, self.dr], -1)
        rows = torch.arange(B).unsqueeze(1).expand(B, S)
        cache.index_put_((rows, pos), torch.cat([c, _rope_half(kr, pos)], -1))
        kv = self.kv_b(cache[..., : self.dc]).view(B, T, H, self.dn + self.dv).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, cache[..., self.dc :].unsqueeze(1).expand(B, H, T, self.dr)], dim=-1)
        w = torch.matmul(q, k.transpose(2, 3)) * (self.dn + self.dr) ** -0.5
        w = w + torch.where(torch.arange(T) <= pos[..., None], 0.0, float("-inf"))[:, None]  # (B, 1, S, T)
        p = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(p, v).transpose(1, 2).reshape(B, S, H * self.dv)
        return self.o(o)


class SdpaPerHeadMLA(nn.Module):
    """scaled_dot_product_attention over per-head K/V caches (style a, passed as a list like the reference
    model's) with a boolean (B, 1, S, T) mask, q / k / v transposed to (B, H, S, D) for it, an explicit scale."""

    def __init__(self, d=32, H=2, dc=16, dr=8, dn=8, dv=4):
        super().__init__()
        self.H, self.dc, self.dr, self.dn, self.dv = H, dc, dr, dn, dv
        self.wq = nn.Linear(d, H * (dn + dr), bias=False)
        self.kv_down = nn.Linear(d, dc + dr, bias=False)
        self.kv_up = nn.Linear(dc, H * (dn + dv), bias=False)
        self.out = nn.Linear(H * dv, d, bias=False)

    def forward(self, x, pos, caches, causal=False):
        k_cache, v_cache = caches
        B, S, _ = x.shape
        T, H = k_cache.shape[1], self.H
        q_nope, q_pe = self.wq(x).view(B, S, H, self.dn + self.dr).split([self.dn, self.dr], -1)
        q = torch.cat([q_nope, _rope_half(q_pe, pos)], -1)
        latent, k_rope = self.kv_down(x).split([self.dc, self.dr], -1)
        k_nope, v = self.kv_up(latent).view(B, S, H, self.dn + self.dv).split([self.dn, self.dv], -1)
        k = torch.cat([k_nope, _rope_half(k_rope, pos).unsqueeze(2).expand(B, S, H, self.dr)], -1)
        rows = torch.arange(B).unsqueeze(1).expand(B, S)
        k_cache.index_put_((rows, pos), k)
        v_cache.index_put_((rows, pos), v)
        visible = (torch.arange(T) <= pos[..., None])[:, None]  # (B, 1, S, T) bool
        o = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
            attn_mask=None if causal else visible, is_causal=causal, scale=0.25,
        )  # fmt: skip
        return self.out(o.transpose(1, 2).flatten(2))


class SplitProjectionMLA(nn.Module):
    """Separate W_UK and W_UV projections (no fused kv_b), one fused projection for the q latent and the
    kv latent, scores with heads-first output letters, a latent cache (style b)."""

    def __init__(self, d=32, H=4, dc=12, dr=4, dn=6, dv=10, ql=20):
        super().__init__()
        self.H, self.dc, self.dr, self.dn, self.dv, self.ql = H, dc, dr, dn, dv, ql
        self.fused_a = nn.Linear(d, ql + dc + dr, bias=False)
        self.q_up = nn.Linear(ql, H * (dn + dr), bias=False)
        self.w_uk, self.w_uv = nn.Linear(dc, H * dn, bias=False), nn.Linear(dc, H * dv, bias=False)
        self.o = nn.Linear(H * dv, d, bias=False)

    def forward(self, x, pos, cache):
        B, S, _ = x.shape
        T, H = cache.shape[1], self.H
        cq, c, kr = self.fused_a(x).split([self.ql, self.dc, self.dr], -1)
        q_nope, q_pe = self.q_up(cq).view(B, S, H, -1).split([self.dn, self.dr], -1)
        q = torch.cat([q_nope, _rope_half(q_pe, pos)], -1)
        rows = torch.arange(B).unsqueeze(1).expand(B, S)
        cache.index_put_((rows, pos), torch.cat([c, _rope_half(kr, pos)], -1))
        lat = cache[..., : self.dc]
        k_nope, v = self.w_uk(lat).view(B, T, H, self.dn), self.w_uv(lat).view(B, T, H, self.dv)
        k = torch.cat([k_nope, cache[..., self.dc :].unsqueeze(2).expand(B, T, H, self.dr)], -1)
        s = torch.einsum("nqhe,nkhe->nhqk", q, k) / 3.0
        s = s + torch.where(torch.arange(T) <= pos[..., None], 0.0, float("-inf")).unsqueeze(1)
        o = torch.einsum("nhqk,nkhe->nqhe", s.softmax(dim=3), v)
        return self.o(o.reshape(B, S, H * self.dv))


class FoldedHeadsBmmMLA(LatentCacheMLA):
    """The latent-cache MLA with attention by torch.bmm: heads folded into the batch, (B·H, S, D)
    against (B·H, T, D) keys, one (S, T) causal mask for every row, the result unfolded again."""

    def forward(self, x, pos, cache):
        B, S, _ = x.shape
        T, H = cache.shape[1], self.H
        q = self.wq(x).view(B, S, H, self.dn + self.dr)
        q_nope, q_rope = torch.split(q, [self.dn, self.dr], dim=-1)
        q = torch.cat([q_nope, _rope_half(q_rope, pos)], dim=-1)
        c, kr = self.wkv_a(x).split([self.dc, self.dr], -1)
        rows = torch.arange(B).unsqueeze(1).expand(B, S)
        cache.index_put_((rows, pos), torch.cat([c, _rope_half(kr, pos)], -1))
        k_nope, v = self.wkv_b(cache[..., : self.dc]).view(B, T, H, self.dn + self.dv).split([self.dn, self.dv], -1)
        k = torch.cat([k_nope, cache[..., self.dc :].unsqueeze(2).expand(B, T, H, self.dr)], -1)
        fold = lambda t: t.transpose(1, 2).reshape(B * H, t.shape[1], t.shape[3])  # noqa: E731
        s = torch.bmm(fold(q), fold(k).transpose(1, 2)) * 0.25
        s = s + torch.where(torch.arange(T) <= pos[0, :, None], 0.0, float("-inf"))  # (S, T)
        o = torch.bmm(s.softmax(-1), fold(v)).view(B, H, S, self.dv).transpose(1, 2)
        return self.wo(o.reshape(B, S, H * self.dv))


def _toy(mod, *args):
    p, _, _ = apply("canonicalize", toy_program(mod, *args))
    return p


def test_fires_on_latent_cache_mla():
    mod = LatentCacheMLA().eval()
    B, S, T = 2, 3, 7
    pos = torch.tensor([[4, 5, 6], [4, 5, 6]])
    args = (torch.randn(B, S, 32), pos, torch.randn(B, T, 24))
    p = _toy(mod, *args)
    out, matches, stats = apply("absorb_mla", p)
    assert matches == 1 and stats["entries"]["forward"]["latent_style"] == 1
    h = ops(out)
    assert h[MLA_OP] == 1 and "aten.softmax.int" not in h
    cache_a, cache_b = torch.randn(B, T, 24), None
    cache_b = cache_a.clone()
    x = torch.randn(B, S, 32)
    with torch.no_grad():
        want = mod(x, pos, cache_a)
        got = out.module("forward")(x, pos, cache_b)
    torch.testing.assert_close(got, want, **TOL["fp32_rewrite"])
    assert torch.equal(cache_a, cache_b)  # same cache layout, same writes


def test_fires_on_per_head_matmul_mla_and_changes_its_cache():
    mod = PerHeadMatmulMLA().eval()
    B, S, T = 1, 2, 6
    pos = torch.tensor([[4, 5]])
    args = (torch.randn(B, S, 32), pos, torch.zeros(B, T, 2, 16), torch.zeros(B, T, 2, 8))
    p = _toy(mod, *args)
    out, matches, stats = apply("absorb_mla", p)
    assert matches == 1 and stats["entries"]["forward"]["per_head_cache_style"] == 1
    # one latent cache input (dc + dr wide) replaces the two per-head caches
    phs = [
        n
        for n in out.entries["forward"].graph.nodes
        if n.op == "placeholder" and n.name.startswith(("k_cache", "v_cache"))
    ]
    assert [tuple(n.meta["val"].shape[2:]) for n in phs] == [(24,)]


@pytest.mark.parametrize("products", ["never", "always"])
def test_fires_on_heads_first_matmul_mla(products):
    mod = HeadsFirstMatmulMLA().eval()
    B, S, T = 2, 2, 9
    pos = torch.tensor([[6, 7], [3, 4]])
    args = (torch.randn(B, S, 32), pos, torch.randn(B, T, 24))
    out, matches, stats = apply("absorb_mla", _toy(mod, *args), options={"products": products})
    assert matches == 1 and stats["entries"]["forward"]["latent_style"] == 1
    assert stats["entries"]["forward"]["products"] == (products == "always")
    # W_UQ·W_UK (H, dc, q_lora) + W_UV·W_O (d, H·dc) against W_UQ's nope rows, W_kvb and W_O
    H, dc, dn, dv, ql, d = 3, 16, 8, 12, 24, 32
    factored, made = 4 * (H * dn * ql + H * (dn + dv) * dc + d * H * dv), 4 * (H * dc * ql + d * H * dc)
    assert stats["products"]["param_bytes_per_layer"] == {"factored": factored, "products": made}
    h = ops(out)
    assert h[MLA_OP] == 1 and "aten.softmax.int" not in h and "aten.matmul.default" not in h
    x, cache = torch.randn(B, S, 32), torch.randn(B, T, 24)
    with torch.no_grad():
        want = mod(x, pos, cache.clone())
        got = out.module("forward")(x, pos, cache.clone())
    torch.testing.assert_close(got, want, **TOL["fp32_rewrite"])


@pytest.mark.parametrize("products", ["never", "always"])
def test_fires_on_split_projection_mla(products):
    mod = SplitProjectionMLA().eval()
    B, S, T = 1, 2, 10
    pos = torch.tensor([[7, 8]])
    p = _toy(mod, torch.randn(B, S, 32), pos, torch.randn(B, T, 16))
    out, matches, stats = apply("absorb_mla", p, options={"products": products})
    assert matches == 1 and stats["entries"]["forward"]["products"] == (products == "always")
    assert ops(out)[MLA_OP] == 1
    x, cache = torch.randn(B, S, 32), torch.randn(B, T, 16)
    with torch.no_grad():
        want = mod(x, pos, cache.clone())
        got = out.module("forward")(x, pos, cache.clone())
    torch.testing.assert_close(got, want, **TOL["fp32_rewrite"])


def test_fires_on_bmm_with_heads_folded_into_the_batch():
    mod = FoldedHeadsBmmMLA().eval()
    B, S, T = 2, 2, 8
    pos = torch.tensor([[5, 6], [5, 6]])
    out, matches, stats = apply("absorb_mla", _toy(mod, torch.randn(B, S, 32), pos, torch.randn(B, T, 24)))
    assert matches == 1 and stats["entries"]["forward"]["latent_style"] == 1
    h = ops(out)
    assert h[MLA_OP] == 1 and "aten.bmm.default" not in h and "aten.softmax.int" not in h
    x, cache = torch.randn(B, S, 32), torch.randn(B, T, 24)
    with torch.no_grad():
        torch.testing.assert_close(out.module("forward")(x, pos, cache.clone()), mod(x, pos, cache.clone()),
                                   **TOL["fp32_rewrite"])  # fmt: skip


def test_fires_on_sdpa_per_head_mla():
    mod = SdpaPerHeadMLA().eval()
    B, S, T = 2, 3, 8
    pos = torch.tensor([[2, 3, 4], [5, 6, 7]])
    caches = (torch.zeros(B, T, 2, 16), torch.zeros(B, T, 2, 4))
    out, matches, stats = apply("absorb_mla", _toy(mod, torch.randn(B, S, 32), pos, list(caches)))
    assert matches == 1 and stats["entries"]["forward"]["per_head_cache_style"] == 1
    h = ops(out)
    assert h[MLA_OP] == 1 and "aten.scaled_dot_product_attention.default" not in h
    # the run-time check: the reference on per-head caches against the Program on one latent cache
    g = torch.Generator().manual_seed(3)
    kc, vc, lat = torch.zeros(B, T, 2, 16), torch.zeros(B, T, 2, 4), torch.zeros(B, T, 24)
    with torch.no_grad():
        for p0 in (0, 3, 5):  # chunks of 3 tokens filling the caches in order (the last rewrites slot 5)
            x, p = torch.randn(B, S, 32, generator=g), torch.arange(p0, p0 + S).expand(B, S)
            torch.testing.assert_close(out.module("forward")(x, p, [lat]), mod(x, p, [kc, vc]), **TOL["fp32_rewrite"])


def test_does_not_fire_on_sdpa_is_causal():
    # is_causal aligns the mask top-left, not to the cache's positions: left alone
    class Causal(SdpaPerHeadMLA):
        def forward(self, x, pos, caches):
            return super().forward(x, pos, caches, causal=True)

    args = (torch.randn(1, 2, 32), torch.tensor([[0, 1]]), [torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 2, 4)])
    _, matches, _ = apply("absorb_mla", _toy(Causal().eval(), *args))
    assert matches == 0


def _long_compare(model, program_a, program_b, prompt=20, steps=32):
    """Prefill, >= 32 single decode steps and one S = 3 extend: logits of both Programs."""
    g = torch.Generator().manual_seed(5)
    total = prompt + steps + 3
    ca, cb = program_a.cache.allocate(2, total), program_b.cache.allocate(2, total)
    toks = torch.randint(0, 256, (2, total), generator=g)
    worst = 0.0
    with torch.no_grad():
        a, _ = program_a.prefill(toks[:, :prompt], [c[:, :prompt] for c in ca])
        b, _ = program_b.prefill(toks[:, :prompt], [c[:, :prompt] for c in cb])
        torch.testing.assert_close(b, a, **TOL["fp32_rewrite"])
        p = prompt
        for n in [1] * steps + [3]:
            pos = torch.arange(p, p + n).expand(2, n)
            a, _ = program_a.decode(toks[:, p : p + n], pos, [c[:, : p + n] for c in ca])
            b, _ = program_b.decode(toks[:, p : p + n], pos, [c[:, : p + n] for c in cb])
            torch.testing.assert_close(b, a, **TOL["fp32_rewrite"])
            worst = max(worst, (a - b).abs().max().item())
            p += n
    return worst


@pytest.mark.parametrize("name", ["tiny", pytest.param("small", marks=pytest.mark.slow)])  # small: --run-slow
def test_reference_model(name, tiny_program):
    cfg = preset(name)
    base = tiny_program if name == "tiny" else capture(DeepseekV32ForCausalLM(cfg).init_weights(0).eval())
    canon, _, _ = apply("canonicalize", base)
    out, matches, stats = apply("absorb_mla", canon)
    L = cfg.num_hidden_layers
    # one site per MLA layer per entry: L in prefill, L in decode, the MTP layer in mtp
    assert matches == 2 * L + 1 and stats["layers"] == list(range(L + 1))
    assert stats["entries"]["mtp"]["sites"] == 1
    for entry in ("prefill", "decode"):
        h = ops(out, entry)
        assert h.get(MLA_OP, 0) == (0 if stats["entries"][entry]["form"] == "mha" else L)
        assert h["aten.index_put_.default"] == 2 * L  # one latent write + one index-key write per layer
    assert stats["entries"]["decode"]["form"] in ("absorbed", "products")
    per_layer = {t.name: t.tail for t in out.cache.tensors if t.layer == 0}
    assert per_layer == {
        "layers.0.kv_latent": [cfg.kv_lora_rank + cfg.qk_rope_head_dim],
        "layers.0.index_k": [cfg.index_head_dim],
    }
    assert out.cache.bytes_per_token({0}) < base.cache.bytes_per_token({0})
    _long_compare(base.config, canon, out, prompt=20 if name == "tiny" else 12, steps=32)


def test_does_not_fire_when_k_nope_has_another_reader():
    class Leaky(PerHeadMatmulMLA):
        def forward(self, x, pos, k_cache, v_cache):
            out = super().forward(x, pos, k_cache, v_cache)
            return out, k_cache.sum()  # the per-head cache is read elsewhere

    args = (torch.randn(1, 2, 32), torch.tensor([[4, 5]]), torch.zeros(1, 6, 2, 16), torch.zeros(1, 6, 2, 8))
    _, matches, _ = apply("absorb_mla", _toy(Leaky().eval(), *args))
    assert matches == 0


def test_does_not_fire_when_w_uk_is_not_constant():
    # the up-projection weight arrives as an input at run time: nothing to absorb ahead of time
    args = (torch.randn(1, 2, 32), torch.tensor([[4, 5]]), torch.randn(1, 6, 24), torch.randn(3 * 20, 16))
    _, matches, _ = apply("absorb_mla", _toy(LatentCacheMLA().eval(), *args))
    assert matches == 0


def test_products_on_the_reference_model(tiny_program):
    canon, _, _ = apply("canonicalize", tiny_program)
    out, _, stats = apply("absorb_mla", canon, options={"products": "always"})
    L = tiny_program.config.num_hidden_layers
    assert stats["entries"]["decode"]["products"] == L and stats["entries"]["mtp"]["products"] == 1
    assert stats["products"]["inflation"] > 1 and out.param_bytes() > canon.param_bytes()
    _long_compare(tiny_program.config, canon, out, steps=32)
    # auto: the cost model compares the forms per entry and says so
    _, _, auto = apply("absorb_mla", canon)
    assert "products:" in auto["entries"]["decode"]["why"] and "absorbed:" in auto["entries"]["decode"]["why"]


def test_pass_options_are_checked():
    from dsc.errors import DscError
    from dsc.pass_manager import parse_pass_options

    assert parse_pass_options(["absorb_mla.products=always"]) == {"absorb_mla": {"products": "always"}}
    for bad, says in [
        ("absorb_mla.products=sometimes", "must be one of auto, never, always"),
        ("absorb_mla.colour=red", "has no option 'colour'"),
        ("nopass.x=1", "unknown pass 'nopass'"),
        ("absorb_mla", "PASS.OPTION=VALUE"),
    ]:
        with pytest.raises(DscError, match=says):
            parse_pass_options([bad])


def test_idempotent_and_end_to_end(tiny_program, tiny):
    program, records = run_pipeline(tiny_program, select_passes())
    assert [r.name for r in records] == DEFAULT_PASSES
    _, again = run_pipeline(program, select_passes(["absorb_mla"]))  # canonicalize, normalize pulled in
    assert again[-1].name == "absorb_mla" and again[-1].matches == 0 and not again[-1].changed
