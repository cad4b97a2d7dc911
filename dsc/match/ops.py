"""Op sets and peeling: the one place that says which ops copy, cast or only re-describe memory."""

from __future__ import annotations

import torch
from torch import fx

from dsc.fx_utils import VIEW_OPS, is_call, val

aten = torch.ops.aten

# nodes that check, never compute: dropped where nothing reads them
ASSERTS = frozenset({
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default,
    aten._assert_async.msg,
})  # fmt: skip
CASTS = frozenset({aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout})
# ops whose output holds the same values as their input (a copy, a cast in fp32 graphs, an alias)
COPIES = CASTS | {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default}
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
SPLITS = frozenset({aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default})
CONTRACTIONS = (aten.einsum.default, aten.matmul.default, aten.bmm.default)
# a mask fill at or below this is minus infinity (finfo.min, -inf, -1e9 ...): exp underflows in fp32
MASK_FILL_MAX = -1e4
VIEWS = frozenset(VIEW_OPS)


def strip(n):
    """n under its copies and casts."""
    while is_call(n, *COPIES):
        n = n.args[0]
    return n


def perm_of(n) -> list[int] | None:
    """p with n.dim i == input.dim p[i], when n is a permute / transpose."""
    if is_call(n, aten.permute.default):
        return [d % len(n.args[1]) for d in n.args[1]]
    if is_call(n, aten.transpose.int, aten.t.default):
        nd = val(n).ndim
        p = list(range(nd))
        if n.target is aten.transpose.int:
            a, b = n.args[1] % nd, n.args[2] % nd
            p[a], p[b] = p[b], p[a]
        elif nd == 2:
            p = [1, 0]
        return p
    return None


def peel(n) -> tuple[fx.Node, list[int], list[fx.Node]]:
    """(base, perm, chain): n is base under casts and permutes with n.dim i == base.dim perm[i];
    chain lists the peeled nodes from n down."""
    perm, chain = list(range(val(n).ndim)), []
    while True:
        p = perm_of(n)
        if p is not None:
            perm = [p[i] for i in perm]
        elif not is_call(n, *COPIES):
            return n, perm, chain
        chain.append(n)
        n = n.args[0]


def sole_path(base: fx.Node, chain: list[fx.Node], consumer: fx.Node) -> bool:
    """Nothing but the peeled chain down from ``consumer`` reads ``base`` and the chain's nodes."""
    path = [consumer, *chain, base]
    return all(set(path[i + 1].users) == {path[i]} for i in range(len(path) - 1))


def same_value(a, b) -> bool:
    """The same node, or two nodes computing the same op of the same inputs (e.g. two equal slices)."""
    if a is b:
        return True
    return is_call(a, a.target) and is_call(b, a.target) and a.args == b.args and a.kwargs == b.kwargs


def same_size(a, b) -> bool:
    """Two sizes (ints or SymInts) equal for every value of their symbols."""
    import sympy

    ea = sympy.sympify(a.node.expr if isinstance(a, torch.SymInt) else int(a))
    eb = sympy.sympify(b.node.expr if isinstance(b, torch.SymInt) else int(b))
    return sympy.simplify(ea - eb) == 0


def squeezed_shape(shape) -> list:
    """The sizes that are not a literal 1."""
    return [s for s in shape if str(s) != "1"]


def slice_bounds(s: fx.Node, size) -> tuple:
    """(start, end, step) of ``aten.slice.Tensor`` node s over a dim of ``size``; an open end
    (torch.export writes 2**63 - 1) is the size."""
    a = s.args[2] if len(s.args) > 2 else 0
    b = s.args[3] if len(s.args) > 3 else size
    step = s.args[4] if len(s.args) > 4 else 1
    if isinstance(b, int) and isinstance(size, int):
        b = min(b, size)
    elif isinstance(b, int) and b >= 2**62:
        b = size
    return a, b, step
