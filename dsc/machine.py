"""The machine a cost choice is made for: peak FLOP rate, memory bandwidth and the context length the
choice is evaluated at. Passes get it through their context (``ctx.machine``) and never hold such
constants themselves; ``dsc optimize --target`` picks it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dsc.errors import DscError


@dataclass(frozen=True)
class Machine:
    name: str
    peak_flops: float  # FLOP/s of a dense matmul in the deployment dtype
    peak_bw: float  # bytes/s of main memory
    context: int = 4096  # the context length (decode) or prompt length (prefill) a form is chosen for

    def roofline_s(self, flops: float, nbytes: float) -> float:
        return max(flops / self.peak_flops, nbytes / self.peak_bw)

    def to_dict(self) -> dict:
        return {"name": self.name, "peak_flops": self.peak_flops, "peak_bw": self.peak_bw, "context": self.context}


# H200: bf16 dense tensor-core rate and HBM3e bandwidth (datasheet figures)
H200 = Machine("h200", 790e12, 4.8e12)


def measure_cpu(seconds: float = 0.3) -> Machine:
    """This CPU, measured: an fp32 matmul's FLOP rate and a large copy's bandwidth (read + write)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    src = torch.empty(16 * 2**20 // 4)
    dst = torch.empty_like(src)

    def rate(fn, work):
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            fn()
            n += 1
        return work * n / (time.perf_counter() - t0)

    flops = rate(lambda: a @ b, 2 * 512**3)
    bw = rate(lambda: dst.copy_(src), 2 * src.numel() * 4)
    return Machine("cpu", flops, bw)


TARGETS = {"h200": lambda: H200, "cpu": measure_cpu}


def target(name: str) -> Machine:
    if name not in TARGETS:
        raise DscError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]()
