"""fuse_add_rms_norm: residual add followed by RMSNorm -> ``dsc::add_rms_norm``.

    s = a + b;  y = w ⊙ s · rsqrt(mean(s², -1) + eps)   ->   (y, s) = dsc::add_rms_norm(a, b, w, eps)

RMSNorm is found by its computation, however it is spelled: ``rsqrt(mean(pow(s, 2) | s*s, [-1],
keepdim) + eps)`` multiplied by ``s`` and by a 1-D weight in either operand order, with optional
casts to fp32 and back, or a single ``aten.rms_norm`` node. The add's other users read ``s``.
Not fused: a norm over anything but the last dim, a weight that is not 1-D of the normalised size,
intermediate values with other users, an add with ``alpha`` or broadcasting.

Preconditions: ``canonicalize`` (no-op casts removed). Numerics: fp32 re-association only.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from dsc.fx_utils import call_nodes, finalize, tag, val
from dsc.registry import register_pass
from dsc.verify import FP32_REASSOC

aten = torch.ops.aten
NAME = "fuse_add_rms_norm"
CASTS = {aten.to.dtype, aten._to_copy.default}


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _strip_cast(n):
    return n.args[0] if isinstance(n, fx.Node) and n.op == "call_function" and n.target in CASTS else n


def _is_last_dim(dims, ndim) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


def _other(n: fx.Node, x) -> object | None:
    a, b = n.args[:2]
    return b if a is x else a if b is x else None


def match_rms_norm(r: fx.Node):
    """From an rsqrt node: (s, weight, eps, nodes, out) for w ⊙ s·rsqrt(mean(s²)+eps), else None."""
    add_eps = r.args[0]
    if not (
        isinstance(add_eps, fx.Node)
        and add_eps.target is aten.add.Tensor
        or getattr(add_eps, "target", None) is aten.add.Scalar
    ):
        return None
    mean, eps = add_eps.args[:2]
    if isinstance(eps, fx.Node):
        mean, eps = eps, mean
    if not isinstance(eps, float) or not isinstance(mean, fx.Node) or mean.target is not aten.mean.dim:
        return None
    sq = mean.args[0]
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not keepdim or not isinstance(sq, fx.Node):
        return None
    if sq.target is aten.pow.Tensor_Scalar and sq.args[1] == 2:
        s = sq.args[0]
    elif sq.target is aten.mul.Tensor and sq.args[0] is sq.args[1]:
        s = sq.args[0]
    else:
        return None
    if val(s) is None or not _is_last_dim(mean.args[1], val(s).ndim):
        return None
    norm = _only_user(r)
    if norm is None or norm.target is not aten.mul.Tensor or _other(norm, r) is not s:
        return None
    scaled = _only_user(norm)
    if scaled is None or scaled.target is not aten.mul.Tensor:
        return None
    w = _other(scaled, norm)
    D = val(s).shape[-1]
    if val(w) is None or val(w).ndim != 1 or val(w).shape[0] != D:
        return None
    out = scaled
    cast_back = _only_user(scaled)
    if cast_back is not None and cast_back.target in CASTS:
        out = cast_back
    inner = [sq, mean, add_eps, r, norm, scaled]
    if any(len(n.users) != 1 for n in inner[:-1]) or (out is not scaled and len(scaled.users) != 1):
        return None
    return s, w, eps, inner + ([out] if out is not scaled else []), out


def _residual_add(s: fx.Node):
    src = _strip_cast(s)
    if src is not s and len(s.users) > 2:  # a cast feeding the norm and something else
        return None
    if src.op != "call_function" or src.target is not aten.add.Tensor or "alpha" in src.kwargs or len(src.args) != 2:
        return None
    a, b = src.args
    va, vb, vs = val(a), val(b), val(src)
    if va is None or vb is None or tuple(va.shape) != tuple(vs.shape) or tuple(vb.shape) != tuple(vs.shape):
        return None
    return src, a, b


def fuse(gm: fx.GraphModule) -> int:
    sites = []
    for r in call_nodes(gm, aten.rsqrt.default):
        m = match_rms_norm(r)
        if m is not None:
            sites.append(("composite", m))
    for n in call_nodes(gm, aten.rms_norm.default):
        w = n.args[2] if len(n.args) > 2 else None
        eps = n.args[3] if len(n.args) > 3 else None
        if isinstance(w, fx.Node) and isinstance(eps, float) and len(n.args[1]) == 1:
            sites.append(("rms_norm", (n.args[0], w, eps, [n], n)))
    count = 0
    for _, (s, w, eps, _nodes, out) in sites:
        res = _residual_add(s)
        if res is None:
            continue
        add, a, b = res
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        anchor = add if order[w] < order[add] else w  # the fused op needs a, b and w defined
        if any(order[u] <= order[anchor] for u in add.users if u is not s and u not in _nodes):
            continue  # the sum is read before the weight exists: leave it
        with gm.graph.inserting_after(anchor):
            fused = tag(gm.graph.call_function(torch.ops.dsc.add_rms_norm.default, (a, b, w, eps)), NAME)
        with gm.graph.inserting_after(fused):
            y = tag(gm.graph.call_function(operator.getitem, (fused, 0)), NAME)
            s_new = tag(gm.graph.call_function(operator.getitem, (fused, 1)), NAME)
        fused.meta["val"] = (val(out), val(add))
        y.meta["val"], s_new.meta["val"] = val(out), val(add)
        out.replace_all_uses_with(y)
        add.replace_all_uses_with(s_new, delete_user_cb=lambda u, keep=fused: u is not keep)
        count += 1
    return count


@register_pass(NAME, order=90, purpose="residual add + RMSNorm -> one dsc::add_rms_norm op", tolerance=FP32_REASSOC)
def fuse_add_rms_norm(program, ctx):
    per_entry = {}
    for name, ep in program.entries.items():
        per_entry[name] = fuse(ep.graph_module)
        finalize(ep)
    return sum(per_entry.values()), {"sites_per_entry": per_entry}
