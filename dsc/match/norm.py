"""RMSNorm, however it is spelled: ``w ⊙ s · rsqrt(mean(s², -1, keepdim) + eps)`` with ``pow(s, 2)``
or ``s * s``, the weight on either side, an optional cast back after the weight, or one
``aten.rms_norm`` node. ``RmsNorm.nodes`` are the composite's interior (each read once, the last
excepted), so a pass that replaces the norm knows what goes with it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from dsc.fx_utils import is_call, val
from dsc.match.ops import CASTS

aten = torch.ops.aten


@dataclass
class RmsNorm:
    x: fx.Node  # the normalised input s
    weight: fx.Node  # 1-D, the normalised size
    eps: float
    nodes: list[fx.Node]  # interior, in order; [the aten.rms_norm node] for the one-node spelling
    out: fx.Node


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _other(n: fx.Node, x) -> object | None:
    a, b = n.args[:2]
    return b if a is x else a if b is x else None


def _last_dim(dims, ndim) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


def rms_norm_at(r: fx.Node) -> RmsNorm | None:
    """The composite RMSNorm around the rsqrt node ``r``, else None."""
    if not is_call(r, aten.rsqrt.default):
        return None
    add_eps = r.args[0]
    if not is_call(add_eps, aten.add.Tensor, aten.add.Scalar):
        return None
    mean, eps = add_eps.args[:2]
    if isinstance(eps, fx.Node):
        mean, eps = eps, mean
    if not isinstance(eps, float) or not is_call(mean, aten.mean.dim):
        return None
    sq = mean.args[0]
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not keepdim:
        return None
    if is_call(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
        s = sq.args[0]
    elif is_call(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]:
        s = sq.args[0]
    else:
        return None
    if val(s) is None or not _last_dim(mean.args[1], val(s).ndim):
        return None
    norm = _only_user(r)
    if not is_call(norm, aten.mul.Tensor) or _other(norm, r) is not s:
        return None
    scaled = _only_user(norm)
    if not is_call(scaled, aten.mul.Tensor):
        return None
    w = _other(scaled, norm)
    if val(w) is None or val(w).ndim != 1 or val(w).shape[0] != val(s).shape[-1]:
        return None
    out = scaled
    cast_back = _only_user(scaled)
    if cast_back is not None and cast_back.target in CASTS:
        out = cast_back
    inner = [sq, mean, add_eps, r, norm, scaled]
    if any(len(n.users) != 1 for n in inner[:-1]) or (out is not scaled and len(scaled.users) != 1):
        return None
    return RmsNorm(s, w, eps, inner + ([out] if out is not scaled else []), out)


def _one_node(n: fx.Node) -> RmsNorm | None:
    if not is_call(n, aten.rms_norm.default):
        return None
    w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
    eps = n.args[3] if len(n.args) > 3 else n.kwargs.get("eps")
    if isinstance(w, fx.Node) and isinstance(eps, float) and len(n.args[1]) == 1:
        return RmsNorm(n.args[0], w, eps, [n], n)
    return None


def rms_norms(graph: fx.Graph) -> list[RmsNorm]:
    """Every RMSNorm of the graph, in graph order of their rsqrt (or rms_norm) node."""
    out = []
    for n in graph.nodes:
        m = rms_norm_at(n) or _one_node(n)
        if m is not None:
            out.append(m)
    return out


def rms_norm(out: fx.Node) -> RmsNorm | None:
    """The RMSNorm whose output is ``out``, else None."""
    m = _one_node(out)
    if m is not None:
        return m
    # the composite's rsqrt sits two or three nodes above its output: weight mul, norm mul, [cast]
    frontier, seen = [out], set()
    for _ in range(3):
        frontier = [a for n in frontier if isinstance(n, fx.Node) for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        for r in frontier:
            m = rms_norm_at(r)
            if m is not None and m.out is out:
                return m
    return None
