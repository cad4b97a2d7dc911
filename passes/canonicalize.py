"""canonicalize: one spelling per computation, so later passes match less surface.

Rewrites, repeated to a fixed point, on every entry point:
- drop assertion / metadata nodes (``_assert_tensor_metadata``, ``_assert_scalar``, ...);
- drop dtype casts to the dtype the tensor already has (``x.float()`` on fp32);
- fold view chains: ``view|reshape(view|reshape|flatten|unflatten(x))`` -> one ``reshape(x)``,
  ``permute(permute(x))`` -> one permute (none if it is the identity);
- dead-code elimination (in-place cache writes are side effects and stay);
- common-subexpression elimination over pure ops that read no memory written in place and whose
  output nothing writes (two ``clone``s later bumped by ``add_`` stay two);
- drop weights no entry reads (e.g. the MTP layer's, which prefill/decode never touch).

Preconditions: torch.export training IR. Numerics: exact (no arithmetic changes).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from dsc.fx_utils import call_nodes, drop_unused_inputs, finalize, mutated_inputs, tag, val
from dsc.match.ops import ASSERTS
from dsc.registry import register_pass
from dsc.verify import EXACT

aten = torch.ops.aten
NAME = "canonicalize"

CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SHAPE_ONLY = RESHAPES | {aten.flatten.using_ints, aten.unflatten.int}


def _noop_cast(n: fx.Node) -> bool:
    src, out = val(n.args[0]), val(n)
    if src is None or out is None or not isinstance(src, torch.Tensor):
        return False
    extra = {k: v for k, v in n.kwargs.items() if k not in ("dtype",) and v is not None and v is not False}
    extra.pop("layout", None) if n.kwargs.get("layout") in (None, torch.strided) else None
    extra.pop("device", None) if n.kwargs.get("device") in (None, src.device) else None
    positional = n.args[1:]
    if n.target is aten.to.dtype and len(positional) > 2 and positional[2]:  # copy=True
        return False
    return not extra and src.dtype == out.dtype and src.device == out.device


def _fold_casts_and_asserts(gm: fx.GraphModule) -> int:
    n_changed = 0
    for n in call_nodes(gm):
        if n.target in ASSERTS and not n.users:
            gm.graph.erase_node(n)
            n_changed += 1
        elif n.target in CASTS and _noop_cast(n):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            n_changed += 1
    return n_changed


def _fold_views(gm: fx.GraphModule) -> int:
    n_changed = 0
    for n in call_nodes(gm):
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node):
            continue
        if n.target in RESHAPES and n.target is not aten._unsafe_view.default and val(src) is not None:
            if val(n) is not None and tuple(val(src).shape) == tuple(val(n).shape):
                n.replace_all_uses_with(src)  # reshape to the shape it already has
                gm.graph.erase_node(n)
                n_changed += 1
                continue
        if src.op != "call_function":
            continue
        if n.target in RESHAPES and src.target in SHAPE_ONLY:
            n.args = (src.args[0], *n.args[1:])
            if n.target is aten.reshape.default or src.target is not aten.view.default:
                n.target = aten.reshape.default
            tag(n, NAME)
            n_changed += 1
        elif n.target is aten.permute.default and src.target is aten.permute.default:
            inner, outer = list(src.args[1]), list(n.args[1])
            composed = [inner[d] for d in outer]
            if composed == list(range(len(composed))):
                n.replace_all_uses_with(src.args[0])
                gm.graph.erase_node(n)
            else:
                n.args = (src.args[0], composed)
                tag(n, NAME)
            n_changed += 1
    return n_changed


def _key(a):
    if isinstance(a, fx.Node):
        return ("node", a)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_key(x) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in a.items())))
    if isinstance(a, torch.SymInt | torch.SymFloat):
        return ("sym", str(a))
    return (type(a).__name__, a)


def _cse(ep) -> int:
    volatile = mutated_inputs(ep)
    seen: dict = {}
    n_changed = 0
    for n in call_nodes(ep.graph_module):
        target = n.target
        if isinstance(target, torch._ops.OpOverload):
            if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
                continue
        elif target is not operator.getitem:
            continue
        if n in volatile or any(isinstance(a, fx.Node) and a in volatile for a in n.all_input_nodes):
            continue
        k = (target, _key(n.args), _key(n.kwargs))
        try:
            hash(k)
        except TypeError:
            continue
        if k in seen:
            n.replace_all_uses_with(seen[k])
            ep.graph.erase_node(n)
            n_changed += 1
        else:
            seen[k] = n
    return n_changed


@register_pass(NAME, order=0, purpose="drop asserts and no-op casts, fold view chains, DCE, CSE", tolerance=EXACT)
def canonicalize(program, ctx):
    stats = {"asserts_and_casts": 0, "views": 0, "cse": 0, "dce": 0, "unused_weight_inputs": 0}
    for ep in program.entries.values():
        gm = ep.graph_module
        while True:
            before = len(gm.graph.nodes)
            stats["asserts_and_casts"] += _fold_casts_and_asserts(gm)
            stats["views"] += _fold_views(gm)
            stats["cse"] += _cse(ep)
            mid = len(gm.graph.nodes)
            gm.graph.eliminate_dead_code()
            stats["dce"] += mid - len(gm.graph.nodes)
            if len(gm.graph.nodes) == before:
                break
        n_inputs = len(ep.graph_signature.input_specs)
        drop_unused_inputs(ep)
        stats["unused_weight_inputs"] += n_inputs - len(ep.graph_signature.input_specs)
        finalize(ep)
    # sites are the nodes rewritten; an entry's unused weight inputs are dropped from that entry only (the
    # Program keeps every weight some entry reads), so they are counted apart and change no parameter bytes
    return sum(v for k, v in stats.items() if k != "unused_weight_inputs"), stats
