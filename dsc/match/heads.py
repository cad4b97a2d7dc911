"""Heads folded into the batch: (B·H, S, D) tensors made by reshaping (B, H, S, D) ones, as ``bmm``
attention spells them; ``unfold`` gives back the 4-D tensor, ``repeated_over_heads`` tells a mask
that is the same for every head of a batch row."""

from __future__ import annotations

import torch
from torch import fx

from dsc.fx_utils import is_call, val
from dsc.match.ops import peel, same_size

aten = torch.ops.aten


def unfold(g: fx.Graph, n, tag) -> fx.Node | None:
    """For n = [permute](reshape(x, (B·H, a, b))) of a 4-D x (B, H, ...), the same values with batch
    and heads apart: x, permuted like n (a new permute node when n was one)."""
    base, perm, _ = peel(n)
    if not is_call(base, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return None
    x = base.args[0]
    xs, bs = val(x).shape, val(base).shape
    if len(xs) != 4 or len(bs) != 3 or perm[0] != 0:
        return None
    if not (same_size(xs[0] * xs[1], bs[0]) and same_size(xs[2], bs[1]) and same_size(xs[3], bs[2])):
        return None
    if perm == [0, 1, 2]:
        return x
    return tag(g.call_function(aten.permute.default, (x, [0, 1] + [p + 1 for p in perm[1:]])))


ELEMENTWISE = (aten.bitwise_not.default, aten.logical_not.default, aten.to.dtype, aten.where.Scalar,
               aten.mul.Tensor, aten.add.Tensor, aten.where.ScalarSelf, aten.where.ScalarOther)  # fmt: skip


def repeated_over_heads(mask) -> bool:
    """A (B·H, S, T) mask made by ``repeat_interleave(m, H, 0)`` of a (B, S, T) m, through elementwise
    ops with scalars only: every head of a batch row sees the same mask."""
    n = mask
    while is_call(n, *ELEMENTWISE) and sum(isinstance(a, fx.Node) for a in n.args) == 1:
        n = next(a for a in n.args if isinstance(a, fx.Node))
    return is_call(n, aten.repeat_interleave.self_int) and len(n.args) > 2 and n.args[2] == 0 and val(n).ndim == 3
