"""``dsc::add_rms_norm`` — residual add fused with RMSNorm.

    s = x + residual
    y = weight ⊙ s / sqrt(mean(s², -1) + eps)          (fp32 math, y in x's dtype)
    returns (y, s)

x, residual: (..., D) same shape and dtype; weight: (D,). ``s`` is the new residual stream, so a
transformer block reads the hidden state once and writes it twice instead of
read-add-write-read-normalise-write. Reference: ``add_rms_norm_ref``. CPU: two ATen calls
(``add``, ``rms_norm``). CUDA: ``_add_rms_norm_kernel``, one program per row.
"""

from __future__ import annotations

import torch
from dsc.kernels.registry import custom_op
from dsc.kernels.triton_utils import HAVE_TRITON, cuda_kernel, tl, triton
from torch import Tensor


def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    sf = s.float()
    y = weight.float() * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps))
    return y.to(x.dtype), s


@custom_op("dsc::add_rms_norm")
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    y = torch.nn.functional.rms_norm(s.float(), (s.shape[-1],), weight.float(), eps)
    return y.to(x.dtype), s


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


if HAVE_TRITON:

    @triton.jit
    def _add_rms_norm_kernel(X, R, W, Y, S, D, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0)
        r = tl.load(R + row * D + cols, mask=mask, other=0.0)
        s = x + r
        tl.store(S + row * D + cols, s, mask=mask)
        sf = s.to(tl.float32)
        var = tl.sum(sf * sf, axis=0) / D
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = sf * (1.0 / tl.sqrt(var + eps)) * w
        tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    assert HAVE_TRITON, "triton is not installed (pip install 'dsc[gpu]')"
    assert x.shape == residual.shape and weight.shape == x.shape[-1:], f"{x.shape} {residual.shape} {weight.shape}"
    D = x.shape[-1]
    xc, rc = x.contiguous(), residual.contiguous()
    y, s = torch.empty_like(xc), torch.empty_like(xc)
    rows = xc.numel() // D
    if rows:
        _add_rms_norm_kernel[(rows,)](xc, rc, weight.contiguous(), y, s, D, eps, BLOCK=triton.next_power_of_2(D))
    return y, s


cuda_kernel(add_rms_norm, "add_rms_norm", add_rms_norm_triton, add_rms_norm_ref)
