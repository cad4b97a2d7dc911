"""Pass registry, the default pipeline, and the runner that verifies every pass.

A pass is a function ``fn(program, ctx) -> (matches, stats)`` registered with ``@register_pass``
(``dsc.registry``, which the passes import: they never import this module, so there is no circle).
It receives a *clone* of the Program (new graphs, shared weights) and edits it in place; the
manager never hands it the caller's Program, so a pass cannot mutate its input. With verification
on, the manager runs the Program before and after each pass on the same seeded scenario and stops
the pipeline with ``PassVerificationError`` (naming the pass and the worst tensor, with a
before/after dump) when the pass breaks its declared tolerance.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dsc.passes  # noqa: F401  (each pass file registers itself)
from dsc.errors import DscError
from dsc.fx_utils import listing, node_count, op_histogram
from dsc.machine import H200, Machine
from dsc.picture import sketch
from dsc.program import Program
from dsc.registry import REGISTRY, PassInfo, Text, register_pass  # noqa: F401  (re-exported)
from dsc.verify import Numerics, Tolerance, compare, make_scenario, run_scenario

log = logging.getLogger(__name__)


def registry() -> dict[str, PassInfo]:
    return dict(sorted(REGISTRY.items(), key=lambda kv: kv[1].order))


@dataclass
class PassRecord:
    name: str
    changed: bool
    matches: int
    stats: dict
    tolerance: Tolerance
    numerics: Numerics | None
    seconds: float
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]
    ops_before: dict[str, dict[str, int]]
    ops_after: dict[str, dict[str, int]]
    param_bytes: tuple[int, int] = (0, 0)
    cache_bytes_per_token: tuple[int, int] = (0, 0)
    # entry -> (before listing, after listing, before sketch, after sketch) if changed (see dsc.picture)
    graphs: dict[str, tuple[str, str, dict, dict]] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)  # the pass options it ran with

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "changed": self.changed,
            "options": self.options,
            "matches": self.matches,
            "stats": self.stats,
            "tolerance": self.tolerance.to_dict(),
            "numerics": self.numerics.to_dict() if self.numerics else None,
            "seconds": round(self.seconds, 3),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "param_bytes": {"before": self.param_bytes[0], "after": self.param_bytes[1]},
            "cache_bytes_per_token": {"before": self.cache_bytes_per_token[0], "after": self.cache_bytes_per_token[1]},
        }


class PassVerificationError(RuntimeError):
    """A pass broke its tolerance. Internal failure (exit 1): the message names the pass, the worst tensor and the dump."""

    def __init__(self, pass_name: str, numerics: Numerics, violations: list[str], dump: Path):
        self.pass_name, self.numerics, self.violations, self.dump = pass_name, numerics, violations, dump
        shown = "\n  - ".join(violations[:8])
        super().__init__(
            f"pass {pass_name!r} changed the numbers beyond its tolerance; worst tensor: {numerics.worst} "
            f"(max abs err {numerics.max_abs_err:.3g}, top-1 agreement {numerics.top1_agreement:.3f}).\n  - {shown}\n"
            f"Before/after graphs of the pass: {dump}"
        )


def select_passes(passes: list[str] | None = None, disable: list[str] | None = None) -> list[PassInfo]:
    reg = registry()
    for name in (passes or []) + (disable or []):
        if name not in reg:
            raise DscError(f"unknown pass {name!r}; available passes: {', '.join(reg)}")
    chosen = [reg[n] for n in passes] if passes else [p for p in reg.values() if p.default]
    off = set(disable or [])
    if not passes:  # the default pipeline: a disabled pass takes the default passes that need it along
        changed = True
        while changed:
            changed = False
            for p in chosen:
                if p.name not in off and off & set(p.requires):
                    off.add(p.name)
                    changed = True
    chosen = [p for p in chosen if p.name not in off]
    # what a pass requires runs before it: pulled in when left out, an error when disabled or misordered
    names = [p.name for p in chosen]
    for p in list(chosen):
        for req in p.requires:
            if req in set(disable or []):
                raise DscError(f"pass {p.name!r} needs {req!r} before it; it cannot be disabled while {p.name} runs")
            if req not in names:
                names.insert(names.index(p.name), req)
            elif names.index(req) > names.index(p.name):
                raise DscError(f"pass {p.name!r} needs {req!r} before it; list {req} first")
        for first in p.after:
            if first in names and names.index(first) > names.index(p.name):
                raise DscError(f"pass {p.name!r} must run after {first!r} when both run; list {first} first")
    return [reg[n] for n in names]


def with_pass(names: list[str], name: str) -> list[str]:
    """``names`` with pass ``name`` added at its place in pipeline order (an opt-in pass such as lower_fp8)."""
    if name in names:
        return names
    order = registry()[name].order
    at = next((i for i, n in enumerate(names) if registry()[n].order > order), len(names))
    return [*names[:at], name, *names[at:]]


def parse_pass_options(items: list[str] | None) -> dict[str, dict[str, str]]:
    """``["absorb_mla.products=always"]`` -> ``{"absorb_mla": {"products": "always"}}``, checked against the registry."""
    reg, out = registry(), {}
    for item in items or []:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not (sep and dot and value):
            raise DscError(f"pass option {item!r}: write PASS.OPTION=VALUE, e.g. absorb_mla.products=always")
        if name not in reg:
            raise DscError(f"pass option {item!r}: unknown pass {name!r}; available passes: {', '.join(reg)}")
        try:
            reg[name].context({option: value})  # the registry checks the option and its value
        except DscError as e:
            raise DscError(f"pass option {item!r}: {e}") from None
        out.setdefault(name, {})[option] = value
    return out


def graph_code(program: Program) -> dict[str, str]:
    return {name: ep.graph_module.code for name, ep in program.entries.items()}


def dump_pass(dump_dir: Path, index: int, name: str, before: Program, after: Program) -> Path:
    dump_dir.mkdir(parents=True, exist_ok=True)
    for label, prog in (("before", before), ("after", after)):
        for entry, code in graph_code(prog).items():
            (dump_dir / f"{index:03d}_{name}.{entry}.{label}.py").write_text(code)
    return dump_dir


def graph_changes(before: Program, after: Program) -> dict[str, tuple[str, str, dict, dict]]:
    """Per entry of ``after``: the listings and sketches of both sides (an entry a pass added has an
    empty before)."""
    out = {}
    for k, ep in after.entries.items():
        old = before.entries.get(k)
        out[k] = (listing(old) if old else "", listing(ep), sketch(old) if old else {}, sketch(ep))
    return out


def run_pipeline(
    program: Program,
    passes: list[PassInfo],
    verify: bool = True,
    seed: int = 0,
    dump_dir: Path | None = None,
    on_event: Callable[[str, str], None] | None = None,
    options: dict[str, dict[str, str]] | None = None,
    machine: Machine | None = None,
) -> tuple[Program, list[PassRecord]]:
    """Run ``passes`` in order on clones of ``program``; returns the final Program and one record per pass.
    ``options``: per pass name, its options (see ``parse_pass_options``)."""
    emit = on_event or (lambda kind, msg: None)
    scenario = make_scenario(program.config, seed) if verify else None
    before_out = None
    if verify:
        emit("verify", "baseline run")
        before_out = run_scenario(program, scenario)
    records = []
    for i, info in enumerate(passes, start=1):
        emit("pass", info.name)
        t0 = time.perf_counter()
        work = program.clone()
        ctx = info.context((options or {}).get(info.name), machine)
        ctx.later = tuple(p.name for p in passes[i:])
        matches, stats = info.fn(work, ctx)
        for w in stats.get("warnings", []) if isinstance(stats, dict) else []:
            emit("warn", f"{info.name}: {w}")
        seconds = time.perf_counter() - t0
        changed = graph_code(work) != graph_code(program) or work.cache != program.cache
        numerics = None
        if verify and changed:
            emit("verify", info.name)
            after_out = run_scenario(work, scenario)
            if work.cache != program.cache:  # a new cache layout: compare outputs, not cache tensors
                after_out = {k: v for k, v in after_out.items() if not k.startswith("cache.")}
            numerics, violations = compare(before_out, after_out, ctx.tolerance or info.tolerance)
            for w in numerics.warnings:
                emit("warn", f"{info.name}: {w} (reported, not gated: see its tolerance)")
            if violations:
                where = dump_dir or Path(tempfile.mkdtemp(prefix="dsc-dump-"))
                dump_pass(where, i, info.name, program, work)
                raise PassVerificationError(info.name, numerics, violations, where)
            before_out = run_scenario(work, scenario) if work.cache != program.cache else after_out
        if changed and dump_dir is not None:
            dump_pass(dump_dir, i, info.name, program, work)
        records.append(
            PassRecord(
                info.name, changed, matches, stats, ctx.tolerance or info.tolerance, numerics, seconds,
                {k: node_count(ep) for k, ep in program.entries.items()},
                {k: node_count(ep) for k, ep in work.entries.items()},
                {k: op_histogram(ep) for k, ep in program.entries.items()},
                {k: op_histogram(ep) for k, ep in work.entries.items()},
                (program.param_bytes(), work.param_bytes()),
                (program.cache.bytes_per_token(), work.cache.bytes_per_token()),
                graph_changes(program, work) if changed else {},
                ctx.options,
            )
        )  # fmt: skip
        log.info("pass %s: changed=%s matches=%d", info.name, changed, matches)
        if changed:
            work.provenance.setdefault("passes", []).append(info.name)
            program = work
    if any(r.changed for r in records) and "prefill" in program.entries:
        program.prefill_chunk = (machine or H200).context  # what the forms were chosen for
    return program, records
