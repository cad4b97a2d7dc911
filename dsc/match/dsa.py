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
from dsc.match.ops import MASK_FILL_MAX, RESHAPES, strip

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
    limit: fx.Node  # (B, S) or broadcastable int positions: key t visible iff t <= limit
    nodes: set  # every node of the selection and the mask, for the caller's sole-use check


def _neg(n) -> bool:
    return isinstance(n, (int, float)) and n <= MASK_FILL_MAX


ZEROS = (aten.zeros_like.default, aten.zeros.default, aten.new_zeros.default)


def _last(n, dim) -> bool:
    return dim in (-1, val(n).ndim - 1)


def allowed_of(mask: fx.Node) -> tuple[list[fx.Node], set] | None:
    """An additive (0 / -inf) mask as the conjunction of its boolean terms (True = attend):
    ``masked_fill(zeros, ~allowed, -inf)`` or ``where(allowed, 0, -inf)``."""
    seen = {mask}
    if is_call(mask, aten.masked_fill.Scalar) and _neg(mask.args[2]) and is_call(strip(mask.args[0]), *ZEROS):
        seen.add(strip(mask.args[0]))
        terms = _negated(mask.args[1], seen)
        return (terms, seen) if terms is not None else None
    if is_call(mask, aten.where.self, aten.where.Scalar) and mask.args[1] == 0 and _neg(mask.args[2]):
        return _conjunction(mask.args[0], seen), seen
    return None


def _negated(n, seen) -> list | None:
    """~n as a conjunction: n = ~a gives a's terms."""
    seen.add(n)
    if is_call(n, aten.bitwise_not.default, aten.logical_not.default):
        return _conjunction(n.args[0], seen)
    return None


def _conjunction(n, seen) -> list:
    seen.add(n)
    if is_call(n, aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default):
        return _conjunction(n.args[0], seen) + _conjunction(n.args[1], seen)
    return [n]


def _key_positions(ar, T) -> bool:
    """``arange(T)``, possibly with size-1 dims added in front (unsqueeze / view): the key index."""
    while is_call(ar, aten.unsqueeze.default, *RESHAPES) and val(ar) is not None:
        if any(str(s) != "1" for s in val(ar).shape[:-1]):
            return False
        ar = ar.args[0]
    v = val(ar)
    return is_call(ar, aten.arange.default) and v is not None and v.ndim == 1 and str(v.shape[0]) == str(T)


def visibility(n: fx.Node, T) -> fx.Node | None:
    """limit when n is ``arange(T) <= limit[..., None]`` (or ``limit[..., None] >= arange(T)``)."""
    if is_call(n, aten.le.Tensor):
        ar, lim = n.args[:2]
    elif is_call(n, aten.ge.Tensor):
        lim, ar = n.args[:2]
    else:
        return None
    if not _key_positions(ar, T):
        return None
    if not (is_call(lim, aten.unsqueeze.default) and _last(lim, lim.args[1])):
        return None
    return lim.args[0]


def _marked(n: fx.Node, seen: set) -> fx.Node | None:
    """idx when boolean n marks the keys idx names: ``scatter(zeros, -1, idx, True)`` (or in place on a
    fresh buffer), optionally cut back to T, or ``any(idx[..., None] == arange(T), -2)``."""
    seen.add(n)
    if is_call(n, aten.slice.Tensor):
        n = n.args[0]
        seen.add(n)
    if is_call(n, aten.scatter.value, aten.scatter_.value) and n.args[3] is True and _last(n, n.args[1]):
        if not is_call(strip(n.args[0]), *ZEROS):
            return None
        seen.add(strip(n.args[0]))
        return n.args[2]
    if is_call(n, aten.any.dim) and n.args[1] in (-2, val(n.args[0]).ndim - 2) and is_call(n.args[0], aten.eq.Tensor):
        eq = n.args[0]
        a, b = eq.args[:2]
        idx, ar = (a, b) if is_call(a, aten.unsqueeze.default) else (b, a)
        if is_call(idx, aten.unsqueeze.default) and _last(idx, idx.args[1]) and _key_positions(ar, val(n).shape[-1]):
            seen |= {eq, idx}
            return idx.args[0]
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
        if (
            (len(tk.args) < 3 or _last(tk.args[0], tk.args[2]))
            and (len(tk.args) < 4 or tk.args[3])
            and isinstance(tk.args[1], int)
        ):
            seen |= {tk, *tk.users}
            return tk.args[0], tk.args[1]
    return None


def selection(n: fx.Node, seen: set) -> tuple[fx.Node, int, fx.Node | None] | None:
    """(index scores, k, visibility limit seen in the scores' own masking) when boolean n marks the
    top-k keys of one score tensor (``_marked`` of ``_ranked``), the scores optionally padded with k
    -inf columns (``cat`` / ``pad``) and masked by visibility (``masked_fill(~vis)`` / ``where(vis)``)."""
    idx = _marked(n, seen)
    if idx is None:
        return None
    seen |= {idx, strip(idx)}
    got = _ranked(strip(idx), seen)
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
    limit = None
    T = val(ranked).shape[-1]
    if is_call(ranked, aten.masked_fill.Scalar) and _neg(ranked.args[2]):
        blocked = ranked.args[1]
        seen |= {ranked, blocked}
        if is_call(blocked, aten.bitwise_not.default, aten.logical_not.default):
            limit = visibility(blocked.args[0], T)
        if limit is None:
            return None
        ranked = ranked.args[0]
    elif (
        is_call(ranked, aten.where.self)
        and is_call(ranked.args[2], aten.full_like.default)
        and _neg(ranked.args[2].args[1])
    ):
        seen |= {ranked, ranked.args[2]}
        limit = visibility(ranked.args[0], T)
        if limit is None:
            return None
        ranked = ranked.args[1]
    return ranked, k, limit


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
            got = _dims(x_node, letters if x_node is not w else "".join(to_inner.get(c, c) for c in lw), names, need)
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


def dsa_mask(mask: fx.Node) -> DsaMask | None:
    """The DSA structure of an additive attention mask (B, S, T), or None."""
    got = allowed_of(mask)
    if got is None:
        return None
    terms, seen = got
    T = val(mask).shape[-1]
    sel, limits = None, []
    for term in terms:
        lim = visibility(term, T)
        if lim is not None:
            limits.append(lim)
            continue
        s = selection(term, seen)
        if s is None or sel is not None:
            return None  # a term that is neither, or two selections
        sel = s
    if sel is None:
        return None
    ranked, k, lim = sel
    if lim is not None:
        limits.append(lim)
    if not limits or any(x is not limits[0] for x in limits):
        return None  # visibility must be stated, and once
    scores = index_scores(ranked)
    return None if scores is None else DsaMask(scores, k, limits[0], seen)
