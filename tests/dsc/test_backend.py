import logging
import warnings

import torch

import dsc.backend  # noqa: F401  (registers backend="dsc")
from tests.tolerances import TOL


def test_torch_compile_dsc_backend_matches_eager(tiny, caplog):
    caplog.set_level(logging.INFO, logger="dsc.backend")
    torch._dynamo.reset()
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ref, _ = tiny.prefill(tokens, tiny.new_cache(2, 20))
        compiled = torch.compile(tiny.prefill, backend="dsc")
        c = tiny.new_cache(2, 20)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback to plain Inductor
            got, _ = compiled(tokens, c)
    torch.testing.assert_close(got, ref, **TOL["fp32_reassoc"])
    assert c[0].abs().sum() > 0  # the cache writes happened
    ran = [r for r in caplog.records if r.name == "dsc.backend"]
    assert ran and "'fuse_add_rms_norm': 9" in ran[0].getMessage()  # ran on the Dynamo graph: 4 + 5 lone norms


class DataDependentSlice(torch.nn.Module):
    """A cache sliced to a length read from a tensor: dsc's export route cannot take it."""

    def forward(self, x, cache, pos):
        n = pos.item()
        torch._check(n >= 1)
        torch._check(n <= cache.shape[1])
        return (cache[:, :n] * 2).sum(1) + x


def test_a_graph_dsc_cannot_take_falls_back_to_inductor(monkeypatch):
    import pytest

    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", True)
    torch._dynamo.reset()
    m, x, cache, pos = DataDependentSlice(), torch.randn(2, 4), torch.randn(2, 6, 4), torch.tensor(3)
    with pytest.warns(UserWarning, match="runs on plain Inductor, without dsc's passes"):
        got = torch.compile(m, backend="dsc")(x, cache, pos)
    torch.testing.assert_close(got, m(x, cache, pos), **TOL["fp32_exact_graph"])
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m, backend="inductor")(x, cache, pos), got, **TOL["fp32_exact_graph"])
