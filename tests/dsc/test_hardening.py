"""Bad input, one test per class of mistake, each over several instances: exit code 2, a message that
names the key / file / flag, no traceback, and nothing created, changed or deleted outside dsc's own
output. (Ctrl-C, --force and out-of-range arguments: test_cli_optimize.py and test_cli_info.py.)"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from dsc.model import preset
from dsc.model.checkpoint import checkpoint_from_model, save_hf, save_pt
from safetensors.torch import load_file, save_file

from dsc.cli import main


def _refused(capsys, argv, *names) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    for n in names:
        assert n in err, (n, err)
    return err


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_hf(checkpoint_from_model(tiny), d)
    return d


# ---- config values of the wrong type or range --------------------------------------------------
@pytest.mark.parametrize(
    "change, names",
    [
        ({"rms_norm_eps": "1e-6"}, ["rms_norm_eps", "expected a number", 'string "1e-6"']),
        ({"rope_scaling": "yarn"}, ["rope_scaling", "expected an object or null"]),
        ({"quantization_config": [128, 128]}, ["quantization_config", "the list [128, 128]"]),
        ({"first_k_dense_replace": True}, ["first_k_dense_replace", "expected an integer", "boolean true"]),
        ({"hidden_size": 64.0}, ["hidden_size", "expected an integer"]),
        ({"eos_token_id": 100000}, ["eos_token_id", "0..319", "100000"]),
        ({"eos_token_id": [257, "x"]}, ["eos_token_id", "a list of integers"]),
        ({"torch_dtype": "bfloat17"}, ["torch_dtype", "bfloat17", "float32"]),
        ({"rope_scaling": {"type": "yarn", "factor": "4", "original_max_position_embeddings": 256}},
         ["rope_scaling.factor", "expected a number"]),
        ({"rope_theta": float("nan")}, ["rope_theta", "NaN"]),
        ({"num_attention_heads": -4, "num_key_value_heads": -4}, ["num_attention_heads must be a positive integer"]),
        ({"rms_norm_eps": "x", "n_group": "4"}, ["rms_norm_eps", "n_group"]),  # every bad key, at once
    ],
)  # fmt: skip
def test_config_values_of_the_wrong_type_or_range(change, names, tmp_path, capsys):
    """Refused when the config is read (before any weight), every bad key named with expected vs got."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(preset("tiny").to_dict() | change))
    _refused(capsys, ["info", str(tmp_path / "m")], "config.json", *names)


# ---- a missing key that defines shapes ---------------------------------------------------------
@pytest.mark.parametrize(
    "drop", [["hidden_size"], ["kv_lora_rank", "n_group"], ["index_topk"], ["num_hidden_layers", "vocab_size"]]
)
def test_a_missing_shape_key_is_the_error_not_a_default(drop, tmp_path, capsys):
    d = {k: v for k, v in preset("tiny").to_dict().items() if k not in drop}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    _refused(capsys, ["info", str(tmp_path / "m")], "missing", *drop)


def test_optional_keys_take_transformers_defaults():
    """What may be left out is what transformers also defaults (the indexer keys on V3, the KV heads)."""
    from dsc.model import ModelConfig

    d = {k: v for k, v in preset("tiny").to_dict().items() if not k.startswith("index_")}
    d = {k: v for k, v in d.items() if k != "num_key_value_heads"} | {"model_type": "deepseek_v3"}
    cfg = ModelConfig.from_dict(d)
    assert cfg.num_key_value_heads == cfg.num_attention_heads and not cfg.has_indexer


# ---- NaN / Inf weights -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, value, fmt",
    [
        ("model.norm.weight", float("nan"), "hf"),
        ("model.layers.1.mlp.experts.3.down_proj.weight", float("inf"), "hf"),
        ("lm_head.weight", float("-inf"), "pt"),
    ],
)
def test_non_finite_weights_are_refused_at_load(name, value, fmt, ckpt, tmp_path, capsys):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = value
    if fmt == "hf":
        model = tmp_path / "m"
        shutil.copytree(ckpt, model)
        save_file(tensors, str(model / "model.safetensors"))
    else:
        from dsc.model.checkpoint import Checkpoint

        model = tmp_path / "m.pt"
        save_pt(Checkpoint(preset("tiny"), tensors), model)
    before = _tree(tmp_path)
    _refused(capsys, ["generate", str(model), "--prompt-tokens", "1,2"], name, "NaN or Inf")
    _refused(capsys, ["optimize", str(model), "-o", str(tmp_path / "out"), "--no-measure"], name)
    assert _tree(tmp_path) == before  # no output, no temporary


# ---- output-path mistakes, found before any work -----------------------------------------------
@pytest.mark.parametrize(
    "argv, names",
    [
        (["optimize", "tiny", "-o", "{file}"], ["{file}", "not a directory"]),
        (["optimize", "tiny", "-o", "{file}/sub"], ["{file}", "is a file"]),
        (["optimize", "tiny", "-o", "/proc/dsc-out"], ["/proc", "not writable"]),
        (["optimize", "tiny", "-o", "{tmp}/out", "--dump-dir", "{file}"], ["--dump-dir", "not a directory"]),
        (["diff", "nowhere", "--html", "{tmp}"], ["--html", "is a directory"]),
        (["diff", "nowhere", "--html", "{file}/x.html"], ["--html", "is a file"]),
        (["bench", "--quick", "-o", "{file}"], ["-o", "not a directory"]),
        (["bench", "--quick", "-o", "{tmp}/earlier"], ["bench.json", "--force"]),
    ],
)
def test_output_path_mistakes_are_found_before_loading(argv, names, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    for stage in ("dsc.optimize.load", "dsc.diff.load_side", "dsc.bench.run_bench"):
        monkeypatch.setattr(stage, no_work)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "bench.json").write_text("{}")
    before = _tree(tmp_path)
    fill = {"{file}": str(tmp_path / "file"), "{tmp}": str(tmp_path)}

    def sub(s):
        for k, v in fill.items():
            s = s.replace(k, v)
        return s

    _refused(capsys, [sub(a) for a in argv], *map(sub, names))
    assert _tree(tmp_path) == before


def test_names_with_markup_characters_are_printed_as_they_are(tmp_path, capsys, monkeypatch, tiny_program):
    from rich.console import Console

    monkeypatch.setattr("dsc.frontends.Loaded.capture", lambda self: tiny_program.clone())  # not under test
    out = tmp_path / "o[red]x"
    assert main(["optimize", "tiny", "-o", str(out), "--passes", "canonicalize", "--no-verify", "--no-measure"]) == 0
    assert f"wrote {out}/" in capsys.readouterr().out.replace("\n", "")
    monkeypatch.setattr("dsc.cli.out", Console(width=80))  # a narrow terminal: wrapped, never cropped
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    assert "[c_kv" in listing and "k_pe]" in listing and "…" not in listing


# ---- a corrupted or edited Program directory ---------------------------------------------------
def _manifest(edit):
    def apply(d: Path):
        m = json.loads((d / "manifest.json").read_text())
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m))

    return apply


def _weights(edit):
    def apply(d: Path):
        w = load_file(str(d / "weights.safetensors"))
        edit(w)
        save_file(w, str(d / "weights.safetensors"))

    return apply


def _nan_first(w):
    k = sorted(w)[-1]
    w[k] = w[k].clone()
    w[k].view(-1)[0] = float("nan")


CORRUPTIONS = {
    "graph file missing": (lambda d: (d / "graphs" / "decode.json").unlink(), ["decode.json", "missing"]),
    "graph not JSON": (lambda d: (d / "graphs" / "decode.json").write_text("{no"), ["decode.json", "not a readable"]),
    "graph of another kind": (lambda d: (d / "graphs" / "decode.json").write_text("{}"), ["decode.json"]),
    "manifest not an object": (lambda d: (d / "manifest.json").write_text("[]"), ["manifest.json", "JSON object"]),
    "no entries": (_manifest(lambda m: m.pop("entries")), ["manifest.json", "'entries'"]),
    "entries empty": (_manifest(lambda m: m.__setitem__("entries", {})), ["manifest.json", "'entries'"]),
    "no cache": (_manifest(lambda m: m.pop("cache")), ["manifest.json", "'cache'"]),
    "cache tail edited": (_manifest(lambda m: m["cache"]["tensors"][0].__setitem__("tail", [99])), ["'cache'", "99"]),
    "cache dtype edited": (
        _manifest(lambda m: m["cache"]["tensors"][0].__setitem__("dtype", "bfloat16")),
        ["'cache'", "bfloat16"],
    ),
    "cache entry malformed": (_manifest(lambda m: m["cache"]["tensors"][0].pop("tail")), ["'cache'"]),
    "config edited under the weights": (
        _manifest(lambda m: m["config"].__setitem__("vocab_size", 400)),
        ["'config'", "vocab_size 400"],
    ),
    "config value wrong type": (_manifest(lambda m: m["config"].__setitem__("hidden_size", "64")), ["hidden_size"]),
    "weights of another shape": (
        _weights(lambda w: w.__setitem__("m.lm_head.weight", torch.zeros(3, 3))),
        ["m.lm_head.weight", "[3, 3]"],
    ),
    "NaN weights": (_weights(_nan_first), ["weights.safetensors", "NaN"]),
}


@pytest.fixture(scope="module")
def saved_program(tmp_path_factory, tiny_optimized):
    d = tmp_path_factory.mktemp("prog") / "p"
    tiny_optimized[0].save(d)
    return d


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_program_directory_is_a_clear_error(case, saved_program, tmp_path, capsys):
    edit, names = CORRUPTIONS[case]
    d = tmp_path / "p"
    shutil.copytree(saved_program, d)
    edit(d)
    before = _tree(tmp_path)
    _refused(capsys, ["generate", str(d), "--prompt-tokens", "1,2", "--max-new-tokens", "2"], str(d), *names)
    assert _tree(tmp_path) == before


def test_diff_of_two_different_models_says_so(saved_program, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(saved_program, other)
    _manifest(lambda m: m["config"].__setitem__("rms_norm_eps", 1e-5))(other)
    assert main(["diff", str(saved_program), str(other)]) == 0
    err = capsys.readouterr().err
    assert "different models" in err and "rms_norm_eps" in err


# ---- small ones --------------------------------------------------------------------------------
def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dsc ")


def test_nonfinite_reads_fp8():
    """fp8 has no isfinite in torch: it is widened, so an FP8 Program loads and a NaN byte is still found."""
    from dsc.program import nonfinite

    w = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    bad = w.clone()
    bad.view(torch.uint8)[1, 2] = 0x7F  # e4m3fn's NaN
    assert nonfinite({"ok": w, "bad": bad, "ids": torch.arange(3)}) == ["bad"]
