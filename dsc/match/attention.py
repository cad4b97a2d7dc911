"""Attention sites: softmax(Q·Kᵀ [· s] [+ mask]) · V, spelled explicitly or as SDPA.

``attention(node)`` takes a softmax (or ``scaled_dot_product_attention``) node and returns the
scores and P·V contractions in one alphabet, the scale, the mask and the softmax dim. It knows
nothing of MLA: which letter is the head or the batch is for the caller to say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from dsc.fx_utils import is_call, val
from dsc.match.contraction import Contraction, contraction, peeled
from dsc.match.ops import CONTRACTIONS, sole_path

aten = torch.ops.aten
SOFTMAXES = (aten.softmax.int, aten._softmax.default)
SDPA = aten.scaled_dot_product_attention.default


def softmax_scores(sm: fx.Node) -> tuple[fx.Node, fx.Node | None, fx.Node | None] | None:
    """(contraction, mask, scale node) when the softmax reads contraction [· or / a scalar] [+ mask],
    each step read only by the next: how attention scores are spelled (the mask on either side)."""
    x, mask, scale = sm.args[0], None, None
    scoreish = (aten.mul.Tensor, aten.div.Tensor, *CONTRACTIONS)
    if is_call(x, aten.add.Tensor) and len(x.users) == 1:
        a, b = x.args[:2]
        x, mask = (a, b) if is_call(a, *scoreish) else (b, a)
        if not isinstance(mask, fx.Node):
            return None
    if is_call(x, aten.mul.Tensor, aten.div.Tensor) and isinstance(x.args[1], (int, float)) and len(x.users) == 1:
        x, scale = x.args[0], x
    if not is_call(x, *CONTRACTIONS) or len(x.users) != 1:
        return None
    return x, mask, scale


@dataclass
class Attention:
    scores: Contraction  # node None for SDPA
    pv: Contraction  # letters[0] is the scores' out; node: the P·V contraction or the SDPA node
    scale: float
    mask: fx.Node | None  # additive, or boolean (True = attend) for SDPA
    softmax_dim: int | None  # over the scores' letters; None for SDPA (the last)


def _sdpa(n) -> Attention | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, n.args)) | dict(n.kwargs)
    if a.get("dropout_p", 0.0) != 0.0 or a.get("is_causal", False) or a.get("enable_gqa", False):
        return None  # is_causal: top-left aligned, not the cache's alignment; left to an explicit mask
    nd = val(a["query"]).ndim
    batch = "pqruw"[: nd - 2]
    qk = peeled((a["query"], a["key"]), (batch + "sd", batch + "td"))
    v = peeled((a["value"],), (batch + "tv",))
    if qk is None or v is None:
        return None
    scores = Contraction(None, *qk[:2], batch + "st", qk[2])
    pv = Contraction(n, (None, v[0][0]), (batch + "st", v[1][0]), batch + "sv", ([], v[2][0]))
    scale = a.get("scale") or 1.0 / math.sqrt(int(val(a["query"]).shape[-1]))
    return Attention(scores, pv, float(scale), a.get("attn_mask"), None)


def attention(node) -> Attention | None:
    """The attention around a softmax or SDPA node, or None."""
    if is_call(node, SDPA):
        return _sdpa(node)
    if not is_call(node, *SOFTMAXES) or len(node.users) != 1:
        return None
    pv = contraction(next(iter(node.users)))
    if pv is None or pv.ops[0] is not node or not sole_path(node, pv.chains[0], pv.node):
        return None
    found = softmax_scores(node)
    sc = contraction(found[0]) if found else None
    if sc is None:
        return None
    _, mask, by = found
    scale = 1.0 if by is None else float(by.args[1]) if by.target is aten.mul.Tensor else 1.0 / float(by.args[1])
    # P's letters name the scores' dims: rename P·V into the scores' alphabet
    ren = dict(zip(pv.letters[0], sc.out))
    fresh = next(ch for ch in "vzyx" if ch not in sc.out)
    rn = lambda s: "".join(ren.get(ch, fresh) for ch in s)
    pv = Contraction(pv.node, pv.ops, (sc.out, rn(pv.letters[1])), rn(pv.out), pv.chains)
    return Attention(sc, pv, scale, mask, node.args[1] % val(node).ndim)


def sites(graph: fx.Graph) -> list[fx.Node]:
    """Every softmax / SDPA node: where attention sites may be."""
    return [n for n in graph.nodes if is_call(n, *SOFTMAXES, SDPA)]
