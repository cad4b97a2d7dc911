"""normalize: many spellings of one computation -> one normal form, before every pattern pass.

Rules, each a small graph rewrite with a hit count in the stats (and, when a rule declines a
candidate for safety, the reason under ``declined``):
- ``grad_mode``: a ``torch.no_grad()`` / ``set_grad_enabled`` region (``wrap_with_set_grad_enabled``,
  a call of a subgraph) inlined into the graph: grad mode changes nothing in an inference graph,
  and the matchers must see what the region computes (transformers' V3.2 indexer sits in one);
- ``noops``: ``dropout`` with p = 0 or in eval mode, ``clone`` / ``contiguous`` / ``alias`` /
  ``detach`` of memory nothing writes in place -> their input;
- ``assembly``: a fresh buffer (``new_empty`` / ``empty`` / ``zeros``) filled by ``copy_`` into
  slices that tile one dim, read only after the last copy -> ``cat`` of the (broadcast) sources;
- ``cache_writes``: ``index_copy_(cache, d, pos, v)`` -> ``index_put_(cache, [None]*d + [pos], v)``;
  ``cache[.., a:b] = v`` (``copy_`` into a slice of a cache input) -> ``index_put_`` at ``arange(a, b)``;
  every later reader of the cache reads the (latest) write's output (the same memory);
- ``layout``: ``movedim``, ``x.T``, ``x.mT`` (``numpy_T``, ``mT``, real ``mH``) -> ``permute``; ``repeat_interleave`` along a size-1 dim -> ``expand``;
- ``masks``: a softmax over ``where(keep, s, c)`` or ``masked_fill(s, drop, c)`` (c a scalar) -> a
  softmax over ``s + where(keep, 0, c)``: the additive mask the attention matchers read (the kept
  scores are the same; the dropped ones get probability 0 either way, for c <= -1e4);
- ``contractions``: ``einsum('...c,oc->...o', x, W)`` of a 2-D W -> ``linear(x, W)`` (the projection
  matchers read linear); ``matmul`` of operands of different ranks (>= 3, batch dims broadcast
  from the right, e.g. a (B, 1, T, c) latent against per-head (H, c, d) weights) -> an einsum with
  one letter per output batch dim, a broadcast size-1 dim squeezed away; ``sum(a * b, dims)`` ->
  the einsum that contracts those dims;
- ``split_sums``: ``A·Bᵀ + A'·B'ᵀ`` (two contractions with the same output, one contracted dim
  each, e.g. ``q_nope·k_noteᵀ + q_pe·k_peᵀ`` with the shared rope key broadcast) -> one contraction
  over ``cat(A, A')`` and ``cat(B, B')``.

Preconditions: ``canonicalize``. Numerics: exact except ``split_sums``, which re-associates one fp32
sum (the pass's tolerance is fp32 re-association).
Not normalised (yet): ``scatter_`` into a cache, writes through views taken before the write,
assembly by ``select`` + ``copy_``, split sums of more than two terms.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from dsc.fx_utils import call_nodes, finalize, is_call, mutated_inputs, refresh_meta, tag, val
from dsc.match.contraction import contraction
from dsc.match.ops import ASSERTS, CONTRACTIONS, MASK_FILL_MAX, slice_bounds
from dsc.registry import register_pass
from dsc.verify import FP32_REASSOC

aten = torch.ops.aten
NAME = "normalize"
ALIASING_COPIES = (aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
                   aten.lift_fresh_copy.default)  # fmt: skip
FRESH = (aten.new_empty.default, aten.empty.memory_format, aten.zeros.default, aten.new_zeros.default)


def inline_grad_mode(ep, declined: list) -> int:
    from torch._higher_order_ops.wrap import wrap_with_set_grad_enabled

    g, gm, n_changed = ep.graph, ep.graph_module, 0
    for n in [n for n in g.nodes if n.op == "call_function" and n.target is wrap_with_set_grad_enabled]:
        sub_node, args = n.args[1], n.args[2:]
        sub = getattr(gm, sub_node.target, None) if sub_node.op == "get_attr" else None
        if not isinstance(sub, fx.GraphModule) or any(x.op in ("get_attr", "call_module") for x in sub.graph.nodes):
            declined.append(f"{n.name}: a grad-mode region with attributes of its own")
            continue
        env, outs = {}, None
        with g.inserting_before(n):
            for x in sub.graph.nodes:
                if x.op == "placeholder":
                    env[x] = args[len(env)]
                elif x.op == "output":
                    outs = x.args[0]
                elif x.target in ASSERTS and not x.users:
                    continue  # canonicalize's rule, for the region it could not see into
                else:
                    env[x] = g.node_copy(x, env.__getitem__)
        mapped = fx.node.map_arg(outs, env.__getitem__)
        for u in list(n.users):
            if not (u.target is operator.getitem and isinstance(mapped, (tuple, list))):
                break
            u.replace_all_uses_with(mapped[u.args[1]])
            g.erase_node(u)
        if n.users:
            n.replace_all_uses_with(mapped)
        g.erase_node(n)
        if not sub_node.users:
            g.erase_node(sub_node)
            delattr(gm, sub_node.target)
        n_changed += 1
    return n_changed


def drop_noops(ep, declined: list) -> int:
    volatile = mutated_inputs(ep)
    n_changed = 0
    for n in call_nodes(ep.graph_module):
        if is_call(n, aten.dropout.default) and (n.args[1] == 0 or not n.args[2]):
            n.replace_all_uses_with(n.args[0])
        elif is_call(n, *ALIASING_COPIES) and isinstance(n.args[0], fx.Node):
            if n in volatile or n.args[0] in volatile:
                declined.append(f"{n.name}: {n.target} of memory written in place")
                continue
            n.replace_all_uses_with(n.args[0])
        else:
            continue
        ep.graph.erase_node(n)
        n_changed += 1
    return n_changed


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def assemble_cats(ep, declined: list) -> int:
    g, order, n_changed = ep.graph, _order(ep.graph), 0
    for buf in [n for n in g.nodes if is_call(n, *FRESH)]:
        shape = val(buf).shape
        slices = [u for u in buf.users if is_call(u, aten.slice.Tensor)]
        readers = [u for u in buf.users if u not in slices]
        copies = []
        for s in slices:
            us = list(s.users)
            if len(us) != 1 or not is_call(us[0], aten.copy_.default) or us[0].args[0] is not s or us[0].users:
                break
            copies.append(us[0])
        if not slices or len(copies) != len(slices) or len({s.args[1] % len(shape) for s in slices}) != 1:
            continue
        d = slices[0].args[1] % len(shape)
        spans = [(*slice_bounds(s, shape[d]), s, c) for s, c in zip(slices, copies)]
        if not all(isinstance(x[0], int) for x in spans):
            continue  # symbolic starts: the tiling cannot be ordered here
        spans.sort(key=lambda x: x[0])
        edges = [0] + [x[1] for x in spans]
        if any(x[2] != 1 for x in spans) or [x[0] for x in spans] != edges[:-1] or str(edges[-1]) != str(shape[d]):
            continue  # the copies must tile the dim exactly
        last = max(order[c] for c in copies)
        if any(order[r] < last for r in readers):
            declined.append(f"{buf.name}: read before it is fully written")
            continue
        with g.inserting_after(max(copies, key=order.get)):
            parts = []
            for _a, _b, _, s, c in spans:
                src = c.args[1]
                if val(src).dtype != val(buf).dtype:
                    src = tag(g.call_function(aten.to.dtype, (src, val(buf).dtype)), NAME)
                if [str(x) for x in val(src).shape] != [str(x) for x in val(s).shape]:
                    sizes = [-1 if i == d else _size_arg(buf, i) for i in range(len(shape))]
                    src = tag(g.call_function(aten.expand.default, (src, sizes)), NAME)
                parts.append(src)
            cat = tag(g.call_function(aten.cat.default, (parts, d)), NAME)
        for r in readers:
            r.replace_input_with(buf, cat)
        for _, _, _, s, c in spans:
            g.erase_node(c)
            g.erase_node(s)
        g.erase_node(buf)
        n_changed += 1
        order = _order(g)
    return n_changed


def _size_arg(buf: fx.Node, i: int):
    """Dim i of a fresh buffer as its constructor was given it (an int or a size node)."""
    shape_arg = buf.args[1] if buf.target in (aten.new_empty.default, aten.new_zeros.default) else buf.args[0]
    return shape_arg[i]


def canonical_cache_writes(ep, declined: list) -> int:
    g, n_changed = ep.graph, 0
    placeholders = {n for n in g.nodes if n.op == "placeholder"}
    for n in list(g.nodes):
        if is_call(n, aten.index_copy_.default) and n.args[0] in placeholders:
            cache, d, idx, src = n.args[:4]
            d = d % val(cache).ndim
            with g.inserting_before(n):
                w = tag(g.call_function(aten.index_put_.default, (cache, [None] * d + [idx], src)), NAME)
        elif (
            is_call(n, aten.copy_.default) and is_call(n.args[0], aten.slice.Tensor)
            and n.args[0].args[0] in placeholders and not n.users and len(n.args[0].users) == 1
        ):  # fmt: skip
            s, src = n.args[0], n.args[1]
            cache = s.args[0]
            d = s.args[1] % val(cache).ndim
            a, b, step = slice_bounds(s, val(cache).shape[d])
            if step != 1:
                declined.append(f"{n.name}: strided slice write")
                continue
            with g.inserting_before(n):
                idx = tag(g.call_function(aten.arange.start, (a, b), {"device": val(cache).device}), NAME)
                if is_call(src, aten.expand.default):  # index_put_ broadcasts the value itself
                    src = src.args[0]
                w = tag(g.call_function(aten.index_put_.default, (cache, [None] * d + [idx], src)), NAME)
        else:
            continue
        n.replace_all_uses_with(w)
        g.erase_node(n)
        if is_call(n.args[0], aten.slice.Tensor) and not n.args[0].users:
            g.erase_node(n.args[0])
        n_changed += 1
    # readers after a write read the write (the same memory), so a cache read is a write's output
    order = _order(g)
    for ph in placeholders:
        writes = sorted((u for u in ph.users if is_call(u, aten.index_put_.default) and u.args[0] is ph), key=order.get)
        if not writes:
            continue
        for r in list(ph.users):
            if r in writes or is_call(r, aten.sym_size.int):
                continue
            before = [w for w in writes if order[w] < order[r]]
            if before:
                r.replace_input_with(ph, before[-1])
                n_changed += 1
    return n_changed


def canonical_layout(ep, declined: list) -> int:
    g, n_changed = ep.graph, 0
    for n in list(g.nodes):
        if is_call(n, aten.movedim.int, aten.movedim.intlist):
            nd = val(n).ndim
            src, dst = n.args[1], n.args[2]
            src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
            src, dst = [d % nd for d in src], [d % nd for d in dst]
            rest = iter(d for d in range(nd) if d not in src)
            perm = [src[dst.index(i)] if i in dst else next(rest) for i in range(nd)]
            with g.inserting_before(n):
                new = tag(g.call_function(aten.permute.default, (n.args[0], perm)), NAME)
        elif is_call(n, aten.numpy_T.default, aten.mT.default, aten.mH.default) and not val(n).is_complex():
            nd = val(n).ndim  # x.T reverses every dim; x.mT / x.mH (real) swap the last two
            perm = list(range(nd))[::-1] if n.target is aten.numpy_T.default else [*range(nd - 2), nd - 1, nd - 2]
            with g.inserting_before(n):
                new = tag(g.call_function(aten.permute.default, (n.args[0], perm)), NAME)
        elif is_call(n, aten.repeat_interleave.self_int) and len(n.args) > 2 and n.args[2] is not None:
            x, reps, d = n.args[:3]
            d = d % val(x).ndim
            if str(val(x).shape[d]) != "1" or not isinstance(reps, int) or n.kwargs.get("output_size") is not None:
                continue
            with g.inserting_before(n):
                sizes = [reps if i == d else -1 for i in range(val(x).ndim)]
                new = tag(g.call_function(aten.expand.default, (x, sizes)), NAME)
        else:
            continue
        n.replace_all_uses_with(new)
        g.erase_node(n)
        n_changed += 1
    return n_changed


def additive_masks(ep, declined: list) -> int:
    g, n_changed = ep.graph, 0
    for sm in [n for n in g.nodes if is_call(n, aten.softmax.int, aten._softmax.default)]:
        x = sm.args[0]
        if len(getattr(x, "users", ())) != 1:
            continue
        if (
            is_call(x, aten.where.ScalarOther)
            and isinstance(x.args[2], (int, float))
            and isinstance(x.args[1], fx.Node)
        ):
            cond, scores, fill, keep_value = x.args[0], x.args[1], float(x.args[2]), True
        elif is_call(x, aten.masked_fill.Scalar) and isinstance(x.args[2], (int, float)):
            scores, cond, fill, keep_value = x.args[0], x.args[1], float(x.args[2]), False
        else:
            continue
        if fill > MASK_FILL_MAX:
            declined.append(f"{x.name}: fill value {fill:g} is not a mask (> {MASK_FILL_MAX:g})")
            continue
        with g.inserting_before(x):
            args = (cond, 0.0, fill) if keep_value else (cond, fill, 0.0)
            mask = tag(g.call_function(aten.where.Scalar, args), NAME)
            new = tag(g.call_function(aten.add.Tensor, (scores, mask)), NAME)
        x.replace_all_uses_with(new)
        g.erase_node(x)
        n_changed += 1
    return n_changed


def merge_split_sums(ep, declined: list) -> int:
    g, n_changed = ep.graph, 0
    for add in [n for n in g.nodes if is_call(n, aten.add.Tensor)]:
        a, b = add.args[:2]
        if not (is_call(a, *CONTRACTIONS) and is_call(b, *CONTRACTIONS)) or len(a.users) != 1 or len(b.users) != 1:
            continue
        ca, cb = contraction(a), contraction(b)
        if ca is None or cb is None or len(ca.contracted) != 1 or len(cb.contracted) != 1:
            continue
        if [str(s) for s in val(a).shape] != [str(s) for s in val(b).shape] or val(a).dtype != val(b).dtype:
            continue
        merged = _merge(g, add, ca, cb)
        if merged is None:
            declined.append(f"{add.name}: the two contractions' operands do not line up")
            continue
        add.replace_all_uses_with(merged)
        n_changed += 1
    if n_changed:
        g.eliminate_dead_code()
    return n_changed


def _merge(g: fx.Graph, add: fx.Node, ca, cb):
    """einsum over cat(A's operand, B's operand) for each side; B's letters renamed into A's alphabet
    (outputs position by position, contracted letter to contracted letter)."""
    (k,), (kb,) = ca.contracted, cb.contracted
    ren = dict(zip(cb.out, ca.out)) | {kb: k}
    if len(set(ren.values())) != len(ren):
        return None
    lb = ["".join(ren.get(ch, "?") for ch in s) for s in cb.letters]
    if any("?" in s for s in lb):
        return None
    pairs = (0, 1) if set(lb[0]) <= set(ca.letters[0]) and set(lb[1]) <= set(ca.letters[1]) else (1, 0)
    operands = []
    with g.inserting_before(add):
        for i in (0, 1):
            xa, la = ca.ops[i], ca.letters[i]
            xb, lxb = cb.ops[pairs[i]], lb[pairs[i]]
            if k not in la or k not in lxb or not set(lxb) <= set(la):
                return None
            xb = _align(g, xb, lxb, la, xa, k)
            if xb is None:
                return None
            operands.append(tag(g.call_function(aten.cat.default, ([xa, xb], la.index(k))), NAME))
        eq = f"{ca.letters[0]},{ca.letters[1]}->{ca.out}"
        return tag(g.call_function(aten.einsum.default, (eq, operands)), NAME)


def _align(g, x, have: str, want: str, like: fx.Node, k: str):
    """x (letters ``have``) with the dims of ``want``: missing ones inserted and broadcast, permuted
    to ``want``'s order, size-1 dims broadcast to ``like``'s sizes (all but the contracted k)."""
    for ch in want:
        if ch not in have:
            x = tag(g.call_function(aten.unsqueeze.default, (x, -1)), NAME)
            have += ch
    if have != want:
        x = tag(g.call_function(aten.permute.default, (x, [have.index(ch) for ch in want])), NAME)
    sl = val(like).shape
    sizes, need = [], False
    xs = _shape_after(x, have, want)
    for i, ch in enumerate(want):
        if ch == k:
            sizes.append(-1)
        elif xs[i] == "1" and str(sl[i]) != "1":
            sizes.append(
                g.call_function(aten.sym_size.int, (like, i)) if isinstance(sl[i], torch.SymInt) else int(sl[i])
            )
            need = True
        elif xs[i] not in ("1", str(sl[i])):
            return None
        else:
            sizes.append(-1)
    if need:
        x = tag(g.call_function(aten.expand.default, (x, sizes)), NAME)
    return x


def _shape_after(x, have, want) -> list[str]:
    """x's sizes as strings, new nodes included (their meta is not propagated yet)."""
    chain = []
    while val(x) is None:
        chain.append(x)
        x = x.args[0]
    shape = [str(s) for s in val(x).shape]
    for n in reversed(chain):
        if n.target is aten.unsqueeze.default:
            shape.append("1")
        elif n.target is aten.permute.default:
            shape = [shape[p] for p in n.args[1]]
    return shape


def canonical_contractions(ep, declined: list) -> int:
    g, n_changed = ep.graph, 0
    for n in [n for n in g.nodes if is_call(n, aten.einsum.default, aten.matmul.default, aten.sum.dim_IntList)]:
        if n.target is aten.einsum.default:
            new = _as_linear(g, n)
        elif n.target is aten.matmul.default:
            new = _broadcast_matmul(g, n)
        else:
            new = _sum_of_product(g, n)
        if new is None:
            continue
        n.replace_all_uses_with(tag(new, NAME))
        g.erase_node(n)
        n_changed += 1
    return n_changed


def _as_linear(g, n):
    eq = n.args[0].replace(" ", "")
    if "->" not in eq or "." in eq or len(n.args[1]) != 2:
        return None
    (lx, lw), out = eq.split("->")[0].split(","), eq.split("->")[1]
    x, w = n.args[1]
    if len(lw) != 2 or val(w) is None or val(w).ndim != 2 or len(set(lx)) != len(lx):
        return None
    o, c = lw
    if not (lx and lx[-1] == c and o not in lx and out == lx[:-1] + o):
        return None
    with g.inserting_before(n):
        return g.call_function(aten.linear.default, (x, w))


def _sum_of_product(g, n):
    """sum(a * b, dims) -> einsum: one letter per dim of the product, a size-1 dim of one operand
    broadcast against the other squeezed away, the summed dims left out of the output."""
    prod = n.args[0]
    keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    if keepdim or n.kwargs.get("dtype") is not None or not is_call(prod, aten.mul.Tensor) or len(prod.users) != 1:
        return None
    a, b = prod.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or val(a) is None or val(b) is None:
        return None
    out_shape = [str(x) for x in val(prod).shape]
    nd = len(out_shape)
    if val(a).ndim != nd or val(b).ndim != nd or val(a).dtype != val(b).dtype:
        return None
    summed = {d % nd for d in n.args[1]}
    letters = "abcdefgh"[:nd]
    sides = [_broadcast_letters(x, [str(s) for s in val(x).shape], out_shape, letters) for x in (a, b)]
    out = "".join(c for d, c in enumerate(letters) if d not in summed)
    return _einsum(g, n, sides, ("", ""), out)


def _broadcast_letters(x, sizes: list[str], out_sizes: list[str], letters: str):
    """(x, its letters, its dims to squeeze) for x's leading ``sizes`` broadcast against ``out_sizes``
    aligned from the right: a dim equal to the output's gets its letter, a size-1 dim is squeezed."""
    off = len(out_sizes) - len(sizes)
    keep, squeeze = [], []
    for d, size in enumerate(sizes):
        if size == out_sizes[off + d]:
            keep.append(letters[off + d])
        elif size == "1":
            squeeze.append(d)
        else:
            return None
    return x, "".join(keep), squeeze


def _einsum(g, n, sides, tails: tuple[str, str], out: str):
    if any(side is None for side in sides):
        return None
    with g.inserting_before(n):
        ops = [g.call_function(aten.squeeze.dims, (x, sq)) if sq else x for x, _, sq in sides]
        subs = [ls + tail for (_, ls, _), tail in zip(sides, tails)]
        return g.call_function(aten.einsum.default, (f"{subs[0]},{subs[1]}->{out}", ops))


def _broadcast_matmul(g, n):
    a, b = n.args[:2]
    va, vb = val(a), val(b)
    if va is None or vb is None or va.ndim == vb.ndim or min(va.ndim, vb.ndim) < 3:
        return None
    nb = max(va.ndim, vb.ndim) - 2  # output batch dims, aligned from the right
    out_batch = [str(s) for s in val(n).shape[:nb]]
    letters = "pqruw"[:nb]
    sides = [_broadcast_letters(x, [str(s) for s in v.shape[:-2]], out_batch, letters) for x, v in ((a, va), (b, vb))]
    return _einsum(g, n, sides, ("ik", "kj"), f"{letters}ij")


RULES = {"grad_mode": inline_grad_mode, "noops": drop_noops, "assembly": assemble_cats, "cache_writes": canonical_cache_writes,
         "layout": canonical_layout, "masks": additive_masks, "contractions": canonical_contractions,
         "split_sums": merge_split_sums}  # fmt: skip


@register_pass(NAME, order=10, purpose="one normal form: no-op copies, in-place assembly, cache writes, split sums",
               tolerance=FP32_REASSOC, requires=("canonicalize",))  # fmt: skip
def normalize(program, ctx):
    stats: dict = {name: 0 for name in RULES} | {"declined": []}
    for ep in program.entries.values():
        changed = False
        for name, rule in RULES.items():
            hits = rule(ep, stats["declined"])
            stats[name] += hits
            if hits:
                changed = True
                refresh_meta(ep)
        if changed:
            ep.graph.eliminate_dead_code()
            finalize(ep)
    stats["declined"] = sorted(set(stats["declined"]))
    return sum(v for k, v in stats.items() if k != "declined"), stats
