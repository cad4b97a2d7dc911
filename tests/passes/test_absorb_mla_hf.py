"""absorb_mla on Hugging Face transformers' DeepSeek-V3 and V3.2 modeling code, exported as HF runs
it: it fires exactly once per layer and the rewritten graph equals HF's own output."""

import pytest

from dsc.program import CacheSpec, Program
from tests.passes.helpers import apply, ops
from tests.passes.hf_models import assert_matches_hf, export_case, hf_model
from tests.tolerances import TOL

MLA_OP = "dsc.mla_decode.default"
CASES = [(k, a, c) for k in ("v3", "v32") for a in ("sdpa", "eager") for c in ("decode", "chunk", "forward")]


@pytest.mark.parametrize("kind,attn,case", CASES, ids=["-".join(c) for c in CASES])
def test_fires_once_per_layer_and_matches_hf(kind, attn, case):
    m = hf_model(kind, attn)
    ep, inputs = export_case(m, case)
    program = Program({"forward": ep}, CacheSpec([]), config=None)
    for name in ("canonicalize", "normalize"):
        program, _, _ = apply(name, program)
    out, matches, stats = apply("absorb_mla", program)
    layers = m.config.num_hidden_layers
    assert matches == layers, stats
    h = ops(out)
    assert h.get(MLA_OP, 0) == layers
    assert "aten.softmax.int" not in h and "aten.scaled_dot_product_attention.default" not in h
    assert_matches_hf(m, case, inputs, out.module("forward"), **TOL["fp32_rewrite"])
