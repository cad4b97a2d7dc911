"""A two-operand contraction read as einsum letters, whatever its spelling.

einsum, or matmul / bmm of two tensors of the same rank >= 3; the operands' casts, transposes and
permutes are peeled and folded into the letters, so ``matmul(q, k.transpose(2, 3))`` and
``einsum('bhsd,bhtd->bhst', q, k)`` read the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from dsc.fx_utils import is_call, val
from dsc.match.ops import peel

aten = torch.ops.aten


@dataclass
class Contraction:
    """Operands with casts and permutes peeled (their letters follow the peeled tensors' dims)."""

    node: fx.Node | None
    ops: tuple
    letters: tuple[str, ...]
    out: str
    chains: tuple[list, ...]

    @property
    def contracted(self) -> set[str]:
        return set(self.letters[0]) & set(self.letters[1]) - set(self.out)


def peeled(xs, ins):
    """(bases, letters, chains) of operands xs written with letters ins, after peeling each."""
    ops, letters, chains = [], [], []
    for x, lx in zip(xs, ins):
        if not isinstance(x, fx.Node) or val(x) is None or len(lx) != val(x).ndim:
            return None
        base, perm, chain = peel(x)
        lb = [""] * len(lx)
        for i, p in enumerate(perm):
            lb[p] = lx[i]
        ops.append(base)
        letters.append("".join(lb))
        chains.append(chain)
    return tuple(ops), tuple(letters), tuple(chains)


def contraction(n) -> Contraction | None:
    """einsum('xy,yz->..'), or matmul / bmm of two tensors of the same rank >= 3, as letters."""
    if is_call(n, aten.einsum.default):
        eq = n.args[0].replace(" ", "")
        if "->" not in eq or "." in eq:
            return None
        ins, out = eq.split("->")
        ins, xs = ins.split(","), n.args[1]
        if len(ins) != 2 or len(xs) != 2:
            return None
    elif is_call(n, aten.matmul.default, aten.bmm.default):
        nd = val(n.args[0]).ndim
        if nd < 3 or val(n.args[1]).ndim != nd:
            return None
        batch = "pqruw"[: nd - 2]
        ins, out, xs = [batch + "ik", batch + "kj"], batch + "ij", n.args[:2]
    else:
        return None
    got = peeled(xs, ins)
    return None if got is None else Contraction(n, *got[:2], out, got[2])
