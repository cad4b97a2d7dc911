"""absorb_mla on MLAs written straight from the spec by someone who had not read the matcher
(``mla_zoo.py``): each fires exactly once and keeps the numbers, on other sizes than it was
exported with."""

import pytest
import torch

from dsc.program import CacheSpec, Program
from tests.passes.helpers import apply, ops
from tests.passes.mla_zoo import ZOO
from tests.passes.test_mla_zoo_selfcheck import _clone, _make, export_dynamic
from tests.tolerances import TOL

MLA_OP = "dsc.mla_decode.default"


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
@torch.no_grad()
def test_fires_once_and_matches(cls):
    m = _make(cls)
    program = Program({"forward": export_dynamic(m)}, CacheSpec([]), config=None)
    for name in ("canonicalize", "normalize"):
        program, _, _ = apply(name, program)
    out, matches, stats = apply("absorb_mla", program)
    assert matches == 1, stats
    assert ops(out).get(MLA_OP, 0) == 1
    if stats["entries"]["forward"]["per_head_cache_style"]:
        _check_latent_history(m, out)
        return
    for shape in [(2, 3, 9, 4), (1, 2, 13, 7), (3, 1, 6, 5)]:
        call = m.example_inputs(*shape)
        a1, a2 = _clone(call), _clone(call)
        want, got = m(*a1), out.module("forward")(*a2)
        torch.testing.assert_close(got, want, **TOL["fp32_rewrite"])
        for c1, c2 in zip(a1[2:], a2[2:]):
            torch.testing.assert_close(c2, c1, **TOL["fp32_rewrite"])


def _check_latent_history(m, out):
    """Per-head K/V caches became one latent cache: both fill their caches from the same history
    (a prompt, then single steps and an extend) and give the same outputs at every call."""
    caches = _clone(m.example_inputs(2, 1, 12, 0)[2:])
    for c in caches:
        c.zero_()
    ep = out.entries["forward"]
    users = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert len(users) == 3, users  # x, positions, the latent cache
    width = next(n for n in ep.graph.nodes if n.name == users[2]).meta["val"].shape[-1]
    latent = torch.zeros(2, 12, width)
    g = torch.Generator().manual_seed(4)
    d = m.example_inputs(1, 1, 1, 0)[0].shape[-1]
    for a, b in [(0, 4), (4, 5), (5, 6), (6, 9), (9, 10)]:
        x, pos = torch.randn(2, b - a, d, generator=g), torch.arange(a, b).expand(2, b - a).contiguous()
        want = m(x, pos, *caches)
        got = out.module("forward")(x, pos, latent)
        torch.testing.assert_close(got, want, **TOL["fp32_rewrite"])
