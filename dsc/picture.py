"""Pictures of what a pass changed: the affected region of an entry's graph before and after, as inline SVG.

A graph is first reduced to a *sketch* (a JSON-able dict per node: op, inputs, value, module, the pass
that made it), which is what a record keeps. A picture then draws the nodes the graph diff says were
removed (before, red) or added (after, green) together with their direct inputs and users (grey, for
context); nodes are grouped by the module they came from (``nn_module_stack``; a node a pass made has
none and takes its neighbours'), and layers whose changes are the same, op for op, are drawn once with
"× N layers". The layout is grandalf's Sugiyama (layered) layout, top to bottom in data-flow order.

Every changed node of the diff is accounted for in the SVG: drawn (``data-node``), folded into a
drawn layer (``data-folded`` on that layer's group), or left out beyond the size limit
(``data-omitted`` on the root, with a line saying so).
"""

from __future__ import annotations

import difflib
import html
import re
from dataclasses import dataclass

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from dsc.fx_utils import describe_val

MAX_NODES = 60  # per picture; a diff larger than this (after folding layers) is drawn in part
LAYER = re.compile(r"^(.*?\blayers?)\.(\d+)(?=\.|$)")
COLORS = {"removed": ("#fce8e6", "#b3261e"), "added": ("#e6f4ea", "#19753a"), "context": ("#f4f5f7", "#9aa3ad")}


def _op_label(n: fx.Node) -> str:
    if n.op == "placeholder":
        return n.name
    if n.op == "output":
        return "output"
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.namespace, t._schema.name.split("::")[-1]
        return f"{ns}::{name}" if ns != "aten" else name
    return getattr(t, "__name__", str(t))


def _module(n: fx.Node) -> str:
    """The qualified name of the innermost module a node was traced in ("" when unknown)."""
    stack = n.meta.get("nn_module_stack")
    path = list(stack.values())[-1][0] if stack else ""
    return "" if path.startswith("_empty") else path


def sketch(ep: ExportedProgram) -> dict[str, dict]:
    """One entry's graph as {node name: {op, in, val, module, pass, kind}} in graph order."""
    kinds = {s.arg.name: s.kind for s in ep.graph_signature.input_specs}
    weights = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.target}  # parameters, buffers
    describe = describe_val(ep)
    out: dict[str, dict] = {}
    for n in ep.graph.nodes:
        kind = "op"
        if n.op == "placeholder":
            kind = "input" if kinds.get(n.name) == InputKind.USER_INPUT else "weight"
        elif n.op == "output":
            kind = "output"
        v = describe(n.meta.get("val"))
        fqn = weights.get(n.name)
        out[n.name] = {
            "op": ".".join(fqn.split(".")[-2:]) if fqn else _op_label(n),
            "in": [a.name for a in n.all_input_nodes],
            "val": v,
            "module": fqn.rpartition(".")[0] if fqn else _module(n),
            "pass": n.meta.get("dsc_pass"),
            "kind": kind,
        }
    # a node a pass made has no module stack: it takes its inputs' (else its users') module
    users: dict[str, list[str]] = {k: [] for k in out}
    order = {k: i for i, k in enumerate(out)}
    for k, d in out.items():
        for i in d["in"]:
            users[i].append(k)
    for d in out.values():
        if not d["module"] and d["kind"] == "op":
            # the latest input's: an early input may be shared across layers (a CSE'd index, positions)
            d["module"] = next(
                (out[i]["module"] for i in sorted(d["in"], key=order.get, reverse=True) if out[i]["module"]), ""
            )
    for k in reversed(list(out)):
        d = out[k]
        if not d["module"] and d["kind"] == "op":
            d["module"] = next((out[u]["module"] for u in users[k] if out[u]["module"]), "")
    return out


def _line_name(line: str) -> str:
    """The node a listing line is about (``fx_utils.listing``: ``name = ...``, ``name: ...  # input``)."""
    if line.startswith("return "):
        return "output"
    return re.split(r"[ :=]", line, maxsplit=1)[0]


def changed_nodes(before: str, after: str) -> tuple[list[str], list[str]]:
    """(removed, added) node names of the graph diff between two listings: the nodes whose lines the
    unified diff of ``report.diff_html`` marks ``-`` and ``+``."""
    a, b = before.splitlines(), after.splitlines()
    removed, added = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            removed += [_line_name(x) for x in a[i1:i2]]
        if tag in ("replace", "insert"):
            added += [_line_name(x) for x in b[j1:j2]]
    return removed, added


@dataclass
class _Fold:
    drawn: list[str]  # changed nodes drawn
    folded: dict[str, list[str]]  # drawn layer prefix -> changed nodes of the identical layers it stands for
    times: dict[str, int]  # drawn layer prefix -> how many layers it stands for
    omitted: list[str]


def _layer(module: str) -> tuple[str, str] | None:
    m = LAYER.match(module)
    return (m.group(0), f"{m.group(1)}.*{module[m.end() :]}") if m else None


def _fold(sk: dict[str, dict], changed: list[str]) -> _Fold:
    """Group the changed nodes by layer; layers whose changed ops are the same are drawn once."""
    by_layer: dict[str, list[str]] = {}
    rest = []
    for n in changed:
        lay = _layer(sk[n]["module"]) if n in sk else None
        (by_layer.setdefault(lay[0], []) if lay else rest).append(n)
    first: dict[tuple, str] = {}
    folded: dict[str, list[str]] = {}
    times: dict[str, int] = {}
    drawn = list(rest)
    for prefix, nodes in by_layer.items():
        signature = tuple(sorted((_layer(sk[n]["module"])[1], sk[n]["op"]) for n in nodes))
        if signature in first:
            folded[first[signature]] += nodes
            times[first[signature]] += 1
        else:
            first[signature] = prefix
            folded[prefix], times[prefix] = [], 1
            drawn += nodes
    order = {k: i for i, k in enumerate(sk)}
    drawn.sort(key=lambda n: order.get(n, 0))
    return _Fold(drawn[:MAX_NODES], folded, times, drawn[MAX_NODES:])


def _region(sk: dict[str, dict], core: list[str]) -> list[str]:
    """The changed nodes with their direct inputs and users, in graph order."""
    keep = set(core)
    core_set = set(core)
    for k, d in sk.items():
        if k in core_set:
            keep.update(i for i in d["in"] if sk[i]["kind"] != "weight" or len(core) < 40)
        elif core_set.intersection(d["in"]):
            keep.add(k)
    return [k for k in sk if k in keep]


def _layout(nodes: list[str], edges: list[tuple[str, str]], sizes: dict[str, tuple[float, float]]):
    """Positions (centre x, y) per node and a polyline per edge, by grandalf's Sugiyama layout; the
    connected components side by side."""
    from grandalf.graphs import Edge, Graph, Vertex
    from grandalf.layouts import SugiyamaLayout

    class View:
        def __init__(self, w, h):
            self.w, self.h, self.xy = w, h, (0.0, 0.0)

    class EdgeView:
        def setpath(self, pts):
            self.pts = pts

    vs = {n: Vertex(n) for n in nodes}
    for n, v in vs.items():
        v.view = View(*sizes[n])
    es = [Edge(vs[a], vs[b]) for a, b in edges]
    for e in es:
        e.view = EdgeView()
    g = Graph(list(vs.values()), es)
    pos, paths, x_off = {}, {}, 0.0
    for comp in g.C:
        sug = SugiyamaLayout(comp)
        sug.xspace, sug.yspace = 18, 40
        roots = [v for v in comp.sV if not v.e_in()]
        sug.init_all(roots=roots or None, optimize=True)
        sug.draw(3)
        xs = [v.view.xy[0] - v.view.w / 2 for v in comp.sV] + [v.view.xy[0] + v.view.w / 2 for v in comp.sV]
        left = min(xs)
        for v in comp.sV:
            pos[v.data] = (v.view.xy[0] - left + x_off, v.view.xy[1])
        for e in comp.sE:
            pts = getattr(e.view, "pts", None) or [e.v[0].view.xy, e.v[1].view.xy]
            paths[(e.v[0].data, e.v[1].data)] = [(x - left + x_off, y) for x, y in pts]
        x_off += max(xs) - left + 40
    return pos, paths


def _group(module: str) -> str:
    """The box a node is drawn in: a layer's direct child (``layers.3.self_attn``), else its module."""
    m = LAYER.match(module)
    if not m:
        return module
    child = module[m.end() :].lstrip(".").split(".")[0]
    return f"{m.group(0)}.{child}" if child else m.group(0)


def picture(sk: dict[str, dict], changed: list[str], side: str, title: str) -> str:
    """The SVG of one side ("removed" for before, "added" for after) of one pass on one entry."""
    if not changed:
        return ""
    fold = _fold(sk, changed)
    nodes = _region(sk, fold.drawn)
    node_set, drawn_changed = set(nodes), set(fold.drawn)
    edges = [(i, k) for k in nodes for i in sk[k]["in"] if i in node_set]
    sizes = {k: (round(max(len(sk[k]["op"]) * 6.6, len(k) * 5.2, 40) + 16), 34) for k in nodes}
    pos, paths = _layout(nodes, edges, sizes)
    pad = 24
    xmin = min(pos[k][0] - sizes[k][0] / 2 for k in nodes) - pad
    ymin = min(pos[k][1] - sizes[k][1] / 2 for k in nodes) - pad - 34
    w = max(pos[k][0] + sizes[k][0] / 2 for k in nodes) + pad + 120 - xmin
    h = max(pos[k][1] + sizes[k][1] / 2 for k in nodes) + pad + 14 - ymin

    def P(x, y):  # page coordinates, whole pixels
        return round(x - xmin), round(y - ymin)

    marker = "arrow-" + re.sub(r"\W", "-", title)  # ids are page-wide: one per picture
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{w:.0f}" height="{h:.0f}" '
        f'viewBox="0 0 {w:.0f} {h:.0f}" role="img" aria-label="{html.escape(title)}" data-side="{side}" '
        f'data-omitted="{html.escape(" ".join(fold.omitted))}" font-family="Helvetica, Arial, sans-serif">',
        f'<defs><marker id="{marker}" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#8a94a0"/></marker></defs>',
        f'<text x="{pad}" y="22" font-size="13" font-weight="600">{html.escape(title)}</text>',
    ]
    # module boxes: a light box around each module's nodes (top-level nodes have none); a layer that
    # stands for identical ones says "× N layers" and lists their changed nodes in data-folded
    groups: dict[str, list[str]] = {}
    for k in nodes:
        groups.setdefault(_group(sk[k]["module"]), []).append(k)
    names = [g for g in groups if g]
    carrier: dict[str, str] = {}
    for g in names:
        lay = _layer(g)
        if lay:
            carrier.setdefault(lay[0], g)
    for gi, (mod, members) in enumerate(groups.items()):
        if not mod:
            continue
        x0, y0 = P(min(pos[k][0] - sizes[k][0] / 2 for k in members) - 8, min(pos[k][1] for k in members) - 35)
        x1, y1 = P(max(pos[k][0] + sizes[k][0] / 2 for k in members) + 8, max(pos[k][1] for k in members) + 23)
        lay = _layer(mod)
        carries = lay is not None and carrier.get(lay[0]) == mod
        folded = fold.folded.get(lay[0], []) if carries else []
        times = fold.times.get(lay[0], 1) if carries else 1
        short = mod[mod[: LAYER.match(mod).end(1)].rfind("layer") :] if lay else mod
        text = short + (f"  × {times} layers" if times > 1 else "")  # "layers.0.self_attn", not m.model....
        out.append(
            f'<g class="module" data-module="{html.escape(mod)}" data-folded="{html.escape(" ".join(folded))}">'
            f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" rx="6" '
            f'fill="{"#eef3fa" if gi % 2 == 0 else "#f4effa"}" fill-opacity="0.75" stroke="#d5dbe3"/>'
            f'<text x="{x0 + 6}" y="{y0 + 12}" font-size="10" fill="#5b6573">{html.escape(text)}</text></g>'
        )
    labelled = set()
    for (src, dst), pts in paths.items():
        pts = [P(x, y) for x, y in pts]
        pts[0], pts[-1] = _border(pts[1], pts[0], sizes[src]), _border(pts[-2], pts[-1], sizes[dst])
        d = " ".join(f"{x},{y}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="#8a94a0" points="{d}" marker-end="url(#{marker})"/>')
        if sk[src]["val"] and src not in labelled:  # the tensor a node's edges carry, once, by its first edge
            labelled.add(src)
            (xa, ya), (xb, yb) = pts[0], pts[1]  # near the source, where the edges of a node still part
            out.append(
                f'<text x="{round(xa + 0.3 * (xb - xa)) + 4}" y="{round(ya + 0.3 * (yb - ya)) + 3}" font-size="8.5" fill="#6b7480" stroke="#fff" stroke-width="3" paint-order="stroke">'
                f"{html.escape(sk[src]['val'])}</text>"
            )
    for k in nodes:
        d = sk[k]
        state = side if k in drawn_changed else "context"
        fill, stroke = COLORS[state]
        (x, y), (bw, bh) = P(*pos[k]), sizes[k]
        weight = ' font-weight="600"' if "::" in d["op"] else ""  # dsc:: and other custom ops stand out
        tip = f"{k} = {d['op']}  {d['val']}" + (f"  <- {d['pass']}" if d["pass"] else "")
        out.append(
            f'<g class="node {state}" data-node="{html.escape(k)}"><title>{html.escape(tip)}</title>'
            f'<rect x="{x - bw // 2}" y="{y - bh // 2}" width="{bw}" height="{bh}" rx="4" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{1.6 if state != "context" else 1}"/>'
            f'<text x="{x}" y="{y - 2}" font-size="11" text-anchor="middle"{weight}>{html.escape(d["op"])}</text>'
            f'<text x="{x}" y="{y + 11}" font-size="9" text-anchor="middle" fill="#5b6573">{html.escape(k)}</text></g>'
        )
    if fold.omitted:
        out.append(
            f'<text x="{pad}" y="{h - 8:.0f}" font-size="11" fill="#b3261e">{len(fold.omitted)} more changed nodes '
            "not drawn (see the listing below)</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _border(frm: tuple[int, int], centre: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Where the line from ``frm`` to a box's centre meets the box: edges end at the border, so the
    arrowheads show."""
    dx, dy = centre[0] - frm[0], centre[1] - frm[1]
    if not dx and not dy:
        return centre
    t = min(size[0] / 2 / abs(dx) if dx else float("inf"), size[1] / 2 / abs(dy) if dy else float("inf"))
    return round(centre[0] - dx * t), round(centre[1] - dy * t)


def before_after(
    sk_before: dict, sk_after: dict, listing_before: str, listing_after: str, entry: str
) -> tuple[str, str]:
    removed, added = changed_nodes(listing_before, listing_after)
    return (
        picture(sk_before, [n for n in removed if n in sk_before], "removed", f"{entry}: before (removed in red)"),
        picture(sk_after, [n for n in added if n in sk_after], "added", f"{entry}: after (added in green)"),
    )
