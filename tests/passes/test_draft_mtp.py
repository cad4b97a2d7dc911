"""draft_mtp: the MTP block found by its computation becomes ``draft``; decode's graph becomes
``verify``; the passes after it rewrite both like any entry; a model without MTP gets no draft."""

import dataclasses

import pytest
import torch
from dsc.model.config import preset
from dsc.model.model import DeepseekV32ForCausalLM

from dsc.cache import CacheSpec
from dsc.frontends.module import capture as capture_module
from dsc.frontends.module import config_of
from dsc.frontends.reference import capture
from dsc.pass_manager import run_pipeline, select_passes
from dsc.program import Program
from tests.frontends.user_mtp_model import SpecDeepseekMTP, init_random, reference_mtp_logits, tiny_mtp_config
from tests.passes.helpers import apply, ops
from tests.tolerances import TOL


def _normal(program):
    for name in ("canonicalize", "normalize"):
        program, _, _ = apply(name, program)
    return program


def _mtp_over_prompt(program, entry, toks):
    """Logits (and the MTP hidden) of ``entry`` over a prompt, h_i with t_{i+1}, from a fresh cache."""
    B, S = toks.shape
    caches = program.cache.allocate(B, S)
    with torch.no_grad():
        _, hidden = program.prefill(toks, caches)
        pos = torch.arange(S - 1).expand(B, S - 1)
        args = (hidden[:, :-1], toks[:, 1:], pos, [c[:, : S - 1] for c in caches])
        return program.mtp(*args) if entry == "mtp" else program.draft(*args)


def test_reference_model(tiny_program, tiny):
    base = _normal(tiny_program)
    out, matches, stats = apply("draft_mtp", base)
    assert matches == 1 and list(out.entries) == ["prefill", "decode", "draft", "verify"], stats
    assert stats["draft"]["order"] == "[enorm(E[t]) ; hnorm(h)]" and stats["draft"]["attention_sites"] == 1
    assert stats["draft"]["mtp_cache_layers"] == [tiny.config.num_hidden_layers]
    toks = torch.randint(0, tiny.config.vocab_size, (2, 12))
    logits, mtp_hidden = _mtp_over_prompt(out, "draft", toks)
    torch.testing.assert_close(logits, _mtp_over_prompt(base, "mtp", toks), **TOL["fp32_exact_graph"])
    # the chained hidden is the head's input: the head of it gives the logits back
    torch.testing.assert_close(mtp_hidden @ tiny.lm_head.weight.T, logits, **TOL["fp32_reassoc"])
    # verify is decode over 1 + n tokens: logits and hidden at every position
    caches = out.cache.allocate(2, 16)
    with torch.no_grad():
        out.prefill(toks, [c[:, :12] for c in caches])
        ref = [c.clone() for c in caches]
        pos = torch.arange(12, 15).expand(2, 3)
        v_logits, v_hidden = out.verify(toks[:, :3], pos, caches)
        d_logits, d_hidden = out.decode(toks[:, :3], pos, ref)
    torch.testing.assert_close(v_logits, d_logits, **TOL["fp32_exact_graph"])
    torch.testing.assert_close(v_hidden, d_hidden, **TOL["fp32_exact_graph"])
    again, n, why = apply("draft_mtp", out)
    assert n == 0 and "already drafted" in why["why"]


def test_every_pass_rewrites_draft_and_verify(tiny_optimized, tiny_cfg):
    program, records = tiny_optimized
    assert set(program.entries) == {"prefill", "decode", "draft", "verify"}
    rec = {r.name: r for r in records}
    assert rec["draft_mtp"].matches == 1 and rec["draft_mtp"].numerics.max_abs_err == 0.0
    L = tiny_cfg.num_hidden_layers
    for name in ("absorb_mla", "fuse_dsa"):
        sites = {e: v["sites"] for e, v in rec[name].stats["entries"].items()}
        assert sites == {"prefill": L, "decode": L, "draft": 1, "verify": L}, (name, sites)
    assert ops(program, "draft")["dsc.sparse_mla.default"] == 1
    assert ops(program, "verify")["dsc.sparse_mla.default"] == L


def test_no_mtp_module_no_draft():
    cfg = dataclasses.replace(preset("tiny"), num_nextn_predict_layers=0)
    program = _normal(capture(DeepseekV32ForCausalLM(cfg).init_weights(0).eval()))
    out, matches, stats = apply("draft_mtp", program)
    assert matches == 0 and set(out.entries) == {"prefill", "decode"}
    assert "no mtp entry" in stats["why"] and "num_nextn_predict_layers = 0" in stats["why"]


def test_an_mtp_entry_that_is_not_an_mtp_block(tiny_program):
    """An ``mtp`` entry computing something else (here: the main model's decode) is left alone, said so."""
    base = _normal(tiny_program)
    odd = Program({**base.entries, "mtp": base.entries["decode"]}, base.cache, base.config)
    out, matches, stats = apply("draft_mtp", odd)
    assert matches == 0 and "not an MTP block" in stats["why"] and "draft" not in out.entries


@pytest.fixture(scope="module")
def stranger():
    """The MTP model of ``user_mtp_model.py``, written from the spec by someone who had not read the
    matcher: shared embedding looked up as ``W[t]``, ``F.rms_norm`` beside hand-written norms, the
    head as ``h @ W.T``, a latent cache re-expanded per call."""
    model = init_random(SpecDeepseekMTP(tiny_mtp_config()), 0).eval()
    cache = CacheSpec.from_description(model.cache_spec(), "user_mtp_model")
    return model, capture_module(model, cache, config_of(model))


def test_stranger_model(stranger):
    model, program = stranger
    out, records = run_pipeline(program, select_passes(), verify=True)
    rec = {r.name: r for r in records}
    assert rec["draft_mtp"].matches == 1, rec["draft_mtp"].stats
    assert set(out.entries) == {"prefill", "decode", "draft", "verify"}
    L = model.config["num_hidden_layers"]
    assert {e: v["sites"] for e, v in rec["absorb_mla"].stats["entries"].items()} == {
        "prefill": L, "decode": L, "draft": 1, "verify": L,
    }  # fmt: skip
    toks = torch.randint(0, model.config["vocab_size"], (2, 10))
    _, want = reference_mtp_logits(model, toks)  # no cache: the ground truth
    got, _ = _mtp_over_prompt(out, "draft", toks)
    torch.testing.assert_close(got, want, **TOL["fp32_rewrite"])
