"""Every input a frontend cannot take is a clear error (exit 2) that says what to do, before any work."""

import json
import sys

import pytest
import torch

from dsc.cache import CacheSpec
from dsc.cli import main
from dsc.errors import DscError
from dsc.frontends.reference import cache_spec_of
from dsc.runtime import EagerBackend, SamplingParams, generate
from tests.passes.hf_models import hf_model


class NoProtocol(torch.nn.Module):
    """A module built from a config that has no entry points."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.w = torch.nn.Linear(2, 2)


def fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_frontend(capsys, tmp_path):
    fails(
        capsys, ["optimize", "tiny", "--frontend", "onnx", "-o", str(tmp_path / "o")], "unknown frontend 'onnx'", "pt2"
    )


def test_module_path_errors(capsys, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    out = str(tmp_path / "o")
    fails(
        capsys,
        ["optimize", str(tmp_path / "ck"), "--frontend", "module:no_such_pkg.mod:X", "-o", out],
        "cannot import 'no_such_pkg.mod'",
    )
    fails(
        capsys,
        ["optimize", str(tmp_path / "ck"), "--frontend", "module:tests.frontends.test_frontend_errors", "-o", out],
        "module:PKG.MOD:CLASS",
    )
    torch.save({"w.weight": torch.zeros(2, 2), "w.bias": torch.zeros(2)}, tmp_path / "w.pt")
    (tmp_path / "config.json").write_text("{}")
    fails(capsys, ["optimize", str(tmp_path / "w.pt"), "--frontend", "module:tests.frontends.test_frontend_errors:NoProtocol", "-o", out],
          "does not implement the module protocol", "prefill", "cache_spec")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_pickled_module_of_an_unknown_class(capsys, tmp_path):
    torch.save(NoProtocol({}), tmp_path / "model.pt")
    fails(capsys, ["optimize", str(tmp_path / "model.pt"), "-o", str(tmp_path / "o")], "--trust-pickle")
    fails(capsys, ["optimize", str(tmp_path / "model.pt"), "--trust-pickle", "-o", str(tmp_path / "o")],
          "pickled tests.frontends.test_frontend_errors.NoProtocol", "--frontend module", "--frontend pt2")  # fmt: skip


def test_transformers_frontend_without_transformers(capsys, tmp_path, monkeypatch):
    hf_model("v3", "eager").save_pretrained(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    fails(
        capsys,
        ["optimize", str(tmp_path / "hf"), "--frontend", "transformers", "-o", str(tmp_path / "o")],
        "pip install 'dsc[hf]'",
    )


def test_transformers_frontend_from_the_checkouts_root():
    """`python -m dsc.cli` in a source checkout puts its root on sys.path, where the source folder
    kernels/ (installed as dsc.kernels) would stand in for Hugging Face's `kernels` package, which
    transformers imports: the frontend binds the installed one first."""
    import subprocess
    from pathlib import Path

    pytest.importorskip("kernels")  # the installed package (a transformers dependency here)
    root = Path(__file__).resolve().parents[2]
    code = (
        "from dsc.frontends.transformers import require_transformers; require_transformers(); "
        "import kernels, transformers.integrations.hub_kernels; print(kernels.__file__)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not Path(run.stdout.strip()).resolve().is_relative_to(root / "kernels")


def test_transformers_frontend_on_other_models(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fails(capsys, ["optimize", str(tmp_path / "m"), "--frontend", "transformers", "-o", str(tmp_path / "o")],
          "model_type is 'llama'", "'deepseek_v32' and 'deepseek_v3'")  # fmt: skip
    fails(
        capsys,
        ["optimize", str(tmp_path / "nope"), "--frontend", "transformers", "-o", str(tmp_path / "o")],
        "not a directory",
    )


def test_shared_position_cache_needs_one_prompt_length(tiny):
    spec = cache_spec_of(tiny)
    backend = EagerBackend(tiny, CacheSpec(spec.tensors, shared_positions=True), tiny.config)
    with pytest.raises(DscError, match="prompts of one length"):
        generate(backend, [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=2))


def test_cache_description_errors():
    ok = {"name": "c", "shape": ["batch", "T", 8], "dtype": "float32"}
    for bad, needle in [
        ({}, "tensors"),
        ({"tensors": [ok | {"shape": ["T", "batch", 8]}]}, 'start with "batch"'),
        ({"tensors": [ok | {"shape": ["batch", "T", 0]}]}, "positive integers"),
        ({"tensors": [ok | {"dtype": "float33"}]}, "unknown dtype"),
        ({"tensors": [{"name": "c"}]}, "missing keys ['shape', 'dtype']"),
        ({"tensors": [ok], "min_len": 0}, "min_len"),
    ]:
        with pytest.raises(DscError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            CacheSpec.from_description(bad, "cache.json")
    spec = CacheSpec.from_description([ok | {"shape": ["batch", 1, "T", 8]}], "x")
    assert spec.tensors[0].time_dim == 2 and spec.tensors[0].tail == [1, 8]
