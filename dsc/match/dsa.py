"""DeepSeek Sparse Attention on the normal form: an attention mask that is the top-k of the
lightning indexer's scores (spec §5, §4.6), read back into what it computes.

    scores   I[b,s,t] = Σ_h w[b,s,h] · ReLU(c · q[b,s,h,:] · k[b,t,:])      (c > 0 folded into w)
    selected = the top-k of I over the visible keys  — a stable descending sort and a slice, or topk;
               scattered into a boolean (True = attend, or True = blocked and negated), optionally
               cut back from a -inf-padded width
    visible  = t <= limit[b,s]                        — arange(T) <= positions[..., None]
    mask     = 0 where (selected & visible), -inf elsewhere

``dsa_mask(mask)`` returns the pieces, or None when the mask holds anything else. The index scores
and the selection may be read by nothing but the mask: a graph that also uses them elsewhere keeps
its dense form.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from dsc.fx_utils import is_call, val
from dsc.match.contraction import contraction
from dsc.match.ops import COPIES, MASK_FILL_MAX, RESHAPES, same_value, squeezed_shape, strip

aten = torch.ops.aten


@dataclass
class IndexScores:
    """I = Σ_h w_h · ReLU(c · q_h · k). Each operand's dims are named in one alphabet: b batch,
    s query, h index head, d feature, t key (other letters are size-1 dims)."""

    node: fx.Node  # I (B, S, T)
    q: fx.Node
    q_dims: str  # e.g. "bshd"
    keys: fx.Node
    k_dims: str  # e.g. "btd", or "bhdt" with a size-1 head
    w: fx.Node
    w_dims: str  # e.g. "bsh"
    scale: float  # c, to fold into w


@dataclass
class DsaMask:
    scores: IndexScores
    k: int  # index_topk
    limit: fx.Node  # the query positions: key t visible iff t <= limit
    limit_dims: str  # limit's dims that are not a literal 1, in order: "bs", "s", "b" or "" (one for all)
    nodes: set  # every node of the selection and the mask, for the caller's sole-use check


def _neg(n) -> bool:
    return isinstance(n, (int, float)) and n <= MASK_FILL_MAX


ZEROS = (aten.zeros_like.default, aten.zeros.default, aten.new_zeros.default)
ONES = (aten.ones_like.default, aten.ones.default, aten.new_ones.default)
NOT = (aten.bitwise_not.default, aten.logical_not.default)
AND = (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default)
OR = (aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.logical_or.default)


def _last(n, dim) -> bool:
    return dim in (-1, val(n).ndim - 1)


def _zero(x) -> bool:
    """0 as a number, or a tensor of zeros (``zeros(())`` as transformers' masks write it)."""
    return (isinstance(x, (int, float)) and x == 0) or is_call(x, *ZEROS)


def _layout(n, seen: set):
    """n under ops that only add, drop or broadcast size-1 dims: its value at every (b, s, t) is
    the same (unsqueeze, squeeze, expand, select of a size-1 dim, a view of the same non-1 sizes)."""
    while isinstance(n, fx.Node):
        src = n.args[0] if n.args else None
        if is_call(n, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            pass
        elif is_call(n, aten.expand.default):
            pass
        elif is_call(n, aten.select.int) and str(val(src).shape[n.args[1]]) == "1":
            pass
        elif is_call(n, *RESHAPES) and _sizes(squeezed_shape(val(n).shape)) == _sizes(squeezed_shape(val(src).shape)):
            pass
        else:
            return n
        seen.add(n)
        n = src
    return n


def _sizes(shape) -> list[str]:
    return [str(s) for s in shape]


def _literals(n, positive: bool, seen: set) -> list[tuple[fx.Node, bool]]:
    """A boolean as a conjunction of literals (node, polarity): ``a & b``, ``~(a | b)``, ``~~a``."""
    n = _layout(n, seen)
    seen.add(n)
    if is_call(n, *NOT):
        return _literals(n.args[0], not positive, seen)
    if is_call(n, *(AND if positive else OR)):
        return _literals(n.args[0], positive, seen) + _literals(n.args[1], positive, seen)
    return [(n, positive)]


def allowed_of(mask: fx.Node, seen: set | None = None) -> tuple[list[tuple[fx.Node, bool]], set] | None:
    """An additive (0 / -inf) or boolean (True = attend, as SDPA takes it) mask as a conjunction of
    boolean literals: ``masked_fill(zeros | mask, blocked, -inf)``, ``where(allowed, 0, -inf)``, a
    sum of masks, or the booleans themselves."""
    seen = set() if seen is None else seen
    mask = _layout(mask, seen)
    if val(mask) is not None and val(mask).dtype == torch.bool:
        return _literals(mask, True, seen), seen
    seen.add(mask)
    if is_call(mask, aten.masked_fill.Scalar) and _neg(mask.args[2]):
        base = strip(mask.args[0])
        if is_call(base, *ZEROS):
            seen.add(base)
            terms = []
        else:
            got = allowed_of(mask.args[0], seen)
            if got is None:
                return None
            terms = got[0]
        return terms + _literals(mask.args[1], False, seen), seen
    if is_call(mask, aten.where.self, aten.where.Scalar, aten.where.ScalarOther) and _zero(mask.args[1]):
        if _neg(mask.args[2]):
            if isinstance(mask.args[1], fx.Node):
                seen.add(mask.args[1])
            return _literals(mask.args[0], True, seen), seen
        return None
    if is_call(mask, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in mask.args[:2]):
        a, b = allowed_of(mask.args[0], seen), allowed_of(mask.args[1], seen)
        return (a[0] + b[0], seen) if a is not None and b is not None else None
    return None


def _key_positions(ar, T) -> bool:
    """``arange(T)`` (``+ 0``), possibly with size-1 dims added in front: the key index."""
    while is_call(ar, aten.unsqueeze.default, *RESHAPES) and val(ar) is not None:
        if any(str(s) != "1" for s in val(ar).shape[:-1]):
            return False
        ar = ar.args[0]
    if is_call(ar, aten.add.Tensor, aten.sub.Tensor) and ar.args[1] == 0:
        ar = ar.args[0]
    v = val(ar)
    return is_call(ar, aten.arange.default) and v is not None and v.ndim == 1 and str(v.shape[0]) == str(T)


def visibility(n: fx.Node, positive: bool, T) -> tuple[fx.Node, str] | None:
    """(limit, its dims) when literal n is ``arange(T) <= limit`` (``limit >= arange(T)``, or the
    negation of ``>`` / ``<``), limit an integer tensor whose last dim is 1 (or none): right-aligned
    against the comparison, its dim -2 is the query and one dim before it may be the batch."""
    le, ge = (aten.le.Tensor, aten.ge.Tensor) if positive else (aten.gt.Tensor, aten.lt.Tensor)
    if is_call(n, le):
        ar, lim = n.args[:2]
    elif is_call(n, ge):
        lim, ar = n.args[:2]
    else:
        return None
    if not isinstance(lim, fx.Node) or not _key_positions(ar, T) or val(lim).dtype.is_floating_point:
        return None
    shape = _sizes(val(lim).shape)
    shape = ["1"] * (val(n).ndim - len(shape)) + shape
    if not shape or shape[-1] != "1":
        return None if shape else (lim, "")
    dims = "s" if len(shape) > 1 and shape[-2] != "1" else ""
    lead = [s for s in shape[:-2] if s != "1"]
    if len(lead) > 1:
        return None
    return lim, "b" * len(lead) + dims


def _marked(n: fx.Node, positive: bool, seen: set) -> tuple[fx.Node, fx.Node] | None:
    """(idx, the marking node) when literal n marks the keys idx names: ``scatter(zeros, -1, idx,
    True)`` (or in place on a fresh buffer), optionally cut back to T, ``any(idx[..., None] ==
    arange(T), -2)``; negated: ``scatter(ones, -1, idx, False)`` (True = blocked)."""
    seen.add(n)
    top = n
    if is_call(n, aten.slice.Tensor):
        n = n.args[0]
        seen.add(n)
    fresh, flag = (ZEROS, True) if positive else (ONES, False)
    if is_call(n, aten.scatter.value, aten.scatter_.value) and n.args[3] is flag and _last(n, n.args[1]):
        if not is_call(strip(n.args[0]), *fresh):
            return None
        seen.add(strip(n.args[0]))
        return n.args[2], top
    if not positive:
        return None
    if is_call(n, aten.any.dim) and n.args[1] in (-2, val(n.args[0]).ndim - 2) and is_call(n.args[0], aten.eq.Tensor):
        eq = n.args[0]
        a, b = eq.args[:2]
        idx, ar = (a, b) if is_call(a, aten.unsqueeze.default) else (b, a)
        if is_call(idx, aten.unsqueeze.default) and _last(idx, idx.args[1]) and _key_positions(ar, val(n).shape[-1]):
            seen |= {eq, idx}
            return idx.args[0], top
    return None


def _topk_k(k, T) -> int | None:
    """k as an int: an int, or ``min(k, T)`` of the scores' own length T (the op's k > visible rule)."""
    if isinstance(k, int):
        return k
    if isinstance(k, fx.Node) and k.target in (torch.sym_min, min) and len(k.args) == 2:
        a, b = k.args
        n, other = (a, b) if isinstance(a, int) else (b, a)
        if isinstance(n, int) and isinstance(other, fx.Node) and str(val(other)) == str(T):
            return n
    return None


def _ranked(idx: fx.Node, seen: set) -> tuple[fx.Node, int] | None:
    """(scores, k) when idx is the first k of a stable descending ranking: ``sort(x, stable,
    descending)[1][..., :k]``, ``argsort(-x, stable)[..., :k]``, or ``topk(x, k)[1]``."""
    seen.add(idx)
    if is_call(idx, aten.slice.Tensor) and _last(idx, idx.args[1]) and (len(idx.args) < 3 or idx.args[2] in (0, None)):
        k, src = idx.args[3] if len(idx.args) > 3 else None, idx.args[0]
        if not isinstance(k, int):
            return None
        if is_call(src, operator.getitem) and src.args[1] == 1 and is_call(src.args[0], aten.sort.stable):
            srt = src.args[0]
            if (
                srt.kwargs.get("stable")
                and srt.kwargs.get("descending")
                and _last(srt.args[0], srt.kwargs.get("dim", -1))
            ):
                seen |= {src, srt, *srt.users}
                return srt.args[0], k
        if is_call(src, aten.argsort.stable) and src.kwargs.get("stable") and not src.kwargs.get("descending", False):
            neg = src.args[0]
            if is_call(neg, aten.neg.default) and _last(neg, src.kwargs.get("dim", -1)):
                seen |= {src, neg}
                return neg.args[0], k
        return None
    if is_call(idx, operator.getitem) and idx.args[1] == 1 and is_call(idx.args[0], aten.topk.default):
        tk = idx.args[0]
        k = _topk_k(tk.args[1], val(tk.args[0]).shape[-1])
        if (len(tk.args) < 3 or _last(tk.args[0], tk.args[2])) and (len(tk.args) < 4 or tk.args[3]) and k is not None:
            seen |= {tk, *tk.users}
            if isinstance(tk.args[1], fx.Node):
                seen.add(tk.args[1])
            return tk.args[0], k
    return None


def _strip_casts(n, seen: set):
    """An index tensor under its integer casts (int64 <-> int32 is exact for any sequence length)."""
    while is_call(n, *COPIES):
        seen.add(n)
        n = n.args[0]
    return n


def _visible_scores(ranked: fx.Node, T, seen: set) -> tuple[fx.Node, list] | None:
    """(x, limits) when ranked is x with the invisible keys set to -inf: ``masked_fill(x, ~vis, -inf)``,
    ``where(vis, x, full_like(-inf))``, or ``x + mask`` with an additive visibility mask."""
    if is_call(ranked, aten.masked_fill.Scalar) and _neg(ranked.args[2]):
        seen.add(ranked)
        return ranked.args[0], _literals(ranked.args[1], False, seen)
    if is_call(ranked, aten.where.self, aten.where.ScalarOther):
        other = ranked.args[2]
        if _neg(other) or (is_call(other, aten.full_like.default) and _neg(other.args[1])):
            seen.add(ranked)
            if isinstance(other, fx.Node):
                seen.add(other)
            return ranked.args[1], _literals(ranked.args[0], True, seen)
    if is_call(ranked, aten.add.Tensor):
        for i in (0, 1):
            got = allowed_of(ranked.args[1 - i], set()) if isinstance(ranked.args[1 - i], fx.Node) else None
            if got is not None:
                seen |= got[1] | {ranked}
                return ranked.args[i], got[0]
    return None


def selection(n: fx.Node, positive: bool, seen: set) -> tuple[fx.Node, int, list, fx.Node] | None:
    """(index scores, k, the visibility literals of the scores' own masking, the marking node) when
    literal n marks the top-k keys of one score tensor (``_marked`` of ``_ranked``), the scores
    optionally padded with k -inf columns (``cat`` / ``pad``) and masked by visibility."""
    got = _marked(n, positive, seen)
    if got is None:
        return None
    idx, marking = got
    got = _ranked(_strip_casts(idx, seen), seen)
    if got is None:
        return None
    ranked, k = got
    if is_call(ranked, aten.cat.default) and len(ranked.args[0]) == 2 and _last(ranked, ranked.args[1]):
        first, pad = ranked.args[0]
        if is_call(pad, aten.new_full.default, aten.full.default) and _neg(pad.args[-1]):
            seen |= {ranked, pad}
            ranked = first
    elif (
        is_call(ranked, aten.pad.default)
        and list(ranked.args[1]) == [0, k]
        and _neg(ranked.args[3] if len(ranked.args) > 3 else 0)
    ):
        seen.add(ranked)
        ranked = ranked.args[0]
    lits = []
    got = _visible_scores(ranked, val(ranked).shape[-1], seen)
    if got is not None:
        ranked, lits = got
        if not lits:
            return None
    return ranked, k, lits, marking


def index_scores(n: fx.Node) -> IndexScores | None:
    """I = Σ_h w_h · ReLU(c · q_h · k): the outer contraction sums the head letter of ReLU(·) against
    w and keeps two letters besides the key's; the inner contracts q's feature letter with k's, keeps
    q's head, and k carries no head of more than one."""
    while is_call(n, *RESHAPES, aten.squeeze.dim, aten.squeeze.dims):
        n = n.args[0]
    outer = contraction(n)
    if outer is None:
        return None
    for i in (0, 1):
        r, w, lr, lw = outer.ops[i], outer.ops[1 - i], outer.letters[i], outer.letters[1 - i]
        if not is_call(r, aten.relu.default):
            continue
        x, scale = r.args[0], 1.0
        if is_call(x, aten.mul.Tensor) and isinstance(x.args[1], (int, float)):
            x, scale = x.args[0], float(x.args[1])
        inner = contraction(x)
        if scale <= 0 or inner is None or len(inner.contracted) != 1:
            continue
        summed = set(lr) & set(lw) - set(outer.out)
        if len(summed) != 1:
            continue
        to_inner = dict(zip(lr, inner.out))  # ReLU(·)'s dims are the inner contraction's output
        h, d = to_inner[next(iter(summed))], next(iter(inner.contracted))
        qi = next((j for j in (0, 1) if {h, d} <= set(inner.letters[j])), None)
        if qi is None:
            continue
        lq, lk = inner.letters[qi], inner.letters[1 - qi]
        kept = [to_inner[o] for o in outer.out if o in to_inner]
        t = [c for c in kept if c in lk and c not in lq]
        bs = [c for c in kept if c not in t]
        if len(t) != 1 or len(bs) != 2:
            continue
        names = {bs[0]: "b", bs[1]: "s", h: "h", d: "d", t[0]: "t"}
        dims = []
        for x_node, letters, need in ((inner.ops[qi], lq, "bshd"), (inner.ops[1 - qi], lk, "btd"), (w, lw, "bsh")):
            if x_node is w:  # w's letters in the inner alphabet; its own size-1 dims get fresh names
                letters = "".join(to_inner.get(c, c.upper()) for c in lw)
            got = _dims(x_node, letters, names, need)
            if got is None:
                break
            dims.append(got)
        else:
            return IndexScores(n, inner.ops[qi], dims[0], inner.ops[1 - qi], dims[1], w, dims[2], scale)
    return None


def _dims(x: fx.Node, letters: str, names: dict, need: str) -> str | None:
    """x's dims in the canonical alphabet; letters outside it must be size 1 (named u, v, ...)."""
    out, spare = [], iter("uvwxyz")
    for c, size in zip(letters, val(x).shape):
        if c in names:
            out.append(names[c])
        elif str(size) == "1":
            out.append(next(spare))
        else:
            return None
    dims = "".join(out)
    return dims if set(need) <= set(dims) and len(set(dims)) == len(dims) else None


def _same_limit(a: tuple, b: tuple) -> bool:
    """Two visibility limits that are one tensor: the same node, or equal ops of the same inputs."""
    x, y = a[0], b[0]
    while is_call(x, aten.unsqueeze.default) and is_call(y, aten.unsqueeze.default) and x.args[1:] == y.args[1:]:
        x, y = x.args[0], y.args[0]
    return a[1] == b[1] and same_value(x, y)


def dsa_mask(mask: fx.Node) -> DsaMask | None:
    """The DSA structure of an additive attention mask (B, S, T), or None."""
    got = allowed_of(mask)
    if got is None:
        return None
    terms, seen = got
    shape = _sizes(val(mask).shape)
    T = val(mask).shape[-1]
    sel, limits = None, []
    for term, positive in terms:
        lim = visibility(term, positive, T)
        if lim is not None:
            limits.append(lim)
            continue
        s = selection(term, positive, seen)
        if s is None or sel is not None:
            return None  # a term that is neither, or two selections
        sel = s
    if sel is None:
        return None
    ranked, k, lits, marking = sel
    for term, positive in lits:
        lim = visibility(term, positive, val(ranked).shape[-1])
        if lim is None:
            return None  # the scores masked by something other than visibility
        limits.append(lim)
    if not limits or any(not _same_limit(x, limits[0]) for x in limits):
        return None  # visibility must be stated, and once
    if squeezed_shape(_sizes(val(marking).shape)) != squeezed_shape(shape):
        return None  # the selection must be one per (batch row, query) of the mask
    lim, dims = limits[0]
    lead = shape[:-1]
    if len(shape) == 4:  # a head dim of 1: (B, 1, S, T) as transformers writes it, or (B, S, 1, T)
        h = 1 if str(shape[1]) == "1" else 2
        lead = tuple(d for i, d in enumerate(lead) if i != h)
    sizes = dict(zip("bs", lead[-2:])) if len(lead) >= 2 else {"s": lead[0]} if len(lead) == 1 else {}
    lim_sizes = squeezed_shape(_sizes(val(lim).shape))
    if any(sizes.get(d) != s for d, s in zip(dims, lim_sizes)):
        return None
    scores = index_scores(ranked)
    if scores is None:
        return None
    while ranked is not scores.node:  # the reshapes index_scores looked through
        seen.add(ranked)
        ranked = ranked.args[0]
    return DsaMask(scores, k, lim, dims, seen)
