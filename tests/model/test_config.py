import json

import pytest
from dsc.model import DeepseekV32ForCausalLM, ModelConfig, preset
from dsc.model.config import PRESETS

from dsc.errors import ConfigError


def test_json_round_trip_keeps_unknown_keys(tmp_path):
    d = preset("small").to_dict() | {"auto_map": {"AutoConfig": "x.y"}, "transformers_version": "4.44"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    assert cfg.extra["auto_map"] == {"AutoConfig": "x.y"}
    assert json.loads(cfg.to_json()) == json.loads(json.dumps(d))


def test_full_config_matches_spec():
    cfg = preset("deepseek-v3.2")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (7168, 61, 128)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 2048)
    assert abs(cfg.softmax_scale - 0.135234) < 1e-6


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"n_routed_experts": 10, "n_group": 4}, "divisible by n_group"),
        ({"topk_group": 5, "n_group": 4}, "topk_group (5) must be <= n_group (4)"),
        ({"index_head_dim": 24}, "power of two"),
        ({"num_experts_per_tok": 7}, "exceeds the experts in the kept groups"),
        ({"hidden_size": -1}, "hidden_size must be a positive integer"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "yarn"),
        ({"quantization_config": {"quant_method": "awq"}}, "fp8"),
    ],
)
def test_inconsistent_config_is_a_clear_error(change, needle):
    d = preset("tiny").to_dict() | change
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_dict(d)


def test_bad_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "nope.json")


def test_presets():
    tiny = DeepseekV32ForCausalLM(preset("tiny"))
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    cfg = preset("tiny")
    assert cfg.num_hidden_layers == 2 and cfg.num_nextn_predict_layers == 1 and cfg.first_k_dense_replace == 1
    assert set(PRESETS) == {"tiny", "small", "demo", "deepseek-v3.2"}
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
