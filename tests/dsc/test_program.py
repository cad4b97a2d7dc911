"""capture -> Program: runs like eager, saves and loads without pickles, entries share weights."""

import json

import pytest
import torch

from dsc.errors import DscError
from dsc.program import Program
from dsc.runtime import EagerBackend
from dsc.verify import EXACT, compare, make_scenario, run_scenario


def test_program_matches_eager_on_scenario(tiny, tiny_program):
    sc = make_scenario(tiny.config, seed=3)
    ref = run_scenario(EagerBackend(tiny), sc)
    got = run_scenario(tiny_program, sc)
    numerics, violations = compare(ref, got, EXACT)
    assert not violations, violations
    assert any(k.startswith("cache.") for k in got) and numerics.top1_agreement == 1.0


def test_compare_gates_top1_only_where_the_tolerance_says():
    """Lossy numerics (FP8) report a top-1 below their floor (saying how decided the reference was) and
    an elementwise excess as warnings; exact ones refuse both. KL is measured either way."""
    from dsc.verify import TOLERANCES

    g = torch.Generator().manual_seed(0)
    ref = {"x.logits": torch.randn(4, 50, generator=g) * 0.01}  # undecided: margins far below the noise
    got = {"x.logits": ref["x.logits"] + torch.randn(4, 50, generator=g) * 0.01}
    tol = type(TOLERANCES["fp8_w8a8"])
    lossy, violations = compare(ref, got, tol(atol=1e-3, rtol=0.0, min_top1=0.99, min_sqnr_db=-10.0, lossy=True))
    assert not violations and lossy.top1_agreement < 0.99
    assert "exceeds atol" in lossy.warnings[0] and "median top-1 margin" in lossy.warnings[1]
    assert lossy.kl_nats > 0 and compare(ref, ref, EXACT)[0].kl_nats == 0
    strict, violations = compare(ref, got, tol(atol=1e-3, rtol=0.0, min_top1=0.99, min_sqnr_db=-10.0))
    assert any("top-1 agreement" in v for v in violations) and any("exceeds atol" in v for v in violations)
    assert not strict.warnings
    # the SQNR floor gates lossy numerics too
    _, violations = compare(ref, got, tol(atol=1e-3, rtol=0.0, min_top1=0.0, min_sqnr_db=30.0, lossy=True))
    assert any("SQNR" in v for v in violations)


def test_cache_spec(tiny_program, tiny_cfg):
    spec = tiny_program.cache
    assert len(spec.tensors) == 3 * tiny_cfg.num_layers_total
    k0 = spec.tensors[0]
    assert k0.name == "layers.0.k" and k0.tail == [tiny_cfg.num_attention_heads, tiny_cfg.qk_head_dim]
    assert spec.bytes_per_token({0}) == 4 * (4 * 24 + 4 * 16 + 16)
    caches = spec.allocate(3, 10)
    assert caches[2].shape == (3, 10, tiny_cfg.index_head_dim)


def test_save_load_runs_identically(tiny_optimized, tmp_path):
    program, _ = tiny_optimized
    program.save(tmp_path / "p")
    files = sorted(p.name for p in (tmp_path / "p").rglob("*") if p.is_file())
    assert files == [
        "constants.safetensors",
        "decode.json",
        "draft.json",
        "manifest.json",
        "prefill.json",
        "verify.json",
        "weights.safetensors",
    ]
    back = Program.load(tmp_path / "p")
    assert back.prefill_chunk == program.prefill_chunk == 4096
    sc = make_scenario(program.config, seed=1)
    a, b = run_scenario(program, sc), run_scenario(back, sc)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # one weight store: both entries hold the very same tensor
    pre, dec = back.entries["prefill"].state_dict, back.entries["decode"].state_dict
    assert pre["m.lm_head.weight"] is dec["m.lm_head.weight"]
    assert back.cache == program.cache and back.provenance["passes"] == program.provenance["passes"]
    # the graphs keep the fused op
    assert "dsc.add_rms_norm" in back.entries["decode"].graph_module.code


def test_cpu_runtime_calls_the_dsc_ops_directly(tiny_optimized, monkeypatch):
    """On CPU the runnable graph calls each dsc:: op's function, not the dispatcher: the same
    results as the graph as exported (which keeps the registered ops), bit for bit. (Its few-row
    ``aten.linear`` calls keep torch's here: the native kernel agrees only up to fp32 re-association,
    tested in tests/kernels/test_linear.py.)"""
    import dataclasses

    from dsc.kernels import linear as lin
    from dsc.kernels.registry import cpu_function

    monkeypatch.setattr(lin, "USE_NATIVE", False)

    program, _ = tiny_optimized
    program = dataclasses.replace(program, _modules={})
    ep = program.entries["decode"]
    ops = {n.target for n in ep.graph.nodes if n.op == "call_function" and cpu_function(n.target)}
    assert {str(op) for op in ops} >= {"dsc.sparse_mla.default", "dsc.indexer_topk.default", "dsc.add_rms_norm.default"}
    targets = {n.target for n in program.module("decode").graph.nodes if n.op == "call_function"}
    assert not targets & ops and {cpu_function(op) for op in ops} <= targets
    sc = make_scenario(program.config, seed=2)
    direct = run_scenario(program, sc)
    program._modules["decode"] = ep.module(check_guards=False)  # through torch.ops.dsc.*
    program._modules["prefill"] = program.entries["prefill"].module(check_guards=False)
    dispatched = run_scenario(program, sc)
    for k in direct:
        assert torch.equal(direct[k], dispatched[k]), k


def test_clone_never_touches_the_original(tiny_program):
    code = tiny_program.entries["decode"].graph_module.code
    c = tiny_program.clone()
    for n in list(c.entries["decode"].graph.nodes):
        if n.op == "call_function" and not n.users and "assert" in str(n.target):
            c.entries["decode"].graph.erase_node(n)
    c.entries["decode"].graph_module.recompile()
    assert tiny_program.entries["decode"].graph_module.code == code
    assert (
        c.entries["decode"].state_dict["m.lm_head.weight"]
        is tiny_program.entries["decode"].state_dict["m.lm_head.weight"]
    )


def test_load_errors(tmp_path, tiny_optimized):
    with pytest.raises(DscError, match="not a saved dsc Program"):
        Program.load(tmp_path)
    program, _ = tiny_optimized
    program.save(tmp_path / "p")
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(m | {"format_version": 99}))
    with pytest.raises(DscError, match="version 99"):
        Program.load(tmp_path / "p")
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "p" / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(DscError, match="cannot read the Program's tensors"):
        Program.load(tmp_path / "p")
