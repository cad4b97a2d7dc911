"""fuse_dsa: DeepSeek Sparse Attention — the indexer's top-k feeds an attention over the selected
latents only (spec §5, §4.6).

    mla_decode(q, [c ; k_pe], mask = top-k(I) & visible, scale)
        ->  sparse_mla(q_abs, q_pe, c, k_pe, indexer_topk(q_I, w_I, k_I, limit, k), scale)

Works on the absorbed form ``absorb_mla`` leaves (``dsc::mla_decode`` over the latent cache) and
on the MHA form it keeps where that is cheaper (a prefill attending to its own per-head K/V):

    softmax(scale · q·kᵀ + mask) · v   ->  sparse_mha(q, k, v, indexer_topk(q_I, w_I, k_I, limit, k), scale)

with any attention spelling the shared matcher ``dsc.match.attention`` reads (einsum, matmul,
SDPA; the heads before or after the queries). The mask, additive or SDPA's boolean, is read by
the shared matcher ``dsc.match.dsa.dsa_mask``: the index scores Σ_h w·ReLU(c·q·k) (any
contraction spelling, c > 0 folded into w), their top-k by a stable sort and slice or by topk,
scattered into a boolean, and the visibility t <= limit; nothing else may be in the mask.
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
from dsc.kernels.dsa import FP8_MAX, hadamard
from torch import fx

from dsc.cache import CacheTensor, cache_inputs, retype_cache_input
from dsc.errors import DscError
from dsc.fx_utils import add_constant_input, finalize, is_call, refresh_meta, tag, val
from dsc.match.attention import SDPA, SOFTMAXES, Attention, attention
from dsc.match.cache import cache_write
from dsc.match.dsa import DsaMask, dsa_mask
from dsc.match.ops import COPIES, RESHAPES
from dsc.program import clone_entry
from dsc.registry import register_pass
from dsc.verify import TOLERANCES

aten = torch.ops.aten
dsc_ops = torch.ops.dsc
NAME = "fuse_dsa"
INDEX_CACHE = ("keep", "fp8", "fp8_ue8m0")  # option index_cache: the index-key cache's format
SCALE_BYTES = 4  # one fp32 scale after the D e4m3 values: 132 B/token/layer at D = 128 (spec §7.4)


def _sites(ep) -> list[tuple[fx.Node, DsaMask]]:
    """(site, mask): an absorbed ``mla_decode`` node, or an MHA attention's softmax or SDPA node."""
    out = []
    for n in ep.graph.nodes:
        if is_call(n, *SOFTMAXES, SDPA):
            got = _mha(n)
            if got is not None:
                out.append((n, got[1]))
            continue
        if not is_call(n, dsc_ops.mla_decode.default) or len(n.args) < 5 or not isinstance(n.args[2], fx.Node):
            continue
        if len(n.args) > 5 and n.args[5] is not None:
            continue  # already given indices
        m = dsa_mask(n.args[2])
        if m is None or not _sole_use(m, n):
            continue
        out.append((n, m))
    return out


def _mha(sm: fx.Node) -> tuple[Attention, DsaMask, dict[str, str], tuple] | None:
    """(the attention, its DSA mask, its letters -> b s h t d v, (letters, node, roles) of q, k and
    v) when softmax or SDPA ``sm`` is an attention of per-head K/V masked by a DSA top-k: the
    scores contract one letter d, keep q's s and k's t and two shared letters, of which the head
    is the one the mask broadcasts over (one selection per (batch row, query), for every head);
    V carries the batch, key and head letters."""
    att = attention(sm)
    if att is None or att.mask is None or len(att.scores.contracted) != 1:
        return None
    sc, pv = att.scores, att.pv
    if is_call(sm, SDPA):  # the mask an argument of SDPA, boolean or additive; the keys last
        mask, top, t = att.mask, sm, sc.out[-1]
    elif is_call(sm.args[0], aten.add.Tensor) and val(att.mask).dtype != torch.bool:  # (added: 0 / -inf)
        mask, top, t = att.mask, sm.args[0], sc.out[att.softmax_dim]
    else:
        return None
    while is_call(mask, aten.unsqueeze.default) and len(mask.users) == 1:  # the head dim added: (B, S, 1, T)
        mask, top = mask.args[0], mask
    m = dsa_mask(mask)
    if m is None or not _sole_use(m, top):
        return None
    out = sc.out
    qi = 0 if t not in sc.letters[0] else 1  # the keys are the operand with the softmax's letter
    (lq, lk), (xq, xk) = (sc.letters[qi], sc.letters[1 - qi]), (sc.ops[qi], sc.ops[1 - qi])
    d = next(iter(sc.contracted))
    s = [c for c in out if c in lq and c not in lk]
    if len(s) > 1:  # the query letter among size-1 spares: the one that is not size 1, else any (one query)
        s = [c for c in s if str(_size(sc, c)) != "1"] or s[:1]
    shared = [c for c in out if c in lq and c in lk]
    if t not in lk or t in lq or len(s) != 1 or len(shared) != 2:
        return None
    mshape = [str(x) for x in val(att.mask).shape]
    mshape = ["1"] * (len(out) - len(mshape)) + mshape
    if len(mshape) != len(out):
        return None
    heads = [c for c in shared if mshape[out.index(c)] == "1" and str(_size(sc, c)) != "1"]
    if len(heads) != 1:
        return None  # which shared letter is the head is not determined (one head, or a per-head mask)
    h = heads[0]
    b = next(c for c in shared if c != h)
    names = {b: "b", s[0]: "s", h: "h", t: "t", d: "d"}
    lv = pv.letters[1]
    vl = [c for c in lv if c not in names and str(_size(pv, c, 1)) != "1"]
    if not {b, t, h} <= set(lv) or len(vl) != 1 or vl[0] not in pv.out:
        return None
    names[vl[0]] = "v"
    roles = ((lq, xq, "bshd"), (lk, xk, "bthd"), (lv, pv.ops[1], "bthv"), (pv.out, pv.node, "bshv"))
    for letters, x, need in roles:
        if not set(need) <= {names.get(c) for c in letters}:
            return None
        if any(c not in names and str(val(x).shape[i]) != "1" for i, c in enumerate(letters)):
            return None  # a letter outside the attention's roles: only size-1 dims may be spare
    return att, m, names, roles[:3]


def _size(con, letter: str, op: int | None = None):
    """The size of ``letter`` in contraction ``con`` (read from the operand that has it)."""
    for i, (x, letters) in enumerate(zip(con.ops, con.letters)):
        if (op is None or i == op) and letter in letters and isinstance(x, fx.Node):
            return val(x).shape[letters.index(letter)]
    return None


def _canon(letters: str, names: dict[str, str]) -> str:
    """``letters`` renamed to the roles; size-1 spare letters get fresh names (squeezed away by ``_as``)."""
    spare = iter("wxyz")
    return "".join(names[c] if c in names else next(spare) for c in letters)


def rewrite_mha(ep, sm: fx.Node) -> bool:
    got = _mha(sm)
    if got is None:
        return False
    att, m, names, operands = got
    g, pv = ep.graph, att.pv
    with g.inserting_before(pv.node):
        q, k, v = (_as(g, x, _canon(letters, names), want) for letters, x, want in operands)
        (lq, xq, _) = operands[0]
        rows = tuple(_canon(lq, names).index(c) for c in "bs")
        idx = tag(_indexer(g, m, xq, rows), NAME)
        o = tag(g.call_function(dsc_ops.sparse_mha.default, (q, k, v, idx, att.scale)), NAME)
        want = _canon(pv.out, names)
        kept = "".join(c for c in want if c in "bshv")
        o = _as(g, o, "bshv", kept)
        for i, c in enumerate(want):  # the size-1 dims the attention's output has besides its roles
            if c not in "bshv":
                o = g.call_function(aten.unsqueeze.default, (o, i))
        dtype = val(pv.node).dtype
        if dtype != torch.float32:
            o = g.call_function(aten._to_copy.default, (o,), {"dtype": dtype})
    pv.node.replace_all_uses_with(o)
    if is_call(pv.node, SDPA):  # dead code elimination keeps SDPA (its dropout makes it impure)
        g.erase_node(pv.node)
    return True


def _indexer(g: fx.Graph, m: DsaMask, q: fx.Node, dims: tuple[int, int] = (0, 1)) -> fx.Node:
    """``dsc::indexer_topk`` of the mask's index scores, for the queries q (batch and query dims ``dims``)."""
    sc = m.scores
    limit = _rows(g, m, q, dims)
    qi, ki, wi = _as(g, sc.q, sc.q_dims, "bshd"), _as(g, sc.keys, sc.k_dims, "btd"), _as(g, sc.w, sc.w_dims, "bsh")
    if sc.scale != 1.0:
        wi = g.call_function(aten.mul.Tensor, (wi, sc.scale))
    return g.call_function(dsc_ops.indexer_topk.default, (qi, wi, ki, limit, m.k))


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
    """x (written with ``letters``) laid out as ``want``: the size-1 letters ``want`` lacks squeezed
    away, then a permute; views both, so a layout costs no copy."""
    gone = [i for i, c in enumerate(letters) if c not in want]
    x_val = val(x)
    assert x_val is None or all(str(x_val.shape[i]) == "1" for i in gone), f"{letters}->{want}: {x_val.shape}"
    if gone:
        x = g.call_function(aten.squeeze.dims, (x, gone))
        letters = "".join(c for c in letters if c in want)
    if letters != want:
        x = g.call_function(aten.permute.default, (x, [letters.index(c) for c in want]))
    return x


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


def _rows(g: fx.Graph, m: DsaMask, q: fx.Node, dims: tuple[int, int]) -> fx.Node:
    """The visibility limit as the (B, S) int64 tensor indexer_topk takes: the limit's size-1 dims
    squeezed away, then broadcast over the batch and the queries it does not name (shared
    positions, one position for all queries) to the sizes of q's batch and query dims ``dims``."""
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
            for d in dims
        ]
        lim = g.call_function(aten.expand.default, (lim, size))
    if val(m.limit).dtype != torch.int64:
        lim = g.call_function(aten._to_copy.default, (lim,), {"dtype": torch.int64})
    return lim


def rewrite(ep, site: fx.Node, m: DsaMask) -> bool:
    if is_call(site, *SOFTMAXES, SDPA):
        return rewrite_mha(ep, site)
    g = ep.graph
    q, kv, _, scale, dv = site.args[:5]
    C = int(val(kv).shape[-1])
    if int(val(q).shape[-1]) != C or not 0 < dv < C:
        return False
    with g.inserting_before(site):
        idx = tag(_indexer(g, m, q), NAME)
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
    tolerance=TOLERANCES["fp32_rewrite"], requires=("canonicalize", "normalize"), after=("absorb_mla",),
    options={"index_cache": INDEX_CACHE},
)  # fmt: skip
def fuse_dsa(program, ctx):
    from dsc.cost import entry_cost

    index_cache = ctx.options["index_cache"]
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
    if total and index_cache != "keep":
        ue8m0 = index_cache == "fp8_ue8m0"
        recall = index_recall(program, ue8m0)
        stats["index_cache"] = {**fp8_index_cache(program, ue8m0), "recall_vs_fp32": recall}
        ctx.tolerance = TOLERANCES["fp8_index_cache"]
    return total, stats


# ---- the FP8 index-key cache (option index_cache=fp8 | fp8_ue8m0) --------------------------------


LAYOUT = (
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    *COPIES, *RESHAPES,
)  # fmt: skip


def _to_indexer(n: fx.Node) -> fx.Node | None:
    """The ``indexer_topk`` whose keys n is, through a chain of layout ops each read once (the
    transposes and casts of a cache read, a one-operand einsum), else None."""
    while True:
        users = list(n.users)
        if len(users) != 1:
            return None
        u = users[0]
        if is_call(u, dsc_ops.indexer_topk.default):
            return u if u.args[2] is n and u.args[0] is not n else None
        if not (is_call(u, *LAYOUT) or (is_call(u, aten.einsum.default) and len(u.args[1]) == 1)):
            return None
        n = u


def _from_cache(n: fx.Node):
    """The cache write under a chain of layout ops, else None."""
    while cache_write(n) is None:
        if is_call(n, *LAYOUT):
            n = n.args[0]
        elif is_call(n, aten.einsum.default) and len(n.args[1]) == 1:
            n = n.args[1][0]
        else:
            return None
    return cache_write(n)


def _index_cache_writes(ep) -> dict[fx.Node, fx.Node]:
    """{cache input: its write} for the index-key caches an ``indexer_topk`` of this entry reads."""
    out = {}
    for n in ep.graph.nodes:
        if is_call(n, dsc_ops.indexer_topk.default):
            w = _from_cache(n.args[2])
            if w is not None and w.time_dim == 1:
                out[w.cache] = w.node
    return out


def _quantize(g: fx.Graph, v: fx.Node, had: fx.Node, ue8m0: bool) -> fx.Node:
    """New index keys (B, S, D) -> packed (B, S, D + 4) uint8: e4m3 of (v H) / s, then s's bytes
    (``dsc.kernels.dsa.quantize_index_keys``, in ATen ops)."""
    call = g.call_function
    r = call(aten.matmul.default, (call(aten._to_copy.default, (v,), {"dtype": torch.float32}), had))
    s = call(
        aten.div.Tensor,
        (
            call(aten.clamp_min.default, (call(aten.amax.default, (call(aten.abs.default, (r,)), [-1], True)), 1e-4)),
            FP8_MAX,
        ),
    )
    if ue8m0:
        s = call(aten.exp2.default, (call(aten.ceil.default, (call(aten.log2.default, (s,)),)),))
    q8 = call(
        aten._to_copy.default,
        (call(aten.clamp.default, (call(aten.div.Tensor, (r, s)), -FP8_MAX, FP8_MAX)),),
        {"dtype": torch.float8_e4m3fn},
    )
    parts = [call(aten.view.dtype, (q8, torch.uint8)), call(aten.view.dtype, (s, torch.uint8))]
    return call(aten.cat.default, (parts, -1))  # fmt: skip


def _dequantize(g: fx.Graph, packed: fx.Node, D: int) -> fx.Node:
    """Packed (B, T, D + 4) uint8 -> the rotated keys (B, T, D) fp32: e4m3 values times their scale."""
    call = g.call_function
    vals = call(aten.view.dtype, (call(aten.slice.Tensor, (packed, -1, 0, D)), torch.float8_e4m3fn))
    scale = call(aten.view.dtype, (call(aten.slice.Tensor, (packed, -1, D, D + SCALE_BYTES)), torch.float32))
    return call(aten.mul.Tensor, (call(aten._to_copy.default, (vals,), {"dtype": torch.float32}), scale))


def fp8_index_cache(program, ue8m0: bool) -> dict:
    """Every index-key cache an ``indexer_topk`` reads becomes FP8 in every entry: the write stores
    the Hadamard-rotated key as D e4m3 values and one fp32 scale; the sparse indexer reads the
    dequantised rotated keys with its queries rotated too (q H · k H = q · k), and any other reader
    (a dense entry's index scores) reads them rotated back (· Hᵀ)."""
    n = len(program.cache.tensors)
    if not n:
        return {"format": "keep", "why": "the Program declares no cache (CacheSpec) to change"}
    chosen = set()  # cache indices (counted from the end, like the cache inputs)
    for ep in program.entries.values():
        phs = cache_inputs(ep)
        chosen |= {phs.index(ph) - len(phs) for ph in _index_cache_writes(ep)}
    if not chosen:
        return {"format": "keep", "why": "no sparse indexer reads an index-key cache written in place"}
    D = program.cache.tensors[n + min(chosen)].tail[-1]
    try:
        had_t = hadamard(D)
    except ValueError:
        raise DscError(
            f"fuse_dsa.index_cache=fp8 rotates the index keys by a Hadamard matrix, which needs a power-of-two "
            f"index_head_dim; this model's is {D}. Use fuse_dsa.index_cache=keep."
        ) from None
    for ep in program.entries.values():
        phs = cache_inputs(ep)
        targets = [phs[i] for i in sorted(chosen) if -i <= len(phs)]
        if not targets:
            continue
        had = add_constant_input(ep, f"dsc_hadamard_{D}", had_t, kind="constant")
        g = ep.graph
        for ph in targets:
            writes = [u for u in ph.users if cache_write(u) is not None]
            readers = [u for u in ph.users if u not in writes and not is_call(u, aten.sym_size.int)]
            if len(writes) > 1 or readers:
                raise DscError(f"fuse_dsa.index_cache=fp8: cache input {ph.name} is read before it is written")
            retype_cache_input(ep, ph, [D + SCALE_BYTES], dtype=torch.uint8)
            if not writes:
                continue
            w = writes[0]
            with g.inserting_before(w):
                w.args = (w.args[0], w.args[1], _quantize(g, w.args[2], had, ue8m0), *w.args[3:])
            for u in [u for u in w.users if u.op != "output"]:  # (the output returns the cache itself)
                with g.inserting_before(u):
                    keys = _dequantize(g, w, D)
                    topk = u if is_call(u, dsc_ops.indexer_topk.default) and u.args[2] is w else _to_indexer(u)
                    if topk is not None:  # the sparse indexer: rotated keys, rotated queries
                        u.replace_input_with(w, keys)
                        with g.inserting_before(topk):
                            q = g.call_function(aten.matmul.default, (topk.args[0], had))
                        topk.args = (q, *topk.args[1:])
                    else:  # any other reader: the keys rotated back
                        back = g.call_function(aten.matmul.default, (keys, g.call_function(aten.t.default, (had,))))
                        u.replace_input_with(w, back)
        refresh_meta(ep)
        finalize(ep)
    meaning = f"index keys, FP8: {D} e4m3 values of the Hadamard-rotated key, then its fp32 scale"
    old_bytes = program.cache.tensors[n + min(chosen)].bytes_per_token
    for i in chosen:
        old = program.cache.tensors[n + i]
        program.cache.replace(
            n + i, CacheTensor(old.name, [D + SCALE_BYTES], "uint8", meaning, old.layer, old.time_dim)
        )
    return {
        "format": "fp8_ue8m0" if ue8m0 else "fp8",
        "caches": len(chosen),
        "bytes_per_token_per_layer": {"before": old_bytes, "after": D + SCALE_BYTES},
    }


def index_recall(program, ue8m0: bool, seed: int = 0) -> dict:
    """Top-k recall of the FP8 index keys against the fp32 indexer on the verification inputs: every
    sparse indexer call of ``program`` (still fp32) also selects over its keys quantised as the
    FP8 cache stores them; recall = |FP8 ∩ fp32| / |fp32| over the queries that see more than k keys
    (the others select everything either way)."""
    from dsc.kernels.dsa import fp8_index_topk_ref, observe_indexer

    from dsc.verify import make_scenario, run_scenario

    hit = total = rows = 0

    def probe(q, w, keys, limit, topk, idx):
        nonlocal hit, total, rows
        past = (limit + 1) > topk  # queries whose selection is a real choice
        if not past.any():
            return
        got = fp8_index_topk_ref(q, w, keys, limit, topk, ue8m0)
        a, b = idx[past], got[past]  # (R, k): fp32 and FP8 selections, all slots valid
        hit += int((a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum())
        total += a.numel()
        rows += a.shape[0]

    with observe_indexer(probe):
        run_scenario(program.clone(), make_scenario(program.config, seed))  # (a clone: its modules die with it)
    if not rows:
        return {"queries": 0, "recall": None, "why": "no query of the verification inputs sees more than top-k keys"}
    return {"queries": rows, "recall": round(hit / total, 4)}


def _why_none(ep) -> str:
    return "no attention mask is a top-k of indexer scores (dense attention, or a selection read elsewhere)"
