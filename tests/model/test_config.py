import json
import math

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
        ({"rope_scaling": None, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "yarn"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 256}},
            "disagrees with rope_parameters",
        ),
        ({"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, "rope_theta"),
        ({"mlp_layer_types": ["dense", "dense"]}, "mlp_layer_types"),
        ({"layer_types": ["full_attention"] * 2}, "layer_types"),
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


def test_no_rope_scaling_means_none():
    """A config.json without any rope scaling gets plain RoPE, never the 671B model's YaRN."""
    d = {k: v for k, v in preset("tiny").to_dict().items() if k != "rope_scaling"}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_scaling is None and cfg.yarn is None and cfg.softmax_scale == cfg.qk_head_dim**-0.5


def test_transformers5_rope_parameters_are_read():
    yarn = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "mscale": 1.0,
            "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}  # fmt: skip
    base = {k: v for k, v in preset("tiny").to_dict().items() if k not in ("rope_scaling", "rope_theta")}
    cfg = ModelConfig.from_dict(base | {"rope_parameters": yarn | {"rope_theta": 5000.0}})
    assert cfg.rope_theta == 5000.0 and cfg.yarn["factor"] == 4
    assert cfg.softmax_scale == preset("tiny").softmax_scale  # mscale_all_dim 1 enters the softmax scale
    plain = ModelConfig.from_dict(base | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert plain.rope_scaling is None
    # transformers' meaning of absent YaRN keys: no softmax mscale, cos/sin scaled by 0.1 ln(s) + 1
    bare = ModelConfig.from_dict(
        base | {"rope_parameters": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 256}}
    )
    assert bare.softmax_scale == bare.qk_head_dim**-0.5
    assert abs(bare.rope_attention_factor - (0.1 * math.log(4) + 1)) < 1e-12


def test_absent_keys_are_recorded():
    d = preset("tiny").to_dict()
    del d["num_nextn_predict_layers"]
    assert "num_nextn_predict_layers" in ModelConfig.from_dict(d).absent
    assert "num_nextn_predict_layers" in ModelConfig.from_dict(d | {"num_nextn_predict_layers": None}).absent
    assert not ModelConfig.from_dict(preset("tiny").to_dict()).absent & {"num_nextn_predict_layers", "rope_scaling"}


def test_deepseek_v3_builds_without_indexer():
    d = preset("tiny").to_dict() | {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}
    m = DeepseekV32ForCausalLM(ModelConfig.from_dict(d))
    assert not any(".indexer." in k for k in m.state_dict())


def test_half_split_rope_is_refused_with_the_frontend_that_takes_it():
    d = preset("tiny").to_dict() | {"model_type": "deepseek_v3", "rope_interleave": False}
    with pytest.raises(ConfigError, match="--frontend transformers"):
        DeepseekV32ForCausalLM(ModelConfig.from_dict(d))
