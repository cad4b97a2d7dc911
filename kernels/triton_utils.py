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
