"""normalize: each rule on a small graph — it fires, the spelling it removes is gone, the numbers are
bit-identical (split sums: fp32 re-association), and it declines what it cannot prove safe."""

import pytest
import torch
from torch import nn

from tests.passes.helpers import apply, ops, toy_program


def _run(mod, *args):
    canon, _, _ = apply("canonicalize", toy_program(mod, *args))
    out, hits, stats = apply("normalize", canon)
    return out, stats


def _same(mod, out, *args, exact=True):
    a = [x.clone() for x in args]
    b = [x.clone() for x in args]
    with torch.no_grad():
        want, got = mod(*a), out.module("forward")(*b)
    if exact:
        assert torch.equal(got, want)
        for x, y in zip(a, b):  # in-place writes land alike
            assert torch.equal(x, y)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class Noops(nn.Module):
    def forward(self, x):
        y = nn.functional.dropout(x * 2, p=0.0, training=False)
        return y.clone().contiguous() + 1


def test_noops():
    x = torch.randn(3, 4)
    out, stats = _run(Noops(), x)
    assert stats["noops"] >= 2
    h = ops(out)
    assert not {"aten.dropout.default", "aten.clone.default"} & set(h)
    _same(Noops(), out, x)


class CloneThenBump(nn.Module):
    def forward(self, x):
        c = x.sum().clone()
        c.add_(1)  # the clone is written: it must stay a copy
        return x + c


def test_noops_keep_a_clone_that_is_written():
    x = torch.randn(3)
    out, _ = _run(CloneThenBump(), x)
    assert ops(out).get("aten.clone.default") == 1
    _same(CloneThenBump(), out, x)


class Assembly(nn.Module):
    """HF's expand_kv: a fresh buffer filled by copy_ into two slices, one source broadcast."""

    def forward(self, a, b):
        buf = a.new_empty(a.shape[0], a.shape[1], 6)
        buf[..., :4].copy_(a)
        buf[..., 4:].copy_(b.expand(-1, a.shape[1], -1))
        return buf * 2


def test_assembly_becomes_cat():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 1, 2)
    out, stats = _run(Assembly(), a, b)
    assert stats["assembly"] == 1
    h = ops(out)
    assert h["aten.cat.default"] == 1 and "aten.copy_.default" not in h and "aten.new_empty.default" not in h
    _same(Assembly(), out, a, b)


class ReadEarly(nn.Module):
    def forward(self, a):
        buf = torch.zeros(2, 4)
        buf[:, :2].copy_(a)
        s = buf.sum()  # read before the second half is written
        buf[:, 2:].copy_(a)
        return buf + s


def test_assembly_declines_a_buffer_read_before_it_is_full():
    a = torch.randn(2, 2)
    out, stats = _run(ReadEarly(), a)
    assert stats["assembly"] == 0 and any("read before it is fully written" in d for d in stats["declined"])
    _same(ReadEarly(), out, a)


class Writes(nn.Module):
    """index_copy_ along the time dim of a heads-first cache, and a slice assignment."""

    def forward(self, x, pos, kc, vc):
        kc.index_copy_(2, pos, x)
        start = pos.shape[0]
        vc[:, :, :start] = x * 2
        return kc.sum(-1) + vc.sum(-1)


def test_cache_writes_become_index_put():
    x, pos = torch.randn(1, 2, 3, 4), torch.tensor([0, 1, 2])
    kc, vc = torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)
    out, stats = _run(Writes(), x, pos, kc, vc)
    assert stats["cache_writes"] >= 2
    h = ops(out)
    assert h["aten.index_put_.default"] == 2 and "aten.index_copy_.default" not in h and "aten.copy_.default" not in h
    g = out.entries["forward"].graph
    writes = [n for n in g.nodes if n.target is torch.ops.aten.index_put_.default]
    for w in writes:  # later readers read the write
        assert not [u for u in w.args[0].users if u not in writes and u.target is not torch.ops.aten.sym_size.int]
    _same(Writes(), out, x, pos, kc, vc)


class Layout(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))

    def forward(self, x, k):
        y = x.movedim(2, 1) + k.unsqueeze(1).repeat_interleave(3, dim=1)
        return y @ self.w.T + (y.mT * 2).mT.sum(-1, keepdim=True)


def test_layout():
    x, k = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 5)
    mod = Layout()
    out, stats = _run(mod, x, k)
    assert stats["layout"] == 5  # movedim, repeat_interleave, W.T, two mT
    h = ops(out)
    assert not {"aten.movedim.int", "aten.repeat_interleave.self_int", "aten.numpy_T.default", "aten.mT.default"} & set(
        h
    )
    _same(mod, out, x, k)


class Masks(nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, s, keep):
        a = torch.where(keep, s, self.fill).softmax(-1)
        b = s.masked_fill(~keep, self.fill).softmax(-1)
        return a + b


@pytest.mark.parametrize("fill", [float("-inf"), -1e9, torch.finfo(torch.float32).min])
def test_masks_become_additive(fill):
    s, keep = torch.randn(2, 3, 5), torch.rand(2, 3, 5) > 0.3
    keep[..., 0] = True
    out, stats = _run(Masks(fill), s, keep)
    assert stats["masks"] == 2
    h = ops(out)
    assert "aten.masked_fill.Scalar" not in h and "aten.where.ScalarOther" not in h
    _same(Masks(fill), out, s, keep, exact=False)


def test_masks_decline_a_fill_that_is_not_a_mask():
    s, keep = torch.randn(2, 5), torch.rand(2, 5) > 0.3
    out, stats = _run(Masks(-1.0), s, keep)
    assert stats["masks"] == 0 and stats["declined"]


class SplitSum(nn.Module):
    """q_nope·k_nopeᵀ + q_pe·k_peᵀ with one rope key shared by the heads."""

    def forward(self, qn, kn, qp, kp):
        return torch.einsum("bshd,bthd->bsht", qn, kn) + torch.einsum("bshr,btr->bsht", qp, kp)


def test_split_sums_merge():
    args = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 4, 8), torch.randn(2, 3, 4, 2), torch.randn(2, 5, 2)
    out, stats = _run(SplitSum(), *args)
    assert stats["split_sums"] == 1
    assert ops(out)["aten.einsum.default"] == 1
    _same(SplitSum(), out, *args, exact=False)


class Contractions(nn.Module):
    """Three spellings the projection and attention matchers read in their normal forms."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.wh = nn.Parameter(torch.randn(2, 4, 3))

    def forward(self, x, lat, a, b):
        y = torch.einsum("btc,oc->bto", x, self.w)  # a linear spelled as einsum
        z = torch.matmul(lat.unsqueeze(1), self.wh)  # (B, 1, T, c) @ (H, c, d): broadcast batch dims
        s = (a * b).sum(1)  # (B, H, S, T) * (B, H, S, 1), summed over H
        return y, z, s


def test_contractions():
    args = (torch.randn(2, 5, 4), torch.randn(2, 7, 4), torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 1))
    m = Contractions()
    out, stats = _run(m, *args)
    assert stats["contractions"] == 3
    h = ops(out)
    assert h.get("aten.linear.default") == 1 and h.get("aten.einsum.default") == 2
    assert "aten.matmul.default" not in h and "aten.sum.dim_IntList" not in h
    with torch.no_grad():
        for got, want in zip(out.module("forward")(*args), m(*args)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grad_mode_regions_are_inlined():
    """transformers' V3.2 indexer runs under torch.no_grad(): export keeps it as a subgraph call."""
    from tests.passes.hf_models import export_case, hf_model

    m = hf_model("v32", "eager")
    ep, inputs = export_case(m, "decode")
    wrap = "wrap_with_set_grad_enabled"
    from dsc.program import CacheSpec, Program

    program = Program({"forward": ep}, CacheSpec([]), config=None)
    assert any(wrap in str(n.target) for n in ep.graph.nodes)
    canon, _, _ = apply("canonicalize", program)
    out, _, stats = apply("normalize", canon)
    assert stats["grad_mode"] == m.config.num_hidden_layers
    assert not any(wrap in str(n.target) for n in out.entries["forward"].graph.nodes)
    args = inputs(2, 1)
    fresh = lambda: [[t.clone() for t in a] if isinstance(a, list) else a.clone() for a in args]  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(out.module("forward")(*fresh()), program.module("forward")(*fresh()), atol=0, rtol=0)
