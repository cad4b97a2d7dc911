"""The KV cache as part of a compiled program's interface: ``CacheTensor`` (one tensor: shape
(batch, max_len, *tail), dtype, meaning, layer) and ``CacheSpec`` (all of them, in the order every
entry point takes them). The reference model describes its caches with the same type, and a pass
that changes the layout changes the spec through ``replace`` / ``remove`` / ``add`` together with
the entries' cache inputs (``retype_cache_input`` / ``drop_cache_input``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, fx

from dsc.fx_utils import drop_user_inputs, is_call

aten = torch.ops.aten


@dataclass
class CacheTensor:
    """One cache tensor: shape (batch, max_len, *tail), its dtype and what it holds."""

    name: str
    tail: list[int]
    dtype: str
    meaning: str
    layer: int

    @property
    def values_per_token(self) -> int:
        return math.prod(self.tail)

    @property
    def bytes_per_token(self) -> int:
        return self.values_per_token * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass
class CacheSpec:
    tensors: list[CacheTensor]

    def allocate(self, batch: int, max_len: int, device=None) -> list[Tensor]:
        return [
            torch.zeros(batch, max_len, *t.tail, dtype=getattr(torch, t.dtype), device=device) for t in self.tensors
        ]

    def bytes_per_token(self, layers: set[int] | None = None) -> int:
        return sum(t.bytes_per_token for t in self.tensors if layers is None or t.layer in layers)

    def to_dict(self) -> list[dict]:
        return [asdict(t) for t in self.tensors]

    @classmethod
    def from_dict(cls, d: list[dict]) -> CacheSpec:
        return cls([CacheTensor(**t) for t in d])

    def replace(self, index: int, tensor: CacheTensor) -> None:
        self.tensors[index] = tensor

    def remove(self, index: int) -> None:
        del self.tensors[index]

    def add(self, tensor: CacheTensor, at: int | None = None) -> None:
        self.tensors.insert(len(self.tensors) if at is None else at, tensor)


def cache_inputs(ep) -> list[fx.Node]:
    """The entry's user inputs; the cache list closes each signature, so cache i is ``[i - n]``."""
    phs = [n for n in ep.graph.nodes if n.op == "placeholder"]
    return [n for n, s in zip(phs, ep.graph_signature.input_specs) if s.kind.name == "USER_INPUT"]


def retype_cache_input(ep, ph: fx.Node, tail: list[int], time_dim: int = 1, dtype=None) -> None:
    """Cache input ``ph`` becomes (batch, T, *tail): its fake value, and every read of its sizes
    (batch stays dim 0, the time dim moves from ``time_dim`` to 1). Other readers are the pass's."""
    old = ph.meta["val"]
    with old.fake_mode:
        ph.meta["val"] = torch.empty((old.shape[0], old.shape[time_dim], *tail), dtype=dtype or old.dtype)
    for u in list(ph.users):
        if is_call(u, aten.sym_size.int):
            assert u.args[1] in (0, time_dim), f"{u.name} reads dim {u.args[1]} of {ph.name}, which changes"
            u.args = (ph, 0 if u.args[1] == 0 else 1)


def drop_cache_input(ep, ph: fx.Node, sizes_from: fx.Node, time_dim: int = 1) -> None:
    """Remove cache input ``ph``: its remaining size reads read ``sizes_from`` (same batch and T)."""
    for u in list(ph.users):
        assert is_call(u, aten.sym_size.int) and u.args[1] in (0, time_dim), f"{u.name} still reads {ph.name}"
        u.args = (sizes_from, 0 if u.args[1] == 0 else 1)
    drop_user_inputs(ep, [ph.name])
