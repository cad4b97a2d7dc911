import pytest
import torch
import torch.nn.functional as F

from dsc.verify import FP32_REASSOC, compare, make_scenario, run_scenario
from tests.passes.helpers import apply, ops, toy_program
from tests.tolerances import TOL

EPS = 1e-6
FUSED = "dsc.add_rms_norm.default"


class PowSpelling(torch.nn.Module):
    def forward(self, x, r, w):
        s = x + r
        return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * w, s * 3


class MulSpelling(torch.nn.Module):  # x*x, weight on the left, fp32 round trip from bf16-style casts
    def forward(self, x, r, w):
        s = r + x
        sf = s.float()
        return (w * (sf * torch.rsqrt((sf * sf).mean(dim=-1, keepdim=True) + EPS))).to(x.dtype), s


class FunctionalSpelling(torch.nn.Module):
    def forward(self, x, r, w):
        s = x + r
        return F.rms_norm(s, (s.shape[-1],), w, EPS), s


@pytest.mark.parametrize("mod", [PowSpelling(), MulSpelling(), FunctionalSpelling()], ids=lambda m: type(m).__name__)
def test_fires_on_each_spelling(mod):
    args = (torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(32))
    p, _, _ = apply("canonicalize", toy_program(mod, *args))  # the pass's precondition
    out, matches, _ = apply("fuse_add_rms_norm", p)
    assert matches == 1
    h = ops(out)
    assert h[FUSED] == 1 and "aten.rsqrt.default" not in h and "aten.add.Tensor" not in h
    for a, b in zip(out.module("forward")(*args), mod(*args)):
        torch.testing.assert_close(a, b, **TOL["fp32_reassoc"])
    assert any(n.meta.get("dsc_pass") == "fuse_add_rms_norm" for n in out.entries["forward"].graph.nodes)


class ExtraUser(torch.nn.Module):  # the rsqrt is read elsewhere: fusing would lose it
    def forward(self, x, r, w):
        s = x + r
        inv = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)
        return s * inv * w, inv


class NotLastDim(torch.nn.Module):
    def forward(self, x, r, w):
        s = x + r
        return s * torch.rsqrt(s.pow(2).mean(0, keepdim=True) + EPS) * w


class Broadcast(torch.nn.Module):  # x + bias: not a residual add of two streams
    def forward(self, x, r, w):
        s = x + r[0, 0]
        return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * w


class NoAdd(torch.nn.Module):
    def forward(self, x, r, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


class CastBack(torch.nn.Module):  # math in a wider type, the weight, then a cast back (as bf16 models do)
    def forward(self, x, r, w):
        xd = x.double()
        return (w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS))).float()


class MixedWeight(torch.nn.Module):  # a bf16 weight times the fp32 norm: aten.rms_norm would not promote alike
    def forward(self, x, r, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.to(torch.bfloat16)


@pytest.mark.parametrize("mod", [ExtraUser(), NotLastDim(), MixedWeight()], ids=lambda m: type(m).__name__)
def test_does_not_fire_when_preconditions_fail(mod):
    args = (torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(32))
    p, _, _ = apply("canonicalize", toy_program(mod, *args))
    out, matches, _ = apply("fuse_add_rms_norm", p)
    assert matches == 0 and FUSED not in ops(out) and "aten.rms_norm.default" not in ops(out)


@pytest.mark.parametrize("mod", [Broadcast(), NoAdd(), CastBack()], ids=lambda m: type(m).__name__)
def test_a_norm_without_a_residual_add_becomes_one_rms_norm(mod):
    args = (torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(32))
    p, _, _ = apply("canonicalize", toy_program(mod, *args))
    out, matches, stats = apply("fuse_add_rms_norm", p)
    h = ops(out)
    assert matches == 1 and stats["rms_norms_per_entry"] == {"forward": 1} and FUSED not in h
    assert h["aten.rms_norm.default"] == 1 and "aten.rsqrt.default" not in h and "aten.mean.dim" not in h
    got, want = out.module("forward")(*args), mod(*args)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL["fp32_reassoc"])


def test_reference_model_one_site_per_residual_norm(tiny_program):
    canon, _, _ = apply("canonicalize", tiny_program)
    out, matches, stats = apply("fuse_add_rms_norm", canon)
    # per entry, tiny (2 layers): post-attn norm of layer 0, both norms of layer 1, the final norm
    # the others, one aten.rms_norm each: q_a / kv_a norms x 2 and layer 0's input norm; in mtp, enorm,
    # hnorm, the MTP block's input norm (of eh_proj's output, no residual add) and its q_a / kv_a norms
    assert stats["sites_per_entry"] == {"prefill": 4, "decode": 4, "mtp": 2}
    assert stats["rms_norms_per_entry"] == {"prefill": 5, "decode": 5, "mtp": 5} and matches == 25
    for entry in ("prefill", "decode"):
        h = ops(out, entry)
        assert h[FUSED] == 4 and h["aten.rms_norm.default"] == 5 and "aten.rsqrt.default" not in h
    sc = make_scenario(tiny_program.config)
    _, violations = compare(run_scenario(canon, sc), run_scenario(out, sc), FP32_REASSOC)
    assert not violations


def test_idempotent(tiny_program):
    canon, _, _ = apply("canonicalize", tiny_program)
    once, _, _ = apply("fuse_add_rms_norm", canon)
    twice, matches, _ = apply("fuse_add_rms_norm", once)
    assert matches == 0 and twice.entries["decode"].graph_module.code == once.entries["decode"].graph_module.code


@pytest.mark.parametrize("kind", ["v3", "v32"])
def test_hf_modeling_code_every_norm_fused_and_equal_to_hf(kind):
    """HF transformers' DeepSeek-V3 / V3.2 RMSNorm (fp32 casts, weight after the cast back), exported
    as HF runs a decode step: every norm becomes one op and the logits are HF's."""
    from dsc.program import CacheSpec, Program
    from tests.passes.hf_models import assert_matches_hf, export_case, hf_model

    m = hf_model(kind, "sdpa")
    ep, inputs = export_case(m, "decode")
    program, _, _ = apply("canonicalize", Program({"forward": ep}, CacheSpec([]), config=None))
    out, matches, stats = apply("fuse_add_rms_norm", program)
    L = m.config.num_hidden_layers
    # per layer the input norm (layer 0's reads the embedding), the post-attention norm and the
    # final norm follow residual adds; q_a / kv_a norms and layer 0's input norm stand alone
    assert stats["sites_per_entry"] == {"forward": 2 * L} and stats["rms_norms_per_entry"] == {"forward": 2 * L + 1}
    h = ops(out)
    assert h[FUSED] == 2 * L and h["aten.rms_norm.default"] == 2 * L + 1 and "aten.rsqrt.default" not in h
    assert_matches_hf(m, "decode", inputs, out.module("forward"), **TOL["fp32_reassoc"])
