"""`dsc export --format aoti`: AOTInductor packages of the entries, checked against the Program and
run by `dsc generate` without the Program."""

import json

import pytest

from dsc.cli import main


def _tokens(capsys, *args):
    assert main(["generate", *args, "--prompt", "def ", "--max-new-tokens", "8", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


@pytest.mark.slow  # two AOTInductor compilations: about 2 minutes on 2 cores
def test_aoti_export_generates_what_the_program_does(tiny_optimized, tmp_path, capsys):
    program, _ = tiny_optimized
    prog = tmp_path / "prog"
    program.save(prog)
    assert main(["export", str(prog), "--format", "aoti", "--check", "trt"]) == 2  # an ONNX-only option
    assert "--check trt is about ONNX" in capsys.readouterr().err
    assert main(["export", str(prog), "--format", "aoti", "--entries", "prefill,decode,verify", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    # verify is decode's graph: one package; the packages agree with the Program (or export fails)
    assert manifest["entries"] == {"prefill": "prefill.pt2", "decode": "decode.pt2", "verify": "decode.pt2"}
    assert manifest["numerics"]["top1_agreement"] == 1.0
    assert sorted(p.name for p in (tmp_path / "prog.aoti").iterdir()) == ["decode.pt2", "export.json", "prefill.pt2"]
    # no dsc:: op inside: the packages are standard ATen, which torch runs without dsc
    assert _tokens(capsys, str(tmp_path / "prog.aoti")) == _tokens(capsys, str(prog))
    assert main(["generate", str(tmp_path / "prog.aoti"), "--prompt", "x", "--compile"]) == 2
    (tmp_path / "prog.aoti" / "export.json").write_text('{"format": "onnx"}')
    assert main(["generate", str(tmp_path / "prog.aoti"), "--prompt", "x"]) == 2
    assert "not an AOTInductor one" in capsys.readouterr().err
