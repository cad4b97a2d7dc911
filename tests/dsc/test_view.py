"""dsc view: the Model Explorer config (graphs through Model Explorer's own adapter, node-data overlays)."""

import json
import math
from urllib.parse import unquote

import pytest

from dsc.cli import main
from dsc.fx_utils import listing
from dsc.picture import changed_nodes

me = pytest.importorskip("model_explorer", reason="the optional extra 'view' (ai-edge-model-explorer)")


def _node_ids(graphs_json: str) -> set[str]:
    return {n["id"] for g in json.loads(graphs_json)["graphs"] for n in g["nodes"]}


def test_config_graphs_and_overlays(tiny_program, tiny_optimized):
    from dsc.view import build_config

    after = tiny_optimized[0]
    cfg = build_config(tiny_program, after, "decode", ("tiny", "out"), 1024)
    data = cfg.get_transferrable_data()  # what the server hands the web app
    graphs = json.loads(data["graphs_list"])
    assert len(graphs) == 2
    ids = [_node_ids(g) for g in graphs]
    models = [s["url"].split("/")[2] for s in data["model_sources"]]
    assert models == ["A tiny: decode", "B out: decode"]
    graph_ids = [json.loads(g)["graphs"][0]["id"] for g in graphs]
    panes = json.loads(unquote(cfg.to_url_param_value()))["uiState"]["paneStates"]
    assert [(p["selectedCollectionLabel"], p["selectedGraphId"]) for p in panes] == list(zip(models, graph_ids))
    removed, added = changed_nodes(listing(tiny_program.entries["decode"]), listing(after.entries["decode"]))
    overlays = {}
    for src, target, nd in zip(data["node_data_sources"], data["node_data_target_models"], cfg.node_data_list):
        name = src.removeprefix("node_data://").rsplit("/", 1)[0]
        ((graph_id, per_graph),) = json.loads(nd.to_json_string()).items()
        assert graph_id == graph_ids[models.index(target)]  # node data names the graph it applies to
        results = per_graph["results"]
        assert set(results) <= ids[models.index(target)], name  # keyed by the adapter's node ids
        overlays[name] = (target, results)
    assert set(overlays["removed"][1]) == set(removed) and overlays["removed"][0] == models[0]
    assert set(overlays["added"][1]) == set(added) and overlays["added"][0] == models[1]
    for p in ("absorb_mla", "fuse_dsa", "fuse_add_rms_norm"):
        assert overlays[f"made by {p}"][0] == models[1]
    errors = overlays["B vs A max |error| (verification inputs)"]
    assert errors[0] == models[1] and len(errors[1]) > 20  # nodes the passes left in place
    assert max(v["value"] for v in errors[1].values()) < 1e-3  # fp32 rewrites: rounding only
    assert all(math.isfinite(v["value"]) for _, r in overlays.values() for v in r.values())  # JSON has no NaN
    flops = overlays["B FLOPs (decode, 1024 ctx)"][1]
    mla = [k for k in flops if k.startswith("sparse_mla")]
    assert mla and all(flops[k]["value"] > 0 for k in mla)


def test_view_errors(tmp_path, capsys, tiny_program, monkeypatch):
    out = tmp_path / "p"
    tiny_program.save(out)
    assert main(["view", str(out), str(out), "--entry", "nope", "--no-browser"]) == 2
    assert "entry 'nope' is not in A and B" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "model_explorer", None)  # the extra not installed
    assert main(["view", str(out), str(out)]) == 2
    assert "pip install 'dsc[view]'" in capsys.readouterr().err
