"""The output head and the multi-token-prediction block, found by their computation (spec §8.1).

- ``output_head(ep)``: the entry's first output is logits = x·Wᵀ of a constant (V, D) weight, with x
  an RMSNorm's output: x is the final (post-norm) hidden state the MTP module takes.
- ``mtp_block(ep)``: ``cat([RMSNorm(E[t]), RMSNorm(h)], -1)`` (either order) of an embedding lookup of
  the entry's integer input and of its float (B, S, D) input h, projected by a constant (D, 2D)
  weight (``eh_proj``), then at least one attention, then ``output_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.export.graph_signature import OutputKind

from dsc.fx_utils import constant_of, is_call, val
from dsc.match import attention
from dsc.match.norm import RmsNorm, rms_norm
from dsc.match.ops import same_size, strip
from dsc.match.projection import projection

aten = torch.ops.aten


@dataclass
class Head:
    logits: fx.Node  # the output
    hidden: fx.Node  # the head's input: the final norm's output
    weight: fx.Node
    norm: RmsNorm


@dataclass
class MtpBlock:
    hidden_input: fx.Node  # the main model's final hidden state h_i (an entry input)
    tokens: fx.Node  # t_{i+1} (an entry input)
    embed_weight: fx.Node
    embed_first: bool  # [enorm(E[t]) ; hnorm(h)], the checkpoint's order (spec §8.1); else the paper's
    eh_proj: fx.Node
    head: Head
    attention_sites: int


def user_outputs(ep) -> list[fx.Node]:
    out = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
    values = torch.utils._pytree.tree_leaves(out.args[0])
    return [v for v, s in zip(values, ep.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT]


def _user_inputs(ep) -> list[fx.Node]:
    phs = [n for n in ep.graph.nodes if n.op == "placeholder"]
    return [n for n, s in zip(phs, ep.graph_signature.input_specs) if s.kind.name == "USER_INPUT"]


def _constant_2d(ep, w) -> torch.Tensor | None:
    t = constant_of(ep, w)
    return t if t is not None and t.ndim == 2 else None


def output_head(ep) -> Head | None:
    outs = user_outputs(ep)
    if not outs or not isinstance(outs[0], fx.Node):
        return None
    logits = strip(outs[0])
    proj = projection(logits)
    if proj is None or _constant_2d(ep, proj[1]) is None:
        return None
    norm = rms_norm(proj[0]) or rms_norm(strip(proj[0]))
    if norm is None:
        return None
    return Head(outs[0], proj[0], proj[1], norm)


def lookup(ep, n) -> tuple[fx.Node, fx.Node] | None:
    """(E, idx) for an embedding lookup E[idx] of a constant 2-D table: ``embedding(E, idx)`` or ``E[idx]``."""
    n = strip(n)
    if is_call(n, aten.embedding.default):
        w, idx = n.args[:2]
    elif is_call(n, aten.index.Tensor) and len(n.args[1]) == 1 and isinstance(n.args[1][0], fx.Node):
        w, idx = n.args[0], n.args[1][0]
    else:
        return None
    if _constant_2d(ep, w) is None or val(idx) is None or val(idx).dtype.is_floating_point:
        return None
    return w, idx


def _ancestors(n: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [n]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def mtp_block(ep) -> MtpBlock | None:
    head = output_head(ep)
    if head is None:
        return None
    inputs = set(_user_inputs(ep))
    above_head = _ancestors(head.logits)
    for cat in ep.graph.nodes:
        if not is_call(cat, aten.cat.default) or cat not in above_head or len(cat.args[0]) != 2:
            continue
        dim = cat.args[1] if len(cat.args) > 1 else 0
        if dim not in (-1, val(cat).ndim - 1):
            continue
        parts = []
        for a in cat.args[0]:
            norm = rms_norm(a) or rms_norm(strip(a))
            parts.append(None if norm is None else strip(norm.x))
        if None in parts:
            continue
        looked = [lookup(ep, p) for p in parts]
        if sum(x is not None for x in looked) != 1:
            continue
        e = 0 if looked[0] is not None else 1
        table, tokens = looked[e]
        hidden = parts[1 - e]
        tokens = strip(tokens)
        if tokens not in inputs or hidden not in inputs or val(hidden).ndim != 3:
            continue
        if not all(same_size(a, b) for a, b in zip(val(hidden).shape[:2], val(tokens).shape[:2])):
            continue
        users = [u for u in cat.users if projection(u) is not None]
        if len(users) != 1 or _constant_2d(ep, projection(users[0])[1]) is None:
            continue
        eh = users[0]
        D = int(val(hidden).shape[-1])
        if tuple(val(projection(eh)[1]).shape) != (D, 2 * D):
            continue
        inside = _ancestors(head.logits) - _ancestors(eh)
        n_att = sum(1 for n in attention.sites(ep.graph) if n in inside)
        if n_att == 0:
            continue
        return MtpBlock(hidden, tokens, table, e == 0, eh, head, n_att)
    return None
