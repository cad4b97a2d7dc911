"""Small helpers for editing the graphs of ExportedPrograms in place (on a clone)."""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Callable

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

aten = torch.ops.aten

# ops that only re-describe memory (their output aliases their input)
VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.expand_as.default, aten.slice.Tensor,
    aten.select.int, aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, aten.unbind.int,
    aten.narrow.default, aten.alias.default, aten.detach.default,
}  # fmt: skip


def call_nodes(gm: fx.GraphModule, *targets) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and (not targets or n.target in targets)]


def op_histogram(ep: ExportedProgram) -> dict[str, int]:
    return dict(Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function"))


def node_count(ep: ExportedProgram) -> int:
    """The entry's operations: call nodes, less ``getitem`` (reading one output of a multi-output op is
    not work, and a saved graph gains one per unused output when it is loaded again)."""
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target is not operator.getitem)


def constant_of(ep: ExportedProgram, node) -> torch.Tensor | None:
    """The tensor behind a parameter / buffer / constant placeholder, else None."""
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return None
    for spec in ep.graph_signature.input_specs:
        if spec.arg.name == node.name:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                return ep.state_dict.get(spec.target)
            if spec.kind == InputKind.CONSTANT_TENSOR:
                return ep.constants.get(spec.target)
    return None


def mutated_inputs(ep: ExportedProgram) -> set[fx.Node]:
    """Every node written in place (e.g. a cache input by ``index_put_``, a counter by ``add_``), the
    views it was written through and every view of them."""
    roots = set()
    for n in ep.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            for arg, a in zip(n.target._schema.arguments, n.args):
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(a, fx.Node):
                    roots.add(a)
        elif n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator):
            # a subgraph call (e.g. the body of a ``torch.no_grad()`` function) may write its inputs
            roots.update(a for a in n.all_input_nodes if a.op != "get_attr")
    closure = set(roots)
    changed = True
    while changed:
        changed = False
        for n in ep.graph.nodes:
            if (
                n not in closure
                and n.op == "call_function"
                and n.target in VIEW_OPS
                and n.args
                and n.args[0] in closure
            ):
                closure.add(n)
                changed = True
            if n not in closure and n.op == "call_function" and n.target is operator.getitem and n.args[0] in closure:
                closure.add(n)
                changed = True
    # the placeholders behind views of written memory are volatile too
    for n in list(closure):
        while n.op == "call_function" and n.target in VIEW_OPS | {operator.getitem}:
            n = n.args[0]
            closure.add(n)
    return closure


def add_constant_input(ep: ExportedProgram, name: str, tensor: torch.Tensor, kind: str = "parameter") -> fx.Node:
    """A new parameter (or constant) placeholder, registered in the signature and the state dict."""
    graph = ep.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    node_name = "p_" + name.replace(".", "_") if kind == "parameter" else "c_" + name.replace(".", "_")
    first_user = next(
        (n for n, s in zip(placeholders, ep.graph_signature.input_specs) if s.kind == InputKind.USER_INPUT), None
    )
    with graph.inserting_before(first_user) if first_user is not None else graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(node_name)
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta.get("val") for n in placeholders])  # the graph's own: one mode per graph
    node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    specs = ep.graph_signature.input_specs
    idx = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT), len(specs))
    if kind == "parameter":
        param = torch.nn.Parameter(tensor, requires_grad=False)
        specs.insert(idx, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target=name))
        ep.state_dict[name] = param
    else:
        specs.insert(idx, InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(node.name), target=name))
        ep.constants[name] = tensor
    return node


def drop_unused_inputs(ep: ExportedProgram) -> None:
    """Remove parameter / buffer / constant placeholders nothing reads any more (graph, signature, tensors)."""
    lifted = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    keep = []
    for node, spec in zip(placeholders, list(ep.graph_signature.input_specs)):
        if spec.kind in lifted and not node.users:
            ep.graph.erase_node(node)
            store = ep.constants if spec.kind == InputKind.CONSTANT_TENSOR else ep.state_dict
            store.pop(spec.target, None)
        else:
            keep.append(spec)
    ep.graph_signature.input_specs[:] = keep
    referenced = {s.target for s in keep if s.target is not None}
    for store in (ep.state_dict, ep.constants):
        for k in [k for k in store if k not in referenced]:
            del store[k]


def sync_outputs(ep: ExportedProgram) -> None:
    """Point the signature's output specs at the nodes the output node now returns."""
    out = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
    values = torch.utils._pytree.tree_leaves(out.args[0])
    specs = ep.graph_signature.output_specs
    assert len(values) == len(specs), f"{len(values)} graph outputs vs {len(specs)} output specs"
    for spec, v in zip(specs, values):
        if isinstance(v, fx.Node) and isinstance(spec.arg, TensorArgument):
            spec.arg.name = v.name


def set_user_outputs(ep: ExportedProgram, nodes: list[fx.Node]) -> None:
    """The entry returns ``tuple(nodes)`` (its in-place cache writes stay as they are)."""
    from torch.export.graph_signature import OutputKind, OutputSpec

    out = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
    specs = ep.graph_signature.output_specs
    values = torch.utils._pytree.tree_leaves(out.args[0])
    keep = [(v, s) for v, s in zip(values, specs) if s.kind != OutputKind.USER_OUTPUT]
    out.args = (tuple([v for v, _ in keep] + list(nodes)),)
    if "val" in out.meta:
        out.meta["val"] = tuple(a.meta.get("val") if isinstance(a, fx.Node) else a for a in out.args[0])
    specs[:] = [s for _, s in keep] + [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n.name), None) for n in nodes]
    sig = ep.module_call_graph[0].signature
    sig.out_spec = torch.utils._pytree.tree_structure(tuple(range(len(nodes))))


def finalize(ep: ExportedProgram) -> None:
    """Dead-code elimination (side-effecting ops stay), signature sync, lint, recompile."""
    sync_outputs(ep)
    ep.graph.eliminate_dead_code()
    ep.graph.lint()
    ep.graph_module.recompile()


def val(n):
    """A node's fake value (``meta["val"]``); None for non-nodes."""
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def tag(node: fx.Node, pass_name: str) -> fx.Node:
    node.meta["dsc_pass"] = pass_name
    return node


def _fmt_arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, torch.dtype):
        return str(a).removeprefix("torch.")
    return repr(a)


def _fmt_val(v) -> str:
    if isinstance(v, torch.Tensor):
        dims = ", ".join(str(d) for d in v.shape)
        return f"{str(v.dtype).removeprefix('torch.')}[{dims}]"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt_val(x) for x in v) + ")"
    return "" if v is None else str(v)


def dim_names(ep: ExportedProgram) -> dict:
    """Dynamic-size symbols of an entry named by role: tokens are (batch, seq), caches (batch, ctx, ...)."""
    users = [
        n for n, s in zip([n for n in ep.graph.nodes if n.op == "placeholder"], ep.graph_signature.input_specs)
        if s.kind == InputKind.USER_INPUT
    ]  # fmt: skip
    out = {}

    def sym(d):
        return d.node.expr if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol else None

    vals = [n.meta.get("val") for n in users]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    tokens = next((v for v in vals if v.ndim == 2 and not v.dtype.is_floating_point), None)  # mtp: after hidden
    if tokens is not None:
        out.update(
            {s: nm for s, nm in ((sym(tokens.shape[0]), "batch"), (sym(tokens.shape[1]), "seq")) if s is not None}
        )
    # the first float input with an unnamed dynamic dim after the batch: a cache (batch, ctx, ...),
    # or heads first (batch, heads, ctx, ...)
    dims = [sym(d) for v in vals if v.ndim >= 2 and v.dtype.is_floating_point for d in v.shape[1:]]
    ctx = next((s for s in dims if s is not None and s not in out), None)
    if ctx is not None:
        out[ctx] = "ctx"
    return out


def name_dims(ep: ExportedProgram) -> Callable[[str], str]:
    """A function that writes an entry's dynamic-size symbols in a text by their roles (s0 -> batch)."""
    names = {str(k): v for k, v in dim_names(ep).items()}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None
    return (lambda text: pattern.sub(lambda m: names[m.group(1)], text)) if pattern else (lambda text: text)


def describe_val(ep: ExportedProgram) -> Callable[[object], str]:
    """A node value as ``dtype[dims]`` with the entry's dims named (see ``name_dims``)."""
    named = name_dims(ep)
    return lambda v: named(_fmt_val(v))


def listing(ep: ExportedProgram) -> str:
    """The graph as readable code, one node a line: ``name = op(args)  # dtype[shape]  <- pass``."""
    kinds = {s.arg.name: s.kind.name.lower() for s in ep.graph_signature.input_specs}
    lines = []
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if kinds.get(n.name) == "user_input":
                lines.append(f"{n.name}: {_fmt_val(n.meta.get('val'))}  # input")
            continue
        if n.op == "output":
            lines.append(f"return {_fmt_arg(n.args[0])}")
            continue
        target = (
            str(n.target).removeprefix("aten.")
            if not callable(n.target) or isinstance(n.target, torch._ops.OpOverload)
            else getattr(n.target, "__name__", str(n.target))
        )
        args = ", ".join([_fmt_arg(a) for a in n.args] + [f"{k}={_fmt_arg(v)}" for k, v in n.kwargs.items()])
        src = n.meta.get("dsc_pass")
        tail = f"  <- {src}" if src else ""
        lines.append(f"{n.name} = {target}({args})  # {_fmt_val(n.meta.get('val'))}{tail}")
    return name_dims(ep)("\n".join(lines))


def refresh_meta(ep: ExportedProgram, full: bool = False) -> None:
    """Recompute ``meta["val"]`` by fake-tensor propagation from the placeholders.

    Incremental by default: a node is recomputed when it has no value, its target or arguments
    changed since the last refresh (``meta["_meta_sig"]``), or an input's value changed shape, dtype
    or strides; the rest keep theirs. A rewrite of one layer's attention thus re-propagates that
    layer, not the model (symbolic fake propagation costs milliseconds per node). ``full``: every node."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    vals = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(vals)
    ep.graph_module.recompile()
    interp = FakeTensorProp(ep.graph_module, mode)
    changed: set[fx.Node] = set()
    with torch.no_grad(), mode:
        for n in ep.graph.nodes:
            old = n.meta.get("val")
            if n.op == "placeholder":
                if old is not n.meta.get("_meta_seen"):
                    changed.add(n)
                interp.env[n] = old
            elif n.op == "get_attr" and old is None:
                interp.env[n] = interp.fetch_attr(n.target)  # a subgraph module, or a tensor read as is
            elif (
                full
                or old is None
                or n.meta.get("_meta_sig") != _meta_sig(n)
                or any(a in changed for a in n.all_input_nodes)
            ):
                interp.env[n] = interp.run_node(n)
                if not _same_meta(old, n.meta.get("val")):
                    changed.add(n)
            else:
                interp.env[n] = old
            n.meta["_meta_sig"], n.meta["_meta_seen"] = _meta_sig(n), n.meta.get("val")


def stamp_meta(ep: ExportedProgram) -> None:
    """Mark every node's value as current, so the next ``refresh_meta`` recomputes only what changes after this."""
    for n in ep.graph.nodes:
        n.meta["_meta_sig"], n.meta["_meta_seen"] = _meta_sig(n), n.meta.get("val")


def _meta_sig(n: fx.Node) -> str:
    return f"{n.target}{n.args}{n.kwargs}"


def _same_meta(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (str(a.shape), a.dtype, str(a.stride()), a.device) == (str(b.shape), b.dtype, str(b.stride()), b.device)
    return str(a) == str(b)


def drop_user_inputs(ep: ExportedProgram, names: list[str]) -> None:
    """Remove user-input placeholders (unread) from the graph, the signature and the call's input structure."""
    if not names:
        return
    pytree = torch.utils._pytree
    users = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    drop = {users.index(n) for n in names}
    spec = ep.module_call_graph[0].signature.in_spec
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)

    def prune(t):
        if isinstance(t, (list, tuple)):
            return type(t)(prune(x) for x in t if not (isinstance(x, int) and x in drop))
        if isinstance(t, dict):
            return {k: prune(v) for k, v in t.items()}
        return t

    sig = ep.module_call_graph[0].signature
    sig.in_spec = pytree.tree_structure(prune(tree))
    if sig.forward_arg_names and isinstance(tree, tuple) and isinstance(tree[0], tuple):
        # a positional argument that was one dropped tensor leaves the forward signature too
        gone = {i for i, t in enumerate(tree[0]) if isinstance(t, int) and t in drop}
        sig.forward_arg_names = [n for i, n in enumerate(sig.forward_arg_names) if i not in gone]
    ep.graph_signature.input_specs[:] = [s for s in ep.graph_signature.input_specs if s.arg.name not in names]
    for n in [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]:
        assert not n.users, f"input {n.name} is still read by {list(n.users)}"
        ep.graph.erase_node(n)
