"""Rotary position embedding with YaRN frequency interpolation (spec §3).

One table of (cos, sin) of shape (max_position_embeddings, r/2) serves both layouts:
- interleaved (MLA): pairs (x_2j, x_2j+1);
- non-interleaved / rotate-half (indexer): pairs (x_j, x_j+r/2).
"""

from __future__ import annotations

import math

import torch
from dsc.model.config import ModelConfig
from torch import Tensor


def yarn_inv_freq(cfg: ModelConfig) -> Tensor:
    """Per-pair angular frequencies f'_j (r/2,), YaRN-interpolated when rope_scaling is yarn."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ys = cfg.yarn
    if ys is None:
        return freqs.float()
    factor = float(ys["factor"])
    original = float(ys["original_max_position_embeddings"])

    def corr_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    # transformers' defaults for the optional keys: beta 32 / 1, the correction range truncated
    low, high = corr_dim(float(ys.get("beta_fast") or 32)), corr_dim(float(ys.get("beta_slow") or 1))
    if ys.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return (freqs * (1 - ramp) + freqs / factor * ramp).float()


def rope_table(cfg: ModelConfig, device=None) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (max_position_embeddings, r/2) float32, scaled by YaRN's attention factor
    (1 for DeepSeek's configs)."""
    inv = yarn_inv_freq(cfg).to(device)
    pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device)
    ang = torch.outer(pos, inv)
    a = cfg.rope_attention_factor
    return (ang.cos(), ang.sin()) if a == 1 else (ang.cos() * a, ang.sin() * a)


def apply_rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., r) with pairs (x_2j, x_2j+1); cos/sin broadcastable to (..., r/2)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., r) with pairs (x_j, x_j+r/2) (NeoX / rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
