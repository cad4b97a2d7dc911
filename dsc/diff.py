"""``dsc diff``: compare two Programs with the report's content (terminal table, JSON, HTML)."""

from __future__ import annotations

from pathlib import Path

import torch

import dsc
from dsc.errors import DscError
from dsc.fx_utils import op_histogram
from dsc.optimize import host, program_summary
from dsc.pass_manager import graph_changes
from dsc.program import MANIFEST, Program
from dsc.report import SCHEMA_VERSION


def load_side(spec: str) -> Program:
    if not (Path(spec) / MANIFEST).exists():
        raise DscError(f"{spec} is not a saved dsc Program (no {MANIFEST}); pass a `dsc optimize` output directory")
    return Program.load(spec)


def input_of(program: Program, trust_pickle: bool = False) -> Program:
    """Re-capture the model an optimize output was made from (its manifest names the source)."""
    from dsc.frontends import load

    source = program.provenance.get("source")
    if not source:
        raise DscError("this Program does not record its input; pass both A and B")
    frontend = program.provenance.get("frontend", "reference")
    return load(None if source == "default" else source, frontend, trust_pickle=trust_pickle).capture()


def config_differences(a: Program, b: Program) -> list[str]:
    """The config keys on which A and B disagree: non-empty means two different models, not two
    pipelines over one."""
    da, db = a.config.to_dict(), b.config.to_dict()
    return sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))


def diff(a: Program, b: Program, label_a: str, label_b: str, context: int = 4096) -> tuple[dict, dict]:
    """-> (report-shaped dict with before = A and after = B, per entry of B its listings and sketches on
    both sides: ``pass_manager.graph_changes``)."""
    ops = {}
    for entry in sorted(set(a.entries) | set(b.entries)):
        ha = op_histogram(a.entries[entry]) if entry in a.entries else {}
        hb = op_histogram(b.entries[entry]) if entry in b.entries else {}
        ops[entry] = {
            op: [ha.get(op, 0), hb.get(op, 0)] for op in sorted(set(ha) | set(hb)) if ha.get(op, 0) != hb.get(op, 0)
        }
    report = {
        "schema_version": SCHEMA_VERSION,
        "dsc_version": dsc.__version__,
        "torch_version": torch.__version__,
        "host": host(),
        "model": f"{label_a} vs {label_b}",
        "a": label_a,
        "b": label_b,
        "passes_a": a.provenance.get("passes", []),
        "passes_b": b.provenance.get("passes", []),
        "before": program_summary(a, context),
        "after": program_summary(b, context),
        "op_changes": ops,
        "cache_a": a.cache.to_dict(),
        "cache_b": b.cache.to_dict(),
        "config_differs": config_differences(a, b),
    }
    return report, graph_changes(a, b)
