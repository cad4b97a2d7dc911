"""dsc custom ops (``dsc::*``): each file holds the reference, the registration and the implementations."""

from dsc.kernels import add_rms_norm, mla_decode, moe  # noqa: F401  (registers the ops)
