"""fuse_dsa: DeepSeek Sparse Attention — the indexer's top-k feeds an attention over the selected
latents only (spec §5, §4.6).

    mla_decode(q, [c ; k_pe], mask = top-k(I) & visible, scale)
        ->  sparse_mla(q_abs, q_pe, c, k_pe, indexer_topk(q_I, w_I, k_I, limit, k), scale)

Works on the absorbed form ``absorb_mla`` leaves (``dsc::mla_decode`` over the latent cache); the
mask is read by the shared matcher ``dsc.match.dsa.dsa_mask``: the index scores Σ_h w·ReLU(c·q·k)
(any contraction spelling, c > 0 folded into w), their top-k by a stable sort and slice or by
topk, scattered into a boolean, and the visibility t <= limit; nothing else may be in the mask.
``indexer_topk`` breaks ties towards the earlier token like a stable sort, so the fused Program
selects what the dense one did. The index scores, the selection and the mask die with the site:
none of them may be read elsewhere. A latent given as a per-step ``cat`` of two caches is read
from the two caches directly (no copy of the cache per step).

Each entry keeps the sparse form where the cost model prices it no dearer than the dense one on
the target machine (``ctx.machine`` at its context length); the record says why. Numerics: the
same selection, the attention summed in another order: fp32 re-association.
"""

from __future__ import annotations

import torch
from torch import fx

from dsc.fx_utils import finalize, is_call, refresh_meta, tag, val
from dsc.match.dsa import DsaMask, dsa_mask
from dsc.program import clone_entry
from dsc.registry import register_pass
from dsc.verify import TOLERANCES

aten = torch.ops.aten
dsc_ops = torch.ops.dsc
NAME = "fuse_dsa"


def _sites(ep) -> list[tuple[fx.Node, DsaMask]]:
    out = []
    for n in ep.graph.nodes:
        if not is_call(n, dsc_ops.mla_decode.default) or len(n.args) < 5 or not isinstance(n.args[2], fx.Node):
            continue
        if len(n.args) > 5 and n.args[5] is not None:
            continue  # already given indices
        m = dsa_mask(n.args[2])
        if m is None or not _sole_use(m, n):
            continue
        out.append((n, m))
    return out


def _sole_use(m: DsaMask, site: fx.Node) -> bool:
    """The index scores and everything of the mask computed from them feed this site only (the
    visibility, which every layer shares, may be read elsewhere)."""
    inside = m.nodes | {site, m.scores.node}
    derived = {m.scores.node}
    for n in site.graph.nodes:  # topological: the mask's nodes computed from the scores
        if n in m.nodes and any(a in derived for a in n.all_input_nodes):
            derived.add(n)
    return all(u in inside for n in derived for u in n.users)


def _as(g: fx.Graph, x: fx.Node, letters: str, want: str) -> fx.Node:
    """x (written with ``letters``) laid out as ``want``: a permute, size-1 letters summed away
    (a squeeze): einsum with one operand, exact."""
    if letters == want:
        return x
    return g.call_function(aten.einsum.default, (f"{letters}->{want}", [x]))


def _split(g: fx.Graph, x: fx.Node, at: int) -> tuple[fx.Node, fx.Node]:
    """[a ; b] along the last dim at ``at``: the operands of a cat when x is one, else two slices."""
    if (
        is_call(x, aten.cat.default)
        and len(x.args[0]) == 2
        and (x.args[1] if len(x.args) > 1 else 0) in (-1, val(x).ndim - 1)
    ):
        a, b = x.args[0]
        if int(val(a).shape[-1]) == at:
            return a, b
    C = int(val(x).shape[-1])
    return (g.call_function(aten.slice.Tensor, (x, -1, 0, at)), g.call_function(aten.slice.Tensor, (x, -1, at, C)))


def _rows(g: fx.Graph, m: DsaMask, q: fx.Node) -> fx.Node:
    """The visibility limit as the (B, S) int64 tensor indexer_topk takes: the limit's size-1 dims
    squeezed away, then broadcast over the batch and the queries it does not name (shared
    positions, one position for all queries)."""
    lim = m.limit
    ones = [d for d, s in enumerate(val(lim).shape) if str(s) == "1"]
    if ones:
        lim = g.call_function(aten.squeeze.dims, (lim, ones))
    if m.limit_dims != "bs":
        if "b" not in m.limit_dims:
            lim = g.call_function(aten.unsqueeze.default, (lim, 0))
        if "s" not in m.limit_dims:
            lim = g.call_function(aten.unsqueeze.default, (lim, -1))
        size = [
            g.call_function(aten.sym_size.int, (q, d)) if not isinstance(val(q).shape[d], int) else int(val(q).shape[d])
            for d in (0, 1)
        ]
        lim = g.call_function(aten.expand.default, (lim, size))
    if val(m.limit).dtype != torch.int64:
        lim = g.call_function(aten._to_copy.default, (lim,), {"dtype": torch.int64})
    return lim


def rewrite(ep, site: fx.Node, m: DsaMask) -> bool:
    g, sc = ep.graph, m.scores
    q, kv, _, scale, dv = site.args[:5]
    C = int(val(kv).shape[-1])
    if int(val(q).shape[-1]) != C or not 0 < dv < C:
        return False
    with g.inserting_before(site):
        limit = _rows(g, m, q)
        qi, ki, wi = _as(g, sc.q, sc.q_dims, "bshd"), _as(g, sc.keys, sc.k_dims, "btd"), _as(g, sc.w, sc.w_dims, "bsh")
        if sc.scale != 1.0:
            wi = g.call_function(aten.mul.Tensor, (wi, sc.scale))
        idx = tag(g.call_function(dsc_ops.indexer_topk.default, (qi, wi, ki, limit, m.k)), NAME)
        q_abs, q_pe = _split(g, q, dv)
        latent, rope = _split(g, kv, dv)
        out = tag(g.call_function(dsc_ops.sparse_mla.default, (q_abs, q_pe, latent, rope, idx, scale)), NAME)
    site.replace_all_uses_with(out)
    g.erase_node(site)
    return True


def transform(ep) -> int:
    n = sum(rewrite(ep, site, m) for site, m in _sites(ep))
    if n:
        ep.graph.eliminate_dead_code()
        refresh_meta(ep)
        finalize(ep)
    return n


@register_pass(
    NAME, order=30, purpose="DSA: the indexer's top-k feeds attention over the selected latents only",
    tolerance=TOLERANCES["fp32_rewrite"], requires=("canonicalize", "normalize", "absorb_mla"),
)  # fmt: skip
def fuse_dsa(program, ctx):
    from dsc.cost import entry_cost

    stats: dict = {"entries": {}}
    total = 0
    for entry, ep in list(program.entries.items()):
        sites = _sites(ep)
        if not sites:
            stats["entries"][entry] = {"sites": 0, "form": "unchanged", "why": _why_none(ep)}
            continue
        kind = "prefill" if entry == "prefill" else "decode"
        trial = clone_entry(ep)
        n = transform(trial)
        T, on = ctx.machine.context, ctx.machine.name
        dense = entry_cost(ep, kind, fused_attention=True).at(T)
        sparse = entry_cost(trial, kind, fused_attention=True).at(T)
        t_dense, t_sparse = ctx.machine.roofline_s(*dense), ctx.machine.roofline_s(*sparse)
        where = f"prefill of {T} tokens" if kind == "prefill" else f"decode step at {T} context"
        why = (
            f"{where} on {on} — dense: {dense[0]:.3g} FLOP, {dense[1]:.3g} B, {t_dense * 1e6:.1f} us; "
            f"sparse: {sparse[0]:.3g} FLOP, {sparse[1]:.3g} B, {t_sparse * 1e6:.1f} us on the roofline"
        )
        if t_sparse <= t_dense:
            program.entries[entry] = trial
            total += n
            stats["entries"][entry] = {"sites": n, "form": "sparse", "why": why, "topk": sites[0][1].k}
        else:
            stats["entries"][entry] = {"sites": 0, "form": "dense", "why": why + "; the dense form is cheaper"}
    return total, stats


def _why_none(ep) -> str:
    if not any(is_call(n, dsc_ops.mla_decode.default) for n in ep.graph.nodes):
        return "no absorbed MLA attention (dsc::mla_decode) to make sparse"
    return "no attention mask is a top-k of indexer scores (dense MLA, or a selection read elsewhere)"
