"""report.json schema, the HTML page, the cost model, and `dsc diff`."""

import json
import re

import sympy

from dsc.cli import main
from dsc.cost import T, attention_interiors, entry_cost, program_cost
from dsc.optimize import program_summary
from dsc.report import SCHEMA_VERSION, render_html, write_report
from tests.passes.helpers import DEFAULT_PASSES

PASS_KEYS = {"name", "changed", "options", "matches", "tolerance", "numerics"}
NUMERICS_KEYS = {"max_abs_err", "max_rel_err", "top1_agreement", "sqnr_db", "worst", "kl_nats", "warnings"}
SIDE_KEYS = {
    "nodes",
    "param_bytes",
    "cache_bytes_per_token",
    "flops_per_decode_step",
    "bytes_per_decode_step",
    "context_len",
    "decode_curve",
}


def _report(tiny_program, tiny_optimized):
    program, records = tiny_optimized
    return {
        "schema_version": SCHEMA_VERSION,
        "model": "tiny",
        "passes": [r.to_dict() for r in records],
        "before": program_summary(tiny_program),
        "after": program_summary(program),
    }, {r.name: r.graphs for r in records if r.changed}


def test_report_json_schema(tiny_program, tiny_optimized, tmp_path):
    report, graphs = _report(tiny_program, tiny_optimized)
    write_report(tmp_path, report, graphs)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema_version"] == 1
    assert [p["name"] for p in data["passes"]] == DEFAULT_PASSES
    for p in data["passes"]:  # a pass that changed nothing has nothing to verify
        assert PASS_KEYS <= set(p) and (NUMERICS_KEYS == set(p["numerics"]) if p["changed"] else p["numerics"] is None)
    for side in ("before", "after"):
        assert SIDE_KEYS <= set(data[side])
        assert len(data[side]["decode_curve"]["context"]) == len(data[side]["decode_curve"]["flops"]) >= 3
    assert data["after"]["bytes_per_decode_step"] < data["before"]["bytes_per_decode_step"]
    # the split of work between entries: the draft is one layer, verify a decode of two tokens
    costs = data["after"]["entry_costs"]
    assert set(costs) == {"prefill", "decode", "draft", "verify"} and set(data["before"]["entry_costs"]) >= {"mtp"}
    assert costs["draft"]["bytes"] < costs["decode"]["bytes"] < costs["verify"]["bytes"]
    assert "Cost per call of each entry point" in (tmp_path / "report.html").read_text()


def test_html_is_self_contained_and_traces_new_nodes(tiny_program, tiny_optimized):
    report, graphs = _report(tiny_program, tiny_optimized)
    page = render_html(report, graphs)
    assert "<script" not in page and "<link" not in page
    urls = set(re.findall(r"https?://[^\"' ]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace only: no CDN, fonts or scripts
    assert page.count("<svg") - page.count('class="graph"') == 3  # the cost charts, beside the pictures
    assert '<span class="tag">fuse_add_rms_norm</span>' in page  # new nodes carry their pass
    assert 'class="del"' in page and 'class="add"' in page


def test_cost_model(tiny_program):
    cfg = tiny_program.config
    decode = entry_cost(tiny_program.entries["decode"], "decode")
    # linear in T apart from the indexer's sort (T log T): the T coefficient covers QK^T and PV of every
    # head and the indexer's per-head dot products, in each main layer
    poly = decode.flops.subs(sympy.log(T + cfg.index_topk), 0)
    coeff = sympy.Poly(sympy.expand(poly), T).coeff_monomial(T)
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    per_layer = 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) + 2 * cfg.index_n_heads * cfg.index_head_dim
    assert coeff >= L * per_layer
    prefill = entry_cost(tiny_program.entries["prefill"], "prefill")
    assert sympy.Poly(prefill.flops.subs(sympy.log(T + cfg.index_topk), 0), T).degree() == 2
    c = program_cost(tiny_program)
    assert c["decode_curve"]["context"][-1] == cfg.max_position_embeddings


def test_cost_model_counts_mla_decode_and_fused_attention(tiny_program, tiny_optimized):
    cfg = tiny_program.config
    L, H, dc, dr = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    # the absorbed (still dense) decode: every head scores T latents (dc + dr wide) and sums dc-wide values
    from dsc.pass_manager import run_pipeline, select_passes

    absorbed, _ = run_pipeline(tiny_program, select_passes(["absorb_mla"]), verify=False)
    after = entry_cost(absorbed.entries["decode"], "decode")
    coeff = sympy.Poly(sympy.expand(after.flops.subs(sympy.log(T + cfg.index_topk), 0)), T).coeff_monomial(T)
    assert coeff >= L * H * (2 * (dc + dr) + 2 * dc + 5)
    # a flash kernel never writes the scores: per layer the scores, scale, mask and softmax go on chip
    prefill = tiny_program.entries["prefill"]
    assert len(attention_interiors(prefill)) == 4 * L
    fused, unfused = entry_cost(prefill, "prefill", fused_attention=True), entry_cost(prefill, "prefill")
    saved = sympy.expand(unfused.bytes - fused.bytes)
    assert fused.flops == unfused.flops and sympy.Poly(saved, T).degree() == 2  # the (S, H, T) scores
    # DSA made sparse: attention reads k of the T latents, so only the indexer still grows with T
    sparse = entry_cost(tiny_optimized[0].entries["decode"], "decode")
    lin = sympy.Poly(sympy.expand(sparse.flops.subs(sympy.log(T + cfg.index_topk), 0)), T).coeff_monomial(T)
    indexer = L * cfg.index_n_heads * (2 * cfg.index_head_dim + 3)
    assert indexer <= lin < L * H * (2 * (dc + dr) + 2 * dc + 5)


def test_dsc_diff(tmp_path, capsys, tiny_program, capture_once):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_program.save(a)  # the captured Program, before any pass
    assert main(["optimize", "tiny", "-o", str(b), "--passes", "canonicalize,fuse_add_rms_norm", "--no-verify"]) == 0
    assert (b / "report.html").exists()
    capsys.readouterr()
    assert main(["diff", str(a), str(b), "--json", "--html", str(tmp_path / "d.html")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["op_changes"]["decode"]["dsc.add_rms_norm.default"] == [0, 4]
    assert "<svg" in (tmp_path / "d.html").read_text()
    assert main(["diff", str(b)]) == 0  # against its input, re-captured
    assert "aten._assert_tensor_metadata.default" in capsys.readouterr().out
    assert main(["diff", str(tmp_path)]) == 2
