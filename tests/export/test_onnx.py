"""`dsc export --format onnx`: every entry as an ONNX model that onnxruntime runs like the Program.

Each pass combination is exported and verified once (10-20 s an entry on 2 cores); the checks on
what the files hold ride on those exports. ``draft_mtp`` is the default pipeline with FP8: its
export carries the FP8 weights' checks too.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from dsc.export import onnx as onnx_export
from dsc.export.common import numerics_tolerance
from dsc.export.onnx import OnnxBackend, export_onnx, verify_export
from onnx import numpy_helper

from dsc.cli import main
from dsc.errors import DscError
from dsc.pass_manager import registry, run_pipeline, select_passes
from dsc.verify import compare, make_scenario, run_scenario

ORDER = list(registry())
COMBOS = {
    "fuse_dsa": ["canonicalize", "normalize", "absorb_mla", "fuse_dsa"],
    "draft_mtp": ["canonicalize", "normalize", "draft_mtp", "absorb_mla", "fuse_dsa", "lower_fp8", "fuse_add_rms_norm"],
}


def _program(tiny_program, combo):
    program, _ = run_pipeline(tiny_program, select_passes(sorted(COMBOS[combo], key=ORDER.index)))
    return program


def _dims(v) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


@pytest.mark.parametrize("combo", list(COMBOS))
def test_export_runs_in_onnxruntime_like_the_program(tiny_program, tmp_path, combo, monkeypatch):
    program = _program(tiny_program, combo)
    dest = tmp_path / "onnx"
    if combo == "fuse_dsa":  # weights past the protobuf limit go to external data files
        monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1000)
    # the mtp entry is exported as draft (draft_mtp; on its own graph by the CLI test); fuse_dsa's
    # combo is about the fp32 sparse attention, which prefill and decode carry
    entries = ["prefill", "decode"] if combo == "fuse_dsa" else None
    res = export_onnx(program, dest, entries=entries)  # raises if onnxruntime disagrees with the Program
    if combo == "fuse_dsa":
        assert {p.name for p in dest.iterdir()} == {
            "export.json",
            *(f"{e}.onnx{x}" for e in res.entries for x in ("", ".data")),
        }
    manifest = json.loads((dest / "export.json").read_text())
    assert set(manifest["entries"]) == set(entries or program.entries)
    assert manifest["numerics"]["top1_agreement"] == 1.0
    names = [t.name for t in program.cache.tensors]
    for name, e in res.entries.items():
        model = onnx.load(str(dest / e.file))
        onnx.checker.check_model(model)
        inputs = {v.name: v for v in model.graph.input}
        outputs = {v.name: v for v in model.graph.output}
        # the caches are named inputs and outputs after the CacheSpec; batch / seq / context are dynamic
        assert [n for n in inputs if n.startswith("cache.")] == [f"cache.{n}" for n in names]
        assert {n.removeprefix("present.") for n in outputs if n.startswith("present.")} <= set(names)
        assert _dims(inputs[e.inputs[0]])[:2] == ["batch", "seq"]
        assert _dims(outputs["logits"])[:2] == ["batch", "seq"]
        cache0 = _dims(inputs[f"cache.{names[0]}"])
        assert cache0[:2] == ["batch", "seq" if name == "prefill" else "context"]
        assert e.writes, f"{name} writes no cache"
    if "lower_fp8" in COMBOS[combo]:
        _check_fp8_weights(program, dest / "decode.onnx")
    if combo == "draft_mtp":
        assert set(program.entries) == {"prefill", "decode", "verify", "draft"}
        assert res.entries["verify"].file == "decode.onnx"  # one graph, one file
        assert not (dest / "verify.onnx").exists()
        assert not res.trt, res.trt  # constant TopK K, no data-dependent shapes, types TensorRT takes
        # other batch sizes and lengths than the export traced: the same numbers
        scenario = make_scenario(program.config, seed=3, batch=3)
        numerics, violations = compare(
            run_scenario(program, scenario), run_scenario(OnnxBackend(dest, program), scenario),
            numerics_tolerance(program),
        )  # fmt: skip
        assert not violations, violations


def _check_fp8_weights(program, path):
    """The e4m3 weights are FLOAT8E4M3FN initializers holding the Program's bytes, dequantised in
    blocks of 128 along K."""
    model = onnx.load(str(path))
    fp8 = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    weights = program.weights()
    want = {k for k, w in weights.items() if w.dtype == torch.float8_e4m3fn}
    assert fp8 and set(fp8) <= want
    for name, t in fp8.items():
        raw = np.frombuffer(t.raw_data, dtype=np.uint8).reshape(tuple(t.dims))
        assert np.array_equal(raw, weights[name].view(torch.uint8).numpy()), name
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in fp8]
    assert dq and all({a.name: a.i for a in n.attribute}.get("block_size") == 128 for n in dq)


def test_failed_export_names_the_entry(tiny_program, tmp_path, monkeypatch):
    def failing(program, name, *args):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(onnx_export, "export_entry", failing)
    with pytest.raises(DscError, match=r"ONNX export of the prefill entry failed: RuntimeError: exporter failed"):
        export_onnx(tiny_program, tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DscError, match=r"the Program has no entry draft \(its entries: prefill, decode, mtp\)"):
        export_onnx(tiny_program, tmp_path / "onnx", entries=["draft"])
    # the packed FP8 index-key cache bit-casts bytes, which opset 23 has no operator for
    packed, _ = run_pipeline(
        tiny_program, select_passes(["canonicalize", "normalize", "absorb_mla", "fuse_dsa"]),
        options={"fuse_dsa": {"index_cache": "fp8"}},
    )  # fmt: skip
    with pytest.raises(DscError, match=r"aten.view.dtype.*fuse_dsa.index_cache=keep"):
        export_onnx(packed, tmp_path / "onnx")


def test_cli_export_and_its_errors(tiny_program, tmp_path, capsys, monkeypatch):
    prog = tmp_path / "prog"
    tiny_program.save(prog)
    # TensorRT's findings are errors with --check trt (at the first entry that has any), and nothing is written
    assert main(["export", str(prog), "--entries", "mtp", "--check", "trt", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "not TensorRT-ready (--check trt)" in err and "K is computed at run time" in err
    assert not (tmp_path / "prog.onnx").exists()
    # without --check: written beside the Program, the findings reported; every entry of the captured
    # Program (the mtp entry on its own graph: draft_mtp's combo exports it as draft)
    assert main(["export", str(prog), "--entries", "prefill,decode,mtp"]) == 0
    text = capsys.readouterr().out
    assert "not TensorRT-ready" in text and "onnxruntime (CPUExecutionProvider) agrees with the Program" in text
    manifest = json.loads((tmp_path / "prog.onnx" / "export.json").read_text())
    assert set(manifest["entries"]) == {"prefill", "decode", "mtp"} and manifest["numerics"]["top1_agreement"] == 1.0
    # verification fails on a wrong model, naming the output that disagrees
    model = onnx.load(str(tmp_path / "prog.onnx" / "decode.onnx"))
    w = max(
        (t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: np.prod(t.dims)
    )
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    onnx.save(model, str(tmp_path / "prog.onnx" / "decode.onnx"))
    with pytest.raises(DscError, match=r"onnxruntime disagrees with the Program:\n  decode\[0\]\(S=1\)\.logits"):
        verify_export(tmp_path / "prog.onnx", tiny_program, make_scenario(tiny_program.config))
    assert main(["export", str(prog), "--no-verify"]) == 2  # an earlier export is replaced only with --force
    assert "--force" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", str(prog), "-o", str(tmp_path / "mine"), "--force"]) == 2  # not dsc's: never replaced
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert main(["export", str(prog), "-o", str(prog / "onnx")]) == 2
    assert "inside the Program" in capsys.readouterr().err
    monkeypatch.setattr(onnx_export, "_absent", lambda m: m == "onnxruntime")
    assert main(["export", str(prog)]) == 2
    assert "pip install 'dsc[onnx]'" in capsys.readouterr().err
