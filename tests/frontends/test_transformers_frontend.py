"""``dsc optimize DIR --frontend transformers``: transformers' own DeepSeek-V3 / V3.2 code, captured
over a StaticCache, optimized with verification, and run by dsc's runtime — the same greedy tokens
as HF's own ``generate``."""

import json

import pytest
import torch

from dsc.cli import main
from tests.passes.hf_models import hf_model

PROMPT = [5, 17, 3, 99, 42, 8, 61, 12, 77, 30]
NEW = 64


def saved_hf(kind, path):
    extra = {"index_n_heads": 8} if kind == "v32" else {}  # no tied index scores (see test_reference_hf)
    m = hf_model(kind, "sdpa", max_position_embeddings=NEW + 32, **extra)
    m.save_pretrained(path)
    return m


def hf_greedy(m, prompt, n):
    m.generation_config.eos_token_id = None  # as --ignore-eos
    m.generation_config.pad_token_id = 0
    out = m.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", ["v3", "v32"])
def test_optimize_then_generate_equals_hf_generate(kind, tmp_path, capsys, capture_once):
    m = saved_hf(kind, tmp_path / "hf")
    out = tmp_path / "out"
    assert main(["optimize", str(tmp_path / "hf"), "--frontend", "transformers", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frontend"] == "transformers" and report["verified"]
    absorb = next(p for p in report["passes"] if p["name"] == "absorb_mla")
    assert absorb["matches"] == 2 * m.config.num_hidden_layers  # every layer, in prefill and in decode
    if kind == "v32":  # and every layer's attention reads only its selected latents
        fuse = next(p for p in report["passes"] if p["name"] == "fuse_dsa")
        assert fuse["matches"] == 2 * m.config.num_hidden_layers, fuse
    assert report["after"]["entries"] == ["decode", "prefill"]

    ids = ",".join(map(str, PROMPT))
    args = ["--prompt-tokens", ids, "--max-new-tokens", str(NEW), "--ignore-eos", "--json"]
    assert main(["generate", str(out), *args]) == 0
    compiled = json.loads(capsys.readouterr().out)["tokens"]
    assert main(["generate", str(tmp_path / "hf"), "--frontend", "transformers", *args]) == 0
    eager = json.loads(capsys.readouterr().out)["tokens"]
    want = hf_greedy(m, PROMPT, NEW)
    assert len(want) == NEW
    assert eager == want
    assert compiled == want


def test_fp8_index_cache_on_hf_code(tmp_path, capsys, capture_once):
    """fuse_dsa.index_cache=fp8 on transformers' V3.2: its index keys (read through HF's transposes
    and casts) become FP8 in every entry and the Program generates (the reference model's test
    verifies the numbers and checks the bytes and the UE8M0 scales)."""
    saved_hf("v32", tmp_path / "hf")
    out = tmp_path / "out"
    args = ["optimize", str(tmp_path / "hf"), "--frontend", "transformers", "-o", str(out), "--json"]
    args += [
        "--passes",
        "fuse_dsa",
        "--pass-option",
        "fuse_dsa.index_cache=fp8",
        "--no-verify",
    ]  # verified: tiny's test
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    fuse = next(p for p in report["passes"] if p["name"] == "fuse_dsa")
    ic = fuse["stats"]["index_cache"]
    assert ic["format"] == "fp8" and ic["caches"] == 3 and ic["recall_vs_fp32"]["recall"] >= 0.9
    assert fuse["tolerance"]["min_sqnr_db"] == 20.0  # the fp8_index_cache contract it states
    cache = json.loads((out / "manifest.json").read_text())["cache"]["tensors"]
    assert sum(t["dtype"] == "uint8" for t in cache) == 3
    assert (
        main(["generate", str(out), "--prompt-tokens", "5,17,3", "--max-new-tokens", "8", "--ignore-eos", "--json"])
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 8


def test_fp8_on_hf_code(tmp_path, capsys, capture_once):
    """`dsc optimize DIR --frontend transformers --fp8` on transformers' V3.2, verified: its linears,
    its batched experts and the W_UK / W_UV of the absorbed attention in FP8, every lowered matmul's
    SQNR in the record, and the Program generates."""
    m = saved_hf("v32", tmp_path / "hf")
    out = tmp_path / "out"
    args = ["optimize", str(tmp_path / "hf"), "--frontend", "transformers", "-o", str(out), "--fp8", "--json"]
    assert main([*args, "--no-measure"]) == 0
    rec = next(p for p in json.loads(capsys.readouterr().out)["passes"] if p["name"] == "lower_fp8")
    mm = rec["stats"]["matmuls"]
    layers = range(m.config.num_hidden_layers)
    assert all(mm[f"model.layers.{i}.self_attn.kv_b_proj (bshd,hdc->bshc)"]["decision"] == "fp8" for i in layers)
    assert all(mm[f"model.layers.{i}.mlp.experts.gate_up_proj"]["decision"] == "fp8" for i in layers if i)
    assert mm["lm_head"]["decision"] == "kept" and rec["numerics"]["sqnr_db"] >= 15
    assert all(v["sqnr_db"] >= 20 for v in mm.values() if v["decision"] == "fp8")
    ids = ",".join(map(str, PROMPT))
    assert main(["generate", str(out), "--prompt-tokens", ids, "--max-new-tokens", "8", "--ignore-eos", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 8
