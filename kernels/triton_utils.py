"""Optional Triton: imported once, missing is reported once with the install command."""

from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None
    HAVE_TRITON = False
    log.info("triton is not installed: dsc:: ops use their CPU implementations (pip install 'dsc[gpu]')")


def interpret_mode() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors, for testing logic."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_warned: set[str] = set()


def warn_no_triton(op: str) -> None:
    """Once per op: a CUDA tensor reached a dsc:: op without Triton, so the fp32 reference runs instead."""
    if op not in _warned:
        _warned.add(op)
        warnings.warn(
            f"dsc::{op} on CUDA without triton: running the fp32 reference (slow); pip install 'dsc[gpu]'",
            RuntimeWarning,
            stacklevel=3,
        )


def cuda_kernel(op, name: str, triton_fn, reference):
    """Registers ``op``'s CUDA kernel: ``triton_fn``, or ``reference`` (the fp32 reference, with one
    warning) where Triton is missing. Returns the kernel."""

    def kernel(*args, **kwargs):
        if not HAVE_TRITON:
            warn_no_triton(name)
            return reference(*args, **kwargs)
        return triton_fn(*args, **kwargs)

    op.register_kernel("cuda")(kernel)
    return kernel
