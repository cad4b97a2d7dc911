"""The few-row fp32 linear (linear_cpu.c through dsc.kernels.linear) against torch's, and where it
leaves the work to torch."""

import pytest
import torch
from dsc.kernels import linear as lin
from dsc.kernels import native

from tests.tolerances import TOL

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native CPU kernels here")


def _calls(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(native, "f32_rows", lambda *a, f=native.f32_rows: calls.append(a[0].shape[0]) or f(*a))
    return calls


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("K,N,bias", [(512, 512, False), (520, 300, True), (1024, 1030, True)])
def test_native_linear_equals_torch(rows, K, N, bias, monkeypatch):
    """Sizes on and off the kernel's 8-wide blocks, with and without a bias, as (1, rows, K) inputs."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(1, rows, K, generator=g), torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    calls = _calls(monkeypatch)
    got = lin.linear(x, w, b)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), **TOL["fp32_reassoc"])
    assert calls == ([rows] if rows <= lin.FEW_ROWS or w.numel() >= lin.MANY_ROWS_WEIGHT else [])


def test_a_rows_numbers_do_not_depend_on_the_rows_beside_it(monkeypatch):
    """A verify step's first row is a decode step's row, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 700, generator=g), torch.randn(384, 700, generator=g)
    calls = _calls(monkeypatch)
    for r in range(1, 5):
        assert torch.equal(lin.linear(x[:r], w), lin.linear(x, w)[:r])
    assert len(calls) == 8


def test_strided_rows_are_read_in_place_or_copied():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 512, generator=g)
    wide = torch.randn(3, 1024, generator=g)
    for x in (wide[:, :512], wide[:, ::2], wide.T[:512].T):  # rows 1024 apart; a column step; a transpose
        torch.testing.assert_close(lin.linear(x, w), x @ w.T, **TOL["fp32_reassoc"])


def test_torch_keeps_what_the_kernel_is_not_for(monkeypatch):
    g = torch.Generator().manual_seed(0)
    big, x = torch.randn(512, 512, generator=g), torch.randn(2, 512, generator=g)
    calls = _calls(monkeypatch)
    cases = [
        (x, torch.randn(16, 512, generator=g)),  # a small weight: torch's call is cheaper
        (x[:1], torch.randn(64, 512, generator=g)),  # one row of a mid-sized weight: likewise
        (torch.randn(64, 512, generator=g), big),  # a prefill's rows
        (x.bfloat16(), big.bfloat16()),  # not fp32
        (x, big.T.contiguous().T),  # a weight the kernel cannot stream row by row
        (x.clone().requires_grad_(), big),  # autograd needs torch's op
    ]
    for a, w in cases:
        torch.testing.assert_close(lin.linear(a, w), torch.nn.functional.linear(a, w))
    assert calls == []
    assert lin.linear(x, big) is not None and calls == [2]  # the same x and weight do go native
    assert lin.linear(x, cases[1][1]) is not None and calls == [2, 2]  # the mid-sized weight from 2 rows on
    monkeypatch.setattr(lin, "USE_NATIVE", False)
    assert torch.equal(lin.linear(x, big), torch.nn.functional.linear(x, big))
    assert calls == [2, 2]


def test_a_program_on_cpu_calls_it_for_aten_linear(tiny_program):
    program = tiny_program.clone()  # the captured Program, before any pass
    targets = [n.target for n in program.module("decode").graph.nodes if n.op == "call_function"]
    assert lin.linear in targets and torch.ops.aten.linear.default not in targets
