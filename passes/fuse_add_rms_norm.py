"""fuse_add_rms_norm: residual add followed by RMSNorm -> ``dsc::add_rms_norm``; an RMSNorm of
anything else, spelled out, -> one ``aten.rms_norm`` node (one fused kernel where the backend has
one, as Inductor and CUDA do; on CPU in eager mode it costs what the six ops did, measured).

    s = a + b;  y = w ⊙ s · rsqrt(mean(s², -1) + eps)   ->   (y, s) = dsc::add_rms_norm(a, b, w, eps)
    y = w ⊙ x · rsqrt(mean(x², -1) + eps)               ->   y = aten.rms_norm(x, [D], w, eps)

RMSNorm is found by its computation, however it is spelled: ``rsqrt(mean(pow(s, 2) | s*s, [-1],
keepdim) + eps)`` multiplied by ``s`` and by a 1-D weight in either operand order, with optional
casts to fp32 and back, or a single ``aten.rms_norm`` node. The add's other users read ``s``.
Not fused: a norm over anything but the last dim, a weight that is not 1-D of the normalised size,
intermediate values with other users, an add with ``alpha`` or broadcasting (such a norm becomes
``aten.rms_norm`` instead); a lone norm whose input, weight and product differ in dtype.

Preconditions: ``canonicalize`` (no-op casts removed). Numerics: fp32 re-association only.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from dsc.fx_utils import finalize, is_call, tag, val
from dsc.match.norm import rms_norms
from dsc.match.ops import CASTS
from dsc.registry import register_pass
from dsc.verify import FP32_REASSOC

aten = torch.ops.aten
NAME = "fuse_add_rms_norm"


def _strip_cast(n):
    return n.args[0] if is_call(n, *CASTS) else n


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


def _one_rms_norm(gm: fx.GraphModule, norm) -> bool:
    """The composite norm's weighted product -> aten.rms_norm(x, [D], w, eps) (a cast back after it
    stays and reads the new node); False where it is one node already or the dtypes would make the
    fused op compute in another precision."""
    if len(norm.nodes) == 1:
        return False
    s, w = norm.x, norm.weight
    scaled = norm.out.args[0] if norm.out.target in CASTS else norm.out
    if not (val(s).dtype == val(w).dtype == val(scaled).dtype):
        return False
    with gm.graph.inserting_before(scaled):
        y = tag(gm.graph.call_function(aten.rms_norm.default, (s, [val(s).shape[-1]], w, norm.eps)), NAME)
    y.meta["val"] = val(scaled)
    scaled.replace_all_uses_with(y)
    return True


def fuse(gm: fx.GraphModule) -> tuple[int, int]:
    """(residual-add sites, lone norms made one aten.rms_norm)."""
    count = lone = 0
    for norm in rms_norms(gm.graph):
        s, w, eps, _nodes, out = norm.x, norm.weight, norm.eps, norm.nodes, norm.out
        res = _residual_add(s)
        if res is None:
            lone += _one_rms_norm(gm, norm)
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
    return count, lone


@register_pass(
    NAME, order=90, purpose="residual add + RMSNorm -> one dsc::add_rms_norm op; other RMSNorms -> one aten.rms_norm",
    tolerance=FP32_REASSOC,
)  # fmt: skip
def fuse_add_rms_norm(program, ctx):
    per_entry, lone = {}, {}
    for name, ep in program.entries.items():
        per_entry[name], lone[name] = fuse(ep.graph_module)
        finalize(ep)
    return sum(per_entry.values()) + sum(lone.values()), {"sites_per_entry": per_entry, "rms_norms_per_entry": lone}
