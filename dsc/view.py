"""``dsc view``: Google's Model Explorer on an entry point's graph before and after, side by side.

The graphs go through Model Explorer's own ExportedProgram adapter; dsc adds node-data overlays keyed
by node name (the adapter's node ids):
- "removed" on the before graph and "added" on the after graph: the nodes of the graph diff (the same
  sets as the report's pictures, ``picture.changed_nodes``);
- "made by <pass>" on the after graph: the nodes each pass created (``meta["dsc_pass"]``);
- "FLOPs" and "bytes" on both: each node's cost in the cost model, for one decode step (or one prefill)
  at the report's context;
- "B vs A max |error|" on the after graph: per node that both graphs have, its output's largest
  difference on verification's inputs (``node_errors``).

Model Explorer is the optional extra ``view`` (``pip install 'dsc[view]'``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import sympy
import torch
import torch.utils._pytree as pytree

from dsc.cost import T, call_sizes, node_bytes, node_flops
from dsc.errors import DscError
from dsc.fx_utils import describe_val, listing
from dsc.picture import changed_nodes, sketch
from dsc.program import Program
from dsc.verify import make_scenario

COLORS = {"removed": "#f28b82", "added": "#81c995"}
PASS_COLORS = ["#8ab4f8", "#fdd663", "#c58af9", "#78d9ec", "#fcad70", "#f6aea9"]


def require_explorer():
    try:
        import model_explorer
    except ImportError:
        raise DscError(
            "dsc view needs Google's Model Explorer, the optional extra 'view': pip install 'dsc[view]' "
            "(or pip install ai-edge-model-explorer)"
        ) from None
    return model_explorer


@dataclass
class Overlay:
    name: str
    model: str  # the model (side) it applies to
    values: dict[str, tuple[float, str | None]]  # node id -> (value, background colour or None)


def node_costs(ep, kind: str, context: int) -> dict[str, tuple[float, float]]:
    """Per call_function node: (FLOPs, bytes) of one ``kind`` call at ``context`` (``cost.call_sizes``),
    as ``cost.entry_cost`` counts them."""
    subs = {k: v.subs(T, context) if isinstance(v, sympy.Expr) else v for k, v in call_sizes(ep, kind).items()}
    subs[T] = context
    out = {}
    for n in ep.graph.nodes:
        if n.op == "call_function":
            f, b = (sympy.sympify(x).subs(subs) for x in (node_flops(n), node_bytes(n)))
            out[n.name] = (float(f) if f.is_number else 0.0, float(b) if b.is_number else 0.0)
    return out


class _Record(torch.fx.Interpreter):
    """Runs a graph and keeps every call_function node's tensor output by node name."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.values[n.name] = out.detach().clone()
        return out


@torch.no_grad()
def node_errors(a: Program, b: Program, entry: str) -> dict[str, float]:
    """Max |B - A| per node of B's ``entry`` that A has too (same name and shape), on verification's
    inputs: each side prefills the same prompt into its own caches (their layouts may differ), then
    runs one call of the entry (a one-token decode; verify: the first multi-token step). Nodes a pass
    left in place downstream of a rewrite show how far its rounding travelled. Empty for entries
    verification does not drive this way (mtp, draft)."""
    if entry not in ("prefill", "decode", "verify") or a.config is None or entry not in a.entries:
        return {}
    sc = make_scenario(b.config, seed=0, batch=1)
    toks, pos = next(((t, p) for t, p in sc.steps if (t.shape[1] > 1) == (entry == "verify")), sc.steps[0])
    seen = []
    for p in (a, b):
        caches = p.cache.allocate(1, sc.total_len)
        if entry == "prefill":
            args = (sc.prompt, p.cache.window(caches, sc.prompt.shape[1]))
        else:
            p.prefill(sc.prompt, p.cache.window(caches, sc.prompt.shape[1]))
            args = (toks, pos, p.cache.window(caches, int(pos.max()) + 1))
        rec = _Record(p.module(entry))
        rec.run(*pytree.tree_leaves(args))
        seen.append(rec.values)
    va, vb = seen

    def err(x, y) -> float:  # equal infinities (masks) are no error; an infinite one is capped (JSON has no inf)
        d = torch.where(x == y, 0.0, (y - x).abs()).nan_to_num(nan=1e30, posinf=1e30)
        return float(d.max()) if d.numel() else 0.0

    return {k: err(va[k], vb[k]) for k in vb if k in va and va[k].shape == vb[k].shape}


def overlays(before, after, entry: str, names: tuple[str, str], context: int) -> list[Overlay]:
    """The node-data overlays of one entry's before (A) and after (B) graphs."""
    removed, added = changed_nodes(listing(before), listing(after))
    a, b = names
    out = [
        Overlay("removed", a, {n: (1.0, COLORS["removed"]) for n in removed}),
        Overlay("added", b, {n: (1.0, COLORS["added"]) for n in added}),
    ]
    made: dict[str, dict[str, tuple[float, str]]] = {}
    for n in after.graph.nodes:
        if n.meta.get("dsc_pass"):
            made.setdefault(n.meta["dsc_pass"], {})[n.name] = (1.0, None)
    for i, (p, nodes) in enumerate(made.items()):
        colour = PASS_COLORS[i % len(PASS_COLORS)]
        out.append(Overlay(f"made by {p}", b, {k: (v, colour) for k, (v, _) in nodes.items()}))
    kind = entry if entry in ("prefill", "verify") else "decode"
    for side, ep in ((a, before), (b, after)):
        costs = node_costs(ep, kind, context)
        tag = side.split(" ", 1)[0]  # "A" / "B"
        out.append(Overlay(f"{tag} FLOPs ({kind}, {context} ctx)", side, {k: (f, None) for k, (f, _) in costs.items()}))
        out.append(Overlay(f"{tag} bytes ({kind}, {context} ctx)", side, {k: (x, None) for k, (_, x) in costs.items()}))
    return out


def explorer_graphs(ep, graph_id: str):
    """``ep`` through Model Explorer's own ExportedProgram adapter, with two of its methods replaced: its
    output metadata handles static tensors only (a SymInt, or a shape with symbolic dims, raises), so
    every output gets dsc's ``dtype[dims]`` with the dims named (batch, seq, ctx); and nodes are nested
    by the module path the report's pictures group by (a node a pass made takes its neighbours')."""
    from model_explorer.consts import DEFAULT_SETTINGS
    from model_explorer.graph_builder import KeyValue, MetadataItem
    from model_explorer.pytorch_exported_program_adapter_impl import PytorchExportedProgramAdapterImpl

    shape = describe_val(ep)

    modules = {k: d["module"] for k, d in sketch(ep).items()}
    wrapper = os.path.commonprefix([m + "." for m in modules.values() if m])  # a wrapper's "m." on every path
    wrapper = wrapper[: wrapper.rfind(".") + 1]

    class Adapter(PytorchExportedProgramAdapterImpl):
        def get_hierachy(self, fx_node):  # the module path the report's pictures group by ("layers.0/self_attn")
            if self.is_arg_node(fx_node):
                return "inputs"
            path = (modules.get(fx_node.name, "") + ".").removeprefix(wrapper).rstrip(".")  # "m" itself too
            return re.sub(r"(?<=\blayers)/(\d+)", r".\1", path.replace(".", "/"))

        def add_outputs_metadata(self, fx_node, node):
            v = fx_node.meta.get("val")
            for i, x in enumerate(v if isinstance(v, (tuple, list)) else [] if v is None else [v]):
                if x is not None:
                    node.outputsMetadata.append(MetadataItem(id=str(i), attrs=[KeyValue("tensor_shape", shape(x))]))

    graphs = Adapter(ep, DEFAULT_SETTINGS).convert()
    graphs["graphs"][0].id = graph_id  # the web app numbers equal ids across models ("graph (2)")
    return graphs


def _side_by_side(me, ids: dict[str, str]):
    """A config whose URL opens the two graphs in two panes (Model Explorer's split view), through the
    ``uiState`` the web app reads from its ``data`` parameter."""
    from urllib.parse import quote, unquote

    class SideBySide(type(me.config())):
        def to_url_param_value(self) -> str:
            data = json.loads(unquote(super().to_url_param_value()))
            data["uiState"] = {
                "paneStates": [
                    {"deepestExpandedGroupNodeIds": [], "selectedNodeId": "", "selectedGraphId": graph,
                     "selectedCollectionLabel": name, "widthFraction": 0.5}
                    for name, graph in ids.items()
                ]
            }  # fmt: skip
            return quote(json.dumps(data))

    return SideBySide()


def build_config(a: Program, b: Program, entry: str, labels: tuple[str, str], context: int):
    """A Model Explorer config with A's and B's ``entry`` graphs and the overlays."""
    me = require_explorer()
    from model_explorer import node_data_builder as ndb

    missing = [side for side, p in (("A", a), ("B", b)) if entry not in p.entries]
    if missing:
        raise DscError(
            f"entry {entry!r} is not in {' and '.join(missing)} (A has {', '.join(sorted(a.entries))}; "
            f"B has {', '.join(sorted(b.entries))}): choose one with --entry"
        )
    # a model's name sits in a graphs://NAME/INDEX url: no slashes in it
    names = tuple(f"{side} {label}: {entry}".replace("/", "\u2215") for side, label in zip("AB", labels))
    ids = dict(zip(names, ("before", "after")))  # each model's one graph
    cfg = _side_by_side(me, ids)
    for name, p in zip(names, (a, b)):  # what add_model_from_pytorch does, with the adapter above
        cfg.model_sources.append({"url": f"graphs://{name}/{len(cfg.graphs_list)}"})
        cfg.graphs_list.append(explorer_graphs(p.entries[entry], ids[name]))
    found = overlays(a.entries[entry], b.entries[entry], entry, names, context)
    errors = node_errors(a, b, entry)
    if errors:
        found.append(
            Overlay("B vs A max |error| (verification inputs)", names[1], {k: (v, None) for k, v in errors.items()})
        )
    for ov in found:
        if not ov.values:
            continue
        results = {k: ndb.NodeDataResult(value=v, bgColor=c) for k, (v, c) in ov.values.items()}
        data = ndb.GraphNodeData(results=results)
        if all(c is None for _, c in ov.values.values()):  # costs: a colour scale, light to dark
            data.gradient = [ndb.GradientItem(stop=0, bgColor="#ffffff"), ndb.GradientItem(stop=1, bgColor="#d93025")]
        graph = ids[ov.model]
        cfg.add_node_data(ov.name, ndb.ModelNodeData(graphsData={graph: data}), model_name=ov.model)
    return cfg


def view(a: Program, b: Program, entry: str, labels: tuple[str, str], context: int, port: int, browser: bool) -> None:
    """Start Model Explorer's local server on the two graphs (it runs until Ctrl-C)."""
    me = require_explorer()
    cfg = build_config(a, b, entry, labels, context)
    me.visualize_from_config(cfg, port=port, no_open_in_browser=not browser)
