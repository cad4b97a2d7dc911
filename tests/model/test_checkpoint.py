"""Checkpoint round trips, FP8 block dequantisation, and every bad-input case."""

import json

import pytest
import torch
from dsc.model.checkpoint import (
    Checkpoint,
    build_model,
    checkpoint_from_model,
    load_checkpoint,
    save_hf,
    save_pt,
)
from dsc.model.fp8 import FP8, block_dequant, block_quant
from safetensors.torch import load_file, save_file

from dsc.errors import CheckpointError, ConfigError
from tests.tolerances import SQNR_DB


@pytest.fixture
def ckpt(tiny):
    return checkpoint_from_model(tiny)


def _fp8_ckpt(ckpt):
    """Quantise every 2-D linear weight (not embeddings / heads / gate / eh_proj) as an FP8 checkpoint does."""
    keep_bf16 = ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight", "weights_proj", "eh_proj")
    tensors = {}
    for k, t in ckpt.tensors.items():
        if t.ndim == 2 and not any(s in k for s in keep_bf16):
            q, s = block_quant(t * 300)  # spread values over the e4m3 range
            tensors[k], tensors[k + "_scale_inv"] = q, s
        else:
            tensors[k] = t
    cfg = ckpt.config
    cfg.quantization_config = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    return Checkpoint(cfg, tensors)


def _assert_bit_exact(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.mark.parametrize("shard", [None, 200_000])
def test_hf_round_trip_is_bit_exact(ckpt, tmp_path, shard):
    save_hf(ckpt, tmp_path / "m", max_shard_bytes=shard)
    if shard:
        assert (tmp_path / "m" / "model.safetensors.index.json").exists()
        assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    back = load_checkpoint(tmp_path / "m")
    _assert_bit_exact(ckpt.tensors, back.tensors)
    assert back.config.to_dict() == ckpt.config.to_dict()


def test_fp8_round_trip_and_dequant(ckpt, tmp_path):
    f8 = _fp8_ckpt(ckpt)
    save_hf(f8, tmp_path / "m")
    back = load_checkpoint(tmp_path / "m")
    _assert_bit_exact(f8.tensors, back.tensors)
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in back.fp8_weights
    sd = back.state_dict()
    # exact formula W = float(Wq) * s[i // 128, j // 128], here on the (40, 64) kv_a_proj (one padded block)
    k = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    wq, s = back.tensors[k], back.tensors[k + "_scale_inv"]
    assert s.shape == (1, 1)
    assert torch.equal(sd[k], wq.float() * s[0, 0])
    model = build_model(back)
    assert torch.equal(model.state_dict()[k], sd[k])


def test_block_quant_padded_edges():
    w = torch.randn(300, 200)
    q, s = block_quant(w)
    assert q.dtype == FP8 and q.shape == (300, 200) and s.shape == (3, 2)
    for i in range(300):
        for j in (0, 127, 128, 199):
            assert q[i, j].float() * s[i // 128, j // 128] == block_dequant(q, s)[i, j]
    err = block_dequant(q, s) - w
    sqnr = 10 * torch.log10(w.pow(2).sum() / err.pow(2).sum())
    assert sqnr > SQNR_DB["fp8_weight_dequant"]
    q2, s2 = block_quant(w, ue8m0=True)
    assert torch.equal(torch.exp2(torch.log2(s2).round()), s2)


def test_pt_round_trip_and_build(ckpt, tmp_path, tiny):
    save_pt(ckpt, tmp_path / "model.pt")
    back = load_checkpoint(tmp_path / "model.pt")
    _assert_bit_exact(ckpt.tensors, back.tensors)
    model = build_model(back)
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], tiny(tokens)[0])


def test_pickled_module_refused_unless_trusted(tiny, tmp_path):
    torch.save(tiny, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects.*--trust-pickle"):
        load_checkpoint(tmp_path / "model.pt")
    back = load_checkpoint(tmp_path / "model.pt", trust_pickle=True)
    assert set(back.tensors) == set(tiny.state_dict())


def test_pt_wrong_structure(tmp_path):
    torch.save({"weights": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match='must hold {"config": dict, "state_dict": dict}'):
        load_checkpoint(tmp_path / "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")


def _edit(tmp_path, ckpt, fn):
    save_hf(ckpt, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))
    return tmp_path / "m"


def test_missing_and_unexpected_keys_listed(ckpt, tmp_path):
    def fn(t):
        for k in [k for k in t if "experts.3." in k]:
            del t[k]
        t["model.layers.0.extra.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(_edit(tmp_path, ckpt, fn))
    msg = str(e.value)
    assert "missing keys: model.layers.1.mlp.experts.3.down_proj.weight" in msg and "(6 in all)" in msg
    assert "unexpected keys: model.layers.0.extra.weight" in msg


def test_shape_and_dtype_mismatch_named(ckpt, tmp_path):
    def fn(t):
        t["model.norm.weight"] = torch.ones(65)
        t["lm_head.weight"] = t["lm_head.weight"].to(torch.int32)

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(_edit(tmp_path, ckpt, fn))
    assert "model.norm.weight: shape (65,), expected (64,)" in str(e.value)
    assert "lm_head.weight: dtype torch.int32" in str(e.value)


def test_config_disagreeing_with_weights(ckpt, tmp_path):
    save_hf(ckpt, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"(?s)kv_a_proj_with_mqa.weight: shape \(40, 64\), expected \(56, 64\).*config.json belongs",
    ):
        load_checkpoint(tmp_path / "m")


def test_fp8_without_scale(ckpt, tmp_path):
    f8 = _fp8_ckpt(ckpt)
    del f8.tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_hf(f8, tmp_path / "m")
    with pytest.raises(CheckpointError, match="o_proj.weight: FP8 weight without its"):
        load_checkpoint(tmp_path / "m")


def test_truncated_safetensors(ckpt, tmp_path):
    save_hf(ckpt, tmp_path / "m")
    p = tmp_path / "m" / "model.safetensors"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "m")


def test_broken_index(ckpt, tmp_path):
    save_hf(ckpt, tmp_path / "m", max_shard_bytes=200_000)
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match="names shards that are not in"):
        load_checkpoint(tmp_path / "m")


def test_wrong_model_type(ckpt, tmp_path):
    save_hf(ckpt, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    with pytest.raises(ConfigError, match="dsc compiles 'deepseek_v32' and 'deepseek_v3'"):
        load_checkpoint(tmp_path / "m")


def test_v3_config_on_v32_weights_names_the_indexer(ckpt, tmp_path):
    save_hf(ckpt, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg | {"model_type": "deepseek_v3"}))
    with pytest.raises(CheckpointError, match="DeepSeek-V3.2 indexer weights.*model_type 'deepseek_v3'"):
        load_checkpoint(tmp_path / "m")


def test_save_never_clobbers(ckpt, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty"):
        save_hf(ckpt, tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left behind
