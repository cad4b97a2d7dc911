"""fuse_dsa on the ``small`` preset (top-k 2048, 16 index heads of 128): the fused Program equals
the masked-dense absorbed one over a prefill past top-k, 32 decode steps and S > 1 extends at
non-zero positions. Minutes on 2 cores: ``python -m pytest -q --run-slow -m slow``."""

import pytest
import torch
from dsc.model import DeepseekV32ForCausalLM, preset

from dsc.frontends.reference import capture
from dsc.pass_manager import run_pipeline, select_passes
from tests.passes.test_fuse_dsa import _run
from tests.tolerances import TOL


@pytest.mark.slow
def test_small_fused_equals_masked_dense():
    cfg = preset("small")
    program = capture(DeepseekV32ForCausalLM(cfg).init_weights(0).eval(), source="small")
    dense, _ = run_pipeline(program, select_passes(["absorb_mla"]), verify=False)
    fused, records = run_pipeline(dense, select_passes(["fuse_dsa"]), verify=False)
    assert records[-1].matches >= cfg.num_hidden_layers + 1  # decode: every layer and the MTP layer
    g = torch.Generator().manual_seed(0)
    P = cfg.index_topk + 60
    steps = [1] * 32 + [3, 2]
    toks = torch.randint(0, cfg.vocab_size, (1, P + sum(steps)), generator=g)
    start = torch.tensor([P])
    worst = 0.0
    for a, b in zip(_run(dense, toks, steps, start), _run(fused, toks, steps, start)):
        torch.testing.assert_close(b, a, **TOL["fp32_rewrite"])
        worst = max(worst, (b - a).abs().max().item())
    print(f"max |fused - masked dense| over {len(steps) + 1} calls: {worst:.3g}")
