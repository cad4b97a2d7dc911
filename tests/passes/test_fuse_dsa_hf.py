"""fuse_dsa on Hugging Face transformers' DeepseekV32ForCausalLM, exported as HF runs it over a
StaticCache (a decode step, and a prefill chunk at a non-zero start), with its SDPA (boolean mask)
and eager (additive finfo.min mask) attention: every layer reads only its selected latents and the
graph still gives HF's own logits.

HF writes the selection its own way: ``topk(masked_fill(scores, ~causal, -inf), min(index_topk,
T))`` cast to int32, scattered as *blocked* keys (``ones.scatter(idx, False)``) into a 4-D mask
whose causal part compares ``arange(T)`` with shared query positions ``start + arange(S)``."""

import pytest

from dsc.program import CacheSpec, Program
from tests.passes.helpers import apply, ops
from tests.passes.hf_models import assert_matches_hf, export_case, hf_model
from tests.tolerances import TOL

SPARSE, TOPK, MHA = "dsc.sparse_mla.default", "dsc.indexer_topk.default", "dsc.sparse_mha.default"
CASES = [("sdpa", "decode"), ("eager", "chunk")]  # both mask spellings (boolean, finfo.min), S = 1 and S > 1


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "mha"])
@pytest.mark.parametrize("attn,case", CASES, ids=["-".join(c) for c in CASES])
def test_fires_once_per_layer_and_matches_hf(attn, case, absorb):
    """Absorbed first, or over HF's own per-head K/V (its (B, H, S, T) matmul / SDPA attention)."""
    m = hf_model("v32", attn, index_n_heads=8)  # 8 index heads: no exactly tied index scores
    ep, inputs = export_case(m, case)
    program = Program({"forward": ep}, CacheSpec([]), config=None)
    for name in ("canonicalize", "normalize", "absorb_mla")[: 3 if absorb else 2]:
        program, _, _ = apply(name, program)
    out, matches, stats = apply("fuse_dsa", program)
    layers = m.config.num_hidden_layers
    assert matches == layers, stats
    h = ops(out)
    assert h.get(SPARSE if absorb else MHA, 0) == layers and h.get(TOPK, 0) == layers
    assert "dsc.mla_decode.default" not in h and "aten.scatter.value" not in h  # (the router keeps its topk)
    assert_matches_hf(m, case, inputs, out.module("forward"), **TOL["fp32_rewrite"])
    _, again, _ = apply("fuse_dsa", out)
    assert again == 0
