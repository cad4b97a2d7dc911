"""The KV cache as part of a compiled program's interface: ``CacheTensor`` (one tensor: batch first,
its length T at ``time_dim``, the other sizes ``tail``; dtype, meaning, layer) and ``CacheSpec``
(all of them, in the order every entry point takes them, and what every call needs of them). The
reference model describes its caches with the same type, a frontend derives them from the cache
tensors of the code it captures, and a pass that changes the layout changes the spec through
``replace`` / ``remove`` / ``add`` together with the entries' cache inputs (``retype_cache_input`` /
``drop_cache_input``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, fx

from dsc.errors import DscError
from dsc.fx_utils import drop_user_inputs, is_call

aten = torch.ops.aten


@dataclass
class CacheTensor:
    """One cache tensor: shape (batch, *tail) with the length inserted at ``time_dim`` (1: (B, T, *tail);
    transformers' (B, 1, T, D) caches have time_dim 2), its dtype and what it holds."""

    name: str
    tail: list[int]
    dtype: str
    meaning: str
    layer: int
    time_dim: int = 1

    def shape(self, batch: int, length) -> tuple:
        t = self.time_dim - 1
        return (batch, *self.tail[:t], length, *self.tail[t:])

    @property
    def values_per_token(self) -> int:
        return math.prod(self.tail)

    @property
    def bytes_per_token(self) -> int:
        return self.values_per_token * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass
class CacheSpec:
    """``min_len``: the shortest cache view the entries take (transformers' V3.2 indexer keeps
    min(index_topk, T) keys, which export fixes at index_topk); a view longer than the context is
    harmless, its extra slots are masked by position. ``shared_positions``: every row of a call
    writes at the same positions (a transformers StaticCache), so a batch must be one length."""

    tensors: list[CacheTensor]
    min_len: int = 1
    shared_positions: bool = False

    def allocate(self, batch: int, max_len: int, device=None) -> list[Tensor]:
        n = max(max_len, self.min_len)
        return [torch.zeros(t.shape(batch, n), dtype=getattr(torch, t.dtype), device=device) for t in self.tensors]

    def window(self, caches: list[Tensor], length: int) -> list[Tensor]:
        """Views of the first ``length`` positions (at least ``min_len``): what one call reads and writes."""
        n = max(length, self.min_len)
        return [c.narrow(t.time_dim, 0, n) for t, c in zip(self.tensors, caches)]

    def bytes_per_token(self, layers: set[int] | None = None) -> int:
        return sum(t.bytes_per_token for t in self.tensors if layers is None or t.layer in layers)

    def to_dict(self) -> dict:
        return {
            "tensors": [asdict(t) for t in self.tensors],
            "min_len": self.min_len,
            "shared_positions": self.shared_positions,
        }

    @classmethod
    def from_dict(cls, d: dict | list[dict]) -> CacheSpec:
        if isinstance(d, list):  # manifests before min_len / shared_positions
            d = {"tensors": d}
        return cls([CacheTensor(**t) for t in d["tensors"]], d.get("min_len", 1), d.get("shared_positions", False))

    @classmethod
    def from_description(cls, d, where: str) -> CacheSpec:
        """A user's cache description: a CacheSpec, or ``{"tensors": [...], "min_len": n,
        "shared_positions": bool}`` (or just the list), each tensor ``{"name", "shape", "dtype",
        "meaning", "layer"}`` with ``shape`` like ``["batch", "T", 576]`` (batch first, ``"T"`` the length)."""
        if isinstance(d, CacheSpec):
            return d
        if isinstance(d, list):
            d = {"tensors": d}
        if not isinstance(d, dict) or not isinstance(d.get("tensors"), list) or not d["tensors"]:
            raise DscError(
                f'{where}: a cache description is {{"tensors": [...]}} (one entry per cache tensor), got {d!r:.200}'
            )
        unknown = set(d) - {"tensors", "min_len", "shared_positions"}
        if unknown:
            raise DscError(f"{where}: unknown cache description keys {sorted(unknown)}")
        out = []
        for i, t in enumerate(d["tensors"]):
            what = f"{where}: cache tensor {i}"
            if not isinstance(t, dict):
                raise DscError(f"{what} must be an object, got {t!r:.100}")
            missing = [k for k in ("name", "shape", "dtype") if k not in t]
            extra = set(t) - {"name", "shape", "dtype", "meaning", "layer"}
            if missing or extra:
                raise DscError(f"{what} ({t.get('name', '?')}): missing keys {missing}, unknown keys {sorted(extra)}")
            shape = t["shape"]
            if not (isinstance(shape, list) and len(shape) >= 2 and shape[0] == "batch" and shape.count("T") == 1):
                raise DscError(f'{what} ({t["name"]}): shape must start with "batch" and name "T" once, got {shape!r}')
            tail = [n for n in shape[1:] if n != "T"]
            if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in tail):
                raise DscError(
                    f'{what} ({t["name"]}): sizes other than "batch" and "T" must be positive integers, got {shape!r}'
                )
            if not isinstance(getattr(torch, str(t["dtype"]), None), torch.dtype):
                raise DscError(f'{what} ({t["name"]}): unknown dtype {t["dtype"]!r} (write e.g. "float32")')
            out.append(
                CacheTensor(
                    str(t["name"]),
                    tail,
                    str(t["dtype"]),
                    str(t.get("meaning", "")),
                    int(t.get("layer", -1)),
                    shape.index("T"),
                )
            )
        min_len = d.get("min_len", 1)
        if not (isinstance(min_len, int) and min_len >= 1):
            raise DscError(f"{where}: min_len must be a positive integer, got {min_len!r}")
        return cls(out, min_len, bool(d.get("shared_positions", False)))

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
