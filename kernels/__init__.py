"""dsc custom ops (``dsc::*``): each file holds the reference, the registration and the implementations."""

from dsc.kernels import moe  # noqa: F401  (registers dsc::moe_experts)
