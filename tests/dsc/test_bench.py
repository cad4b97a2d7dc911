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
    # the split of a step: plain decoding's decode calls; a speculative step's verify and draft calls
    # and the runtime's own work, which with the calls' whole time per step make up ms_per_step
    for v in ("eager", "dsc"):
        plain, drafted = spec[v, 0], spec[v, 2]
        assert plain["decode_ms"] > 0 and "verify_ms" not in plain and "runtime_ms_per_step" not in plain
        assert drafted["verify_ms"] > 0 and drafted["draft_ms"] > 0 and drafted["runtime_ms_per_step"] >= 0
        assert "decode_ms" not in drafted
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


def test_step_split_leaves_out_the_prompt_and_prices_the_runtime():
    from dsc.bench import step_split

    calls = [("prefill", 0.5), ("draft", 0.3)] + [("verify", 0.004), ("draft", 0.002)] * 3
    stats = {"speculative": 1, "verify_steps": 3, "decode_s": 0.021}
    split = step_split(calls, stats, prompt_calls=1)
    # the prompt's draft (0.3 s) is not a step's; 21 ms over 3 steps less 6 ms of calls a step
    assert split == {"verify_ms": 4.0, "draft_ms": 2.0, "runtime_ms_per_step": 1.0}
    plain = step_split([("prefill", 0.5), ("decode", 0.003), ("decode", 0.005)], {"decode_s": 0.008}, 1)
    assert plain == {"decode_ms": 4.0}
    # a prompt in two chunks: a prefill and a decode extend, then a draft over each
    chunked = [("prefill", 0.5), ("decode", 0.4), ("draft", 0.3), ("draft", 0.2), ("verify", 0.004), ("draft", 0.002)]
    split = step_split(chunked, {"speculative": 1, "verify_steps": 1, "decode_s": 0.007}, prompt_calls=2)
    assert split == {"verify_ms": 4.0, "draft_ms": 2.0, "runtime_ms_per_step": 1.0}
