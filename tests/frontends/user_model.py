"""A tiny DeepSeek-V3-style causal LM written from the model math alone.

This is a test fixture: an independent, plain-PyTorch (fp32) implementation of
the architecture (RMSNorm, interleaved RoPE, naive-mode MLA with a latent cache,
dense SwiGLU MLP), written the way an outside user would write it, so the
compiler front end can be exercised on code it has never seen.

Entry-point protocol:

* ``cache_spec()``        -> description of the per-layer latent cache tensors
* ``prefill(tokens, caches)``            -> (logits, hidden)
* ``decode(tokens, positions, caches)``  -> (logits, hidden)

Each layer's cache is ONE tensor (B, T, kv_lora_rank + qk_rope_head_dim)
holding ``[c_kv ; roped k_pe]`` per position; calls write into it in place.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = x.pow(2).mean(dim=-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(ms + self.eps))


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) by angle theta_j.

    x: (..., r); cos/sin: broadcastable to (..., r/2).
    """
    pairs = x.unflatten(-1, (-1, 2))
    a = pairs[..., 0]
    b = pairs[..., 1]
    ya = a * cos - b * sin
    yb = a * sin + b * cos
    return torch.stack((ya, yb), dim=-1).flatten(-2)


class LatentAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.n_heads = cfg["num_attention_heads"]
        self.q_rank = cfg["q_lora_rank"]
        self.kv_rank = cfg["kv_lora_rank"]
        self.d_nope = cfg["qk_nope_head_dim"]
        self.d_rope = cfg["qk_rope_head_dim"]
        self.d_v = cfg["v_head_dim"]
        hidden = cfg["hidden_size"]
        eps = cfg["rms_norm_eps"]
        self.scale = (self.d_nope + self.d_rope) ** -0.5

        self.q_down = nn.Linear(hidden, self.q_rank, bias=False)
        self.q_norm = RMSNorm(self.q_rank, eps)
        self.q_up = nn.Linear(self.q_rank, self.n_heads * (self.d_nope + self.d_rope), bias=False)
        self.kv_down = nn.Linear(hidden, self.kv_rank + self.d_rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, eps)
        self.kv_up = nn.Linear(self.kv_rank, self.n_heads * (self.d_nope + self.d_v), bias=False)
        self.out = nn.Linear(self.n_heads * self.d_v, hidden, bias=False)

    def forward(self, x, positions, cos, sin, cache):
        # x: (B, S, hidden); positions: (B, S) int64; cos/sin: (B, S, d_rope/2)
        # cache: (B, T, kv_rank + d_rope), written in place at `positions`.
        H = self.n_heads

        q = self.q_up(self.q_norm(self.q_down(x)))
        q = q.unflatten(-1, (H, self.d_nope + self.d_rope))  # (B,S,H,dn+dr)
        q_nope = q[..., : self.d_nope]
        q_pe = rope_interleaved(q[..., self.d_nope :], cos.unsqueeze(2), sin.unsqueeze(2))
        q = torch.cat((q_nope, q_pe), dim=-1)

        kv = self.kv_down(x)  # (B,S,kv_rank+dr)
        c_kv = self.kv_norm(kv[..., : self.kv_rank])
        k_pe = rope_interleaved(kv[..., self.kv_rank :], cos, sin)
        new_latent = torch.cat((c_kv, k_pe), dim=-1)  # (B,S,C)

        # write the new positions into the cache, in place
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(positions)
        cache[rows, positions] = new_latent

        # decompress per-head K/V from the whole cached latent (naive / MHA mode)
        lat_c = cache[..., : self.kv_rank]  # (B,T,kv_rank)
        lat_pe = cache[..., self.kv_rank :]  # (B,T,dr)
        kvb = self.kv_up(lat_c).unflatten(-1, (H, self.d_nope + self.d_v))  # (B,T,H,dn+dv)
        k_nope = kvb[..., : self.d_nope]
        v = kvb[..., self.d_nope :]
        k = torch.cat((k_nope, lat_pe.unsqueeze(2).expand(-1, -1, H, -1)), dim=-1)

        scores = torch.einsum("bshd,bthd->bsht", q, k) * self.scale  # (B,S,H,T)
        slots = torch.arange(cache.shape[1], device=x.device)
        visible = slots.view(1, 1, -1) <= positions.unsqueeze(-1)  # (B,S,T)
        scores = scores.masked_fill(~visible.unsqueeze(2), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("bsht,bthd->bshd", probs, v)  # (B,S,H,dv)
        return self.out(o.flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.norm1 = RMSNorm(cfg["hidden_size"], eps)
        self.attn = LatentAttention(cfg)
        self.norm2 = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = SwiGLU(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, h, positions, cos, sin, cache):
        h = h + self.attn(self.norm1(h), positions, cos, sin, cache)
        h = h + self.mlp(self.norm2(h))
        return h


class TinyDeepseekV3(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        cfg = config
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.final_norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        r = cfg["qk_rope_head_dim"]
        inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    # -- protocol -----------------------------------------------------------
    def cache_spec(self) -> dict:
        c = self.config["kv_lora_rank"] + self.config["qk_rope_head_dim"]
        return {
            "tensors": [
                {
                    "name": f"layers.{i}.latent",
                    "shape": ["batch", "T", c],
                    "dtype": "float32",
                    "meaning": "MLA latent per position: [RMSNorm(c_kv) (kv_lora_rank) ; "
                    "RoPE'd k_pe (qk_rope_head_dim)]",
                    "layer": i,
                }
                for i in range(self.config["num_hidden_layers"])
            ]
        }

    def prefill(self, tokens, caches):
        B, S = tokens.shape
        positions = torch.arange(S, device=tokens.device).unsqueeze(0).expand(B, S)
        return self._run(tokens, positions, caches)

    def decode(self, tokens, positions, caches):
        return self._run(tokens, positions, caches)

    # -- body ---------------------------------------------------------------
    def _run(self, tokens, positions, caches):
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (B,S,r/2)
        cos = torch.cos(angles)
        sin = torch.sin(angles)
        h = self.embed(tokens)
        for block, cache in zip(self.blocks, caches):
            h = block(h, positions, cos, sin, cache)
        hidden = self.final_norm(h)
        logits = self.head(hidden)
        return logits, hidden

    def forward(self, tokens, positions, caches):
        return self.decode(tokens, positions, caches)


def tiny_config() -> dict:
    return {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 96,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "q_lora_rank": 24,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "n_routed_experts": 4,
        "n_group": 2,
        "topk_group": 1,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 16,
        "rope_scaling": None,
        "num_nextn_predict_layers": 0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
    }


def init_random(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights: N(0, 0.05) for matrices, ones for norm weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.05)
            else:
                p.fill_(1.0)
    return model


def new_caches(model: TinyDeepseekV3, batch: int, length: int) -> list[torch.Tensor]:
    c = model.config["kv_lora_rank"] + model.config["qk_rope_head_dim"]
    return [torch.zeros(batch, length, c) for _ in range(model.config["num_hidden_layers"])]


def full_forward(model: TinyDeepseekV3, tokens: torch.Tensor) -> torch.Tensor:
    """Logits over the whole sequence, no cache reuse: prefill into a fresh zero cache."""
    B, S = tokens.shape
    with torch.no_grad():
        logits, _ = model.prefill(tokens, new_caches(model, B, S))
    return logits
