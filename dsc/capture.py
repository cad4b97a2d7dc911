"""capture(model) -> Program: torch.export of each entry point with dynamic batch, sequence and context.

The entry wrappers are thin modules around the reference model's ``prefill`` / ``decode`` so that
both exported programs name their weights identically (``m.model.layers.0...``) and can share one
weight store.
"""

from __future__ import annotations

import logging

import torch
from torch.export import Dim

from dsc.model.model import DeepseekV32ForCausalLM, cache_layout
from dsc.program import CacheSpec, CacheTensor, Program

log = logging.getLogger(__name__)


class _Prefill(torch.nn.Module):
    def __init__(self, m: DeepseekV32ForCausalLM):
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


def cache_spec_of(model: DeepseekV32ForCausalLM) -> CacheSpec:
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    return CacheSpec([CacheTensor(e.name, list(e.tail), dtype, e.meaning, e.layer) for e in cache_layout(model.config)])


def capture(model: DeepseekV32ForCausalLM, max_batch: int = 256, source: str = "") -> Program:
    """Export ``prefill``, ``decode`` and (with an MTP module) ``mtp`` of an eval-mode reference model.

    ``mtp(hidden, tokens, positions, caches)``: the MTP module's logits for t_{i+2} from the main
    model's final hidden state h_i and the token t_{i+1}; it writes the MTP layer's caches."""
    cfg = model.config
    spec = cache_spec_of(model)
    n = len(spec.tensors)
    max_len = cfg.max_position_embeddings
    batch, seq = Dim("batch", min=1, max=max_batch), Dim("seq", min=1, max=max_len)
    new, ctx = Dim("new", min=1, max=max_len), Dim("ctx", min=1, max=max_len)
    entries = {}
    with torch.no_grad():
        caches = spec.allocate(2, 8)
        entries["prefill"] = torch.export.export(
            _Prefill(model),
            (torch.zeros(2, 8, dtype=torch.long), caches),
            dynamic_shapes=({0: batch, 1: seq}, [{0: batch, 1: seq}] * n),
        )
        caches = spec.allocate(2, 11)
        entries["decode"] = torch.export.export(
            _Decode(model),
            (torch.zeros(2, 3, dtype=torch.long), torch.tensor([[8, 9, 10]] * 2), caches),
            dynamic_shapes=({0: batch, 1: new}, {0: batch, 1: new}, [{0: batch, 1: ctx}] * n),
        )
        if cfg.num_nextn_predict_layers:
            caches = spec.allocate(2, 11)
            entries["mtp"] = torch.export.export(
                _Mtp(model),
                (
                    torch.zeros(2, 3, cfg.hidden_size),
                    torch.zeros(2, 3, dtype=torch.long),
                    torch.tensor([[8, 9, 10]] * 2),
                    caches,
                ),
                dynamic_shapes=({0: batch, 1: new}, {0: batch, 1: new}, {0: batch, 1: new}, [{0: batch, 1: ctx}] * n),
            )
    for ep in entries.values():
        ep.example_inputs = None  # never saved; keeps Programs light
    return Program(entries, spec, cfg, {"source": source, "passes": []})
