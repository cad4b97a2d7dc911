"""absorb_mla: MLA weight absorption — attention over the latent cache ("MQA mode", spec §4.4).

    softmax(q·(W_UK c)ᵀ + m) (W_UV c)  ->  W_UV · mla_decode([W_UKᵀ q_nope ; q_pe], [c ; k_pe], m)

Found by computation. An attention is a softmax (or ``scaled_dot_product_attention``) between two
contractions, each read as einsum letters whatever its spelling: einsum, or matmul / bmm of tensors
of the same rank, with the operands' casts, transposes and permutes folded into the letters. The
scores contract one letter d of q and K and keep q's s and K's t; two letters are shared. Which
shared letter is the head and which the batch comes from where K and V are made: k_nope and V are
per-head projections of one latent c — the two row blocks of one constant ``W_kvb`` split after a
per-head view, or two separate constant projections — and K = [k_nope ; k_pe broadcast over the
heads]. An optional scalar scale and an additive (or, for SDPA, boolean) mask with no head extent
are carried over. Two cache styles: (a) per-head K/V caches written in place (the reference model):
both become one latent cache [c ; k_pe] (kv_lora_rank + qk_rope_head_dim per token) and the
CacheSpec changes with them; (b) a latent cache re-decompressed every step: the attention reads it
directly. W_UK and W_UV are views of the original weights: no approximation.

Each entry gets the form with the least roofline time on the target machine (``ctx.machine``, the
H200 by default, at its context length; ``dsc.cost``, attention
counted as a fused kernel moves it, so no form pays for materialised scores): prefill
may keep the MHA form (it attends to the chunk's own K/V, which is what the cache holds when T == S
from position 0); decode is absorbed. Option ``products`` (auto | never | always): the absorbed form
with W_UQ·W_UK (H, dc, q_lora) and W_UV·W_O (d, H·dc) precomputed, which saves a matmul per side but
inflates those weights (3.6x at full size); ``auto`` takes it only where it is 10% faster.

Not fired: k_nope or V read by anything else; W_UK / W_UV not constants; K and V from different
latents; a per-head cache that other code reads; SDPA with ``is_causal`` (top-left aligned) or
dropout; heads folded into bmm's batch with a mask that differs per row (with a shared mask they
are unfolded first, ``_unfold_heads``). Preconditions: ``canonicalize``. Numerics: fp32
re-association.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dsc.passes.mla_products import match_products, param_bytes, param_name, product_weights
from torch import fx

from dsc.cache import CacheTensor, cache_inputs, drop_cache_input, retype_cache_input
from dsc.fx_utils import (
    add_constant_input,
    drop_unused_inputs,
    finalize,
    is_call,
    refresh_meta,
    tag,
    val,
)
from dsc.match.attention import attention, softmax_scores
from dsc.match.attention import sites as attention_nodes
from dsc.match.cache import CacheWrite, cache_write, other_readers
from dsc.match.heads import repeated_over_heads, unfold
from dsc.match.ops import same_size, same_value, sole_path, strip
from dsc.match.projection import WeightRows, per_head, shared_key
from dsc.program import clone_entry
from dsc.registry import register_pass
from dsc.verify import TOLERANCES

aten = torch.ops.aten
NAME = "absorb_mla"


@dataclass
class KVProj:
    """k_nope = W_UK c and v = W_UV c per head, from one latent c: W_UK (H, dn, dc) and W_UV (H, dv, dc)
    are rows of one fused ``kv_b_proj`` weight, or of two separate weights."""

    latent: fx.Node
    heads: int
    k: WeightRows
    v: WeightRows

    @property
    def dn(self) -> int:
        return self.k.size

    @property
    def dv(self) -> int:
        return self.v.size


@dataclass
class Site:
    out: fx.Node  # the attention output: the P·V contraction or the SDPA node
    out_roles: str  # its dims as roles over "bshv" (batch, query, head, value)
    q_nope: fx.Node
    q_pe: fx.Node
    q_roles: str  # their dims as roles over "bshd"
    scale: float
    mask: fx.Node | None  # additive (or boolean: True = attend), broadcast over the scores
    mask_roles: str  # the mask's dims as roles over "bsht"
    dec: KVProj
    k_pe: fx.Node  # style a: this chunk's rope key; style b: the rope keys of every attended token
    k_pe_squeeze: list[int]  # size-1 dims of k_pe to drop for (B, T, dr)
    c_squeeze: list[int]  # size-1 dims of the latent to drop for (B, T, dc)
    style: str  # "per_head_cache" | "latent"
    k_write: CacheWrite | None = None  # style a: the write into the K cache (the scores read it)
    v_write: CacheWrite | None = None
    latent: fx.Node | None = None  # style b: one (B, T, dc + dr) tensor holding [c ; k_pe], if there is one
    k_new: fx.Node | None = None
    v_new: fx.Node | None = None
    attn: fx.Node | None = None  # the softmax / SDPA node


KEPT_MHA = "dsc_absorb_mla_kept_mha"  # meta flag: a site this pass chose to keep in MHA form


def kv_projection(ep, k_nope, v) -> tuple[KVProj, list[int], list[int]] | None:
    """(projection, k_nope perm, v perm) over (b, t, h, d): two per-head projections of one latent
    (parts 0 / 1 of one split, two einsums against slices of one weight, or two weights)."""
    hk, hv = per_head(ep, k_nope), per_head(ep, v)
    if not (hk and hv) or hk.rows.heads != hv.rows.heads or not same_value(strip(hk.x), strip(hv.x)):
        return None
    if hk.split is not None and (hk.split is not hv.split or (hk.part, hv.part) != (0, 1)):
        return None
    if hk.perm[-1] != 3 or hv.perm[-1] != 3:  # the per-head features stay the last dim
        return None
    return KVProj(hk.x, hk.rows.heads, hk.rows, hv.rows), hk.perm, hv.perm


def _bt_view(x: fx.Node, b, t) -> list[int] | None:
    """The size-1 dims to squeeze from x (.., C) for (B, T, C), when its other leading dims are (b, t)."""
    shape = val(x).shape
    ones = [i for i in range(len(shape) - 1) if str(shape[i]) == "1" and i != 0]
    rest = [shape[i] for i in range(len(shape) - 1) if i not in ones]
    if len(rest) != 2 or not (same_size(rest[0], b) and same_size(rest[1], t)):
        return None
    return ones


def _k_layout(ep, K, V):
    """Where K and V come from: style (a) per-head caches written in place, or (b) decompressed here
    from latents of every attended token. Returns (fields for Site, K roles over 'bthd', V roles
    over 'bthv') or None."""
    wk, wv = cache_write(K), cache_write(V)
    if wk and wv:  # (a): per-head caches (B, T, H, D) or heads first (B, H, T, D)
        roles = {1: "bthd", 2: "bhtd"}.get(wk.time_dim)
        if roles is None or wv.time_dim != wk.time_dim or wk.per_row != wv.per_row:
            return None
        k_new, v_new = strip(wk.value), strip(wv.value)
        if not (is_call(k_new, aten.cat.default) and len(k_new.args[0]) == 2 and k_new.args[1] in (-1, 3)):
            return None
        k_nope, k_rope = k_new.args[0]
        kv, rope = kv_projection(ep, k_nope, v_new), shared_key(k_rope, roles.index("h"))
        want = [{"b": 0, "t": 1, "h": 2, "d": 3}[r] for r in roles]
        if not (kv and rope) or kv[1] != want or kv[2] != want:
            return None
        if len(k_nope.users) != 1 or len(v_new.users) != 1:
            return None
        if other_readers(wk.cache, K) or other_readers(wv.cache, V):  # the caches' sizes aside, nothing reads them
            return None
        c_sq = _bt_view(kv[0].latent, val(k_new).shape[0], val(k_new).shape[roles.index("t")])
        if c_sq is None:
            return None
        r_sq = [] if rope[1] is None else [rope[1]]
        fields = dict(dec=kv[0], k_pe=rope[0], k_pe_squeeze=r_sq, c_squeeze=c_sq, style="per_head_cache")
        return fields | dict(k_write=wk, v_write=wv, k_new=k_new, v_new=v_new), roles, roles.replace("d", "v")
    K = strip(K)
    if not (is_call(K, aten.cat.default) and len(K.args[0]) == 2 and K.args[1] in (-1, 3)):
        return None
    kv = kv_projection(ep, K.args[0][0], V)
    if kv is None:
        return None
    k_roles, v_roles = "".join("bthd"[p] for p in kv[1]), "".join("bthv"[p] for p in kv[2])
    rope = shared_key(K.args[0][1], k_roles.index("h"))
    if rope is None or len(K.args[0][0].users) != 1 or len(strip(V).users) != 1:
        return None
    kshape = val(K).shape
    b, t = kshape[k_roles.index("b")], kshape[k_roles.index("t")]
    r_sq = [] if rope[1] is None else [rope[1]]
    r_roles = k_roles if rope[1] is not None else k_roles.replace("h", "")
    if r_roles.replace("h", "") != "btd":
        return None
    c_sq = _bt_view(kv[0].latent, b, t)
    if c_sq is None:
        return None
    latent = None  # [c ; k_pe] already one tensor: c and k_pe its two slices
    c, r = strip(kv[0].latent), strip(rope[0])
    if is_call(c, aten.slice.Tensor) and is_call(r, aten.slice.Tensor) and c.args[0] is r.args[0] and not c_sq:
        whole = c.args[0]
        dc = int(val(c).shape[-1])
        if val(whole).ndim == 3 and c.args[1] % 3 == 2 and r.args[1] % 3 == 2 and tuple(c.args[2:4]) == (0, dc):
            width = int(val(whole).shape[-1])  # the kernel reads every feature: nothing after k_pe
            if r.args[2] == dc and not r_sq and val(r).ndim == 3 and width == dc + int(val(r).shape[-1]):
                latent = whole
    fields = dict(dec=kv[0], k_pe=rope[0], k_pe_squeeze=r_sq, c_squeeze=c_sq, style="latent", latent=latent)
    return fields, k_roles, v_roles


def match(ep, node: fx.Node) -> Site | None:
    if node.meta.get(KEPT_MHA):
        return None
    att = attention(node)
    if att is None:
        return None
    sc, pv, scale, mask, sm_dim = att.scores, att.pv, att.scale, att.mask, att.softmax_dim
    (qb, K), (lq, lk) = sc.ops, sc.letters
    in_q, in_k, in_out = set(lq), set(lk), set(sc.out)
    d, s, t, shared = (in_q & in_k) - in_out, in_q - in_k, in_k - in_q, in_q & in_k & in_out
    if len(d) != 1 or len(s) != 1 or len(t) != 1 or len(shared) != 2 or in_out != shared | s | t or len(sc.out) != 4:
        return None
    V = pv.ops[1]
    layout = _k_layout(ep, K, V)
    if layout is None:
        return None
    fields, k_roles, v_roles = layout
    role = dict(zip(lk, k_roles)) | {next(iter(s)): "s"}
    if role[next(iter(t))] != "t" or role[next(iter(d))] != "d" or {role[ch] for ch in shared} != {"b", "h"}:
        return None
    so_roles = "".join(role[ch] for ch in sc.out)
    q_roles = "".join(role[ch] for ch in lq)
    # P·V: contracts exactly t; V's dims are what its source says; the output holds b, s, h, v
    lp, lv = pv.letters
    role_pv = role | {ch: "v" for ch in lv if ch not in lp}
    if set(lp) & set(lv) - set(pv.out) != t or "".join(role_pv[ch] for ch in lv) != v_roles:
        return None
    out_roles = "".join(role_pv[ch] for ch in pv.out)
    if sorted(out_roles) != sorted("bshv") or (sm_dim is not None and so_roles[sm_dim] != "t"):
        return None
    # q = cat([q_nope, q_pe]) over d, its last dim
    qb = strip(qb)
    if not (is_call(qb, aten.cat.default) and len(qb.args[0]) == 2 and qb.args[1] % 4 == 3 and q_roles[3] == "d"):
        return None
    q_nope, q_pe = qb.args[0]
    mask_roles = ""
    if mask is not None:
        mval = val(mask)
        mask_roles = so_roles[max(0, 4 - mval.ndim) :]
        if mval.ndim > 4 or ("h" in mask_roles and str(mval.shape[mask_roles.index("h")]) != "1"):
            return None
    if fields["style"] == "per_head_cache":  # the per-head caches go away: only this attention may read them
        if not (sole_path(K, sc.chains[1], sc.node or pv.node) and sole_path(V, pv.chains[1], pv.node)):
            return None
    dec = fields["dec"]
    if int(val(q_nope).shape[q_roles.index("d")]) != dec.dn:
        return None
    return Site(pv.node, out_roles, q_nope, q_pe, q_roles, scale, mask, mask_roles, **fields, attn=node)


def _to_roles(g: fx.Graph, n: fx.Node, have: str, want: str) -> fx.Node:
    if have == want:
        return n
    return tag(g.call_function(aten.permute.default, (n, [have.index(r) for r in want])), NAME)


def _mask_bst(g: fx.Graph, site: Site) -> fx.Node | None:
    """The scores' mask as an additive (B|1, S|1, T|1) tensor, what ``mla_decode`` broadcasts."""
    m, roles = site.mask, site.mask_roles
    if m is None:
        return None
    if "h" in roles:
        i = roles.index("h")
        if is_call(m, aten.unsqueeze.default) and m.args[1] % len(roles) == i:
            m = m.args[0]
        else:
            m = tag(g.call_function(aten.squeeze.dim, (m, i)), NAME)
        roles = roles.replace("h", "")
    if val(site.mask).dtype == torch.bool:
        m = tag(g.call_function(aten.where.Scalar, (m, 0.0, float("-inf"))), NAME)
    want = "".join(r for r in "bst" if r in roles)
    m = _to_roles(g, m, roles, want)
    for r in "bst":
        if r not in want:
            m = tag(g.call_function(aten.unsqueeze.default, (m, "bst".index(r))), NAME)
            want = "".join(x for x in "bst" if x in want + r)
    return m


def _latent_3d(g: fx.Graph, site: Site) -> tuple[fx.Node, fx.Node]:
    """The latent c (B, T, dc) and rope key k_pe (B, T, dr) of the site, as views."""
    c, r = site.dec.latent, site.k_pe
    if site.c_squeeze:
        c = tag(g.call_function(aten.squeeze.dims, (c, site.c_squeeze)), NAME)
    if site.k_pe_squeeze:
        r = tag(g.call_function(aten.squeeze.dims, (r, site.k_pe_squeeze)), NAME)
    return c, r


def rewrite_absorbed(g: fx.Graph, site: Site, latent: fx.Node, dc: int, products=None) -> None:
    """products: (Products, {name: placeholder}) to use W_UQ·W_UK and W_UV·W_O instead of the factors."""
    with g.inserting_before(site.out):
        w_uk, w_uv = site.dec.k.build(g, _tag), site.dec.v.build(g, _tag)
        if latent is None:  # c and k_pe are separate tensors: the kernel reads them as one
            latent = tag(g.call_function(aten.cat.default, (list(_latent_3d(g, site)), -1)), NAME)
        q_pe = _to_roles(g, site.q_pe, site.q_roles, "bshd")
        if products:
            pr, w = products
            q_abs = g.call_function(aten.einsum.default, ("bsl,hcl->bshc", [pr.cq, w["uq_uk"]]))
        else:
            q_nope = _to_roles(g, site.q_nope, site.q_roles, "bshd")
            q_abs = g.call_function(aten.einsum.default, ("bshd,hdc->bshc", [q_nope, w_uk]))
        q_cat = tag(g.call_function(aten.cat.default, ([tag(q_abs, NAME), q_pe], -1)), NAME)
        mask = _mask_bst(g, site)
        o_lat = tag(g.call_function(torch.ops.dsc.mla_decode.default, (q_cat, latent, mask, site.scale, dc)), NAME)
        if products:
            flat = tag(g.call_function(aten.flatten.using_ints, (o_lat, 2)), NAME)
            bias = pr.out_linear.args[2] if len(pr.out_linear.args) > 2 else None
            o = tag(g.call_function(aten.linear.default, (flat, w["uv_o"], bias)), NAME)
            pr.out_linear.replace_all_uses_with(o)
        else:
            o = tag(g.call_function(aten.einsum.default, (f"bshc,hvc->{site.out_roles}", [o_lat, w_uv])), NAME)
            site.out.replace_all_uses_with(o)
    if products:  # the rope rows of W_q become their own projection; the nope rows are absorbed
        pr, w = products
        with g.inserting_before(pr.q_pe_part):
            heads = site.dec.heads
            y = tag(g.call_function(aten.linear.default, (pr.cq, w["q_rope"])), NAME)
            y = tag(g.call_function(aten.unflatten.int, (y, -1, [heads, pr.dr])), NAME)
            y = _to_roles(g, y, "bshd", "".join("bshd"[p] for p in pr.q_perm))
        pr.q_pe_part.replace_all_uses_with(y)


def rewrite_mha_prefill(site: Site) -> None:
    """Prefill from position 0 with T == S: the cache holds exactly this chunk's K/V. The site is
    marked so that a later run of the pass leaves the choice as it is."""
    site.attn.meta[KEPT_MHA] = True
    for old, new in ((site.k_write.node, site.k_new), (site.v_write.node, site.v_new)):
        for u in list(old.users):
            u.replace_input_with(old, new)


def _latent_write(g: fx.Graph, site: Site) -> fx.Node:
    """Write [c ; k_pe] of the chunk into the K cache input (which becomes the latent cache (B, T, C)),
    at the positions the K write used."""
    w = site.k_write
    with g.inserting_before(w.node):
        lat = tag(g.call_function(aten.cat.default, (list(_latent_3d(g, site)), -1)), NAME)
        indices = w.indices if w.time_dim == 1 else [None, w.indices[-1]]
        return tag(g.call_function(aten.index_put_.default, (w.cache, indices, lat)), NAME)


def _tag(n: fx.Node) -> fx.Node:
    return tag(n, NAME)


def _is_prefill(ep, site: Site) -> bool:
    """T == S (one symbol) and the chunk starts at position 0: what the prefill entry guarantees."""
    cache_len = val(site.k_write.node).shape[site.k_write.time_dim]
    chunk_len = val(site.k_new).shape[1]
    return str(cache_len) == str(chunk_len) and "positions" not in [n.name for n in cache_inputs(ep)]


def _unfold_heads(ep) -> None:
    """Attention over heads folded into the batch — bmm(reshape(q, (B·H, S, D)), reshape(k)ᵀ), softmax,
    bmm with reshape(v) — becomes the same computation on 4-D tensors (batched matmul), which ``match``
    reads; kept only where it then matches, so nothing else in the graph changes."""
    g, changed = ep.graph, False
    for sm in [n for n in g.nodes if is_call(n, aten.softmax.int, aten._softmax.default)]:
        if len(sm.users) != 1 or val(sm).ndim != 3 or sm.args[1] % 3 != 2:
            continue
        pv, found = next(iter(sm.users)), softmax_scores(sm)
        if found is None:
            continue
        x, mask, scale = found
        mval = val(mask)
        per_row = mval is not None and mval.ndim == 3 and str(mval.shape[0]) != "1"
        if mval is not None and (mval.ndim > 3 or (per_row and not repeated_over_heads(mask))):
            continue  # a mask that differs per (batch, head) row stays folded
        if not (
            is_call(x, aten.bmm.default, aten.matmul.default) and is_call(pv, aten.bmm.default, aten.matmul.default)
        ):
            continue
        if pv.args[0] is not sm:
            continue
        with g.inserting_before(pv):
            ops = [unfold(g, a, _tag) for a in (*x.args[:2], pv.args[1])]
            if any(o is None for o in ops):
                continue
            s4 = tag(g.call_function(aten.matmul.default, (ops[0], ops[1])), NAME)
            if scale is not None:
                s4 = tag(g.call_function(scale.target, (s4, scale.args[1])), NAME)
            if mask is not None:
                if per_row:  # (B·H, S, T), the same for every head: (B, 1, S, T), head 0's rows
                    sizes = [g.call_function(aten.sym_size.int, (ops[0], 0)), -1, *(val(mask).shape[1:])]
                    sizes[2:] = [g.call_function(aten.sym_size.int, (mask, i)) if isinstance(d, torch.SymInt) else d
                                 for i, d in enumerate(sizes[2:], start=1)]  # fmt: skip
                    m = tag(g.call_function(aten.reshape.default, (mask, sizes)), NAME)
                    m = tag(g.call_function(aten.slice.Tensor, (m, 1, 0, 1)), NAME)
                else:
                    m = mask if val(mask).ndim < 3 else tag(g.call_function(aten.unsqueeze.default, (mask, 0)), NAME)
                s4 = tag(g.call_function(aten.add.Tensor, (s4, m)), NAME)
            p4 = tag(g.call_function(sm.target, (s4, -1, *sm.args[2:])), NAME)
            o4 = tag(g.call_function(aten.matmul.default, (p4, ops[2])), NAME)
            o3 = tag(g.call_function(aten.flatten.using_ints, (o4, 0, 1)), NAME)
        pv.replace_all_uses_with(o3)
        refresh_meta(ep)
        if match(ep, p4) is None:  # not an MLA after all: put the original back
            o3.replace_all_uses_with(pv)
        g.eliminate_dead_code()
        changed = True
    if changed:
        g.eliminate_dead_code()
        refresh_meta(ep)


def _sites(ep) -> list[Site]:
    return [s for s in (match(ep, n) for n in attention_nodes(ep.graph)) if s is not None]


def _cache_index(ep, ph: fx.Node) -> int:
    """Position among the user inputs counted from the end: the same cache has the same index in
    every entry (entries differ in their leading inputs, the cache list closes each signature)."""
    users = cache_inputs(ep)
    return users.index(ph) - len(users)


def transform(ep, accepted: dict[int, tuple[int, int]], form: str, store: dict | None = None) -> dict:
    """Rewrite one entry in place. ``accepted``: K cache index -> (V cache index, latent width) of the
    per-head cache pairs that become latent caches (in every entry, read or not); ``form``: "mha"
    (prefill only), "absorbed", or "products" (absorbed with W_UQ·W_UK and W_UV·W_O precomputed;
    ``store`` keeps those tensors by name so that every entry shares one copy)."""
    g, store = ep.graph, {} if store is None else store
    stats = {"sites": 0, "latent_style": 0, "per_head_cache_style": 0, "products": 0}
    old_writes, replaced = [], []
    for site in _sites(ep):
        dc = int(val(site.dec.k.weight).shape[1])
        if site.style == "per_head_cache" and _cache_index(ep, site.k_write.cache) not in accepted:
            continue
        products = None
        pr = match_products(ep, site) if form == "products" else None
        if pr is not None:
            base = param_name(ep, site.dec.k.weight).removesuffix(".weight")
            made, w = None, {}
            for key in ("uq_uk", "q_rope", "uv_o"):
                name = f"{base}.absorbed_{key}"
                if name not in store:
                    made = made or product_weights(ep, site, pr)
                    store[name] = made[key]
                w[key] = add_constant_input(ep, name, store[name])
            products = (pr, w)
            stats["products"] += 1
        if site.style == "latent":
            rewrite_absorbed(g, site, site.latent, dc, products)
            stats["latent_style"] += 1
        else:
            latent_write = _latent_write(g, site)
            if form == "mha":
                rewrite_mha_prefill(site)
            else:
                rewrite_absorbed(g, site, latent_write, dc, products)
            old_writes += [site.k_write.node, site.v_write.node]
            stats["per_head_cache_style"] += 1
        stats["sites"] += 1
        replaced.append(site.out)
    g.eliminate_dead_code()
    for n in replaced:  # DCE keeps SDPA (its dropout makes it "random"): it goes by hand
        if n.graph is g and not n.users and is_call(n, aten.scaled_dot_product_attention.default):
            g.erase_node(n)
    g.eliminate_dead_code()
    for n in old_writes:  # in-place writes are side effects: DCE keeps them, so they go by hand
        assert not n.users, f"{n.name} still read by {list(n.users)}"
        g.erase_node(n)
    # every accepted pair changes layout in this entry too: K slot -> latent, V slot gone
    users = cache_inputs(ep)
    for k, (v, width, time_dim) in accepted.items():  # the latent cache (B, T, C): same B and T
        kph, vph = users[len(users) + k], users[len(users) + v]
        retype_cache_input(ep, kph, [width], time_dim)
        drop_cache_input(ep, vph, kph, time_dim)
    drop_unused_inputs(ep)
    refresh_meta(ep)
    finalize(ep)
    return stats


def _roofline_s(cost, machine) -> tuple[float, float, float]:
    flops, nbytes = cost.at(machine.context)
    return machine.roofline_s(flops, nbytes), flops, nbytes


def _as_fuse_dsa_leaves_it(ep, kind: str, machine, sparse: bool) -> tuple[float, float, float, bool]:
    """A form's roofline cost (s, FLOP, B, made sparse) as it will run: with ``sparse`` (fuse_dsa
    runs later), its attentions masked by a DSA top-k made sparse (on a copy) where that is no
    dearer; else dense."""
    from dsc.passes.fuse_dsa import transform as make_sparse

    from dsc.cost import entry_cost

    dense = (*_roofline_s(entry_cost(ep, kind, fused_attention=True), machine), False)
    if not sparse:
        return dense
    fused = clone_entry(ep)
    if not make_sparse(fused):
        return dense
    return min(dense, (*_roofline_s(entry_cost(fused, kind, fused_attention=True), machine), True))


PRODUCTS = ("auto", "never", "always")
PRODUCTS_MIN_GAIN = 0.1  # "auto" takes the products only for this much less roofline time


@register_pass(
    NAME, order=20, purpose="MLA weight absorption: attention over the latent [c_kv ; k_pe] cache",
    tolerance=TOLERANCES["fp32_rewrite"],
    options={"products": PRODUCTS}, requires=("canonicalize", "normalize"),
)  # fmt: skip
def absorb_mla(program, ctx):
    """Option ``products``: precompute W_UQ·W_UK and W_UV·W_O for the absorbed form — "auto" (the
    cost model decides per entry), "never", "always"."""
    products = ctx.options["products"]
    sparse = ctx.later is None or "fuse_dsa" in ctx.later  # the forms priced as fuse_dsa leaves them
    for ep in program.entries.values():
        _unfold_heads(ep)
    # 1. which per-head K/V cache pairs can change layout: matched in every entry that reads them
    matched: dict[int, tuple] = {}  # k cache index -> (v index, layer, dc, dr, time dim)
    readers: dict[int, set[str]] = {}
    hits: dict[int, set[str]] = {}
    inflation = None
    for entry, ep in program.entries.items():
        for ph in cache_inputs(ep):
            if any(not is_call(u, aten.sym_size.int) for u in ph.users):  # size reads do not count
                readers.setdefault(_cache_index(ep, ph), set()).add(entry)
        for s in _sites(ep):
            pr = match_products(ep, s)
            if pr is not None and inflation is None:
                inflation = param_bytes(ep, s, pr)
            if s.style == "per_head_cache":
                k, v = _cache_index(ep, s.k_write.cache), _cache_index(ep, s.v_write.cache)
                dc, dr = int(val(s.dec.latent).shape[-1]), int(val(s.k_pe).shape[-1])
                layer = program.cache.tensors[k].layer if program.cache.tensors else None
                matched[k] = (v, layer, dc, dr, s.k_write.time_dim)
                hits.setdefault(k, set()).add(entry)
    accepted = {
        k: (matched[k][0], matched[k][2] + matched[k][3], matched[k][4])
        for k in matched
        if hits[k] >= readers.get(k, set()) and hits[k] >= readers.get(matched[k][0], set())
    }

    # 2. rewrite each entry; the cost model picks the form where there is a choice
    stats: dict = {"entries": {}, "layers": sorted(matched[k][1] for k in accepted if matched[k][1] is not None)}
    store: dict[str, torch.Tensor] = {}
    for entry, ep in program.entries.items():
        sites = _sites(ep)
        prefill = entry == "prefill" and any(_is_prefill(ep, s) for s in sites if s.style == "per_head_cache")
        forms = ["mha"] if prefill else []
        forms += {"never": ["absorbed"], "always": ["products"], "auto": ["absorbed", "products"]}[products]
        if products == "auto" and not any(match_products(ep, s) for s in sites):
            forms.remove("products")
        kind = "prefill" if entry == "prefill" else "decode"
        form, why = forms[0], "the only form asked for"
        trials = {}  # form -> (rewritten entry, its stats): the chosen one is kept, not redone
        if len(forms) > 1:
            options = {}
            for f in forms:
                trial = clone_entry(ep)
                trials[f] = trial, transform(trial, accepted, f, store)
                options[f] = _as_fuse_dsa_leaves_it(trial, kind, ctx.machine, sparse)
            form = min(options, key=lambda f: options[f][0])
            why = ", ".join(
                f"{f}: {v[1]:.3g} FLOP, {v[2]:.3g} B, {v[0] * 1e6:.1f} us on the roofline{' with DSA sparse' if v[3] else ''}"
                for f, v in options.items()
            )
            T, on = ctx.machine.context, ctx.machine.name
            why = f"{f'prefill of {T} tokens' if kind == 'prefill' else f'decode step at {T} context'} on {on} — {why}"
            rest = {f: v for f, v in options.items() if f != "products"}
            if form == "products" and rest and options[form][0] > (1 - PRODUCTS_MIN_GAIN) * min(rest.values())[0]:
                form = min(rest, key=lambda f: rest[f][0])  # more weight memory must buy a real gain
                why += f"; products save under {PRODUCTS_MIN_GAIN:.0%}: not worth their extra weights"
        elif form != "mha":
            why = "attends to the whole cached context every step: read the latents, not per-head K/V"
        if form in trials:
            program.entries[entry], s = trials[form]
        else:
            s = transform(ep, accepted, form, store)
        stats["entries"][entry] = {**s, "form": form if s["sites"] else "unchanged", "why": why}
    if inflation is not None:
        stats["products"] = {
            "option": products,
            "entries": [e for e, v in stats["entries"].items() if v["products"]],
            "param_bytes_per_layer": {"factored": inflation[0], "products": inflation[1]},
            "inflation": round(inflation[1] / inflation[0], 2),
        }

    # 3. the CacheSpec follows the entries (indices count from the end, like the cache inputs)
    layer0 = matched[min(accepted)][1] if accepted else None
    before = program.cache.bytes_per_token({layer0}) if accepted and program.cache.tensors else None
    if program.cache.tensors:
        n = len(program.cache.tensors)
        for k in accepted:
            v, layer, dc, dr, _ = matched[k]
            old = program.cache.tensors[n + k]
            meaning = "MLA latent [c_kv ; RoPE(k_pe)], shared by all heads"
            program.cache.replace(n + k, CacheTensor(f"layers.{layer}.kv_latent", [dc + dr], old.dtype, meaning, layer))
        for v in sorted((n + matched[k][0] for k in accepted), reverse=True):
            program.cache.remove(v)
    if accepted and program.cache.tensors:
        k0 = min(accepted)
        layer = matched[k0][1]
        stats["cache_bytes_per_token_per_layer"] = {"before": before, "after": program.cache.bytes_per_token({layer})}
    return sum(e["sites"] for e in stats["entries"].values()), stats
