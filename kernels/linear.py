"""fp32 linear layers of a few rows on CPU: what a Program's graph calls for ``aten.linear`` when it
runs on CPU (``dsc.program._direct_calls``), with the numbers of ``torch.nn.functional.linear`` up to
fp32 re-association.

torch's GEMM reads the whole weight once per activation row at decode shapes, so a verify step's 2
rows cost twice a decode step's 1, and one row streams at ~18 GB/s (a 4096x4096 weight: 3.79 / 7.99
ms for 1 / 2 rows). ``linear_cpu.c`` reads it once for all the rows, on torch's threads where the
weight is large: 1.56 / 1.68 ms. Small weights pay the same: a 512x192 weight (the demo model's MLP)
took 9.2 / 17.3 / 23.8 µs in torch and 9.0 / 11.5 / 14.3 µs here for 1 / 2 / 3 rows, a 96x192 one
3.2 / 6.4 / 7.5 against 3.9 / 4.3 / 4.7 (micro-benchmark medians, ctypes call included). So it takes
2-4 rows from ``MIN_WEIGHT`` values and a single row from ``MIN_WEIGHT_ONE_ROW``: below those a ctypes
call (~2.5 µs) costs more than torch's whole matmul. torch keeps the rest, prefill's many rows, bf16
weights and anything needing autograd.
"""

from __future__ import annotations

import torch
from dsc.kernels import native
from torch import Tensor

USE_NATIVE = True
MIN_WEIGHT = 1 << 14  # from here the kernel beat torch at 2-4 rows
MIN_WEIGHT_ONE_ROW = 1 << 16  # and at 1 row from here
FEW_ROWS = 4  # more rows (up to native.ROWS_MAX) only for weights of at least MANY_ROWS_WEIGHT values
MANY_ROWS_WEIGHT = 1 << 19


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    n = weight.numel()
    if n < MIN_WEIGHT or not USE_NATIVE:  # first: the cheap test that most small layers fail
        return torch.nn.functional.linear(x, weight, bias)
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if (
        0 < rows <= (FEW_ROWS if n < MANY_ROWS_WEIGHT else native.ROWS_MAX)
        and (rows > 1 or n >= MIN_WEIGHT_ONE_ROW)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.is_cpu
        and weight.is_cpu
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        )
        and native.library() is not None
    ):
        flat = x.reshape(rows, K)
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        return native.f32_rows(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)
