"""Symbolic cost of an entry point: FLOPs and bytes moved as sympy functions of the context length.

Derived from the graph itself: every node's output shape (``meta["val"]``, whose dynamic sizes are
sympy symbols) and a per-op rule. The entry's batch / new-token / context symbols are found from
its inputs (tokens: (batch, seq); caches: (batch, ctx)) and substituted: a decode step is batch 1,
one new token, context ``T``; a prefill is batch 1, ``T`` prompt tokens.

FLOPs count multiply-adds as 2 (matmul-like ops: 2·|out|·K; einsum: 2·Π of all index sizes;
the MoE op: its activated experts only) and 1 per output element for elementwise work. Bytes moved
is the unfused estimate — every op reads its tensor inputs and writes its output, views are free,
an in-place cache write moves only the written values — so it is an upper bound that fusion and
better layouts lower, which is what a pass's effect should show.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import sympy
import torch
from torch import fx
from torch.export import ExportedProgram

import dsc.kernels  # noqa: F401  (registers the dsc:: ops this file prices)
from dsc.fx_utils import VIEW_OPS, dim_names, val
from dsc.match.attention import softmax_scores
from dsc.match.ops import CONTRACTIONS

aten = torch.ops.aten
T = sympy.Symbol("T", positive=True, integer=True)
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]

ZERO_COST = VIEW_OPS | {
    aten.sym_size.int, aten.arange.default, aten.arange.start, aten.zeros_like.default, aten.new_full.default,
    aten.ones_like.default, aten.full.default, aten.zeros.default, aten.empty.memory_format, operator.getitem,
}  # fmt: skip
# sparse attention ops -> how many query operands precede the two cached ones and the indices
SPARSE_ATTENTION = {torch.ops.dsc.sparse_mla.default: 2, torch.ops.dsc.sparse_mha.default: 1}
MATMUL_LIKE = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default}
MOE = (torch.ops.dsc.moe_experts.default, torch.ops.dsc.moe_experts_fp8.default)


def _expr(x) -> sympy.Expr:
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


def _numel(val) -> sympy.Expr:
    if not isinstance(val, torch.Tensor):
        return sympy.Integer(0)
    return sympy.Mul(*[_expr(s) for s in val.shape]) if val.ndim else sympy.Integer(1)


def _bytes(val) -> sympy.Expr:
    if isinstance(val, torch.Tensor):
        return _numel(val) * val.element_size()
    if isinstance(val, (list, tuple)):
        return sympy.Add(*[_bytes(v) for v in val])
    return sympy.Integer(0)


def _einsum_flops(eq: str, operands) -> sympy.Expr:
    lhs = eq.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, sympy.Expr] = {}
    for sub, op in zip(lhs, operands):
        for ch, dim in zip(sub, val(op).shape):
            sizes[ch] = _expr(dim)
    return 2 * sympy.Mul(*sizes.values())


def _latent_attention_flops(rows, keys, width, dv) -> sympy.Expr:
    """Query-head rows against ``keys`` shared latents: scores over ``width``, P·V over ``dv``, softmax."""
    return rows * keys * (2 * width + 2 * dv + 5)


def node_flops(n: fx.Node) -> sympy.Expr:
    t, out = n.target, val(n)
    if t in ZERO_COST or t is operator.getitem:
        return sympy.Integer(0)
    if t in MATMUL_LIKE or t in (torch.ops.dsc.fp8_linear.default, torch.ops.dsc.fp8_linear_gathered.default):
        a = val(n.args[0] if t is not aten.addmm.default else n.args[1])
        return 2 * _numel(out) * _expr(a.shape[-1])
    if t is aten.einsum.default:
        return _einsum_flops(n.args[0], n.args[1])
    if t in MOE:
        x, idx, gate_w = val(n.args[0]), val(n.args[1]), n.args[3]
        F, D = val(gate_w[0]).shape
        return 2 * 3 * _numel(idx) * int(F) * int(D) + _numel(x)
    if t is torch.ops.dsc.mla_decode.default:  # q (B, S, H, C) against T (or K selected) latents of width C
        q, kv = val(n.args[0]), val(n.args[1])
        idx = n.args[5] if len(n.args) > 5 else n.kwargs.get("indices")
        keys = _expr(val(idx).shape[-1]) if isinstance(idx, fx.Node) else _expr(kv.shape[1])
        return _latent_attention_flops(_numel(q) / _expr(q.shape[-1]), keys, _expr(q.shape[-1]), int(n.args[4]))
    if t is torch.ops.dsc.indexer_topk.default:  # Σ_h w·ReLU(q·k) over every visible key, then a selection
        q, keys = val(n.args[0]), val(n.args[2])
        B, S, H, D = (_expr(x) for x in q.shape)
        return B * S * _expr(keys.shape[1]) * (H * (2 * D + 3) + 4)
    if t is torch.ops.dsc.sparse_mla.default:  # q (B, S, H, dc + dr) against K selected latents
        q_abs, q_pe, idx = val(n.args[0]), val(n.args[1]), val(n.args[4])
        dc, dr = _expr(q_abs.shape[-1]), _expr(q_pe.shape[-1])
        return _latent_attention_flops(_numel(q_abs) / dc, _expr(idx.shape[-1]), dc + dr, dc)
    if t is torch.ops.dsc.sparse_mha.default:  # q (B, S, H, D) against K selected tokens' per-head K/V
        q, v, idx = val(n.args[0]), val(n.args[2]), val(n.args[3])
        D = _expr(q.shape[-1])
        return _latent_attention_flops(_numel(q) / D, _expr(idx.shape[-1]), D, _expr(v.shape[-1]))
    if t in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int):
        return 5 * _numel(out)
    if t in (aten.sort.stable, aten.sort.default, aten.topk.default):
        v = val(n.args[0])
        k = _expr(v.shape[-1])
        return _numel(v) * sympy.log(k, 2)
    if isinstance(out, torch.Tensor):
        return _numel(out)
    if isinstance(out, (tuple, list)):
        return sympy.Add(*[_numel(v) for v in out if isinstance(v, torch.Tensor)])
    return sympy.Integer(0)


def node_bytes(n: fx.Node, interior: frozenset = frozenset()) -> sympy.Expr:
    """Bytes n reads and writes; ``interior``: nodes a fused kernel keeps on chip (not written, not read)."""
    t = n.target
    if t in ZERO_COST:
        return sympy.Integer(0)
    if t in (aten.index_put_.default, aten.index_put.default):
        return 2 * _bytes(val(n.args[2]))  # read the values, write them into the cache
    if t in SPARSE_ATTENTION:  # only the selected tokens' cached rows are read: at most S·K of the T
        nq = SPARSE_ATTENTION[t]
        queries, cached, idx = [val(a) for a in n.args[:nq]], [val(a) for a in n.args[nq : nq + 2]], val(n.args[nq + 2])
        B, S, K, Tk = (_expr(x) for x in (*idx.shape, cached[0].shape[1]))
        row = sympy.Add(*[_bytes(c) for c in cached]) / (B * Tk)  # latent and rope, or K and V
        return sympy.Add(*[_bytes(x) for x in queries]) + _bytes(idx) + B * sympy.Min(Tk, S * K) * row + _bytes(val(n))
    inputs = [a for a in n.all_input_nodes if a not in interior and isinstance(val(a), torch.Tensor)]
    reads = sympy.Add(*[_bytes(val(a)) for a in inputs])
    if n in interior:
        return reads
    if t is torch.ops.dsc.fp8_linear_gathered.default:  # only the experts some row is routed to are read
        x, ids, w = val(n.args[0]), val(n.args[2]), val(n.args[3])
        per_expert = int(w[0].numel()) * w.element_size()
        reads = _bytes(x) + _bytes(ids) + sympy.Min(_numel(ids), int(w.shape[0])) * per_expert
    if t in MOE:  # only the routed experts' weights are read (FP8: a byte each, scales aside)
        idx = val(n.args[1])
        per_expert = sum(int(val(w[0]).numel()) * val(w[0]).element_size() for w in n.args[3:6])
        E = len(n.args[3])
        reads = _bytes(val(n.args[0])) + _bytes(idx) + _bytes(val(n.args[2])) + sympy.Min(_numel(idx), E) * per_expert
    return reads + _bytes(val(n))


def _symbols(ep: ExportedProgram) -> dict[str, sympy.Symbol]:
    return {name: sym for sym, name in dim_names(ep).items()}


@dataclass
class EntryCost:
    flops: sympy.Expr  # in T
    bytes: sympy.Expr

    def at(self, t: int) -> tuple[float, float]:
        return float(self.flops.subs(T, t)), float(self.bytes.subs(T, t))

    def curve(self, contexts=None) -> dict:
        contexts = contexts or CONTEXTS
        pts = [self.at(t) for t in contexts]
        return {"context": list(contexts), "flops": [p[0] for p in pts], "bytes": [p[1] for p in pts]}


def attention_interiors(ep: ExportedProgram) -> frozenset:
    """The nodes a fused (flash) attention kernel never writes out: for each softmax of scores
    (``softmax_scores``) read by one contraction, the scores, their scaled / masked forms and the
    probabilities."""
    inner = set()
    for sm in ep.graph.nodes:
        if not (sm.op == "call_function" and sm.target in (aten.softmax.int, aten._softmax.default)):
            continue
        if len(sm.users) != 1 or next(iter(sm.users)).target not in CONTRACTIONS:
            continue
        found = softmax_scores(sm)
        if found is not None:
            scores, _, scale = found
            inner.update(n for n in (sm, sm.args[0], scale, scores) if n is not None)
    return frozenset(inner)


def call_sizes(ep: ExportedProgram, kind: str) -> dict:
    """The sizes one call of ``kind`` is priced at, as a substitution of the entry's dynamic dims (see
    ``entry_cost``): batch 1; decode 1 new token and verify 2 at context T; prefill T tokens."""
    syms = _symbols(ep)
    subs = {syms[k]: 1 for k in ("batch",) if k in syms}
    if kind in ("decode", "verify"):
        subs.update({syms["seq"]: 1 if kind == "decode" else 2} if "seq" in syms else {})
        subs.update({syms["ctx"]: T} if "ctx" in syms else {})
    else:
        subs.update({syms[k]: T for k in ("seq", "ctx") if k in syms})
    return subs


def entry_cost(ep: ExportedProgram, kind: str, fused_attention: bool = False) -> EntryCost:
    """kind "decode": batch 1, 1 new token, context T; "verify": batch 1, 2 new tokens (one draft,
    FlashMLA's s_q = 2) at context T; kind "prefill": batch 1, T tokens.
    ``fused_attention``: count attention as a flash kernel moves it (``attention_interiors``)."""
    subs = call_sizes(ep, kind)
    flops = bytes_ = sympy.Integer(0)
    interior = attention_interiors(ep) if fused_attention else frozenset()
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        flops += node_flops(n)
        bytes_ += node_bytes(n, interior)
    return EntryCost(sympy.expand(flops.subs(subs)), sympy.expand(bytes_.subs(subs)))


def program_cost(program, context: int = 4096) -> dict:
    """Decode-step and prefill cost: formulas, values at ``context``, curves over CONTEXTS (up to the model's limit)."""
    limit = program.config.max_position_embeddings if program.config is not None else CONTEXTS[-1]
    context = min(context, limit)
    contexts = [c for c in CONTEXTS if c <= limit]
    if len(contexts) < 3:  # a short-context model: its own range, 1/8 of the limit up to the limit
        contexts = [limit // 8, limit // 4, limit // 2, limit]
    out = {"context_len": context}
    for entry, kind in (("decode", "decode"), ("prefill", "prefill")):
        if entry not in program.entries:
            continue
        c = entry_cost(program.entries[entry], kind)
        f, b = c.at(context)
        out[f"flops_per_{kind}" + ("_step" if kind == "decode" else "")] = f
        out[f"bytes_per_{kind}" + ("_step" if kind == "decode" else "")] = b
        out[f"{kind}_formula"] = {"flops": str(sympy.N(c.flops, 6)), "bytes": str(sympy.N(c.bytes, 6))}
        out[f"{kind}_curve"] = c.curve(contexts)
    # every entry's cost per call: how the work splits between main decode, draft and verify
    kinds = {"prefill": "prefill", "verify": "verify"}
    out["entry_costs"] = {}
    for entry, ep in program.entries.items():
        kind = kinds.get(entry, "decode")
        f, b = entry_cost(ep, kind).at(context)
        out["entry_costs"][entry] = {"kind": kind, "flops": f, "bytes": b}
    return out


def human(x: float, unit: str = "") -> str:
    """3 significant digits with an SI prefix: human(6.5e6, "B") == "6.5 MB"."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g} {unit}".strip()
    exp = max(min(int(math.log10(abs(x)) // 3), 5), 0)
    return f"{x / 10 ** (3 * exp):.3g} {' kMGTP'[exp].strip()}{unit}".strip()


def tokens_label(n: int) -> str:
    """Context lengths read in binary thousands: 1024 -> "1K", 131072 -> "128K"."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
