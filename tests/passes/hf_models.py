"""Hugging Face transformers' DeepSeek-V3 / V3.2 modeling code as a compiler user brings it: tiny
random configs built here (no downloads), captured with torch.export as HF runs them — a decode step
or a prefill chunk over a ``StaticCache`` whose tensors are the entry's inputs, or a plain forward
without a cache. The wrapper only hands HF its cache tensors; HF's code is not changed."""

from __future__ import annotations

import torch
from torch.export import Dim

transformers = __import__("pytest").importorskip("transformers")

TOPK = 4


def hf_model(kind: str, attn: str, seed: int = 0, **overrides):
    """A tiny random transformers DeepSeek-V3 ("v3") or V3.2 ("v32") model; ``overrides``: config keys."""
    cls_cfg = transformers.DeepseekV32Config if kind == "v32" else transformers.DeepseekV3Config
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4, n_group=2,
        topk_group=1, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=8, first_k_dense_replace=1, max_position_embeddings=64,
    )  # fmt: skip
    if kind == "v32":
        kw.update(index_topk=TOPK, index_head_dim=16, index_n_heads=2)
    cfg = cls_cfg(**(kw | overrides))
    cfg._attn_implementation = attn
    cfg._experts_implementation = "batched_mm"  # the default loops over the experts present (data-dependent)
    torch.manual_seed(seed)
    cls = transformers.DeepseekV32ForCausalLM if kind == "v32" else transformers.DeepseekV3ForCausalLM
    return cls(cfg).eval()


class StaticStep(torch.nn.Module):
    """logits of ``ids`` at ``positions`` (the same for every row), the cache tensors of a StaticCache
    given as inputs: per layer the latent (B, 1, T, kv_lora_rank), the rope key (B, 1, T, rope) and,
    for V3.2, the indexer keys (B, T, index_head_dim)."""

    def __init__(self, m):
        super().__init__()
        self.m = m
        self.per_layer = 3 if hasattr(m.config, "index_topk") else 2

    def forward(self, ids, positions, caches):
        cache = transformers.StaticCache(config=self.m.config, max_cache_len=caches[0].shape[2])
        start = positions[0, 0]
        for i, layer in enumerate(cache.layers):
            c = caches[self.per_layer * i : self.per_layer * (i + 1)]
            layer.keys, layer.values, layer.device = c[0], c[1], ids.device
            layer.cumulative_length, layer.is_initialized = start.clone(), True
            if self.per_layer == 3:
                layer.indexer_keys, layer.indexer_cumulative_length = c[2], start.clone()
                layer.indexer_dtype, layer.indexer_device, layer.is_indexer_initialized = c[2].dtype, ids.device, True
        return self.m(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits

    def caches(self, batch: int, T: int, gen=None) -> list[torch.Tensor]:
        cfg, out = self.m.config, []
        for _ in range(cfg.num_hidden_layers):
            out += [torch.randn(batch, 1, T, cfg.kv_lora_rank, generator=gen) * 0.5,
                    torch.randn(batch, 1, T, cfg.qk_rope_head_dim, generator=gen) * 0.5]  # fmt: skip
            if self.per_layer == 3:
                out.append(torch.randn(batch, T, cfg.index_head_dim, generator=gen) * 0.5)
        return out


class Forward(torch.nn.Module):
    """HF's plain forward, no cache: logits of every position."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


def export_case(m, case: str):
    """(exported program, a function making fresh inputs (batch, seed))."""
    B = Dim("batch", max=16)
    if case == "forward":
        S = Dim("seq", min=TOPK + 1, max=48)
        ep = torch.export.export(Forward(m), (torch.zeros(2, 9, dtype=torch.long),), dynamic_shapes=({0: B, 1: S},))

        def inputs(batch, seed):
            g = torch.Generator().manual_seed(seed)
            return (torch.randint(0, 128, (batch, 11), generator=g),)

        return ep, inputs
    step = StaticStep(m)
    T = Dim("ctx", min=TOPK + 1, max=48)
    S = 1 if case == "decode" else Dim("seq", max=16)
    s0 = 1 if case == "decode" else 3
    ids, pos = torch.zeros(2, s0, dtype=torch.long), torch.arange(5, 5 + s0).expand(2, s0)
    caches = step.caches(2, 12)
    shapes = ({0: B, 1: S}, {0: B, 1: S}, [{0: B, 2: T} if c.ndim == 4 else {0: B, 1: T} for c in caches])
    ep = torch.export.export(step, (ids, pos, caches), dynamic_shapes=shapes, strict=False)

    def inputs(batch, seed):
        g = torch.Generator().manual_seed(seed)
        n, start, T = (1, 13, 20) if case == "decode" else (4, 6, 17)
        ids = torch.randint(0, 128, (batch, n), generator=g)
        return ids, torch.arange(start, start + n).expand(batch, n).contiguous(), step.caches(batch, T, g)

    return ep, inputs


def fresh(args):
    """A copy of an entry's inputs (the caches are written in place)."""
    return tuple([t.clone() for t in a] if isinstance(a, list) else a.clone() for a in args)


def hf_output(m, case: str, args):
    """HF's own eager forward on the same inputs (through the same cache hand-over for cached cases)."""
    mod = Forward(m) if case == "forward" else StaticStep(m)
    return mod(*fresh(args))


@torch.no_grad()
def assert_matches_hf(m, case: str, inputs, module, **tol) -> None:
    """``module`` (a rewritten graph) gives HF's output on fresh inputs of batch 2 and 1."""
    for batch, seed in ((2, 1), (1, 2)):
        args = inputs(batch, seed)
        torch.testing.assert_close(module(*fresh(args)), hf_output(m, case, args), **tol)
