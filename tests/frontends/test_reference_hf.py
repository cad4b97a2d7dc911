"""The reference frontend reads what transformers writes: a tiny random HF DeepSeek-V3 / V3.2 model,
saved with ``save_pretrained``, loads into dsc's reference model and gives HF's own logits — a
prefill and a decode step — with the rope config transformers 5 writes, with an explicit YaRN
``rope_scaling`` and with a YaRN ``rope_parameters`` that leaves its optional keys to transformers."""

import json

import pytest
import torch

from dsc.frontends.reference import load_model
from tests.passes.hf_models import hf_model
from tests.tolerances import TOL

YARN_FULL = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
             "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
YARN_MINIMAL = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 5000.0}
ROPES = {
    "transformers5": {},
    "rope_scaling": {"rope_scaling": YARN_FULL},
    "rope_parameters": {"rope_parameters": YARN_MINIMAL},
}
CASES = [(k, r) for k in ("v3", "v32") for r in ROPES]
# HF's indexer takes torch.topk, which breaks ties (ReLU zeros) as it likes, the reference model
# takes the earliest key; with 8 index heads these inputs have no tie at the top-k boundary.
V32 = {"index_n_heads": 8}


def hf(kind, **kw):
    return hf_model(kind, "eager", **(V32 if kind == "v32" else {}), **kw)


def assert_no_boundary_ties(model, run):
    """``run()`` with the reference model's attention records on: no query's k-th and (k+1)-th
    visible index scores are equal (else HF and dsc may pick different keys, both correctly)."""
    mlas = [layer.self_attn for layer in model.model.layers if layer.self_attn.indexer is not None]
    for m in mlas:
        m.aux = []
    try:
        run()
    finally:
        recs = [r for m in mlas for r in m.aux]
        for m in mlas:
            m.aux = None
    k = model.config.index_topk
    for r in recs:
        s = r["index_scores"].masked_fill(~r["visible"], float("-inf")).sort(-1, descending=True).values
        if s.shape[-1] > k:
            assert not ((s[..., k - 1] == s[..., k]) & s[..., k].isfinite()).any(), (
                "tied index scores: pick other inputs"
            )


@pytest.mark.parametrize("kind,rope", CASES, ids=[f"{k}-{r}" for k, r in CASES])
def test_reference_frontend_equals_hf(kind, rope, tmp_path):
    m = hf(kind, **ROPES[rope])
    m.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written  # what transformers 5 writes, whatever it was given
    model, ckpt = load_model(str(tmp_path))
    assert model.config.model_type == {"v3": "deepseek_v3", "v32": "deepseek_v32"}[kind]
    assert model.config.num_nextn_predict_layers == 0 and ckpt.notes  # HF saves no MTP layer: said, not assumed
    assert (model.config.yarn is None) == (rope == "transformers5")

    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(1))  # > index_topk: DSA selects
    P = ids.shape[1] - 1
    with torch.no_grad():
        want = m(input_ids=ids).logits
        caches = model.new_cache(2, P + 1)
        got_prefill, _ = model.prefill(ids[:, :P], [c[:, :P] for c in caches])
        got_step, _ = model.decode(ids[:, P:], torch.full((2, 1), P), caches)
        assert_no_boundary_ties(model, lambda: model(ids))
    torch.testing.assert_close(got_prefill, want[:, :P], **TOL["fp32_reassoc"])
    torch.testing.assert_close(got_step, want[:, P:], **TOL["fp32_reassoc"])


def test_hf_state_dict_with_fused_experts(tmp_path):
    """A state dict from a live transformers 5 model holds each MoE layer's experts fused."""
    m = hf("v3")
    sd = m.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    torch.save({"config": m.config.to_dict(), "state_dict": sd}, tmp_path / "model.pt")
    model, _ = load_model(str(tmp_path / "model.pt"))
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], m(input_ids=ids).logits, **TOL["fp32_reassoc"])


def test_trusted_pickled_hf_module(tmp_path):
    m = hf("v32")
    torch.save(m, tmp_path / "model.pt")
    model, _ = load_model(str(tmp_path / "model.pt"), trust_pickle=True)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], m(input_ids=ids).logits, **TOL["fp32_reassoc"])
        assert_no_boundary_ties(model, lambda: model(ids))
