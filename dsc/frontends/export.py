"""torch.export of a model's entry points into a Program, whatever the frontend.

The model is any object with the entry-point protocol — ``prefill(tokens, caches)``,
``decode(tokens, positions, caches)`` and, optionally, ``mtp(hidden, tokens, positions, caches)`` —
and the CacheSpec says what ``caches`` holds. Thin wrapper modules keep one attribute name for the
model, so every exported program names its weights identically (``m.model.layers.0...``) and the
entries share one weight store. Batch, sequence and context are dynamic.
"""

from __future__ import annotations

import torch
from torch.export import Dim

from dsc.cache import CacheSpec
from dsc.program import Program


class _Prefill(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, tokens, caches):
        return self.m.prefill(tokens, caches)


class _Decode(_Prefill):
    def forward(self, tokens, positions, caches):
        return self.m.decode(tokens, positions, caches)


class _Mtp(_Prefill):
    def forward(self, hidden, tokens, positions, caches):
        return self.m.mtp(hidden, tokens, positions, caches)


def export_entries(
    model,
    spec: CacheSpec,
    config,
    provenance: dict,
    max_len: int,
    max_batch: int = 256,
    tied_prefill: bool = True,
    strict: bool = False,
) -> Program:
    """``tied_prefill``: the prefill's cache view is exactly the prompt (the reference model);
    otherwise it is any length >= max(prompt, ``spec.min_len``)."""
    lo = 1 if tied_prefill and spec.min_len <= 1 else max(spec.min_len, 2)  # export refuses a free dim of min 1
    batch, seq = Dim("batch", min=1, max=max_batch), Dim("seq", min=1, max=max_len)
    new, ctx = Dim("new", min=1, max=max_len), Dim("ctx", min=lo, max=max_len)
    T0 = max(11, spec.min_len + 3)

    def cache_dims(d):
        return [{0: batch, t.time_dim: d} for t in spec.tensors]

    def positions(n):
        return torch.arange(T0 - n, T0).expand(2, n).contiguous()

    entries = {}
    with torch.no_grad():
        if tied_prefill:
            args, dims = (
                (torch.zeros(2, 8, dtype=torch.long), spec.allocate(2, 8)),
                ({0: batch, 1: seq}, cache_dims(seq)),
            )
        else:
            args, dims = (
                (torch.zeros(2, 8, dtype=torch.long), spec.allocate(2, T0)),
                ({0: batch, 1: seq}, cache_dims(ctx)),
            )
        entries["prefill"] = torch.export.export(_Prefill(model), args, dynamic_shapes=dims, strict=strict)
        entries["decode"] = torch.export.export(
            _Decode(model),
            (torch.zeros(2, 3, dtype=torch.long), positions(3), spec.allocate(2, T0)),
            dynamic_shapes=({0: batch, 1: new}, {0: batch, 1: new}, cache_dims(ctx)),
            strict=strict,
        )
        if hasattr(model, "mtp") and getattr(config, "num_nextn_predict_layers", 0):
            entries["mtp"] = torch.export.export(
                _Mtp(model),
                (
                    torch.zeros(2, 3, config.hidden_size),
                    torch.zeros(2, 3, dtype=torch.long),
                    positions(3),
                    spec.allocate(2, T0),
                ),
                dynamic_shapes=({0: batch, 1: new}, {0: batch, 1: new}, {0: batch, 1: new}, cache_dims(ctx)),
                strict=strict,
            )
    for ep in entries.values():
        ep.example_inputs = None  # never saved; keeps Programs light
    return Program(entries, spec, config, {"passes": [], **provenance})
