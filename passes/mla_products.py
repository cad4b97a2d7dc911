"""absorb_mla's ``products`` form: W_UQ·W_UK and W_UV·W_O precomputed.

    q_abs = (c_q W_UQ_nopeᵀ) W_UK = c_q (W_UQ_nope W_UK)ᵀ ,   out = W_O (W_UV o_lat) = (W_O W_UV) o_lat

which saves one matmul on each side of the attention but stores the products, larger than the
factors at DeepSeek's shapes (3.6x at full size; ``param_bytes`` reports it). The matcher finds the
q projection (part 0 of a per-head split of a constant projection of c_q) and the output projection
(``linear`` of the flattened heads) around an absorbed site.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx

from dsc.fx_utils import constant_of, is_call, val
from dsc.match.ops import COPIES, perm_of
from dsc.match.projection import split_part

if TYPE_CHECKING:
    from dsc.passes.absorb_mla import Site

aten = torch.ops.aten


@dataclass
class Products:
    """The projections around a site that precomputed products replace: q_nope = part 0 of
    linear(c_q, W_q) per head, and o_proj = linear(flatten(P·V over heads), W_o[, bias])."""

    cq: fx.Node
    w_q: fx.Node
    q_pe_part: fx.Node  # part 1 of the same split: the rope rows, kept as their own projection
    q_perm: list[int]
    dr: int
    out_linear: fx.Node


def match_products(ep, site: Site) -> Products | None:
    qd = split_part(ep, site.q_nope)
    if qd is None or qd.part != 0 or len(site.q_nope.users) != 1:
        return None
    r = qd.rows
    if r.heads != site.dec.heads or r.size != site.dec.dn or r.offset != 0:
        return None
    pe = [u for u in qd.split.users if is_call(u, operator.getitem) and u.args[1] == 1]
    if len(pe) != 1:
        return None
    # o -> [permute to (b, s, h, v)] -> reshape (B, S, H * dv) -> linear(., W_o[, bias])
    n, roles = site.out, site.out_roles
    while len(n.users) == 1:
        u = next(iter(n.users))
        p = perm_of(u)
        if p is not None:
            roles = "".join(roles[i] for i in p)
        elif not is_call(u, *COPIES):
            break
        n = u
    if len(n.users) != 1 or roles != "bshv":
        return None
    flat = next(iter(n.users))
    if not is_call(flat, aten.view.default, aten.reshape.default, aten.flatten.using_ints) or val(flat).ndim != 3:
        return None
    if len(flat.users) != 1:
        return None
    lin = next(iter(flat.users))
    if not is_call(lin, aten.linear.default) or lin.args[0] is not flat or constant_of(ep, lin.args[1]) is None:
        return None
    return Products(qd.x, r.weight, pe[0], qd.perm, r.stride - r.size, lin)


def param_name(ep, node: fx.Node) -> str:
    return ep.graph_signature.inputs_to_parameters.get(node.name) or ep.graph_signature.inputs_to_buffers.get(
        node.name, node.name
    )


@torch.no_grad()
def product_weights(ep, site: Site, pr: Products) -> dict[str, torch.Tensor]:
    """W_UQ·W_UK (H, dc, q_lora), the rope rows of W_UQ (H·dr, q_lora) and W_UV·W_O (d, H·dc),
    computed once in fp32 from the original weights, stored in their dtype."""
    d = site.dec
    w_uk, w_uv = d.k.tensor(ep), d.v.tensor(ep)
    w_q, w_o = constant_of(ep, pr.w_q), constant_of(ep, pr.out_linear.args[1])
    ql = w_q.shape[1]
    q = w_q.float().view(d.heads, d.dn + pr.dr, ql)
    o = w_o.float().view(w_o.shape[0], d.heads, d.dv)
    return {
        "uq_uk": torch.einsum("hnc,hnl->hcl", w_uk, q[:, : d.dn]).to(w_q.dtype).contiguous(),
        "q_rope": q[:, d.dn :].reshape(d.heads * pr.dr, ql).to(w_q.dtype).contiguous(),
        "uv_o": torch.einsum("ehv,hvc->ehc", o, w_uv).reshape(w_o.shape[0], -1).to(w_o.dtype).contiguous(),
    }


def param_bytes(ep, site: Site, pr: Products) -> tuple[int, int]:
    """Bytes of the weights the products replace (W_UQ's nope rows, W_UK, W_UV, W_O) and of the products."""
    d = site.dec
    w_kvb, w_q, w_o = (constant_of(ep, n) for n in (d.k.weight, pr.w_q, pr.out_linear.args[1]))
    ql, dc, e = w_q.shape[1], w_kvb.shape[1], w_o.shape[0]
    factored = d.heads * (d.dn * ql * w_q.element_size() + (d.dn + d.dv) * dc * w_kvb.element_size())
    factored += w_o.numel() * w_o.element_size()
    return factored, d.heads * dc * (ql * w_q.element_size() + e * w_o.element_size())
