"""The ``dsc optimize`` job: load, capture, run the pass pipeline with verification, write OUT atomically."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import dsc
from dsc.frontends import load
from dsc.fsutil import atomic_dir
from dsc.machine import H200, Machine
from dsc.pass_manager import PassRecord, parse_pass_options, run_pipeline, select_passes
from dsc.program import Program
from dsc.report import SCHEMA_VERSION, write_report


@dataclass
class OptimizeResult:
    before: Program
    after: Program
    records: list[PassRecord]
    timings: dict[str, float]
    report: dict


def cache_scope(p: Program) -> str:
    """What ``cache_bytes_per_token`` counts: the dtype(s) the Program caches in and its cached layers."""
    dtypes = sorted({t.dtype for t in p.cache.tensors})
    layers = {t.layer for t in p.cache.tensors}
    main = p.config.num_hidden_layers if p.config is not None else None
    mtp = sum(1 for n in layers if main is not None and n >= main)
    return f"{'/'.join(dtypes)}, {len(layers)} layers" + (f" incl. {mtp} MTP" if mtp else "")


def host() -> dict:
    """The machine the report was made on (its measured figures are this machine's)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:  # the model name is more telling than "x86_64"
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "threads": torch.get_num_threads()}


def program_summary(p: Program, context: int = 4096) -> dict:
    from dsc.cost import program_cost
    from dsc.fx_utils import node_count

    return {
        "entries": sorted(p.entries),
        "nodes": {k: node_count(ep) for k, ep in p.entries.items()},
        "param_bytes": p.param_bytes(),
        "cache_bytes_per_token": p.cache.bytes_per_token(),
        "cache_scope": cache_scope(p),
        "cache": p.cache.to_dict(),
        **program_cost(p, context),
    }


def optimize(
    model_spec: str | None,
    passes: list[str] | None = None,
    disable: list[str] | None = None,
    verify: bool = True,
    trust_pickle: bool = False,
    dump_dir: Path | None = None,
    on_event: Callable[[str, str], None] | None = None,
    options: list[str] | None = None,
    machine: Machine | None = None,
    frontend: str | None = None,
    measure: bool = True,
) -> OptimizeResult:
    """``options``: "PASS.OPTION=VALUE" strings (``dsc optimize --pass-option``); ``frontend``: see
    ``dsc.frontends`` (default: the reference model); ``measure``: time a decode step and a prefill
    of the eager model, the captured Program and the optimized one on this machine."""
    emit = on_event or (lambda kind, msg: None)
    chosen = select_passes(passes, disable)  # bad names and options fail before any work
    pass_options = parse_pass_options(options)
    timings = {}
    t = time.perf_counter()
    emit("stage", f"loading model ({frontend or 'reference'} frontend)")
    loaded = load(model_spec, frontend, trust_pickle=trust_pickle)
    for note in loaded.notes:
        emit("note", note)
    timings["load_s"] = time.perf_counter() - t
    # one context for every figure: the passes' choices and the report's costs, at most the model's limit
    machine = machine or H200
    limit = getattr(loaded.config, "max_position_embeddings", None)
    if limit and machine.context > limit:
        machine = dataclasses.replace(machine, context=limit)
    t = time.perf_counter()
    emit("stage", "capturing the entry points with torch.export")
    before = loaded.capture()
    timings["capture_s"] = time.perf_counter() - t
    t = time.perf_counter()
    after, records = run_pipeline(
        before, chosen, verify=verify, dump_dir=dump_dir, on_event=on_event, options=pass_options, machine=machine
    )
    timings["passes_s"] = time.perf_counter() - t
    measured = None
    if measure and after.config is not None and {"prefill", "decode"} <= set(after.entries):
        from dsc.bench import measure_speed

        emit("stage", "measuring a decode step and a prefill on this machine (--no-measure to skip)")
        t = time.perf_counter()
        measured = measure_speed({"eager": loaded.eager(), "before": before, "after": after}, after.config)
        timings["measure_s"] = time.perf_counter() - t
    report = {
        "schema_version": SCHEMA_VERSION,
        "dsc_version": dsc.__version__,
        "torch_version": torch.__version__,
        "host": host(),
        "model": model_spec or "default",
        "frontend": loaded.frontend,
        "notes": loaded.notes,
        "verified": verify,
        "target": machine.to_dict(),
        "passes": [r.to_dict() for r in records],
        "before": program_summary(before, machine.context),
        "after": program_summary(after, machine.context),
        "measured": measured,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    return OptimizeResult(before, after, records, timings, report)


def write_output(result: OptimizeResult, out: str | Path, force: bool = False) -> None:
    def write(tmp: Path) -> None:
        result.after.save(tmp)
        write_report(tmp, result.report, {r.name: r.graphs for r in result.records if r.changed})

    atomic_dir(out, write, overwrite=force)


def check_output_dir(out: str | Path, force: bool, inputs: list[str | None]) -> None:
    """Refuse before any work: an OUT that would clobber user data or the input itself."""
    from dsc.errors import DscError
    from dsc.fsutil import check_replaceable, check_writable
    from dsc.program import MANIFEST

    check_writable(out, "output directory", directory=True)
    out = Path(out).resolve()
    for src in inputs:
        if src and Path(src).exists() and Path(src).resolve() in (out, *out.parents):
            raise DscError(f"output {out} would overwrite the input {src}; choose another -o path")
    check_replaceable(out, force, MANIFEST)
