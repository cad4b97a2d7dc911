"""Size figures derived from a config: parameter counts and KV-cache bytes per token."""

from __future__ import annotations

import math

import torch
from dsc.model.config import ModelConfig
from dsc.model.model import DeepseekV32ForCausalLM, cache_layout

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total parameters (main model, MTP, all) and those activated per token (one main-model token)."""
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg)
    n_main = cfg.num_hidden_layers
    main = mtp = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        in_mtp = parts[:2] == ["model", "layers"] and int(parts[2]) >= n_main
        if in_mtp:
            mtp += p.numel()
        else:
            main += p.numel()
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(n_main))
    idle = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    mtp_idle = cfg.num_nextn_predict_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    return {
        "total": main + mtp,
        "main": main,
        "mtp": mtp,
        "activated_main": main - idle,
        "activated_mtp": mtp - mtp_idle,
    }


def cache_values_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Cached values per token per layer: the reference layout and the absorbed (latent) layout."""
    index_keys = cfg.index_head_dim if cfg.has_indexer else 0
    per_layer_ref = sum(math.prod(e.tail) for e in cache_layout(cfg) if e.layer == 0)
    return {
        "per_head_kv": per_layer_ref - index_keys,
        "mla_latent": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "index_keys": index_keys,
    }


def info(cfg: ModelConfig) -> dict:
    dtype = cfg.torch_dtype
    nbytes = DTYPE_BYTES.get(dtype, 4)
    vals = cache_values_per_token(cfg)
    layers, mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    ref = (vals["per_head_kv"] + vals["index_keys"]) * nbytes
    latent = (vals["mla_latent"] + vals["index_keys"]) * nbytes
    return {
        "config": {
            k: getattr(cfg, k)
            for k in (
                "model_type",
                "hidden_size",
                "num_hidden_layers",
                "first_k_dense_replace",
                "num_attention_heads",
                "q_lora_rank",
                "kv_lora_rank",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
                "n_routed_experts",
                "num_experts_per_tok",
                "n_shared_experts",
                "n_group",
                "topk_group",
                "index_n_heads",
                "index_head_dim",
                "index_topk",
                "num_nextn_predict_layers",
                "vocab_size",
                "max_position_embeddings",
                "torch_dtype",
            )
        },  # fmt: skip
        "softmax_scale": cfg.softmax_scale,
        "params": param_counts(cfg),
        "cache": {
            "dtype": dtype,
            "values_per_token_per_layer": vals,
            "bytes_per_token_per_layer": {"reference_per_head_kv": ref, "absorbed_latent": latent},
            # the main layers (the published per-token figure); the MTP layers' caches come on top
            "bytes_per_token": {"reference_per_head_kv": ref * layers, "absorbed_latent": latent * layers},
            "bytes_per_token_with_mtp": {
                "reference_per_head_kv": ref * (layers + mtp),
                "absorbed_latent": latent * (layers + mtp),
            },  # fmt: skip
            "layers": layers,
            "mtp_layers": mtp,
        },
    }
