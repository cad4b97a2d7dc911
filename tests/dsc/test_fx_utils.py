"""The incremental ``refresh_meta`` leaves every node with the value a full propagation gives."""

import sympy
import torch

from dsc.fx_utils import refresh_meta


def _sizes(xs):
    return tuple(str(sympy.expand(x.node.expr)) if isinstance(x, torch.SymInt) else str(x) for x in xs)


def _snapshot(ep):
    out = {}
    for n in ep.graph.nodes:
        v = n.meta.get("val")
        out[n.name] = (_sizes(v.shape), v.dtype, _sizes(v.stride())) if hasattr(v, "shape") else str(v)
    return out


def test_incremental_meta_equals_a_full_propagation(tiny_program):
    from dsc.pass_manager import run_pipeline, select_passes

    start = tiny_program.clone()
    for ep in start.entries.values():
        refresh_meta(ep, full=True)  # export's own symbolic forms differ in spelling (Min(64, 64*s) vs 64)
    program, records = run_pipeline(start, select_passes(), verify=False)
    assert any(r.name == "absorb_mla" and r.changed for r in records)
    for ep in program.entries.values():
        before = _snapshot(ep)
        refresh_meta(ep, full=True)
        assert _snapshot(ep) == before
