import json

import pytest

from dsc.bench import ATTENTION_FORMS, GEMV_FORMS
from dsc.cli import main


def test_bench_quick_smoke(tmp_path, capsys, capture_once):
    """The one-minute smoke run: every variant and scenario produces medians, ratios and plots."""
    assert main(["bench", "--quick", "-o", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["bandwidth_gbs"] > 0
    points = data["points"]
    assert {p["variant"] for p in points if p["scenario"] not in ("attention", "gemv")} == {"eager", "compile", "dsc"}
    assert {p["scenario"] for p in points} == {"decode", "prefill", "attention", "speculative", "gemv"}
    for p in points:
        assert p["median_ms"] > 0 and (p["scenario"] == "speculative" or p["x_bound"] > 0)
        plain = p.get("draft_tokens", 0) == 0
        assert p["speedup_vs_eager"] == (
            1.0 if p["variant"] in ("eager", "per_head", "fp32") and plain else p["speedup_vs_eager"]
        )
    # one MLA layer's attention, four forms that agree: the absorbed ones read the latent cache only
    att = {p["variant"]: p for p in points if p["scenario"] == "attention" and p["tokens"] == 768}
    assert list(att) == list(ATTENTION_FORMS)
    assert att["mla_decode"]["bytes_moved"] == att["absorbed_torch"]["bytes_moved"] < att["per_head"]["bytes_moved"]
    # the decode matmul alone: FP8 reads a quarter of fp32's bytes (plus one scale per 128x128 block)
    gemv = {p["variant"]: p for p in points if p["scenario"] == "gemv"}
    assert list(gemv) == list(GEMV_FORMS) and gemv["fp32"]["tokens"] == 512
    assert gemv["fp8_w8a8"]["bytes_moved"] == gemv["fp8_w8a16"]["bytes_moved"] == pytest.approx(512 * 512 + 16 * 4)
    assert gemv["fp32"]["bytes_moved"] == pytest.approx(4 * 512 * 512)
    # speculative: plain and 2 drafts per step for every variant (the same tokens, checked by the run)
    spec = {(p["variant"], p["draft_tokens"]): p for p in points if p["scenario"] == "speculative"}
    assert set(spec) == {(v, n) for v in ("eager", "dsc") for n in (0, 2)}
    assert len(spec["dsc", 2]["acceptance_per_position"]) == 2 and spec["dsc", 0]["speedup_vs_plain"] == 1.0
    for scenario in ("decode", "prefill", "attention", "gemv"):
        assert (tmp_path / f"bench_{scenario}.svg").read_text().startswith("<svg")
    out = capsys.readouterr().out  # the table (rich wraps its cells to the terminal)
    assert "mla_decode" in out and "compile" in out and "speed-up" in out


def test_bench_bad_options(tmp_path, capsys):
    assert main(["bench", "--quick", "--variants", "eager,turbo", "-o", str(tmp_path)]) == 2
    assert "unknown ['turbo']" in capsys.readouterr().err
    assert main(["bench", "--quick", "--contexts", "1k", "-o", str(tmp_path)]) == 2


def test_bench_per_pass_ablation(capture_once):
    from dsc.bench import BenchConfig, run_bench

    cfg = BenchConfig.quick(
        variants=("eager", "dsc:canonicalize", "dsc"), scenarios=("decode",), contexts=(64,), repeat=2, warmup=1
    )
    res = run_bench(cfg, on_event=lambda *a: None)
    assert [p["variant"] for p in res.points] == ["eager", "dsc:canonicalize", "dsc"]
    by = {p["variant"]: p for p in res.points}
    # the ablation without absorb_mla moves more bytes per step than the full pipeline
    assert by["dsc:canonicalize"]["bytes_moved"] > by["dsc"]["bytes_moved"]
