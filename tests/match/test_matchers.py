"""The shared matchers read graphs they did not make: contractions as letters, attention sites,
per-head projections (linear, split, slice, einsum against a weight slice), cache writes."""

import torch
from torch import nn

from dsc.fx_utils import constant_of, is_call
from dsc.match.attention import attention, sites
from dsc.match.cache import cache_write
from dsc.match.contraction import contraction
from dsc.match.projection import per_head
from tests.passes.helpers import apply, toy_program

aten = torch.ops.aten


def _graph(mod, *args):
    p, _, _ = apply("normalize", apply("canonicalize", toy_program(mod, *args))[0])
    return p.entries["forward"]


def _first(ep, *targets):
    return next(n for n in ep.graph.nodes if is_call(n, *targets))


class Scores(nn.Module):
    def forward(self, q, k):
        return torch.matmul(q, k.transpose(2, 3)), torch.einsum("bhsd,bhtd->bhst", q, k)


def test_contraction_letters_do_not_depend_on_the_spelling():
    ep = _graph(Scores(), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4))
    mm, es = contraction(_first(ep, aten.matmul.default)), contraction(_first(ep, aten.einsum.default))
    for c in (mm, es):  # q's last dim against k's last dim, k's t kept
        (lq, lk), out = c.letters, c.out
        assert c.contracted == {lq[3]} and lk[3] == lq[3] and out[3] == lk[2] and out[2] == lq[2]
    assert mm.ops == es.ops  # the transpose was peeled: both read the placeholders


class Attn(nn.Module):
    def forward(self, q, k, v, m):
        explicit = ((q @ k.transpose(-1, -2)) * 0.5 + m).softmax(-1) @ v
        fused = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.5)
        return explicit, fused


def test_attention_sites_explicit_and_sdpa_read_alike():
    args = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 6), torch.zeros(1, 1, 3, 5)
    ep = _graph(Attn(), *args)
    found = [attention(n) for n in sites(ep.graph)]
    assert len(found) == 2 and all(a is not None for a in found)
    for a in found:
        assert a.scale == 0.5 and a.mask is not None and len(a.pv.out) == 4


def test_sdpa_is_causal_is_not_a_site():
    class Causal(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    ep = _graph(Causal(), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert [attention(n) for n in sites(ep.graph)] == [None]


class Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(6, 2 * (3 + 4), bias=False)

    def forward(self, c):
        y = self.w(c).view(c.shape[0], c.shape[1], 2, 7)
        a, b = y.split([3, 4], -1)
        w = self.w.weight.view(2, 7, 6)
        e = torch.einsum("btc,hdc->bthd", c, w[:, 3:])
        return a.sum() + b.sum() + y[..., 1:3].sum() + e.sum()


def test_per_head_projections_name_their_weight_rows():
    ep = _graph(Proj(), torch.randn(1, 5, 6))
    parts = [n for n in ep.graph.nodes if n.target is __import__("operator").getitem]
    rows = [per_head(ep, n).rows for n in parts]
    assert [(r.heads, r.stride, r.offset, r.size) for r in rows] == [(2, 7, 0, 3), (2, 7, 3, 4)]
    sl = next(n for n in ep.graph.nodes if is_call(n, aten.slice.Tensor) and n.args[0].target is aten.view.default
              and len(n.args) > 2 and n.args[2] == 1)  # fmt: skip
    r = per_head(ep, sl).rows
    assert (r.offset, r.size) == (1, 2)
    e = per_head(ep, _first(ep, aten.einsum.default))
    assert (e.rows.offset, e.rows.size, e.perm) == (3, 4, [0, 1, 2, 3])
    w = constant_of(ep, e.rows.weight)
    assert torch.equal(e.rows.tensor(ep), w.view(2, 7, 6)[:, 3:])


class Write(nn.Module):
    def forward(self, x, pos, cache, hf):
        rows = torch.arange(x.shape[0]).unsqueeze(1).expand_as(pos)
        cache.index_put_((rows, pos), x)
        hf.index_copy_(2, pos[0], x.unsqueeze(1))
        return cache.sum() + hf.sum()


def test_cache_writes_know_their_time_dim():
    args = torch.randn(2, 3, 4), torch.tensor([[1, 2, 3]] * 2), torch.zeros(2, 6, 4), torch.zeros(2, 1, 6, 4)
    ep = _graph(Write(), *args)
    writes = [cache_write(n) for n in ep.graph.nodes if is_call(n, aten.index_put_.default)]
    assert sorted((w.time_dim, w.per_row) for w in writes) == [(1, True), (2, False)]


class DsaMasks(nn.Module):
    """The lightning indexer's top-k of Σ_h w·ReLU(q·k) among the visible keys (spec §5), returned as
    masks in three layouts: additive (B, S, T), boolean (B, 1, S, T) for SDPA, additive (B, S, 1, T)."""

    def forward(self, iq, w, ik, pos):
        T = ik.shape[1]
        scores = torch.einsum("bsht,bsh->bst", torch.relu(torch.einsum("bshd,btd->bsht", iq, ik)), w)
        visible = torch.arange(T)[None, None, :] <= pos[:, :, None]
        idx = scores.masked_fill(~visible, float("-inf")).topk(2, dim=-1).indices
        keep = torch.zeros_like(visible).scatter(-1, idx, True) & visible
        additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
        return additive, keep[:, None], additive[:, :, None]


def test_dsa_masks_read_alike_in_every_layout():
    from dsc.match.dsa import dsa_mask

    B, S, T = 2, 3, 7
    args = torch.randn(B, S, 4, 8), torch.rand(B, S, 4), torch.randn(B, T, 8), torch.tensor([[4, 5, 6], [2, 3, 4]])
    ep = _graph(DsaMasks(), *args)
    outs = next(iter(ep.graph.find_nodes(op="output"))).args[0]
    found = [dsa_mask(m) for m in outs]
    assert all(f is not None for f in found), found
    assert {f.k for f in found} == {2} and len({f.scores.node for f in found}) == 1  # one selection, three masks
    assert all(f.limit_dims == "bs" for f in found)  # the per-row positions, read with the right sizes
