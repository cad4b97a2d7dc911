"""Cache writes and reads in their normal form.

After ``normalize`` every write of new positions into a cache input is ``index_put_(cache, indices,
value)`` with ``indices`` either ``(rows, positions)`` (batch and time, the reference model's form)
or ``[None] * d + [positions]`` (``index_copy_`` along dim d, the same positions for every row), and
every later reader of the cache reads the write's output. ``CacheWrite`` tells where the time dim is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from dsc.fx_utils import is_call, val

aten = torch.ops.aten


@dataclass
class CacheWrite:
    node: fx.Node  # the index_put_
    cache: fx.Node  # the cache input it writes
    indices: list
    value: fx.Node
    time_dim: int

    @property
    def per_row(self) -> bool:
        """Positions given per (row, token), not one list for every row."""
        return self.time_dim == 1 and self.indices[0] is not None


def cache_write(n) -> CacheWrite | None:
    """n = index_put_(cache input, indices, value) in the normal form, else None."""
    if not (is_call(n, aten.index_put_.default) and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"):
        return None
    if len(n.args) > 3 and n.args[3]:  # accumulate
        return None
    idx = list(n.args[1])
    if len(idx) == 2 and all(isinstance(i, fx.Node) for i in idx):
        return CacheWrite(n, n.args[0], idx, n.args[2], 1)
    if idx and isinstance(idx[-1], fx.Node) and all(i is None for i in idx[:-1]) and val(idx[-1]).ndim == 1:
        return CacheWrite(n, n.args[0], idx, n.args[2], len(idx) - 1)
    return None


def other_readers(cache: fx.Node, write: fx.Node) -> list[fx.Node]:
    """Readers of ``cache`` besides ``write`` and reads of its batch / time sizes."""
    return [u for u in cache.users if u is not write and not is_call(u, aten.sym_size.int)]
