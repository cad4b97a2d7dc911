"""dsc::moe_experts' native few-token kernel (moe_cpu.c) against the specification and the torch path."""

import pytest
import torch
from dsc.kernels import moe, native

from tests.tolerances import TOL

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native CPU kernels here")


def _experts(E, D, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(F, D, generator=g) / D**0.5 for _ in range(E)],
            [torch.randn(F, D, generator=g) / D**0.5 for _ in range(E)],
            [torch.randn(D, F, generator=g) / F**0.5 for _ in range(E)])  # fmt: skip


@pytest.mark.parametrize("N,E,D,F,K", [(1, 8, 192, 96, 2), (4, 6, 37, 13, 3), (2, 4, 512, 2048, 2)])
def test_native_moe_rows_equal_the_specification(N, E, D, F, K, monkeypatch):
    """Sizes off the SIMD widths, the demo model's, and larger experts."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    wts = torch.rand(N, K, generator=g)
    ws = _experts(E, D, F)
    want = moe.moe_experts_ref(x, idx, wts, *ws)
    torch.testing.assert_close(native.moe_rows(x, idx, wts, *ws), want, **TOL["fp32_reassoc"])
    calls = []
    monkeypatch.setattr(native, "moe_rows", lambda *a, f=native.moe_rows: calls.append(1) or f(*a))
    torch.testing.assert_close(torch.ops.dsc.moe_experts(x, idx, wts, *ws), want, **TOL["fp32_reassoc"])
    assert calls  # a decode step's tokens went through the native kernel
    monkeypatch.setattr(moe, "USE_NATIVE", False)
    torch.testing.assert_close(torch.ops.dsc.moe_experts(x, idx, wts, *ws), want, **TOL["fp32_reassoc"])


def test_native_moe_leaves_what_it_cannot_read_to_torch():
    x, idx, wts = torch.randn(1, 16), torch.tensor([[0, 2]]), torch.rand(1, 2)
    gate, up, down = _experts(3, 16, 8)
    down[2] = down[2].T.contiguous().T  # a transposed view: not the (D, F) rows the kernel reads
    assert native.moe_rows(x, idx, wts, gate, up, down) is None
    torch.testing.assert_close(
        torch.ops.dsc.moe_experts(x, idx, wts, gate, up, down), moe.moe_experts_ref(x, idx, wts, gate, up, down),
        **TOL["fp32_reassoc"],
    )  # fmt: skip
    low = [[w.bfloat16() for w in ws] for ws in (gate, up, down)]
    assert native.moe_rows(x, idx, wts, *low) is None
