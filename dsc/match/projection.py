"""Constant-weight projections and their per-head views.

A per-head projection y[.., h, d] = Σ_c x[.., c] · W[h·stride + offset + d, c] of a constant 2-D
weight W, spelled as
- ``view(linear(x, W), (.., .., H, stride))`` (or ``matmul(x, Wᵀ)``), possibly permuted, and then
  possibly one part of a split / chunk along the per-head features;
- ``einsum(.., x, W.view(H, stride, C)[:, offset:offset + size])``: a contraction against a view or
  slice of the weight.
``WeightRows`` names those rows so that a pass can rebuild them as views of W in the graph (no new
parameters) or read their values.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from dsc.fx_utils import constant_of, is_call, val
from dsc.match.contraction import contraction
from dsc.match.ops import RESHAPES, SPLITS, peel, perm_of, slice_bounds, strip

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightRows:
    """Rows h·stride + offset .. + size of each head h of the constant weight ``weight`` (H·stride, C)."""

    weight: fx.Node
    heads: int
    stride: int
    offset: int
    size: int

    def tensor(self, ep) -> torch.Tensor:
        """(H, size, C) in fp32."""
        w = constant_of(ep, self.weight).float()
        return w.view(self.heads, self.stride, -1)[:, self.offset : self.offset + self.size]

    def build(self, g: fx.Graph, tag) -> fx.Node:
        """(H, size, C) as views of the weight, inserted at g's insertion point."""
        C = int(val(self.weight).shape[1])
        n = tag(g.call_function(aten.view.default, (self.weight, [self.heads, self.stride, C])))
        if (self.offset, self.size) != (0, self.stride):
            n = tag(g.call_function(aten.slice.Tensor, (n, 1, self.offset, self.offset + self.size)))
        return n


@dataclass
class HeadProj:
    """n == permute(y, perm) with y (.., .., H, size) the projection of ``x`` through ``rows``:
    n.dim i == y.dim perm[i]."""

    x: fx.Node
    rows: WeightRows
    perm: list[int]
    split: fx.Node | None = None  # the split whose part this is, if any
    part: int | None = None


def projection(n):
    """(x, W) for y = x Wᵀ spelled linear(x, W) or matmul(x, W.t() / W.permute(1, 0) / W.transpose(0, 1))."""
    if is_call(n, aten.linear.default) and (len(n.args) < 3 or n.args[2] is None):
        return n.args[0], n.args[1]
    if is_call(n, aten.matmul.default) and val(n.args[1]).ndim == 2:
        wt = n.args[1]
        if perm_of(wt) == [1, 0]:
            return n.args[0], wt.args[0]
    return None


def _constant_2d(ep, w) -> bool:
    t = constant_of(ep, w) if ep is not None else None
    return t is not None and t.ndim == 2


def head_projection(ep, n) -> HeadProj | None:
    """n as a per-head projection of a constant weight, whole (not split)."""
    view, perm, _ = peel(n)
    if is_call(view, *RESHAPES, aten.unflatten.int) and val(view).ndim == 4:
        proj = projection(view.args[0])
        if proj is None or len(view.args[0].users) != 1 or not _constant_2d(ep, proj[1]):
            return None
        H, width = int(val(view).shape[2]), int(val(view).shape[3])
        if int(val(proj[1]).shape[0]) != H * width:
            return None
        return HeadProj(proj[0], WeightRows(proj[1], H, width, 0, width), perm)
    return _einsum_projection(ep, n)


def _weight_expr(ep, w) -> tuple[WeightRows, list[int]] | None:
    """w = [permute](slice(view(W, (H, stride, C)), 1, a, b)) of a constant W: (rows, perm of w's dims
    over (h, d, c))."""
    base, perm, _ = peel(w)
    sl = None
    if is_call(base, aten.slice.Tensor) and base.args[1] % 3 == 1:
        sl, base = base, base.args[0]
    if not (is_call(base, *RESHAPES, aten.unflatten.int) and val(base).ndim == 3 and _constant_2d(ep, base.args[0])):
        return None
    H, stride, C = (int(s) for s in val(base).shape)
    if tuple(val(base.args[0]).shape) != (H * stride, C):
        return None
    a, b = 0, stride
    if sl is not None:
        a, b, step = slice_bounds(sl, stride)
        if not (isinstance(a, int) and isinstance(b, int)) or step != 1:
            return None
    return WeightRows(base.args[0], H, stride, a, b - a), perm


def _einsum_projection(ep, n) -> HeadProj | None:
    if not is_call(n, aten.einsum.default):
        return None
    con = contraction(n)
    if con is None or len(con.out) != 4:
        return None
    got = _weight_expr(ep, n.args[1][1])
    if got is None:
        return None
    rows, perm = got
    lx, lw = con.letters[0], _over_hdc(n, perm)
    if len(lx) != 3 or len(con.contracted) != 1 or lx[-1] != lw[2] or lw[2] not in con.contracted:
        return None
    canonical = lx[:2] + lw[:2]  # (b, t, h, d)
    if sorted(canonical) != sorted(con.out):
        return None
    return HeadProj(con.ops[0], rows, [canonical.index(ch) for ch in con.out])


def _over_hdc(n, perm: list[int]) -> str:
    """The einsum letters of operand 1, reordered over the weight expression's (h, d, c) dims."""
    lw = n.args[0].replace(" ", "").split("->")[0].split(",")[1]
    out = [""] * 3
    for i, p in enumerate(perm):
        out[p] = lw[i]
    return "".join(out)


def split_part(ep, n) -> HeadProj | None:
    """n as part 0 or 1 of a two-way split, along the per-head features, of a per-head projection."""
    n = strip(n)
    if not (is_call(n, operator.getitem) and is_call(n.args[0], *SPLITS)):
        return None
    split, part = n.args[0], n.args[1]
    whole = head_projection(ep, split.args[0])
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if whole is None or whole.perm[dim % 4] != 3:
        return None
    width = whole.rows.size
    if split.target is aten.split_with_sizes.default:
        sizes = list(split.args[1])
    elif split.target is aten.chunk.default and split.args[1] == 2 and width % 2 == 0:
        sizes = [width // 2, width // 2]
    elif split.target is aten.split.Tensor and isinstance(split.args[1], int) and 2 * split.args[1] == width:
        sizes = [split.args[1]] * 2
    else:
        return None
    if len(sizes) != 2 or sum(sizes) != width or part not in (0, 1):
        return None
    r = whole.rows
    rows = WeightRows(r.weight, r.heads, r.stride, r.offset + (0 if part == 0 else int(sizes[0])), int(sizes[part]))
    return HeadProj(whole.x, rows, whole.perm, split, part)


def slice_part(ep, n) -> HeadProj | None:
    """n as a slice ``y[..., a:b]`` of the per-head features of a per-head projection."""
    n = strip(n)
    if not is_call(n, aten.slice.Tensor) or len(n.args) < 3:
        return None
    whole = head_projection(ep, n.args[0])
    if whole is None or whole.perm[n.args[1] % 4] != 3:
        return None
    r = whole.rows
    a, b, step = slice_bounds(n, r.size)
    if not (isinstance(a, int) and isinstance(b, int)) or step != 1 or not 0 <= a < b:
        return None
    return HeadProj(whole.x, WeightRows(r.weight, r.heads, r.stride, r.offset + a, b - a), whole.perm)


def per_head(ep, n) -> HeadProj | None:
    """A split part, a feature slice or a whole per-head projection."""
    return split_part(ep, n) or slice_part(ep, n) or head_projection(ep, strip(n))


def shared_key(n, hpos: int) -> tuple[fx.Node, int | None] | None:
    """(k, squeeze_dim) when n broadcasts one key over the heads at dim hpos:
    expand(unsqueeze(k, hpos)) -> (k, None), expand(k with size 1 at hpos) -> (k, hpos)."""
    n = strip(n)
    if not is_call(n, aten.expand.default, aten.expand_as.default):
        return None
    x = n.args[0]
    shape = val(x).shape
    if len(shape) != 4 or str(shape[hpos]) != "1":
        return None
    if is_call(x, aten.unsqueeze.default) and x.args[1] % 4 == hpos:
        return x.args[0], None
    return x, hpos
