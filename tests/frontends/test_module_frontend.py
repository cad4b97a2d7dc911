"""The user's own implementation as dsc takes it: a module with the entry-point protocol, by import
path with a checkpoint or as a trusted pickle, and entry points the user exported to ``.pt2``. The
module (``user_model.py``) was written from the spec by someone who had not read the matchers."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.export import Dim

from dsc.cli import main
from dsc.frontends.export import _Decode, _Prefill  # thin wrappers, as a user would write them
from tests.frontends.user_model import TinyDeepseekV3, full_forward, init_random, tiny_config

TARGET = "module:tests.frontends.user_model:TinyDeepseekV3"
PROMPT = [5, 17, 3, 44, 8, 61, 12]
NEW = 24


@pytest.fixture(scope="module")
def user():
    return init_random(TinyDeepseekV3(tiny_config()), 0).eval()


def greedy(model, prompt, n):
    """Greedy tokens by re-running the whole sequence each step: no cache reuse, nothing of dsc's."""
    toks = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            toks.append(int(full_forward(model, torch.tensor([toks]))[0, -1].argmax()))
    return toks[len(prompt) :]


def checkpoint_dir(model, path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(model.config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


def optimize_and_generate(capsys, src, out, *flags):
    assert main(["optimize", str(src), *flags, "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    args = ["--prompt-tokens", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW), "--ignore-eos", "--json"]
    assert main(["generate", str(out), *args]) == 0
    return report, json.loads(capsys.readouterr().out)["tokens"]


def absorbed(report):
    return next(p for p in report["passes"] if p["name"] == "absorb_mla")["matches"]


def test_module_by_import_path(user, tmp_path, capsys):
    src = checkpoint_dir(user, tmp_path / "ckpt")
    report, tokens = optimize_and_generate(capsys, src, tmp_path / "out", "--frontend", TARGET)
    assert report["verified"] and report["frontend"] == TARGET
    assert absorbed(report) == 2 * tiny_config()["num_hidden_layers"]
    assert report["after"]["cache_bytes_per_token"] == report["before"]["cache_bytes_per_token"]  # already latent
    assert tokens == greedy(user, PROMPT, NEW)


def test_module_from_trusted_pickle(user, tmp_path, capsys):
    torch.save(user, tmp_path / "model.pt")
    assert main(["optimize", str(tmp_path / "model.pt"), "--frontend", "module", "-o", str(tmp_path / "x")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "x").exists()
    report, tokens = optimize_and_generate(
        capsys, tmp_path / "model.pt", tmp_path / "out", "--frontend", "module", "--trust-pickle"
    )
    assert report["verified"] and absorbed(report) == 4
    assert tokens == greedy(user, PROMPT, NEW)


def caches(B, T, C, L, alias):
    return [torch.zeros(B, T, C)] * L if alias else [torch.zeros(B, T, C) for _ in range(L)]


def export_pt2(m, root, alias_caches=False):
    """What a user writes: export both entry points with dynamic shapes and save them.
    ``alias_caches``: the easy mistake of one example tensor for every cache."""
    root.mkdir()
    C, L = m.config["kv_lora_rank"] + m.config["qk_rope_head_dim"], m.config["num_hidden_layers"]
    B, S, T = Dim("B", max=64), Dim("S", max=128), Dim("T", min=2, max=128)
    with torch.no_grad():
        pre = torch.export.export(
            _Prefill(m), (torch.zeros(2, 6, dtype=torch.long), caches(2, 6, C, L, alias_caches)),
            dynamic_shapes=({0: B, 1: S}, [{0: B, 1: S}] * L),
        )  # fmt: skip
        dec = torch.export.export(
            _Decode(m), (torch.zeros(2, 2, dtype=torch.long), torch.tensor([[6, 7]] * 2), caches(2, 8, C, L, alias_caches)),
            dynamic_shapes=({0: B, 1: Dim("N", max=16)}, {0: B, 1: Dim("N", max=16)}, [{0: B, 1: T}] * L),
        )  # fmt: skip
    torch.export.save(pre, root / "prefill.pt2")
    torch.export.save(dec, root / "decode.pt2")
    (root / "cache.json").write_text(json.dumps(m.cache_spec()))
    (root / "config.json").write_text(json.dumps(m.config))
    return root


def test_pt2_programs(user, tmp_path, capsys):
    src = export_pt2(user, tmp_path / "pt2")
    assert main(["optimize", str(src), "-o", str(tmp_path / "x")]) == 2
    assert "--frontend pt2" in capsys.readouterr().err
    assert main(["optimize", str(src), "--frontend", "pt2", "-o", str(tmp_path / "x")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    report, tokens = optimize_and_generate(capsys, src, tmp_path / "out", "--frontend", "pt2", "--trust-pickle")
    assert report["verified"] and absorbed(report) == 4
    assert tokens == greedy(user, PROMPT, NEW)


def test_pt2_with_tied_example_caches_is_refused(user, tmp_path, capsys):
    src = export_pt2(user, tmp_path / "pt2", alias_caches=True)
    assert main(["optimize", str(src), "--frontend", "pt2", "--trust-pickle", "-o", str(tmp_path / "x")]) == 2
    assert "never writes the cache tensors ['layers.0.latent']" in capsys.readouterr().err
