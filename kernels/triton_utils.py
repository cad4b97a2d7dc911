"""Optional Triton: imported once, missing is reported once with the install command."""

from __future__ import annotations

import logging
import os

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
