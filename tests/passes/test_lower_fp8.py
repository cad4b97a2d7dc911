"""lower_fp8: every constant-weight linear outside the spec §7.5 policy becomes dsc::fp8_linear on
e4m3 weights (W8A8 with dsc::act_quant, or W8A16), verified, with each matmul's decision in the record."""

import json

import pytest
import torch
from dsc.model.fp8 import block_dequant

from dsc.cli import main
from dsc.errors import DscError
from dsc.pass_manager import run_pipeline, select_passes
from dsc.program import Program
from dsc.verify import TOLERANCES
from tests.passes.helpers import apply, ops
from tests.tolerances import SQNR_DB

FP8_LINEAR, ACT_QUANT = "dsc.fp8_linear.default", "dsc.act_quant.default"
KEPT = {"lm_head", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate"}


def _normal(program):
    for name in ("canonicalize", "normalize"):
        program, _, _ = apply(name, program)
    return program


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_reference_model(tiny_program, tiny_cfg, mode, tmp_path):
    out, records = run_pipeline(tiny_program, select_passes(["lower_fp8"]), options={"lower_fp8": {"mode": mode}})
    rec = records[-1]  # verified under the mode's tolerance
    assert rec.tolerance == TOLERANCES[f"fp8_{mode}"] and rec.numerics.sqnr_db > 20
    mm = rec.stats["matmuls"]
    kept = {k for k, v in mm.items() if v["decision"] == "kept"}
    assert {k for k in kept if "indexer.weights_proj" not in k} >= KEPT
    assert all("spec §7.5" in mm[k]["reason"] for k in KEPT)
    lowered = {k for k, v in mm.items() if v["decision"] == "fp8"}
    assert "model.layers.0.self_attn.q_a_proj" in lowered and "model.layers.0.mlp.down_proj" in lowered
    experts = {f"model.layers.{i}.mlp.experts" for i in (1, 2)}  # the routed experts, one line per MoE
    assert experts <= lowered and all(mm[k]["experts"] and mm[k]["shape"] == [8, 32, 64] for k in experts)
    for entry in out.entries:
        h = ops(out, entry)
        assert h.get(FP8_LINEAR, 0) > 0 and (
            h.get(ACT_QUANT, 0) == h[FP8_LINEAR] if mode == "w8a8" else ACT_QUANT not in h
        )
        assert "dsc.moe_experts.default" not in h
    assert sum(ops(out, e).get("dsc.moe_experts_fp8.default", 0) for e in out.entries) >= 2
    # every lowered matmul's output SQNR on the verification inputs, against its fp32 product (a MoE's
    # experts: two quantised matmuls deep, their own floor)
    floor = {k: SQNR_DB["fp8_experts" if k in experts else "fp8_weight_dequant"] for k in lowered}
    assert all(mm[k]["sqnr_db"] >= floor[k] for k in lowered), {k: mm[k]["sqnr_db"] for k in lowered}
    assert rec.stats["sqnr_db"]["matmuls"] == len(lowered) and rec.stats["sqnr_db"]["below_floor"] == {}
    w = rec.stats["weights"]  # every weight tensor: the linears' and 3 x 8 experts' in each MoE
    assert w["lowered"] == len(lowered) - 2 + 2 * 3 * 8 and w["bytes_after"] < w["bytes_before"] / 3.5
    # the e4m3 weights dequantise to the fp32 ones within e4m3's precision, and the original is gone
    weights = out.weights()
    name = "m.model.layers.0.self_attn.q_a_proj.weight"
    assert name not in weights and weights[name + "_fp8"].dtype == torch.float8_e4m3fn
    orig = tiny_program.weights()[name]
    back = block_dequant(weights[name + "_fp8"], weights[name + "_fp8_scale"])
    assert (back - orig).abs().max() <= orig.abs().max() / 16
    # save -> load -> the same numbers
    out.save(tmp_path / "p")
    again = Program.load(tmp_path / "p")
    toks = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        a, _ = out.prefill(toks, out.cache.allocate(1, 9))
        b, _ = again.prefill(toks, again.cache.allocate(1, 9))
    assert torch.equal(a, b)


def test_include_exclude_and_bad_inputs(tiny_program):
    base = _normal(tiny_program)
    out, _, stats = apply("lower_fp8", base, {"include": "lm_head", "exclude": "*.mlp.*,*.indexer.*"})
    mm = stats["matmuls"]
    assert mm["lm_head"]["decision"] == "fp8" and "included by 'lm_head'" in mm["lm_head"]["reason"]
    assert all(v["decision"] == "kept" for k, v in mm.items() if ".mlp." in k or ".indexer." in k)
    # the experts of one MoE op go together: a pattern that keeps one expert keeps them all, and says so
    _, _, stats = apply("lower_fp8", base, {"exclude": "*.experts.3.*"})
    moe = stats["matmuls"]["model.layers.1.mlp.experts"]
    assert moe["decision"] == "kept" and "lowered together" in moe["reason"]
    assert stats["matmuls"]["model.layers.1.mlp.shared_experts.up_proj"]["decision"] == "fp8"
    with pytest.raises(DscError, match="match no matmul"):
        apply("lower_fp8", base, {"exclude": "*.no_such_module"})
    with pytest.raises(DscError, match="mode must be one of"):
        apply("lower_fp8", base, {"mode": "w4a16"})
    name = "m.model.layers.0.self_attn.o_proj.weight"
    w = base.weights()[name].detach().clone()
    w[0, 0] = float("nan")
    with pytest.raises(DscError, match="o_proj holds NaN"):
        apply("lower_fp8", _with_weight(base, name, w))


def _with_weight(program, name, tensor):
    """A clone whose weight ``name`` is ``tensor`` (new tensors: the fixture's stay as they are)."""
    out = program.clone()
    for ep in out.entries.values():
        if name in ep.state_dict:
            ep.state_dict[name] = torch.nn.Parameter(tensor, requires_grad=False)
    return out


def test_all_zero_blocks_get_a_finite_scale(tiny_program):
    base = _normal(tiny_program)
    name = "m.model.layers.0.self_attn.o_proj.weight"
    out, _, _ = apply("lower_fp8", _with_weight(base, name, torch.zeros_like(base.weights()[name])))
    s = out.weights()[name + "_fp8_scale"]
    assert torch.isfinite(s).all() and (s > 0).all()


def test_fp8_flags_put_the_pass_in_pipeline_order():
    from argparse import Namespace

    from dsc.cli import _fp8_flags

    ns = Namespace(
        passes=None, disable_pass=None, pass_option=None, fp8="w8a16", fp8_include="lm_head", fp8_exclude=None
    )
    passes, options = _fp8_flags(ns)
    assert passes[-2:] == ["lower_fp8", "fuse_add_rms_norm"] and passes[:5] == [
        "canonicalize",
        "normalize",
        "draft_mtp",
        "absorb_mla",
        "fuse_dsa",
    ]
    assert options == ["lower_fp8.mode=w8a16", "lower_fp8.include=lm_head"]


def test_fp8_flags_need_the_pass(tmp_path, capsys):
    assert main(["optimize", "tiny", "-o", str(tmp_path / "o"), "--fp8-include", "lm_head"]) == 2
    assert "add --fp8" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_transformers_deepseek_v32_code():
    """HF's own modeling code: its projections and its batched routed experts lowered, lm_head /
    router / weights_proj kept, and the logits within FP8's contract of HF's."""
    pytest.importorskip("transformers")
    from dsc.program import CacheSpec
    from tests.passes.hf_models import export_case, fresh, hf_model, hf_output

    m = hf_model("v32", "sdpa")
    ep, inputs = export_case(m, "decode")
    program = _normal(Program({"forward": ep}, CacheSpec([]), config=None))
    out, matches, stats = apply("lower_fp8", program)
    mm = stats["matmuls"]
    assert (
        mm["lm_head"]["decision"] == "kept"
        and mm["model.layers.0.self_attn.indexer.weights_proj"]["decision"] == "kept"
    )
    assert mm["model.layers.0.self_attn.q_b_proj"]["decision"] == "fp8" and matches >= 8 * m.config.num_hidden_layers
    # its routed experts: stacked (E, N, K) weights gathered by the routing into batched matmuls
    assert all(mm[f"model.layers.{i}.mlp.experts.{w}"]["decision"] == "fp8" for i in (1, 2)
               for w in ("gate_up_proj", "down_proj"))  # fmt: skip
    assert ops(out, "forward").get("dsc.fp8_linear_gathered.default") == 4 and "aten.bmm.default" not in ops(
        out, "forward"
    )
    args = inputs(2, 1)
    with torch.no_grad():
        want, got = hf_output(m, "decode", args), out.module("forward")(*fresh(args))
    sqnr = 10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum())
    assert sqnr > TOLERANCES["fp8_w8a8"].min_sqnr_db, sqnr


def test_an_fp8_checkpoint_keeps_its_bytes(tiny, tmp_path, capsys):
    """An FP8 HF checkpoint (e4m3 + weight_scale_inv, ragged edges at tiny's sizes) through
    `dsc optimize --fp8 --fp8-exclude ...`: the lowered weights are the checkpoint's bytes and
    scales, bit for bit, through save and load."""
    from dsc.model.checkpoint import Checkpoint, checkpoint_from_model, save_hf
    from dsc.model.fp8 import block_quant

    ckpt = checkpoint_from_model(tiny)
    keep = ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight", "weights_proj", "eh_proj")
    tensors = {}
    for k, t in ckpt.tensors.items():
        if t.ndim == 2 and not any(s in k for s in keep):
            tensors[k], tensors[k + "_scale_inv"] = block_quant(
                t, ue8m0=True
            )  # max |q| < 448: requantising would differ
        else:
            tensors[k] = t
    cfg = ckpt.config
    cfg.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    save_hf(Checkpoint(cfg, tensors), tmp_path / "m")
    args = ["optimize", str(tmp_path / "m"), "-o", str(tmp_path / "out"), "--passes", "lower_fp8"]
    args += ["--fp8-exclude", "*.indexer.*", "--no-verify", "--json"]  # (the numbers: test_reference_model)
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    rec = next(p for p in report["passes"] if p["name"] == "lower_fp8")
    assert rec["stats"]["mode"] == "w8a8" and rec["matches"] > 0
    assert rec["stats"]["weights"]["from_checkpoint"] == rec["stats"]["weights"]["lowered"] > 10
    assert all(v["decision"] == "kept" for k, v in rec["stats"]["matmuls"].items() if ".indexer." in k)
    weights = Program.load(tmp_path / "out").weights()
    for name in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.1.mlp.shared_experts.up_proj.weight"):  # fmt: skip
        got = weights[f"m.{name}_fp8"]
        assert got.dtype == torch.float8_e4m3fn and torch.equal(got.view(torch.uint8), tensors[name].view(torch.uint8))
        assert torch.equal(weights[f"m.{name}_fp8_scale"], tensors[name + "_scale_inv"])


def test_a_matmul_below_its_floor_is_named_with_the_way_out(tiny_program, monkeypatch):
    """A lowered matmul whose FP8 product keeps less than the typical SQNR is a warning naming it and
    the --fp8-exclude that keeps it in high precision (here every linear: the floor raised to 100 dB)."""
    from dsc.verify import SQNR_FLOORS_DB

    monkeypatch.setitem(SQNR_FLOORS_DB, "fp8_weight_dequant", 100.0)
    events = []
    _, records = run_pipeline(
        tiny_program, select_passes(["lower_fp8"]), verify=False, on_event=lambda k, m: events.append((k, m))
    )
    stats = records[-1].stats
    low = stats["sqnr_db"]["below_floor"]
    assert "model.layers.0.self_attn.q_a_proj" in low and not any(p.endswith(".mlp.experts") for p in low)
    warned = [m for k, m in events if k == "warn"]
    assert len(warned) == len(low) and any("--fp8-exclude 'model.layers.0.self_attn.q_a_proj'" in m for m in warned)


def test_absorbed_w_uk_w_uv_per_head_from_the_checkpoints_bytes(tmp_path, capsys):
    """absorb_mla's W_UK / W_UV (views of W_kv_b) lowered per head: with DeepSeek's 128 + 128 rows a
    head each head's rows are whole 128-row blocks of the checkpoint's kv_b_proj, so the per-head FP8
    weights are its e4m3 bytes and weight_scale_inv laid out per head, bit for bit."""
    import dataclasses

    from dsc.model.checkpoint import Checkpoint, checkpoint_from_model, save_hf
    from dsc.model.config import preset
    from dsc.model.fp8 import block_quant
    from dsc.model.model import DeepseekV32ForCausalLM

    cfg = dataclasses.replace(preset("tiny"), qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=256,
                              num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    ckpt = checkpoint_from_model(DeepseekV32ForCausalLM(cfg).init_weights(0).eval())
    tensors = {}
    for k, t in ckpt.tensors.items():
        if k.endswith("kv_b_proj.weight"):
            tensors[k], tensors[k + "_scale_inv"] = block_quant(t, ue8m0=True)
        else:
            tensors[k] = t
    cfg.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    save_hf(Checkpoint(cfg, tensors), tmp_path / "m")
    args = ["optimize", str(tmp_path / "m"), "-o", str(tmp_path / "out"), "--passes", "absorb_mla,lower_fp8"]
    absorbed = ["--pass-option", "absorb_mla.products=never"]  # the per-head W_UK / W_UV, whatever the pricing
    assert main([*args, *absorbed, "--fp8-include", "*.kv_b_proj", "--json", "--no-measure"]) == 0
    rec = next(p for p in json.loads(capsys.readouterr().out)["passes"] if p["name"] == "lower_fp8")
    per_head = {k: v for k, v in rec["stats"]["matmuls"].items() if "kv_b_proj (" in k}
    assert {k.split(" ")[0] for k in per_head} >= {f"model.layers.{i}.self_attn.kv_b_proj" for i in (0, 1)} and all(
        v["decision"] == "fp8" and "checkpoint's own" in v["reason"] for v in per_head.values()
    )
    assert all(v["sqnr_db"] >= SQNR_DB["fp8_weight_dequant"] for v in per_head.values())
    weights = Program.load(tmp_path / "out").weights()
    kv = tensors["model.layers.0.self_attn.kv_b_proj.weight"].view(torch.uint8).view(2, 256, 256)  # (h, dn + dv, c)
    sc = tensors["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"].view(2, 2, 2)
    heads = {
        tuple(w.shape): k
        for k, w in weights.items()
        if ".layers.0.self_attn.kv_b_proj.heads" in k and k.endswith("_fp8")
    }
    uk, uv = heads[(2, 256, 128)], heads[(2, 128, 256)]  # W_UK as (h, c, d): contracted over d; W_UV (h, v, c)
    assert torch.equal(weights[uk].view(torch.uint8), kv[:, :128].transpose(1, 2))
    assert torch.equal(weights[uk + "_scale"], sc[:, :1].transpose(1, 2))
    assert torch.equal(weights[uv].view(torch.uint8), kv[:, 128:]) and torch.equal(weights[uv + "_scale"], sc[:, 1:])


def test_lower_fp8_runs_after_the_passes_whose_matches_it_would_hide():
    with pytest.raises(DscError, match="must run after 'absorb_mla'"):
        select_passes(["canonicalize", "normalize", "lower_fp8", "absorb_mla"])


def test_a_weight_computed_at_run_time_stays_and_is_said_so():
    """A linear whose weight is an input (or computed from one) is not lowered; the record says why."""
    from dsc.program import CacheSpec

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(256, 128, bias=False)

        def forward(self, x, w):
            return torch.nn.functional.linear(self.proj(x), w * 2.0)

    ep = torch.export.export(M(), (torch.randn(3, 256), torch.randn(64, 128)))
    out, matches, stats = apply("lower_fp8", _normal(Program({"forward": ep}, CacheSpec([]), config=None)))
    kept = [v for k, v in stats["matmuls"].items() if k.startswith("forward:")]
    assert matches == 1 and stats["matmuls"]["proj"]["decision"] == "fp8"
    assert len(kept) == 1 and kept[0] == {"decision": "kept", "reason": "the weight is not a parameter"}
    assert ops(out)["aten.linear.default"] == 1 and ops(out)[FP8_LINEAR] == 1


def test_absorbed_products_are_lowered_too(tiny_program):
    """With absorb_mla's precomputed products (W_UQ·W_UK read by ``bsl,hcl->bshc``, W_UV·W_O by a
    linear) every constant product is FP8, verified under the fp8 contract."""
    passes = select_passes(["absorb_mla", "lower_fp8"])
    out, records = run_pipeline(tiny_program, passes, options={"absorb_mla": {"products": "always"}})
    mm = records[-1].stats["matmuls"]
    uq_uk = [v for k, v in mm.items() if "absorbed_uq_uk (" in k]
    assert uq_uk and all(v["decision"] == "fp8" and v["sqnr_db"] >= SQNR_DB["fp8_weight_dequant"] for v in uq_uk)
    uv_o = [v for k, v in mm.items() if k.endswith("absorbed_uv_o")]
    assert uv_o and all(v["decision"] == "fp8" for v in uv_o)
    assert not any("not lowered yet" in v["reason"] for v in mm.values())
