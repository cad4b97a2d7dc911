"""fuse_dsa on the reference model: every DSA layer (MTP included) in every entry reads only its
selected latents, the numbers are the masked-dense ones, and it leaves alone what is not DSA."""

import pytest
import torch
from torch.export import Dim

from dsc.fx_utils import call_nodes, finalize, refresh_meta
from dsc.program import CacheSpec, Program
from tests.passes.dsa_zoo import DSA_ZOO
from tests.passes.helpers import apply, ops
from tests.tolerances import TOL

SPARSE, TOPK = "dsc.sparse_mla.default", "dsc.indexer_topk.default"
MHA = "dsc.sparse_mha.default"


def _absorbed(program):
    for name in ("canonicalize", "normalize", "absorb_mla"):
        program, _, _ = apply(name, program)
    return program


def _run(program, toks, steps, rows_start):
    """Logits of a prefill, single steps and S > 1 extends, rows at different positions."""
    B = toks.shape[0]
    total = toks.shape[1]
    caches = program.cache.allocate(B, total)
    P = int(rows_start.max())
    out = []
    with torch.no_grad():
        logits, _ = program.prefill(toks[:, :P], [c[:, :P] for c in caches])
        out.append(logits)
        p = rows_start.clone()
        for n in steps:
            pos = p[:, None] + torch.arange(n)
            T = int(pos.max()) + 1
            tk = torch.gather(toks, 1, pos)
            logits, _ = program.decode(tk, pos, [c[:, :T] for c in caches])
            out.append(logits)
            p += n
    return out


def test_reference_model_every_dsa_layer(tiny_program, tiny_cfg):
    dense = _absorbed(tiny_program)
    out, matches, stats = apply("fuse_dsa", dense)
    L = tiny_cfg.num_hidden_layers
    assert matches == 2 * L + 1, stats  # prefill and decode: every layer; mtp: the MTP layer
    for entry, n in (("prefill", L), ("decode", L), ("mtp", 1)):
        h = ops(out, entry)
        assert stats["entries"][entry]["form"] == "sparse" and "roofline" in stats["entries"][entry]["why"]
        assert h.get(SPARSE, 0) == n and h.get(TOPK, 0) == n
        assert "dsc.mla_decode.default" not in h and "aten.sort.stable" not in h  # no dense scores, no full sort
    # the fused Program's numbers are the masked-dense one's: a prefill past top-k, >= 32 steps, extends
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(0, 256, (2, 80), generator=g)
    start = torch.tensor([24, 20])  # the second row's prompt is padding past 20: it starts its extends earlier
    steps = [1] * 32 + [3, 2, 1]
    for a, b in zip(_run(dense, toks, steps, start), _run(out, toks, steps, start)):
        torch.testing.assert_close(b, a, **TOL["fp32_rewrite"])
    # idempotent: nothing left to fuse
    _, again, stats2 = apply("fuse_dsa", out)
    assert again == 0 and all(e["sites"] == 0 for e in stats2["entries"].values())


def test_a_selection_read_elsewhere_stays_dense(tiny_program):
    dense = _absorbed(tiny_program)
    ep = dense.entries["decode"]
    sort = call_nodes(ep.graph_module, torch.ops.aten.sort.stable)[0]  # layer 0's selection
    output = next(iter(ep.graph.find_nodes(op="output")))
    logits = output.args[0][0]
    with ep.graph.inserting_before(output):
        peek = ep.graph.call_function(torch.ops.aten.sum.default, (next(iter(sort.users)),))
        zero = ep.graph.call_function(torch.ops.aten.mul.Tensor, (peek, 0.0))
        new = ep.graph.call_function(torch.ops.aten.add.Tensor, (logits, zero))
    output.args = ((new, *output.args[0][1:]),)
    refresh_meta(ep)
    finalize(ep)
    _, _, stats = apply("fuse_dsa", dense)
    assert stats["entries"]["decode"]["sites"] == 1  # layer 1 only


def test_a_mask_that_is_not_an_indexer_top_k_stays_dense(tiny_program):
    dense = _absorbed(tiny_program)
    for ep in dense.entries.values():  # scores of sigmoid(q·k) are not the lightning indexer's
        for n in call_nodes(ep.graph_module, torch.ops.aten.relu.default):
            n.target = torch.ops.aten.sigmoid.default
        finalize(ep)
    _, matches, stats = apply("fuse_dsa", dense)
    assert matches == 0 and "no attention mask is a top-k" in stats["entries"]["decode"]["why"]


def test_the_mha_form_reads_only_the_selected_keys(tiny_program, tiny_cfg):
    """Without absorb_mla the attention stays over per-head K/V (the form absorb_mla keeps for a
    prefill where it is cheaper): fuse_dsa makes that sparse too, with the same numbers."""
    dense = tiny_program
    for name in ("canonicalize", "normalize"):
        dense, _, _ = apply(name, dense)
    out, matches, stats = apply("fuse_dsa", dense)
    L = tiny_cfg.num_hidden_layers
    assert matches == 2 * L + 1, stats
    for entry, n in (("prefill", L), ("decode", L), ("mtp", 1)):
        h = ops(out, entry)
        assert h.get(MHA, 0) == n and h.get(TOPK, 0) == n and "aten.sort.stable" not in h, h
        assert "aten._softmax.default" not in h  # every softmax was an attention's, and each is gone
    g = torch.Generator().manual_seed(4)
    toks = torch.randint(0, 256, (2, 72), generator=g)
    steps = [1] * 32 + [3, 2]
    for a, b in zip(_run(dense, toks, steps, torch.tensor([20, 26])), _run(out, toks, steps, torch.tensor([20, 26]))):
        torch.testing.assert_close(b, a, **TOL["fp32_rewrite"])
    _, again, _ = apply("fuse_dsa", out)
    assert again == 0


def test_nothing_to_fuse_in_dense_attention(tiny_program):
    canon, _, _ = apply("canonicalize", tiny_program)
    for ep in canon.entries.values():  # the indexer's scores no longer ReLU: no mask is a DSA top-k
        for n in call_nodes(ep.graph_module, torch.ops.aten.relu.default):
            n.target = torch.ops.aten.sigmoid.default
        finalize(ep)
    _, matches, stats = apply("fuse_dsa", canon)
    assert matches == 0 and "no attention mask is a top-k" in stats["entries"]["decode"]["why"]


def _mha_form(program):
    for name in ("canonicalize", "normalize"):
        program, _, _ = apply(name, program)
    return program


@pytest.mark.parametrize("form", [_absorbed, _mha_form], ids=["absorbed", "mha"])
@pytest.mark.parametrize("cls", DSA_ZOO, ids=lambda c: c.__name__)
@torch.no_grad()
def test_spec_written_dsa_modules(cls, form):
    """Two DSA attentions written from the spec by someone who had not read the matchers
    (``dsa_zoo.py``): absorbed or left over per-head K/V, then made sparse, each exactly once,
    with the numbers kept."""
    torch.manual_seed(0)
    m = cls().eval()
    args = m.example_inputs(2, 3, 9, 4)
    B, S, T = Dim("batch", max=16), Dim("seq", max=32), Dim("ctx", min=5, max=64)
    ep = torch.export.export(
        m, tuple(a.clone() for a in args), dynamic_shapes=({0: B, 1: S}, {0: B, 1: S}, {0: B, 1: T}, {0: B, 1: T})
    )
    program = form(Program({"forward": ep}, CacheSpec([]), config=None))
    out, matches, stats = apply("fuse_dsa", program)
    assert matches == 1, stats
    assert ops(out).get(SPARSE if form is _absorbed else MHA, 0) == 1 and "dsc.mla_decode.default" not in ops(out)
    g = torch.Generator().manual_seed(1)
    for b, s, t, start in [(2, 3, 9, 4), (1, 1, 20, 17), (3, 2, 12, 6)]:
        call = list(m.example_inputs(b, s, t, start))
        call[2] = torch.randn(call[2].shape, generator=g)  # a filled history, longer than top-k
        call[3] = torch.randn(call[3].shape, generator=g)
        a1, a2 = [a.clone() for a in call], [a.clone() for a in call]
        torch.testing.assert_close(out.module("forward")(*a2), m(*a1), **TOL["fp32_rewrite"])


@pytest.mark.parametrize("fmt", ["fp8_ue8m0"])  # (fp8 with fp32 scales: the transformers frontend's test)
def test_fp8_index_cache(tiny_program, tiny_cfg, fmt):
    """index_cache=fp8: every index-key cache holds D e4m3 values of the Hadamard-rotated key and
    one fp32 scale (D + 4 bytes a token), verified under the fp8_index_cache tolerance, with the
    top-k recall against the fp32 indexer on the verification inputs in the record."""
    from dsc.kernels.dsa import hadamard, quantize_index_keys

    from dsc.pass_manager import run_pipeline, select_passes
    from dsc.verify import TOLERANCES

    passes = select_passes(["fuse_dsa"])
    fp32, _ = run_pipeline(tiny_program, passes)
    out, records = run_pipeline(tiny_program, passes, options={"fuse_dsa": {"index_cache": fmt}})  # verified
    rec = records[-1]
    assert rec.tolerance == TOLERANCES["fp8_index_cache"]
    ic = rec.stats["index_cache"]
    D = tiny_cfg.index_head_dim
    L = tiny_cfg.num_hidden_layers + tiny_cfg.num_nextn_predict_layers
    assert ic["format"] == fmt and ic["caches"] == L
    assert ic["bytes_per_token_per_layer"] == {"before": 4 * D, "after": D + 4}
    assert ic["recall_vs_fp32"]["queries"] > 0 and 0.8 <= ic["recall_vs_fp32"]["recall"] <= 1.0
    idx = [i for i, t in enumerate(out.cache.tensors) if t.dtype == "uint8"]
    assert len(idx) == L and all(out.cache.tensors[i].tail == [D + 4] for i in idx)
    # the bytes are the reference quantiser's: layer 0's keys (computed before any selection) after a prefill
    toks = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(5))
    c32, c8 = fp32.cache.allocate(2, 30), out.cache.allocate(2, 30)
    with torch.no_grad():
        fp32.prefill(toks, c32)
        out.prefill(toks, c8)
    i0 = idx[0]
    k8, s = quantize_index_keys(c32[i0] @ hadamard(D), ue8m0=fmt == "fp8_ue8m0")
    got = c8[i0]
    torch.testing.assert_close(got[..., D:].contiguous().view(torch.float32), s, rtol=1e-6, atol=0)
    same = got[..., :D].contiguous().view(torch.float8_e4m3fn).float() == k8.float()
    assert same.float().mean() > 0.999  # (a matmul rounding may move a value across an e4m3 rounding boundary)
    if fmt == "fp8_ue8m0":
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two
    # generation runs and stays close to the fp32 indexer's
    from dsc.runtime import SamplingParams, generate

    p = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    assert len(generate(out, [[256, 5, 6, 7]], p).tokens[0]) == 8


def test_fp8_index_cache_option_is_checked(tiny_program):
    from dsc.errors import DscError

    with pytest.raises(DscError, match="index_cache must be one of"):
        apply("fuse_dsa", _absorbed(tiny_program), {"index_cache": "int4"})


class _PerHeadSelection(DSA_ZOO[0]):
    """Not DSA: each attention head keeps the top-k of its own index head's ReLU scores, so the
    heads attend to different sets (DSA shares one set across all heads)."""

    def _index_mask(self, iq, w, index_cache, visible):  # -> additive (B, S, H, T)
        B, S = iq.shape[:2]
        T, k = index_cache.shape[1], self.index_topk
        score = torch.nn.functional.relu(torch.einsum("bshd,btd->bsht", iq, index_cache)) * w[..., None]
        vis = visible[:, :, None, :]
        score = score.masked_fill(~vis, float("-inf"))
        idx = score.topk(min(k, T), dim=-1).indices
        keep = torch.zeros(B, S, self.n_heads, T, dtype=torch.bool).scatter_(-1, idx, True) & vis
        return torch.zeros(B, S, self.n_heads, T).masked_fill(~keep, float("-inf"))

    def _attend(self, q, latent_cache, mask):
        H, dn, dc = self.n_heads, self.dn, self.kv_lora_rank
        c_kv, k_pe = latent_cache[..., :dc], latent_cache[..., dc:]
        kvb = torch.einsum("btc,oc->bto", c_kv, self.wkv_b.weight).unflatten(-1, (H, dn + self.dv))
        k = torch.cat((kvb[..., :dn], k_pe[:, :, None, :].expand(-1, -1, H, -1)), dim=-1)
        scores = torch.einsum("bshd,bthd->bsht", q, k) * self.softmax_scale + mask
        return self.wo(torch.einsum("bsht,bthd->bshd", scores.softmax(-1), kvb[..., dn:]).flatten(2))


@pytest.mark.parametrize("form", [_absorbed, _mha_form], ids=["absorbed", "mha"])
@torch.no_grad()
def test_per_head_selections_stay_dense(form):
    torch.manual_seed(0)
    m = _PerHeadSelection().eval()
    assert m.n_heads == m.index_n_heads
    args = m.example_inputs(2, 3, 9, 4)
    B, S, T = Dim("batch", max=16), Dim("seq", max=32), Dim("ctx", min=5, max=64)
    ep = torch.export.export(
        m, tuple(a.clone() for a in args), dynamic_shapes=({0: B, 1: S}, {0: B, 1: S}, {0: B, 1: T}, {0: B, 1: T})
    )
    program = form(Program({"forward": ep}, CacheSpec([]), config=None))
    out, matches, _ = apply("fuse_dsa", program)
    assert matches == 0 and SPARSE not in ops(out) and MHA not in ops(out)
    call = list(m.example_inputs(1, 1, 20, 17))
    call[2], call[3] = torch.randn(call[2].shape), torch.randn(call[3].shape)
    torch.testing.assert_close(
        out.module("forward")(*[a.clone() for a in call]), m(*[a.clone() for a in call]), **TOL["fp32_rewrite"]
    )
