"""`dsc optimize` / `dsc generate` / `dsc passes` as a user runs them."""

import json

import pytest
from dsc.model.checkpoint import checkpoint_from_model, save_hf

from dsc.cli import main
from dsc.pass_manager import REGISTRY, register_pass
from dsc.verify import FP32_REASSOC
from tests.passes.helpers import DEFAULT_PASSES


def _gen(capsys, *args):
    assert main(["generate", *args, "--prompt", "def ", "--max-new-tokens", "12", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_optimize_then_generate_matches_eager(tmp_path, capsys, tiny):
    save_hf(checkpoint_from_model(tiny), tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["optimize", str(tmp_path / "ckpt"), "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == DEFAULT_PASSES
    assert report["after"]["nodes"]["decode"] < report["before"]["nodes"]["decode"]
    # measured on this machine, beside the cost model: eager, the captured Program, the optimized one
    m = report["measured"]
    for point in (m["decode"], m["prefill"]):
        assert all(point[f"{n}_ms"] > 0 for n in ("eager", "before", "after"))
    assert "Measured on this machine" in (out / "report.html").read_text()
    # one definition of each figure: the saved Program's node counts are the report's; the passes chose
    # their forms at the report's context (the model's 1024-token limit, not a 4096 it cannot reach)
    from dsc.fx_utils import node_count
    from dsc.program import Program

    saved = Program.load(out)
    assert {e: node_count(ep) for e, ep in saved.entries.items()} == report["after"]["nodes"]
    assert report["target"]["context"] == report["after"]["context_len"] == 1024
    why = report["passes"][DEFAULT_PASSES.index("absorb_mla")]["stats"]["entries"]["decode"]["why"]
    assert "at 1024 context" in why
    assert report["after"]["cache_scope"] == "float32, 3 layers incl. 1 MTP"
    assert "measured decode step" in capsys.readouterr().out
    compiled = _gen(capsys, str(out))
    eager = _gen(capsys, str(tmp_path / "ckpt"))
    assert compiled["tokens"] == eager["tokens"] and len(compiled["tokens"]) == 12
    assert set(compiled) == {"text", "tokens", "stats"}


def test_bad_options_exit_2(tmp_path, capsys):
    assert main(["optimize", "tiny", "-o", str(tmp_path / "o"), "--disable-pass", "nope"]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err
    assert main(["optimize", "deepseek-v3.2", "-o", str(tmp_path / "o")]) == 2
    assert "shape and cost analysis only" in capsys.readouterr().err
    assert main(["optimize", "tiny", "-o", str(tmp_path / "o"), "--pass-option", "absorb_mla.products=yes"]) == 2
    assert "products must be one of auto, never, always" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["optimize", "tiny", "-o", str(tmp_path / "o"), "--no-such-flag"]) == 2


def test_planted_fault_exits_1_and_touches_nothing(tmp_path, capsys, tiny, capture_once):
    import torch

    from dsc.fx_utils import call_nodes, finalize

    @register_pass("plant_cli_fault", order=501, purpose="test only", tolerance=FP32_REASSOC, default=False)
    def plant(program, ctx):
        for ep in program.entries.values():
            n = call_nodes(ep.graph_module, torch.ops.aten.softmax.int)[0]
            n.target, n.args = torch.ops.aten.sigmoid.default, n.args[:1]
            finalize(ep)
        return 1, {}

    try:
        save_hf(checkpoint_from_model(tiny), tmp_path / "ckpt")
        src = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
        out = tmp_path / "out"
        out.mkdir()  # an earlier dsc output (its manifest), which --force may replace only on success
        (out / "manifest.json").write_text("{}")
        (out / "mine.txt").write_text("keep")
        code = main(["optimize", str(tmp_path / "ckpt"), "-o", str(out), "--force", "--passes", "plant_cli_fault"])
        err = capsys.readouterr().err
        assert code == 1 and "pass 'plant_cli_fault'" in err and "worst tensor" in err and "dsc-dump-" in err
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "mine.txt"]
        assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == src
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no temporaries left
    finally:
        del REGISTRY["plant_cli_fault"]


def test_passes_listing(capsys):
    assert main(["passes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = ["canonicalize", "normalize", "draft_mtp", "absorb_mla", "fuse_dsa", "lower_fp8", "fuse_add_rms_norm"]
    assert [r["name"] for r in rows] == names
    assert rows[3]["options"] == {"products": ["auto", "never", "always"]}
    assert rows[5]["default"] is False and rows[5]["options"]["include"] == "text"  # opt-in; free-text patterns
    assert all(r["purpose"] for r in rows)


def test_optimize_json_dump_dir_target_and_pass_option(tmp_path, capsys, capture_once):
    out, dump = tmp_path / "out", tmp_path / "dump"
    args = ["optimize", "tiny", "-o", str(out), "--passes", "absorb_mla", "--json"]  # verified like any other run
    opt = ["--pass-option", "absorb_mla.products=always"]
    assert main([*args, *opt, "--dump-dir", str(dump), "--target", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout is the report alone
    assert report == json.loads((out / "report.json").read_text())
    assert report["target"]["name"] == "cpu" and report["target"]["peak_bw"] > 0
    assert [p["name"] for p in report["passes"]] == ["canonicalize", "normalize", "absorb_mla"]  # pulled in
    absorb = report["passes"][2]
    assert absorb["options"] == {"products": "always"} and absorb["numerics"]["top1_agreement"] == 1.0
    # "always" is for the absorbed form: prefill may still keep MHA when the cost model says so
    assert {"decode", "mtp"} <= set(absorb["stats"]["products"]["entries"])
    assert absorb["param_bytes"]["after"] > absorb["param_bytes"]["before"]  # the products' inflation
    assert "on cpu" in absorb["stats"]["entries"]["prefill"]["why"]  # MHA or products, priced on this machine
    names = {p.name for p in dump.iterdir()}
    assert "003_absorb_mla.decode.after.py" in names and "001_canonicalize.decode.before.py" in names
    # argparse names the choices
    assert main(["optimize", "tiny", "-o", str(tmp_path / "o2"), "--target", "tpu"]) == 2
    assert "choose from 'cpu', 'h200'" in capsys.readouterr().err


FAST = ["--passes", "canonicalize", "--no-verify", "--no-measure"]


@pytest.mark.parametrize(
    "stage",
    ["dsc.optimize.load", "dsc.frontends.Loaded.capture", "dsc.optimize.run_pipeline", "dsc.program.Program.save"],
)
def test_ctrl_c_exits_130_and_leaves_nothing(stage, tmp_path, capsys, monkeypatch, tiny_program):
    """Ctrl-C while loading, capturing, running passes or writing: exit 130, one line, no output
    directory and no temporary left behind."""

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    if stage in ("dsc.optimize.run_pipeline", "dsc.program.Program.save"):  # the capture is not under test
        monkeypatch.setattr("dsc.frontends.Loaded.capture", lambda self: tiny_program.clone())
    monkeypatch.setattr(stage, interrupt)
    work = tmp_path / "work"
    work.mkdir()
    assert main(["optimize", "tiny", "-o", str(work / "out"), *FAST]) == 130
    err = capsys.readouterr().err.strip()  # the progress lines, then one line for the interrupt
    assert err.splitlines()[-1] == "interrupted; nothing was written" and "Traceback" not in err
    assert list(work.iterdir()) == []


def test_force_replaces_only_an_earlier_dsc_output(tmp_path, capsys, capture_once):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    assert main(["optimize", "tiny", "-o", str(out), *FAST]) == 2  # a non-empty OUT needs --force
    assert "not empty" in capsys.readouterr().err
    assert main(["optimize", "tiny", "-o", str(out), "--force", *FAST]) == 2
    assert "did not write" in capsys.readouterr().err and (out / "precious.txt").read_text() == "mine"
    # an earlier dsc output (its manifest) is replaced whole; a temporary left by a killed run (its
    # process is gone) is cleaned up by the next run
    ours = tmp_path / "out2"
    ours.mkdir()
    (ours / "manifest.json").write_text("{}")
    (ours / "old-graph.json").write_text("{}")
    stale = tmp_path / ".out2.tmp-999999999-x"
    stale.mkdir()
    assert main(["optimize", "tiny", "-o", str(ours), "--force", *FAST]) == 0
    assert not stale.exists() and not (ours / "old-graph.json").exists()
    assert json.loads((ours / "manifest.json").read_text())["format"] == "dsc-program"
    again = json.loads((ours / "report.json").read_text())
    assert [p["name"] for p in again["passes"]] == ["canonicalize"] and again["measured"] is None
    assert "Not measured on this machine" in (ours / "report.html").read_text()
