"""Self-check of the MLA zoo fixtures: cached decode == cache-free reference, and each exports."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from tests.passes.mla_zoo import ZOO

TOL = dict(atol=1e-5, rtol=1e-4)
B, L, P = 2, 12, 5


def _make(cls):
    torch.manual_seed(0)
    return cls().eval()


def _fresh_caches(m, T):
    """Caches for a call at start=0 (all zeros / empty for the functional one)."""
    return list(m.example_inputs(B, 1, T, 0)[2:])


def _steps():
    # prompt, three single tokens, one 3-token step, one more single token
    return [(0, P), (P, P + 1), (P + 1, P + 2), (P + 2, P + 3), (P + 3, P + 6), (P + 6, P + 7)]


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
@torch.no_grad()
def test_cached_matches_reference(cls):
    m = _make(cls)
    torch.manual_seed(1)
    x_all = torch.randn(B, L, m.example_inputs(1, 1, 1, 0)[0].shape[-1])
    ref = m.reference(x_all)
    caches = _fresh_caches(m, L)
    for a, b in _steps():
        pos = torch.arange(a, b).expand(B, -1).clone()
        res = m(x_all[:, a:b], pos, *caches)
        if m.functional:
            out, new_cache = res
            assert new_cache.shape[1] == b
            caches = [new_cache]
        else:
            out = res
        torch.testing.assert_close(out, ref[:, a:b], **TOL)


@pytest.mark.parametrize("cls", [c for c in ZOO if c.per_row_positions], ids=lambda c: c.__name__)
@torch.no_grad()
def test_per_row_positions(cls):
    m = _make(cls)
    torch.manual_seed(2)
    x_all = torch.randn(B, L, m.example_inputs(1, 1, 1, 0)[0].shape[-1])
    ref = m.reference(x_all)
    caches = _fresh_caches(m, L)
    pos = torch.arange(0, 6).expand(B, -1).clone()
    torch.testing.assert_close(m(x_all[:, :6], pos, *caches), ref[:, :6], **TOL)
    # row 0 continues at 6,7 ; row 1 re-writes its slots 3,4 (stale slot 5 must stay masked)
    pos = torch.tensor([[6, 7], [3, 4]])
    x = torch.stack([x_all[0, 6:8], x_all[1, 3:5]])
    out = m(x, pos, *caches)
    torch.testing.assert_close(out[0], ref[0, 6:8], **TOL)
    torch.testing.assert_close(out[1], ref[1, 3:5], **TOL)
    # then single tokens at different positions per row
    pos = torch.tensor([[8], [5]])
    x = torch.stack([x_all[0, 8:9], x_all[1, 5:6]])
    out = m(x, pos, *caches)
    torch.testing.assert_close(out[0], ref[0, 8:9], **TOL)
    torch.testing.assert_close(out[1], ref[1, 5:6], **TOL)


def _dynamic_shapes(m, args):
    b, s, t = Dim("b", min=1, max=64), Dim("s", min=1, max=64), Dim("t", min=1, max=4096)
    ds = [{0: b, 1: s}, {0: b, 1: s}]
    for time_dim in m.cache_time_dims:
        ds.append({0: b, time_dim: t})
    return tuple(ds)


def _clone(args):
    return [a.clone() for a in args]


def export_dynamic(m):
    """torch.export of the module with batch, new tokens and cache length dynamic."""
    torch.manual_seed(3)
    args = m.example_inputs(2, 3, 9, 4)
    return torch.export.export(m, tuple(_clone(args)), dynamic_shapes=_dynamic_shapes(m, args))


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
@torch.no_grad()
def test_exports_dynamic(cls):
    m = _make(cls)
    ep = export_dynamic(m)
    em = ep.module()
    for shape in [(2, 3, 9, 4), (1, 2, 13, 7), (3, 1, 6, 5), (2, 4, 16, 0)]:
        call = m.example_inputs(*shape)
        a1, a2 = _clone(call), _clone(call)
        want, got = m(*a1), em(*a2)
        torch.testing.assert_close(got, want, **TOL)
        for c1, c2 in zip(a1[2:], a2[2:]):  # in-place cache writes happen in both
            torch.testing.assert_close(c2, c1, **TOL)
