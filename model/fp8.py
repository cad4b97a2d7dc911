"""FP8 e4m3 block-scaled weights (spec §7.2).

A checkpoint's FP8 weight W_q (out, in) comes with ``weight_scale_inv`` of shape
(ceil(out/128), ceil(in/128)), a *multiplicative* dequant factor per 128x128 block:
``W[i, j] = float(W_q[i, j]) * scale_inv[i // 128, j // 128]``; edge blocks are padded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def scale_shape(shape: tuple[int, int], block: int = BLOCK) -> tuple[int, int]:
    return math.ceil(shape[0] / block), math.ceil(shape[1] / block)


def block_dequant(wq: Tensor, scale_inv: Tensor, block: int = BLOCK) -> Tensor:
    """fp32 W from an e4m3 W_q and its per-block multiplicative scale."""
    out, inp = wq.shape
    expected = scale_shape((out, inp), block)
    assert tuple(scale_inv.shape) == expected, f"scale shape {tuple(scale_inv.shape)} != {expected}"
    s = scale_inv.float().repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return wq.float() * s


def block_quant(w: Tensor, block: int = BLOCK, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """(W_q e4m3, scale_inv fp32): each 128x128 block scaled so its amax maps to 448.

    With ``ue8m0`` the scale is rounded up to a power of two (V3.1+ checkpoints)."""
    out, inp = w.shape
    so, si = scale_shape((out, inp), block)
    pad = torch.zeros(so * block, si * block, dtype=torch.float32, device=w.device)
    pad[:out, :inp] = w.float()
    blocks = pad.view(so, block, si, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)  # (so, si)
    scale = amax / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(so * block, si * block)[:out, :inp].contiguous(), scale.float()
