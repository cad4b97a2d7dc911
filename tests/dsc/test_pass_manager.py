"""The pass manager: selection, records, and a planted wrong rewrite caught and named."""

import pytest
import torch

from dsc.errors import DscError
from dsc.fx_utils import call_nodes, finalize
from dsc.pass_manager import REGISTRY, PassVerificationError, register_pass, run_pipeline, select_passes
from dsc.verify import FP32_REASSOC
from tests.passes.helpers import DEFAULT_PASSES, apply


@pytest.fixture
def planted():
    """A wrong 'fusion': rewrites the first softmax of each entry into a sigmoid."""
    name = "plant_wrong_softmax"

    @register_pass(name, order=500, purpose="test only: a wrong rewrite", tolerance=FP32_REASSOC, default=False)
    def plant(program, ctx):
        n = 0
        for ep in program.entries.values():
            node = call_nodes(ep.graph_module, torch.ops.aten.softmax.int)[0]
            node.target, node.args = torch.ops.aten.sigmoid.default, node.args[:1]
            finalize(ep)
            n += 1
        return n, {}

    yield name
    del REGISTRY[name]


def test_planted_wrong_rewrite_is_caught(tiny_program, planted, tmp_path):
    before = {k: ep.graph_module.code for k, ep in tiny_program.entries.items()}
    with pytest.raises(PassVerificationError) as e:
        run_pipeline(tiny_program, select_passes(["canonicalize", planted]), dump_dir=tmp_path / "dump")
    err = e.value
    assert err.pass_name == planted and "plant_wrong_softmax" in str(err)
    assert err.numerics.worst.startswith(("prefill", "decode", "cache"))
    assert err.numerics.worst in str(err)
    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert "002_plant_wrong_softmax.decode.before.py" in dumps and "002_plant_wrong_softmax.decode.after.py" in dumps
    after = (tmp_path / "dump" / "002_plant_wrong_softmax.decode.after.py").read_text()
    assert "sigmoid" in after
    # the input Program is untouched
    assert {k: ep.graph_module.code for k, ep in tiny_program.entries.items()} == before


def test_selection_and_records(tiny_program):
    assert [p.name for p in select_passes()] == DEFAULT_PASSES
    # fuse_dsa makes the MHA form sparse too: it does not need absorb_mla
    assert [p.name for p in select_passes(disable=["absorb_mla"])] == [
        "canonicalize", "normalize", "draft_mtp", "fuse_dsa", "fuse_add_rms_norm",
    ]  # fmt: skip
    with pytest.raises(
        DscError,
        match="unknown pass 'nope'; available passes: canonicalize, normalize, draft_mtp, absorb_mla, fuse_dsa, lower_fp8, fuse_add_rms_norm",
    ):
        select_passes(["nope"])
    program, records = run_pipeline(tiny_program, select_passes())
    r = records[5].to_dict()
    assert r["name"] == "fuse_add_rms_norm" and r["changed"] and r["matches"] == 34
    # residual add + norm: 4 + 4 + 2 (draft) + 4 (verify); the other norms, one aten.rms_norm each: 5 an entry
    assert r["stats"]["rms_norms_per_entry"] == dict.fromkeys(("prefill", "decode", "draft", "verify"), 5)
    assert r["numerics"]["top1_agreement"] == 1.0 and r["tolerance"]["atol"] == FP32_REASSOC.atol
    assert r["nodes_after"]["decode"] < r["nodes_before"]["decode"]
    assert program.provenance["passes"] == [
        "canonicalize",
        "draft_mtp",
        "absorb_mla",
        "fuse_dsa",
        "fuse_add_rms_norm",
    ]  # normalize: nothing to do


def test_a_pass_that_finds_nothing_says_so(tiny_optimized):
    program, _ = tiny_optimized
    _, records = run_pipeline(program, select_passes(["fuse_add_rms_norm"]))
    assert records[0].matches == 0 and not records[0].changed and records[0].numerics is None


def test_required_passes_are_pulled_in_and_ordered():
    assert [p.name for p in select_passes(["absorb_mla"])] == ["canonicalize", "normalize", "absorb_mla"]
    with pytest.raises(DscError, match="needs 'canonicalize' before it; list canonicalize first"):
        select_passes(["absorb_mla", "canonicalize"])
    with pytest.raises(DscError, match="needs 'normalize' before it; it cannot be disabled"):
        select_passes(["absorb_mla"], disable=["normalize"])
    # the default pipeline: disabling a pass leaves out the default passes that need it
    assert [p.name for p in select_passes(disable=["normalize"])] == ["canonicalize", "fuse_add_rms_norm"]


def test_the_target_machine_reaches_the_passes(tiny_program):
    from dsc.machine import Machine

    slow = Machine("test-cpu", peak_flops=1e11, peak_bw=2e10, context=512)
    _, records = run_pipeline(tiny_program, select_passes(["absorb_mla"]), verify=False, machine=slow)
    why = records[-1].stats["entries"]["decode"]["why"]
    assert "on test-cpu" in why and "512 context" in why


def test_absorb_mla_prices_dsa_sparse_only_when_fuse_dsa_follows(tiny_program):
    """Each pass learns which passes run after it: absorb_mla prices its forms as fuse_dsa will leave
    them only where fuse_dsa is in the pipeline (run on its own, the default pipeline is assumed)."""
    _, alone = run_pipeline(tiny_program, select_passes(["absorb_mla"]), verify=False)
    _, fused = run_pipeline(tiny_program, select_passes(["absorb_mla", "fuse_dsa"]), verify=False)
    assert "mha:" in alone[-1].stats["entries"]["prefill"]["why"]  # the forms were priced
    assert "with DSA sparse" not in alone[-1].stats["entries"]["prefill"]["why"]
    assert "with DSA sparse" in fused[-2].stats["entries"]["prefill"]["why"]
    program = tiny_program
    for name in ("canonicalize", "normalize", "absorb_mla"):
        program, _, stats = apply(name, program)
    assert "with DSA sparse" in stats["entries"]["prefill"]["why"]
