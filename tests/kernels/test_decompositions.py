"""Every dsc:: op has a decomposition into standard ATen ops (its reference): an optimized Program
lowered with it holds no dsc:: op and gives the same numbers; every registered op is covered."""

import pytest
import torch
from dsc.kernels import DECOMPOSITIONS, decompose, triton_utils

from tests.tolerances import TOL


def test_every_dsc_op_has_a_decomposition():
    packets = [getattr(torch.ops.dsc, name) for name in dir(torch.ops.dsc) if not name.startswith("_")]
    ops = {p.default for p in packets if isinstance(p, torch._ops.OpOverloadPacket)}
    assert ops and ops <= set(DECOMPOSITIONS), ops - set(DECOMPOSITIONS)


def test_a_lowered_program_holds_no_dsc_op_and_agrees(tiny_optimized):
    program, _ = tiny_optimized
    ep = program.entries["decode"]
    assert any(str(n.target).startswith("dsc.") for n in ep.graph.nodes)
    low = decompose(ep)
    assert not [n for n in low.graph.nodes if str(n.target).startswith("dsc.")]
    caches = program.cache.allocate(2, 9)
    for c in caches:
        c.normal_(generator=torch.Generator().manual_seed(0))
    toks, pos = torch.tensor([[3, 4], [5, 6]]), torch.tensor([[7, 8], [7, 8]])
    with torch.no_grad():
        want = program.decode(toks, pos, [c.clone() for c in caches])[0]
        got = low.module()(toks, pos, [c.clone() for c in caches])[0]
    torch.testing.assert_close(got, want, **TOL["fp32_rewrite"])


def test_cuda_without_triton_warns_once(monkeypatch):
    monkeypatch.setattr(triton_utils, "_warned", set())
    with pytest.warns(RuntimeWarning, match="dsc::mla_decode on CUDA without triton"):
        triton_utils.warn_no_triton("mla_decode")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_utils.warn_no_triton("mla_decode")  # the second time: silent


def test_a_cuda_kernel_is_triton_or_the_reference_with_a_warning(monkeypatch):
    registered = {}

    class Op:  # records what cuda_kernel registers, as torch.library's register_kernel would
        def register_kernel(self, device):
            return lambda fn: registered.setdefault(device, fn)

    kernel = triton_utils.cuda_kernel(Op(), "toy", lambda x, k=2: ("triton", x, k), lambda x, k=2: ("ref", x, k))
    assert registered == {"cuda": kernel}
    monkeypatch.setattr(triton_utils, "_warned", set())
    monkeypatch.setattr(triton_utils, "HAVE_TRITON", True)
    assert kernel(1, k=3) == ("triton", 1, 3)
    monkeypatch.setattr(triton_utils, "HAVE_TRITON", False)
    with pytest.warns(RuntimeWarning, match="dsc::toy on CUDA without triton"):
        assert kernel(1) == ("ref", 1, 2)
