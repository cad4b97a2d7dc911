"""lower_fp8: matmuls on constant weights become FP8 e4m3 with 128x128 weight blocks (spec §7).

    linear(x, W, b)  ->  fp8_linear(*act_quant(x, 128), W_e4m3, W_scale, b)      (mode=w8a8, as deployed)
                     ->  fp8_linear(x, None, W_e4m3, W_scale, b)                  (mode=w8a16: weights only)

A weight is a parameter of the Program read by a ``linear`` of the normal form (``normalize`` makes
every ``einsum('...c,oc->...o')`` a linear). Policy (spec §7.5): embeddings, ``lm_head``, the MoE
router gate, the indexer's ``weights_proj`` and the MTP ``eh_proj`` / shared head stay in high
precision by default; ``include`` / ``exclude`` take comma-separated module-path patterns (fnmatch,
e.g. ``*.mlp.*``) that override it, and a pattern that matches no matmul is an error. Each matmul is
in the record with its decision and the reason. Weights are quantised per 128x128 block (edge
blocks padded, ``dsc.model.fp8.block_quant``; an all-zero block gets the floor scale, never NaN);
NaN / Inf weights are an error naming the tensor. A weight loaded from an FP8 checkpoint (e4m3 with
``weight_scale_inv``) keeps the checkpoint's bytes and scales as they are, when the Program still
holds exactly their dequantisation.

The routed experts inside a ``dsc::moe_experts`` become ``dsc::moe_experts_fp8`` (the same mixture,
each expert matmul an ``fp8_linear``), all of one op's experts or none: the record has one line for
them. A two-operand einsum that is a matmul per head against a weight read through views
(``absorb_mla``'s ``q_nope · W_UK`` and ``o_lat · W_UV``, views of W_kv_b) becomes ``fp8_linear`` on a
per-head weight (H, N, K), quantised per head, or the checkpoint's bytes laid out per head where
each head's rows are whole 128-row blocks. An einsum on a constant weight of another shape is in
the record as kept (not lowered yet: the products' ``W_UQ·W_UK``). The pass runs after draft_mtp,
absorb_mla and fuse_dsa, which match the high-precision linears it replaces.

Checks: each lowered matmul's output SQNR against its high-precision product on the verification
inputs, in the record; one below the typical floor (``SQNR_FLOORS_DB``) is a warning naming the
``--fp8-exclude`` that keeps it. The pass's contract is ``fp8_w8a8`` / ``fp8_w8a16``.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import os

import torch
from dsc.model.fp8 import BLOCK, block_dequant, block_quant
from torch import fx

from dsc.errors import DscError
from dsc.fx_utils import add_constant_input, constant_of, drop_unused_inputs, finalize, is_call, refresh_meta, tag, val
from dsc.program import logits_hidden
from dsc.registry import TEXT, register_pass
from dsc.verify import SQNR_FLOORS_DB, TOLERANCES, make_scenario, run_scenario

aten = torch.ops.aten
dsc_ops = torch.ops.dsc
NAME = "lower_fp8"
MODES = ("w8a8", "w8a16")
SCALES = ("fp32", "ue8m0")
# spec §7.5: what DeepSeek's checkpoints keep in high precision (module paths, HF names)
KEEP = (
    "*embed_tokens",
    "lm_head",
    "*.lm_head",
    "*.mlp.gate",
    "*.indexer.weights_proj",
    "*eh_proj",
    "*shared_head.head",
)


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def module_path(target: str) -> str:
    """A weight's module path: its state-dict name without ``.weight`` and the entry wrapper's ``m.``."""
    path = target.removesuffix(".weight")
    return path[2:] if path.startswith("m.") else path


def _param(ep, w) -> tuple[str, torch.Tensor] | None:
    """(state-dict name, tensor) when w is a 2-D parameter placeholder."""
    t = constant_of(ep, w)
    if t is None or t.ndim != 2:
        return None
    spec = next(s for s in ep.graph_signature.input_specs if s.arg.name == w.name)
    return spec.target, t


def _weight_of(ep, n: fx.Node) -> tuple[str, torch.Tensor] | None:
    """(state-dict name, tensor) when linear n's weight is a parameter placeholder."""
    return _param(ep, n.args[1])


def _check_finite(target: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise DscError(f"lower_fp8: weight {module_path(target)} holds NaN or Inf values; fix the checkpoint")


def _expert_weights(ep, n: fx.Node) -> list[list[tuple[str, torch.Tensor]]] | None:
    """[gate, up, down] of a ``dsc::moe_experts`` node: (state-dict name, tensor) per expert, when
    every one is a parameter."""
    groups = []
    for ws in n.args[3:6]:
        g = [_param(ep, w) for w in ws]
        if any(x is None for x in g):
            return None
        groups.append(g)
    return groups


def _experts_path(ep, n: fx.Node) -> str:
    """The experts' common module path (``model.layers.1.mlp.experts``), else the node's name."""
    paths = [module_path(t) for t, _ in (_param(ep, w) or ("", None) for w in n.args[3])]
    prefix = os.path.commonprefix(paths)
    return prefix[: prefix.rfind(".")] if "." in prefix else n.name


VIEWS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dims, aten.select.int,
    aten.alias.default, aten.unflatten.int, aten.expand.default,
}  # fmt: skip


def _through_views(ep, n) -> tuple[str, torch.Tensor, list[fx.Node]] | None:
    """(state-dict name, the parameter, the view ops from it to n, in order) when n reads a
    parameter through views only (absorb_mla's W_UK / W_UV are views of W_kv_b)."""
    chain = []
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in VIEWS:
        chain.append(n)
        n = n.args[0]
    t = constant_of(ep, n)
    if t is None or t.ndim not in (2, 3):
        return None
    spec = next(s for s in ep.graph_signature.input_specs if s.arg.name == n.name)
    return spec.target, t, chain[::-1]


def _evaluate(t: torch.Tensor, chain: list[fx.Node]) -> torch.Tensor:
    for n in chain:
        t = n.target(t, *n.args[1:], **n.kwargs)
    return t


def _per_head_roles(eq: str, w_first: bool) -> tuple[str, str, str, str | None, str, list[str]] | None:
    """For a two-operand einsum with a 3-D weight operand: (x labels, w labels, out labels, h, k, ns) when
    it is a matmul per head h (in x, w and out) contracting k (in x and w) into ns = [n] (in w and out),
    or (h None) one linear contracting k into the two output labels ns of the weight (the products'
    ``bsl,hcl->bshc``: W flattened to (h·c, l))."""
    if "." in eq or "->" not in eq:
        return None
    ins, out = eq.replace(" ", "").split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    xl, wl = (parts[1], parts[0]) if w_first else parts
    if len(wl) != 3 or any(len(set(s)) != len(s) for s in (xl, wl, out)):
        return None
    h = [c for c in wl if c in xl and c in out]
    k = [c for c in wl if c in xl and c not in out]
    n = [c for c in wl if c not in xl and c in out]
    if len(k) != 1 or set(out) != (set(xl) - set(k)) | set(n):
        return None
    if len(h) == len(n) == 1 or (not h and len(n) == 2):
        return xl, wl, out, h[0] if h else None, k[0], n
    return None


def _per_head_quant(w: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q = [block_quant(w[h], ue8m0=ue8m0) for h in range(w.shape[0])]
    return torch.stack([a for a, _ in q]), torch.stack([b for _, b in q])


def _checkpoint_heads(program, target: str, chain: list[fx.Node], perm: list[int], w: torch.Tensor):
    """The checkpoint's own e4m3 bytes and scales for the per-head weight ``w`` (H, N, K) that ``chain``
    views out of a 2-D FP8 weight and ``perm`` lays out, when each head's rows are whole 128-row
    blocks of it (W_kv_b at DeepSeek's sizes: 128 + 128 rows a head) and they dequantise to ``w``."""
    own = program.fp8_source.get(module_path(target) + ".weight")
    if own is None or not chain or chain[0].target is not aten.view.default or len(chain) > 2:
        return None
    wq, s = own
    shape = list(chain[0].args[1])
    if len(shape) != 3 or tuple(wq.shape) != (shape[0] * shape[1], shape[2]):
        return None
    H, S, C = shape
    off, end = 0, S
    if len(chain) == 2:
        sl = chain[1]
        if sl.target is not aten.slice.Tensor or sl.args[1] != 1 or (len(sl.args) > 4 and sl.args[4] != 1):
            return None
        off, end = sl.args[2] or 0, min(sl.args[3], S)
    if S % BLOCK or off % BLOCK or end % BLOCK:
        return None
    q = wq.view(H, S, C)[:, off:end].permute(perm).contiguous()
    sc = s.float().view(H, S // BLOCK, -1)[:, off // BLOCK : end // BLOCK].permute(perm).contiguous()
    if tuple(q.shape) != tuple(w.shape) or not all(torch.equal(block_dequant(q[h], sc[h]), w[h]) for h in range(H)):
        return None
    return q, sc


def _fp8_linear(g: fx.Graph, n: fx.Node, wq: fx.Node, ws: fx.Node, w8a8: bool, ue8m0: bool) -> fx.Node:
    return _fp8_call(g, n.args[0], n.args[2] if len(n.args) > 2 else None, wq, ws, w8a8, ue8m0)


def _fp8_call(g: fx.Graph, x: fx.Node, bias, wq: fx.Node, ws: fx.Node, w8a8: bool, ue8m0: bool) -> fx.Node:
    if w8a8:
        aq = tag(g.call_function(dsc_ops.act_quant.default, (x, 128, ue8m0)), NAME)
        xq, xs = (g.call_function(operator.getitem, (aq, i)) for i in (0, 1))
    else:
        xq, xs = x, None
    return tag(g.call_function(dsc_ops.fp8_linear.default, (xq, xs, wq, ws, bias)), NAME)


def absorbed_site(ep, n: fx.Node) -> dict | None:
    """An einsum that is a matmul per head against a constant weight read through views (absorbed
    MLA's ``bshd,hdc->bshc`` with W_UK, ``bshc,hvc->bshv`` with W_UV, or the products' W_UQ·W_UK),
    however its labels are named and ordered: what ``_lower_absorbed`` needs."""
    eq, ops = n.args[0], n.args[1]
    for wi in (1, 0):
        got = _through_views(ep, ops[wi])
        if got is None:
            continue
        roles = _per_head_roles(eq, w_first=wi == 0)
        if roles is None:  # a constant weight, but not a matmul per head: in the record as kept
            return {"target": got[0], "key": f"{module_path(got[0])} ({eq})", "w": got[1], "unsupported": True}
        target, t, chain = got
        xl, wl, out, h, k, ns = roles
        w = _evaluate(t.detach().float(), chain)
        if w.ndim != 3:
            continue
        perm = [wl.index(c) for c in ([h] if h else []) + ns + [k]]
        laid = w.permute(perm).contiguous()
        key = f"{module_path(target)} ({eq})"
        return {"target": target, "chain": chain, "perm": perm, "w": laid if h else laid.flatten(0, 1), "w_einsum": w,
                "sizes": list(laid.shape[:2]), "x": ops[1 - wi], "w_first": wi == 0, "roles": roles, "key": key,
                "eq": eq}  # fmt: skip
    return None


def _lower_absorbed(ep, n: fx.Node, site: dict, name: str, fp8: tuple, inputs: dict, w8a8: bool, ue8m0: bool):
    """einsum(x, W) -> fp8_linear per head: x laid out (..., h, k), W as (h, n, k) e4m3 (``fp8``: its
    bytes and scales, ``name``: what they go by), the result laid out as the einsum's output; without
    a head label, one fp8_linear on W as (n1·n2, k), its output unflattened."""
    if name not in inputs:
        inputs[name] = (
            add_constant_input(ep, f"{name}_fp8", fp8[0]),
            add_constant_input(ep, f"{name}_fp8_scale", fp8[1]),
        )
    xl, _, out, h, k, ns = site["roles"]
    lead = [h] if h else []
    g = ep.graph
    with g.inserting_before(n):
        others = [c for c in xl if c not in (*lead, k)]
        order = others + lead + [k]
        x = site["x"]
        if list(xl) != order:
            x = tag(g.call_function(aten.permute.default, (x, [xl.index(c) for c in order])), NAME)
        y = _fp8_call(g, x, None, *inputs[name], w8a8, ue8m0)
        if not h:  # one linear into the weight's two output labels
            y = tag(g.call_function(aten.unflatten.int, (y, -1, site["sizes"])), NAME)
        got = others + lead + ns
        if got != list(out):
            y = tag(g.call_function(aten.permute.default, (y, [got.index(c) for c in out])), NAME)
    y.meta["fp8_of"] = ("einsum", site["key"], site["eq"], site["x"], name, site["w_first"])
    n.replace_all_uses_with(y)
    g.erase_node(n)


def gathered_site(ep, n: fx.Node) -> dict | None:
    """``bmm(W[ids], v[..., None])`` with W (E, N, K) a parameter: row r of v through expert ids[r]'s
    weight, as transformers' batched experts compute each routed slot (gate_up_proj, down_proj)."""
    a, b = n.args
    if not (is_call(a, aten.index.Tensor) and len(a.args[1]) == 1 and isinstance(a.args[1][0], fx.Node)):
        return None
    if not (is_call(b, aten.unsqueeze.default) and b.args[1] in (-1, 2)):
        return None
    t = constant_of(ep, a.args[0])
    ids = a.args[1][0]
    if t is None or t.ndim != 3 or val(ids).ndim != 1 or val(b.args[0]).ndim != 2:
        return None
    spec = next(s for s in ep.graph_signature.input_specs if s.arg.name == a.args[0].name)
    return {"target": spec.target, "w": t, "ids": ids, "x": b.args[0], "key": module_path(spec.target)}


def _lower_gathered(ep, n: fx.Node, site: dict, fp8: tuple, inputs: dict, w8a8: bool, ue8m0: bool):
    name = site["target"]
    if name not in inputs:
        inputs[name] = (
            add_constant_input(ep, f"{name}_fp8", fp8[0]),
            add_constant_input(ep, f"{name}_fp8_scale", fp8[1]),
        )
    g = ep.graph
    with g.inserting_before(n):
        x = site["x"]
        if w8a8:
            aq = tag(g.call_function(dsc_ops.act_quant.default, (x, 128, ue8m0)), NAME)
            xq, xs = (g.call_function(operator.getitem, (aq, i)) for i in (0, 1))
        else:
            xq, xs = x, None
        y = tag(g.call_function(dsc_ops.fp8_linear_gathered.default, (xq, xs, site["ids"], *inputs[name])), NAME)
        y.meta["fp8_of"] = ("gathered", site["key"], x, site["ids"], name)
        out = tag(g.call_function(aten.unsqueeze.default, (y, -1)), NAME)  # the bmm's (R, N, 1)
    n.replace_all_uses_with(out)
    g.erase_node(n)


def decide(path: str, include: list[str], exclude: list[str]) -> tuple[bool, str]:
    hit = next((p for p in exclude if fnmatch.fnmatchcase(path, p)), None)
    if hit:
        return False, f"excluded by {hit!r}"
    hit = next((p for p in include if fnmatch.fnmatchcase(path, p)), None)
    if hit:
        return True, f"included by {hit!r}"
    keep = next((p for p in KEEP if fnmatch.fnmatchcase(path, p)), None)
    if keep:
        return False, f"high precision by default (spec §7.5: {keep})"
    return True, "a constant-weight matmul"


def _fp8_weight(program, target: str, w: torch.Tensor, ue8m0: bool) -> tuple[tuple, bool]:
    """(e4m3, scale) for weight ``target``: the checkpoint's own, when the Program still holds exactly
    their dequantisation (bit for bit, no requantising), else ``w`` quantised per 128x128 block."""
    own = program.fp8_source.get(module_path(target) + ".weight")
    if own is not None:
        wq, s = own
        if tuple(wq.shape) == tuple(w.shape) and torch.equal(block_dequant(wq, s), w.detach().float()):
            return (wq, s.float()), True
    return block_quant(w.detach(), ue8m0=ue8m0), False


@register_pass(
    NAME, order=40, purpose="FP8 e4m3 matmuls: 128x128 weight blocks, 1x128 activation groups",
    tolerance=TOLERANCES["fp8_w8a8"], default=False, requires=("canonicalize", "normalize"),
    after=("draft_mtp", "absorb_mla", "fuse_dsa"),  # they match the high-precision linears it replaces
    options={"mode": MODES, "scales": SCALES, "include": TEXT, "exclude": TEXT},
)  # fmt: skip
def lower_fp8(program, ctx):
    o = ctx.options
    include, exclude = _patterns(o["include"]), _patterns(o["exclude"])
    ue8m0, w8a8 = o["scales"] == "ue8m0", o["mode"] == "w8a8"
    if not w8a8:
        ctx.tolerance = TOLERANCES["fp8_w8a16"]
    quantised: dict[str, tuple] = {}  # one FP8 copy of each weight, shared by every entry
    matmuls: dict[str, dict] = {}
    used = set()
    n_reused = 0
    originals: dict[str, torch.Tensor] = {}  # state-dict name -> the high-precision weight
    absorbed: dict[str, torch.Tensor] = {}  # per-head FP8 copy -> the weight as its einsum read it
    summary = None

    def decide_one(target: str) -> tuple[bool, str]:
        path = module_path(target)
        used.update(p for p in include + exclude if fnmatch.fnmatchcase(path, p))
        return decide(path, include, exclude)

    def quantise(target: str, w: torch.Tensor) -> bool:
        """One FP8 copy of a 2-D weight, shared by every entry; True when it is the checkpoint's own."""
        nonlocal n_reused
        if target in quantised:
            return False
        _check_finite(target, w)
        quantised[target], reused = _fp8_weight(program, target, w, ue8m0)
        originals[target] = w.detach()
        if reused:
            n_reused += 1
        return reused

    heads: dict[tuple, str] = {}  # (weight, its views, layout) -> the name its FP8 copy goes by

    def quantise_heads(site: dict) -> str:
        """One FP8 copy per distinct per-head weight, shared by every entry; its name."""
        nonlocal n_reused
        sig = (site["target"], tuple((str(v.target), repr(v.args[1:])) for v in site["chain"]), tuple(site["perm"]))
        if sig not in heads:
            name = heads[sig] = f"{site['target'].removesuffix('.weight')}.heads{len(heads)}"
            w = site["w"]
            _check_finite(site["target"], w)
            own = _checkpoint_heads(program, site["target"], site["chain"], site["perm"], w) if w.ndim == 3 else None
            quantised[name] = own or (_per_head_quant(w, ue8m0) if w.ndim == 3 else block_quant(w, ue8m0=ue8m0))
            absorbed[name] = site["w_einsum"]
            if own is not None:
                n_reused += 1
                matmuls[site["key"]]["reason"] += "; the checkpoint's own FP8 bytes and scales"
        return heads[sig]

    def quantise_stacked(site: dict) -> None:
        """A stacked (E, N, K) expert weight: one FP8 copy, quantised per expert."""
        target, w = site["target"], site["w"]
        if target not in quantised:
            _check_finite(target, w)
            quantised[target] = _per_head_quant(w.detach().float(), ue8m0)
            originals[target] = w.detach()

    total = 0
    for entry, ep in program.entries.items():
        # (node, [[(target, weight)], ...]): a linear's one weight, a MoE op's three lists; or (node, site dict):
        # a gathered-experts bmm, an einsum per head
        sites = []
        for n in ep.graph.nodes:
            if is_call(n, aten.linear.default):
                got = _weight_of(ep, n)
                if got is None:
                    matmuls.setdefault(
                        f"{entry}:{n.name}", {"decision": "kept", "reason": "the weight is not a parameter"}
                    )
                    continue
                target, w = got
                lower, why = decide_one(target)
                matmuls[module_path(target)] = {
                    "shape": list(w.shape),
                    "decision": "fp8" if lower else "kept",
                    "reason": why,
                }
                if lower:
                    sites.append((n, [[got]]))
            elif is_call(n, dsc_ops.moe_experts.default):
                groups = _expert_weights(ep, n)
                path = _experts_path(ep, n)
                if groups is None:
                    matmuls.setdefault(path, {"decision": "kept", "reason": "the expert weights are not parameters"})
                    continue
                decisions = [decide_one(t) for g in groups for t, _ in g]
                lower = all(d for d, _ in decisions)
                why = decisions[0][1] if lower else next(r for d, r in decisions if not d)
                if not lower and any(d for d, _ in decisions):
                    why += "; the experts of one dsc::moe_experts are lowered together, and this pattern keeps some"
                shape = [len(groups[0]), *groups[0][0][1].shape]  # experts, F, D
                matmuls[path] = {"shape": shape, "decision": "fp8" if lower else "kept", "reason": why, "experts": True}
                if lower:
                    sites.append((n, groups))
            elif is_call(n, aten.bmm.default) and (got := gathered_site(ep, n)) is not None:
                lower, why = decide_one(got["target"])
                matmuls[got["key"]] = {"shape": list(got["w"].shape), "decision": "fp8" if lower else "kept",
                                       "reason": why + " (one weight per expert, gathered by the routing)"}  # fmt: skip
                if lower:
                    sites.append((n, got))
            elif is_call(n, aten.einsum.default) and len(n.args[1]) == 2:
                got = absorbed_site(ep, n)
                if got is None:
                    continue
                if got.get("unsupported"):
                    matmuls[got["key"]] = {"shape": list(got["w"].shape), "decision": "kept",
                                           "reason": "an einsum on a constant weight that is no matmul per head "
                                           "(not lowered yet)"}  # fmt: skip
                    continue
                lower, why = decide_one(got["target"])
                matmuls[got["key"]] = {"shape": list(got["w"].shape), "decision": "fp8" if lower else "kept",
                                       "reason": why + f" (per head: {n.args[0]})"}  # fmt: skip
                if lower:
                    sites.append((n, got))
        inputs: dict[str, tuple] = {}  # this entry's placeholders of the FP8 weights
        for n, groups in sites:
            if isinstance(groups, dict) and "ids" in groups:  # a matmul through weights gathered per row
                quantise_stacked(groups)
                _lower_gathered(ep, n, groups, quantised[groups["target"]], inputs, w8a8, ue8m0)
                total += 1
                continue
            if isinstance(groups, dict):  # a per-head product of an absorbed attention
                name = quantise_heads(groups)
                _lower_absorbed(ep, n, groups, name, quantised[name], inputs, w8a8, ue8m0)
                total += 1
                continue
            for g in groups:
                for target, w in g:
                    if quantise(target, w):
                        key = module_path(target) if n.target is aten.linear.default else _experts_path(ep, n)
                        if "checkpoint" not in matmuls[key]["reason"]:
                            matmuls[key]["reason"] += "; the checkpoint's own FP8 bytes and scales"
                    if target not in inputs:
                        wq, ws = quantised[target]
                        inputs[target] = (
                            add_constant_input(ep, f"{target}_fp8", wq),
                            add_constant_input(ep, f"{target}_fp8_scale", ws),
                        )
            g = ep.graph
            with g.inserting_before(n):
                if n.target is aten.linear.default:
                    y = _fp8_linear(g, n, *inputs[groups[0][0][0]], w8a8, ue8m0)
                    y.meta["fp8_of"] = (groups[0][0][0], n.args[0])  # the weight and the input, for matmul_sqnr
                else:
                    q = [[inputs[t][0] for t, _ in grp] for grp in groups]
                    s = [[inputs[t][1] for t, _ in grp] for grp in groups]
                    y = tag(g.call_function(dsc_ops.moe_experts_fp8.default, (*n.args[:3], *q, *s, w8a8, ue8m0)), NAME)
                    y.meta["fp8_of"] = ([[t for t, _ in grp] for grp in groups], _experts_path(ep, n))
            n.replace_all_uses_with(y)
            g.erase_node(n)
            total += 1
        if sites:
            drop_unused_inputs(ep)
            refresh_meta(ep)
            finalize(ep)
    unused = [p for p in include + exclude if p not in used]
    if unused:
        raise DscError(
            f"lower_fp8: pattern(s) {', '.join(map(repr, unused))} match no matmul; module paths look like "
            f"{', '.join(sorted(matmuls)[:3])}"
        )
    before = sum(w.numel() * w.element_size() for w in originals.values())
    after = sum(q.numel() + 4 * s.numel() for t, (q, s) in quantised.items() if t in originals)
    if total:
        sqnr = matmul_sqnr(program, originals | absorbed)
        for path, db in sqnr.items():
            matmuls[path]["sqnr_db"] = db
        if sqnr:
            vals = sorted(sqnr.values())
            floors = {
                p: SQNR_FLOORS_DB["fp8_experts" if matmuls[p].get("experts") else "fp8_weight_dequant"] for p in sqnr
            }
            summary = {
                "matmuls": len(vals),
                "min": vals[0],
                "median": vals[len(vals) // 2],
                "worst": min(sqnr, key=sqnr.get),
                # typical block-FP8 floors on well-scaled data: a matmul below one is where FP8 hurts this model
                # most, a candidate for --fp8-exclude
                "below_floor": {p: {"sqnr_db": db, "floor_db": floors[p]} for p, db in sqnr.items() if db < floors[p]},
            }
    low = (summary or {}).get("below_floor", {})
    warnings = [f"the FP8 product of {p} keeps {v['sqnr_db']} dB of its high-precision one on the verification "
                f"inputs (typical: >= {v['floor_db']} dB); --fp8-exclude '{p.split(' (')[0]}' keeps it in high precision"
                for p, v in low.items()]  # fmt: skip
    stats = {
        "warnings": warnings,
        "mode": o["mode"], "scales": o["scales"], "matmuls": matmuls,
        "weights": {"lowered": len(originals), "from_checkpoint": n_reused, "bytes_before": before, "bytes_after": after},
        # absorb_mla's W_UK / W_UV: views of W_kv_b in high precision, FP8 copies laid out per head here
        "per_head": {"weights": len(absorbed), "bytes": sum(q.numel() + 4 * s.numel() for t, (q, s) in quantised.items() if t in absorbed)},
        "sqnr_db": summary,
    }  # fmt: skip
    return total, stats


class _Probe(fx.Interpreter):
    """Runs a lifted entry graph; at each lowered matmul, the output SQNR (dB) of the FP8 result
    against the high-precision product of the same input with the original weight."""

    def __init__(self, gm, originals, acc):
        super().__init__(gm, garbage_collect_values=False)  # (a matmul's input outlives its act_quant)
        self.originals, self.acc = originals, acc

    def run_node(self, n):
        out = super().run_node(n)
        got = n.meta.get("fp8_of")
        if got is None:
            return out
        if got[0] == "gathered":
            _, key, x, ids, name = got
            w = self.originals[name].float()[self.env[ids]]
            ref = torch.bmm(w, self.env[x].float().unsqueeze(-1)).squeeze(-1)
        elif got[0] == "einsum":
            _, key, eq, x, name, w_first = got
            xw = (self.env[x].float(), self.originals[name])
            ref = torch.einsum(eq, *(xw[::-1] if w_first else xw))
        elif n.target is dsc_ops.fp8_linear.default:
            target, x = got
            bias = self.env[n.args[4]] if isinstance(n.args[4], fx.Node) else None
            ref = torch.nn.functional.linear(self.env[x].float(), self.originals[target].float(), bias)
            key = module_path(target)
        elif n.target is dsc_ops.moe_experts_fp8.default:
            groups, key = got
            x, idx, wts = (self.env[a] for a in n.args[:3])
            ref = dsc_ops.moe_experts(x, idx, wts, *[[self.originals[t] for t in g] for g in groups])
        else:
            return out
        sig, noise = self.acc.setdefault(key, [0.0, 0.0])
        self.acc[key] = [sig + ref.double().pow(2).sum().item(), noise + (out - ref).double().pow(2).sum().item()]
        return out


class _ProbedProgram:
    """A Program whose entries run through ``_Probe`` (what ``run_scenario`` needs of a Program)."""

    def __init__(self, program, originals, acc):
        self.p, self.originals, self.acc = program, originals, acc
        self.cache, self.config, self.entries = program.cache, program.config, program.entries

    def _call(self, entry, *user):
        ep = self.p.entries[entry]
        flat, it = [], iter(torch.utils._pytree.tree_leaves(user))
        for spec in ep.graph_signature.input_specs:
            if spec.kind.name == "USER_INPUT":
                flat.append(next(it))
            else:  # parameters, buffers (non-persistent ones live with the constants), constants
                flat.append(ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target])
        outs = _Probe(ep.graph_module, self.originals, self.acc).run(*flat)
        kinds = [s.kind.name for s in ep.graph_signature.output_specs]
        user_outs = [o for o, k in zip(outs, kinds) if k == "USER_OUTPUT"]
        return user_outs[0] if len(user_outs) == 1 else tuple(user_outs)

    def prefill(self, tokens, caches):
        return logits_hidden(self._call("prefill", tokens, caches))

    def decode(self, tokens, positions, caches):
        return logits_hidden(self._call("decode", tokens, positions, caches))

    def mtp(self, hidden, tokens, positions, caches):
        return self._call("mtp", hidden, tokens, positions, caches)

    def draft(self, hidden, tokens, positions, caches):
        return logits_hidden(self._call("draft", hidden, tokens, positions, caches))

    def verify(self, tokens, positions, caches):
        return logits_hidden(self._call("verify", tokens, positions, caches))


def matmul_sqnr(program, originals: dict[str, torch.Tensor], seed: int = 0) -> dict[str, float]:
    """Per lowered matmul (module path; a MoE's experts together): output SQNR in dB over the verification inputs (one
    prefill, decode steps, S > 1 extends), each FP8 product against the original weight's."""
    if program.config is None or not {"prefill", "decode"} <= set(program.entries):
        return {}
    acc: dict[str, list] = {}
    run_scenario(_ProbedProgram(program, originals, acc), make_scenario(program.config, seed))
    return {path: round(10 * math.log10(s / n), 2) if n > 0 else float("inf") for path, (s, n) in acc.items()}
