"""dsc custom ops (``dsc::*``): each file holds the reference, the registration and the implementations.

``DECOMPOSITIONS`` maps every op to its reference (for ``fp8_linear``, the reference's dequantised-product
form), written in standard ATen ops: what an exporter (ONNX, AOTInductor) lowers a Program with,
``ep.run_decompositions(DECOMPOSITIONS)``.
"""

import torch
from dsc.kernels import add_rms_norm, dsa, fp8, mla_decode, moe  # noqa: F401  (registers the ops)

DECOMPOSITIONS = {
    torch.ops.dsc.add_rms_norm.default: add_rms_norm.add_rms_norm_ref,
    torch.ops.dsc.mla_decode.default: mla_decode.mla_decode_ref,
    torch.ops.dsc.moe_experts.default: moe.moe_experts_ref,
    torch.ops.dsc.moe_experts_fp8.default: moe.moe_experts_fp8_ref,
    torch.ops.dsc.indexer_topk.default: dsa.indexer_topk_ref,
    torch.ops.dsc.sparse_mla.default: dsa.sparse_mla_ref,
    torch.ops.dsc.sparse_mha.default: dsa.sparse_mha_ref,
    torch.ops.dsc.act_quant.default: fp8.act_quant_ref,
    torch.ops.dsc.fp8_linear.default: fp8.fp8_linear_decomposed,
    torch.ops.dsc.fp8_linear_gathered.default: fp8.fp8_linear_gathered_ref,
}


def decompose(ep):
    """The exported program with every dsc:: op replaced by its reference's ATen ops (core ATen)."""
    from torch.export import default_decompositions

    return ep.run_decompositions(default_decompositions() | DECOMPOSITIONS)
