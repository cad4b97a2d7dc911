"""absorb_mla: MLA weight absorption — attention over the latent cache ("MQA mode", spec §4.4).

    softmax(q·(W_UK c)ᵀ + m) (W_UV c)  ->  W_UV · mla_decode([W_UKᵀ q_nope ; q_pe], [c ; k_pe], m)

Found by computation: a softmax over the last axis whose scores are a per-head contraction
``einsum(q, K)`` (optionally scaled, plus an additive mask that does not depend on K) and whose
probabilities are contracted with V; K = [k_nope ; broadcast k_pe] and V where k_nope and V are the
two halves of one constant projection ``W_kvb`` of a latent c, reshaped per head. Two cache styles:
(a) per-head K/V caches written in place (the reference model): both become one latent cache
[c ; k_pe] (kv_lora_rank + qk_rope_head_dim per token) and the CacheSpec changes with them;
(b) a latent cache re-decompressed through ``W_kvb`` every step: the attention reads it directly.
W_UK and W_UV are views of the original ``kv_b_proj`` weight: no new parameters, no approximation.

Prefill keeps the MHA form when the cost model says it is cheaper (it attends to the chunk's own
decompressed K/V, which is what the cache holds when T == S from position 0); decode is always
absorbed (an MHA form over a latent cache would decompress the whole context every step).

Not fired: k_nope or V read by anything else; W_kvb not a constant; K/V of different projections;
a cache that other code reads. Preconditions: ``canonicalize``. Numerics: fp32 re-association.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass

import torch
from torch import fx
from torch.export.graph_signature import InputKind

from dsc.fx_utils import constant_of, drop_user_inputs, finalize, refresh_meta, tag
from dsc.pass_manager import register_pass
from dsc.program import CacheTensor
from dsc.verify import Tolerance

aten = torch.ops.aten
NAME = "absorb_mla"
# roofline machine for the MHA-vs-absorbed prefill choice: H200 bf16 dense (FLOP/s) and HBM (B/s)
PEAK_FLOPS, PEAK_BW = 790e12, 4.8e12


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _strip(n):
    while _is(n, aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default):
        n = n.args[0]
    return n


@dataclass
class Decompress:
    """x = view(linear(c, W), [..., H, dn + dv]) split into (k_nope, v) on the last axis."""

    linear: fx.Node
    latent: fx.Node
    weight: fx.Node
    heads: int
    dn: int
    dv: int


def _decompress_part(n) -> tuple[Decompress, int] | None:
    """(decompression, part) when n is part 0 (k_nope) or 1 (v) of a per-head split of linear(c, W)."""
    n = _strip(n)
    splits = (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default)
    if not (_is(n, operator.getitem) and _is(n.args[0], *splits)):
        return None
    split, part = n.args[0], n.args[1]
    view = split.args[0]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if dim not in (-1, 3) or not _is(view, aten.view.default, aten.reshape.default, aten.unflatten.int):
        return None
    shape = _val(view).shape
    if len(shape) != 4:
        return None
    width = int(shape[-1])
    if split.target is aten.split_with_sizes.default:
        sizes = list(split.args[1])
    elif split.target is aten.chunk.default and split.args[1] == 2 and width % 2 == 0:
        sizes = [width // 2, width // 2]
    elif split.target is aten.split.Tensor and isinstance(split.args[1], int) and 2 * split.args[1] == width:
        sizes = [split.args[1]] * 2
    else:
        return None
    if len(sizes) != 2 or sum(sizes) != width:
        return None
    proj = _projection(view.args[0])
    if proj is None:
        return None
    return Decompress(view.args[0], proj[0], proj[1], int(shape[2]), int(sizes[0]), int(sizes[1])), part


def _projection(n):
    """(c, W) for y = c Wᵀ spelled linear(c, W) or matmul(c, W.t() / W.permute(1, 0) / W.transpose(0, 1))."""
    if _is(n, aten.linear.default) and (len(n.args) < 3 or n.args[2] is None):
        return n.args[0], n.args[1]
    if _is(n, aten.matmul.default):
        wt = n.args[1]
        if _is(wt, aten.t.default) or (_is(wt, aten.permute.default) and list(wt.args[1]) == [1, 0]):
            return n.args[0], wt.args[0]
        if _is(wt, aten.transpose.int) and sorted(a % 2 for a in wt.args[1:3]) == [0, 1]:
            return n.args[0], wt.args[0]
    return None


def _shared_rope(n) -> fx.Node | None:
    """k_pe when n broadcasts one (B, S, dr) key over the heads: expand(unsqueeze(k_pe, 2), ...)."""
    if _is(n, aten.expand.default, aten.expand_as.default) and _is(n.args[0], aten.unsqueeze.default):
        if n.args[0].args[1] in (2, -2):
            return n.args[0].args[0]
    return None


def _einsum_roles(eq: str, lhs_len: int = 4) -> list[str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    ops = ins.split(",")
    return [*ops, out] if len(ops) == 2 and all(len(o) == lhs_len for o in ops + [out]) else None


def _is_scores(eq: str) -> bool:
    """'bshd,bthd->bsht' in any letters: shared batch and head, contract d, keep s and t."""
    r = _einsum_roles(eq)
    if r is None:
        return False
    (b, s, h, d), (b2, t, h2, d2), o = r
    return b == b2 and h == h2 and d == d2 and len({b, s, h, d, t}) == 5 and o == b + s + h + t


def _is_pv(eq: str) -> bool:
    """'bsht,bthd->bshd' in any letters."""
    r = _einsum_roles(eq)
    if r is None:
        return False
    (b, s, h, t), (b2, t2, h2, d), o = r
    return b == b2 and h == h2 and t == t2 and len({b, s, h, t, d}) == 5 and o == b + s + h + d


@dataclass
class Site:
    softmax: fx.Node
    scores: fx.Node
    pv: fx.Node
    q_nope: fx.Node
    q_pe: fx.Node
    scale: float
    mask: fx.Node | None  # (B, S, T) additive
    dec: Decompress
    k_pe_new: fx.Node  # (B, S, dr) of this chunk
    style: str  # "per_head_cache" | "latent_cache"
    k_write: fx.Node | None = None  # style a: index_put_ into the K cache (the scores read it)
    v_write: fx.Node | None = None
    latent: fx.Node | None = None  # style b: the written latent cache (B, T, dc + dr)
    k_new: fx.Node | None = None
    v_new: fx.Node | None = None


def _cache_write(n):
    """(placeholder, indices, value) for n = index_put_(cache placeholder, indices, value)."""
    if _is(n, aten.index_put_.default) and n.args[0].op == "placeholder":
        return n.args[0], n.args[1], n.args[2]
    return None


def _other_readers(cache: fx.Node, write: fx.Node) -> list[fx.Node]:
    return [u for u in cache.users if u is not write and not (_is(u, aten.sym_size.int) and u.args[1] in (0, 1))]


def match(ep, sm: fx.Node) -> Site | None:
    if sm.args[1] not in (-1, 3) or len(sm.users) != 1:
        return None
    pv = next(iter(sm.users))
    if not (_is(pv, aten.einsum.default) and _is_pv(pv.args[0]) and pv.args[1][0] is sm):
        return None
    x, mask = sm.args[0], None
    if _is(x, aten.add.Tensor) and len(x.users) == 1:
        a, b = x.args[:2]
        if _is(b, aten.unsqueeze.default) and b.args[1] in (2, -2):
            x, mask = a, b.args[0]
        elif _is(a, aten.unsqueeze.default) and a.args[1] in (2, -2):
            x, mask = b, a.args[0]
        else:
            return None
    scale = 1.0
    if _is(x, aten.mul.Tensor, aten.div.Tensor) and isinstance(x.args[1], (int, float)) and len(x.users) == 1:
        x, scale = x.args[0], (float(x.args[1]) if x.target is aten.mul.Tensor else 1.0 / float(x.args[1]))
    if not (_is(x, aten.einsum.default) and _is_scores(x.args[0]) and len(x.users) == 1):
        return None
    q, K = x.args[1]
    V = pv.args[1][1]
    q = _strip(q)
    if not (_is(q, aten.cat.default) and len(q.args[0]) == 2 and q.args[1] in (-1, 3)):
        return None
    q_nope, q_pe = q.args[0]

    wk, wv = _cache_write(K), _cache_write(V)
    if wk and wv:  # style (a): per-head caches written with this chunk's K and V
        k_new, v_new = _strip(wk[2]), _strip(wv[2])
        if not (_is(k_new, aten.cat.default) and len(k_new.args[0]) == 2):
            return None
        k_nope, k_rope = k_new.args[0]
        kp, vp = _decompress_part(k_nope), _decompress_part(v_new)
        k_pe = _shared_rope(k_rope)
        if not (kp and vp and k_pe is not None) or kp[1] != 0 or vp[1] != 1 or kp[0].linear is not vp[0].linear:
            return None
        # nothing else may read the caches (their batch / length sizes aside) or the per-head pieces
        if _other_readers(wk[0], K) or _other_readers(wv[0], V) or set(K.users) != {x} or set(V.users) != {pv}:
            return None
        if len(k_nope.users) != 1 or len(v_new.users) != 1:
            return None
        dec = kp[0]
        site = Site(sm, x, pv, q_nope, q_pe, scale, mask, dec, k_pe, "per_head_cache", K, V, k_new=k_new, v_new=v_new)
    else:  # style (b): K, V decompressed from a latent cache right here
        K = _strip(K)
        if not (_is(K, aten.cat.default) and len(K.args[0]) == 2):
            return None
        kp, vp = _decompress_part(K.args[0][0]), _decompress_part(V)
        k_pe_all = _shared_rope(K.args[0][1])
        if not (kp and vp and k_pe_all is not None) or kp[0].linear is not vp[0].linear or (kp[1], vp[1]) != (0, 1):
            return None
        dec = kp[0]
        c_all, r_all = _strip(dec.latent), _strip(k_pe_all)
        # both must be slices [.., :dc] and [.., dc:] of one written latent cache
        if not (_is(c_all, aten.slice.Tensor) and _is(r_all, aten.slice.Tensor) and c_all.args[0] is r_all.args[0]):
            return None
        latent = c_all.args[0]
        if _cache_write(latent) is None or len(K.args[0][0].users) != 1 or len(V.users) != 1:
            return None
        site = Site(sm, x, pv, q_nope, q_pe, scale, mask, dec, k_pe_all, "latent_cache", latent=latent)
    w = constant_of(ep, dec.weight)
    if w is None or w.ndim != 2:  # W_UK must be a constant to absorb it
        return None
    if int(_val(q_nope).shape[-1]) != dec.dn:
        return None
    return site


def _weights(g: fx.Graph, site: Site, dc: int):
    d = site.dec
    wv = g.call_function(aten.view.default, (d.weight, [d.heads, d.dn + d.dv, dc]))
    w_uk = g.call_function(aten.slice.Tensor, (wv, 1, 0, d.dn))
    w_uv = g.call_function(aten.slice.Tensor, (wv, 1, d.dn, d.dn + d.dv))
    return [tag(n, NAME) for n in (wv, w_uk, w_uv)]


def rewrite_absorbed(g: fx.Graph, site: Site, latent: fx.Node, dc: int) -> None:
    with g.inserting_before(site.pv):
        _, w_uk, w_uv = _weights(g, site, dc)
        q_abs = tag(g.call_function(aten.einsum.default, ("bshd,hdc->bshc", [site.q_nope, w_uk])), NAME)
        q_cat = tag(g.call_function(aten.cat.default, ([q_abs, site.q_pe], -1)), NAME)
        o_lat = tag(g.call_function(torch.ops.dsc.mla_decode.default, (q_cat, latent, site.mask, site.scale, dc)), NAME)
        o = tag(g.call_function(aten.einsum.default, ("bshc,hdc->bshd", [o_lat, w_uv])), NAME)
    site.pv.replace_all_uses_with(o)


def rewrite_mha_prefill(site: Site) -> None:
    """Prefill from position 0 with T == S: the cache holds exactly this chunk's K/V."""
    site.scores.replace_input_with(site.k_write, site.k_new)
    site.pv.replace_input_with(site.v_write, site.v_new)


def _latent_write(g: fx.Graph, site: Site, cache_ph: fx.Node, indices, dc: int) -> fx.Node:
    with g.inserting_before(site.k_write):
        lat = tag(g.call_function(aten.cat.default, ([site.dec.latent, site.k_pe_new], -1)), NAME)
        return tag(g.call_function(aten.index_put_.default, (cache_ph, indices, lat)), NAME)


def _user_inputs(ep):
    phs = [n for n in ep.graph.nodes if n.op == "placeholder"]
    return [n for n, s in zip(phs, ep.graph_signature.input_specs) if s.kind == InputKind.USER_INPUT]


def _is_prefill(ep, site: Site) -> bool:
    """T == S (one symbol) and the chunk starts at position 0: what the prefill entry guarantees."""
    cache_len = _val(site.k_write).shape[1]
    chunk_len = _val(site.k_new).shape[1]
    return str(cache_len) == str(chunk_len) and "positions" not in [n.name for n in _user_inputs(ep)]


def _sites(ep) -> list[Site]:
    out = []
    for sm in [n for n in ep.graph.nodes if _is(n, aten.softmax.int, aten._softmax.default)]:
        s = match(ep, sm)
        if s is not None:
            out.append(s)
    return out


def _cache_index(ep, ph: fx.Node) -> int:
    """Position among the user inputs counted from the end: the same cache has the same index in
    every entry (entries differ in their leading inputs, the cache list closes each signature)."""
    users = _user_inputs(ep)
    return users.index(ph) - len(users)


def transform(ep, entry: str, accepted: dict[int, tuple[int, int]], form: str) -> dict:
    """Rewrite one entry in place. ``accepted``: K cache index -> (V cache index, latent width) of the
    per-head cache pairs that become latent caches (in every entry, read or not); ``form`` is
    "absorbed" or "mha" (prefill only)."""
    g = ep.graph
    sites = _sites(ep)
    stats = {"sites": 0, "latent_cache_style": 0, "per_head_cache_style": 0}
    old_writes = []
    for site in sites:
        dc = int(constant_of(ep, site.dec.weight).shape[1])
        if site.style == "latent_cache":
            rewrite_absorbed(g, site, site.latent, dc)
            stats["latent_cache_style"] += 1
        else:
            if _cache_index(ep, site.k_write.args[0]) not in accepted:
                continue
            latent_write = _latent_write(g, site, site.k_write.args[0], site.k_write.args[1], dc)
            if form == "mha":
                rewrite_mha_prefill(site)
            else:
                rewrite_absorbed(g, site, latent_write, dc)
            old_writes += [site.k_write, site.v_write]
            stats["per_head_cache_style"] += 1
        stats["sites"] += 1
    g.eliminate_dead_code()
    for n in old_writes:  # in-place writes are side effects: DCE keeps them, so they go by hand
        assert not n.users, f"{n.name} still read by {list(n.users)}"
        g.erase_node(n)
    # every accepted pair changes layout in this entry too: K slot -> latent, V slot gone
    users = _user_inputs(ep)
    dropped = []
    for k, (v, width) in accepted.items():
        kph, vph = users[len(users) + k], users[len(users) + v]
        for u in list(vph.users):  # only size reads remain: the latent cache has the same (B, T)
            u.replace_input_with(vph, kph)
        dropped.append(vph.name)
        old = kph.meta["val"]
        with old.fake_mode:
            kph.meta["val"] = torch.empty((old.shape[0], old.shape[1], width), dtype=old.dtype)
    drop_user_inputs(ep, dropped)
    refresh_meta(ep)
    finalize(ep)
    return stats


def _roofline_s(cost, context: int) -> tuple[float, float, float]:
    flops, nbytes = cost.at(context)
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BW), flops, nbytes


@register_pass(
    NAME, order=20, purpose="MLA weight absorption: attention over the latent [c_kv ; k_pe] cache",
    tolerance=Tolerance(atol=1e-4, rtol=1e-3, min_top1=0.95, min_sqnr_db=60.0),
)  # fmt: skip
def absorb_mla(program, ctx):
    from dsc.cost import entry_cost

    # 1. which per-head K/V cache pairs can change layout: matched in every entry that reads them
    matched: dict[int, tuple[int, int, int, int]] = {}  # k cache index -> (v index, layer, dc, dr)
    readers: dict[int, set[str]] = {}
    hits: dict[int, set[str]] = {}
    for entry, ep in program.entries.items():
        for ph in _user_inputs(ep):
            if any(not _is(u, aten.sym_size.int) for u in ph.users):  # size reads do not count
                readers.setdefault(_cache_index(ep, ph), set()).add(entry)
        for s in _sites(ep):
            if s.style == "per_head_cache":
                k, v = _cache_index(ep, s.k_write.args[0]), _cache_index(ep, s.v_write.args[0])
                dc, dr = int(_val(s.dec.latent).shape[-1]), int(_val(s.k_pe_new).shape[-1])
                layer = program.cache.tensors[k].layer if program.cache.tensors else None
                matched[k] = (v, layer, dc, dr)
                hits.setdefault(k, set()).add(entry)
    accepted = {
        k: (matched[k][0], matched[k][2] + matched[k][3])
        for k in matched
        if hits[k] >= readers.get(k, set()) and hits[k] >= readers.get(matched[k][0], set())
    }

    # 2. rewrite each entry; prefill picks MHA or absorbed by the cost model
    stats: dict = {"entries": {}, "layers": sorted(matched[k][1] for k in accepted if matched[k][1] is not None)}
    for entry, ep in program.entries.items():
        form, why = "absorbed", "attends to the whole cached context every step: read the latents, not per-head K/V"
        if entry == "prefill" and any(_is_prefill(ep, s) for s in _sites(ep) if s.style == "per_head_cache"):
            options = {}
            for f in ("mha", "absorbed"):
                trial = _clone_entry(ep)
                transform(trial, entry, accepted, f)
                options[f] = _roofline_s(entry_cost(trial, "prefill"), 4096)
            form = min(options, key=lambda f: options[f][0])
            why = ", ".join(
                f"{f}: {v[1]:.3g} FLOP, {v[2]:.3g} B, {v[0] * 1e6:.1f} us on the roofline" for f, v in options.items()
            )
            why = f"prefill of 4096 tokens — {why}"
        s = transform(ep, entry, accepted, form)
        stats["entries"][entry] = {**s, "form": form if s["sites"] else "unchanged", "why": why}

    # 3. the CacheSpec follows the entries (indices count from the end, like the cache inputs)
    layer0 = matched[min(accepted)][1] if accepted else None
    before = program.cache.bytes_per_token({layer0}) if accepted and program.cache.tensors else None
    if program.cache.tensors:
        n = len(program.cache.tensors)
        for k in accepted:
            v, layer, dc, dr = matched[k]
            old = program.cache.tensors[n + k]
            meaning = "MLA latent [c_kv ; RoPE(k_pe)], shared by all heads"
            program.cache.tensors[n + k] = CacheTensor(
                f"layers.{layer}.kv_latent", [dc + dr], old.dtype, meaning, layer
            )
        for v in sorted((n + matched[k][0] for k in accepted), reverse=True):
            del program.cache.tensors[v]
    if accepted and program.cache.tensors:
        k0 = min(accepted)
        layer = matched[k0][1]
        stats["cache_bytes_per_token_per_layer"] = {"before": before, "after": program.cache.bytes_per_token({layer})}
    return sum(e["sites"] for e in stats["entries"].values()), stats


def _clone_entry(ep):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(ep.graph_module)
        sig = copy.deepcopy(ep.graph_signature)
        new = ep._update(gm, sig, state_dict=dict(ep.state_dict), constants=dict(ep.constants))
        new._module_call_graph = copy.deepcopy(ep.module_call_graph)
    return new
