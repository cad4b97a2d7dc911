"""Graph passes, one per file; importing this package registers them all with the pass manager
(``mla_products`` is part of absorb_mla, not a pass)."""

from dsc.passes import (  # noqa: F401
    absorb_mla,
    canonicalize,
    draft_mtp,
    fuse_add_rms_norm,
    fuse_dsa,
    lower_fp8,
    normalize,
)  # fmt: skip
