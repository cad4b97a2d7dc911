"""The ``dsc`` command line. Library code raises; only this module prints.

Exit codes: 0 success, 2 bad input (the message says what to do), 1 internal failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dsc.errors import DscError
from dsc.machine import TARGETS
from dsc.pass_manager import PassVerificationError

console = Console(stderr=True)
out = Console()


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


# ---- info ---------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from dsc.frontends.reference import resolve_config
    from dsc.model.stats import info

    data = info(resolve_config(args.model))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    t = Table(title=f"dsc info {escape(args.model or '(default)')}", show_header=False)
    for k, v in data["config"].items():
        t.add_row(k, escape(str(v)))
    t.add_row("softmax_scale", f"{data['softmax_scale']:.6f}")
    p = data["params"]
    t.add_section()
    t.add_row(
        "parameters (total)", f"{_fmt_count(p['total'])}  (main {_fmt_count(p['main'])} + MTP {_fmt_count(p['mtp'])})"
    )
    t.add_row("activated per token", f"{_fmt_count(p['activated_main'])} main, {_fmt_count(p['activated_mtp'])} MTP")
    c = data["cache"]
    v = c["values_per_token_per_layer"]
    t.add_section()
    t.add_row(
        "cache values/token/layer",
        f"per-head K/V {v['per_head_kv']} | MLA latent {v['mla_latent']} | indexer keys {v['index_keys']}",
    )
    for form, label in (
        ("reference_per_head_kv", "reference (per-head K/V)"),
        ("absorbed_latent", "absorbed (latent)"),
    ):
        t.add_row(
            f"cache bytes/token, {label}",
            f"{c['bytes_per_token_per_layer'][form]:,} B/layer, {c['bytes_per_token'][form]:,} B over the "
            f"{c['layers']} main layers ({_fmt_bytes(c['bytes_per_token'][form] * 131072)} per 128K tokens), "
            f"{c['bytes_per_token_with_mtp'][form]:,} B with {c['mtp_layers']} MTP; in {c['dtype']} (torch_dtype)",
        )
    out.print(t)
    return 0


# ---- passes -------------------------------------------------------------------------------------
def cmd_passes(args) -> int:
    from dsc.pass_manager import Text, registry

    reg = registry()
    if args.json:
        print(json.dumps([{"name": p.name, "order": p.order, "default": p.default, "purpose": p.purpose,
                           "tolerance": p.tolerance.to_dict(),
                           "options": {k: "text" if isinstance(v, Text) else v for k, v in p.options.items()}}
                          for p in reg.values()],
                         indent=2))  # fmt: skip
        return 0
    t = Table(title="dsc passes (default pipeline in this order)")
    for col in ("order", "name", "default", "purpose", "options", "tolerance (atol / rtol)"):
        t.add_column(col, overflow="fold")  # a narrow terminal wraps long names, never crops them
    for p in reg.values():
        t.add_row(
            str(p.order),
            p.name,
            "yes" if p.default else "no",
            escape(p.purpose),
            "\n".join(f"{k}={'TEXT' if isinstance(v, Text) else '|'.join(v)}" for k, v in p.options.items()),
            f"{p.tolerance.atol:g} / {p.tolerance.rtol:g}",
        )
    out.print(t)
    return 0


# ---- optimize -----------------------------------------------------------------------------------
def _split(v: str | None, flag: str = "") -> list[str] | None:
    """A comma-separated flag value as names; one that names nothing (``--passes ,``) is an error,
    never the default."""
    if v is None:
        return None
    names = [s.strip() for s in v.split(",") if s.strip()]
    if not names:
        raise DscError(f"{flag} {v!r} names nothing: give comma-separated names, e.g. canonicalize,absorb_mla".lstrip())
    return names


def _at_least(lo: int):
    """An argparse type: an integer >= lo (argparse reports a bad one with exit 2 and the flag)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n

    return parse


def _finite(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return x


def _fp8_flags(args) -> tuple[list[str] | None, list[str]]:
    """--fp8 / --fp8-include / --fp8-exclude as the pipeline and lower_fp8's options."""
    from dsc.pass_manager import select_passes, with_pass

    passes, options = _split(args.passes, "--passes"), list(args.pass_option or [])
    if args.fp8:
        names = passes or [p.name for p in select_passes(None, _split(args.disable_pass, "--disable-pass"))]
        passes = with_pass(names, "lower_fp8")
        options.append(f"lower_fp8.mode={args.fp8}")
    for flag, key in ((args.fp8_include, "include"), (args.fp8_exclude, "exclude")):
        if flag:
            if "lower_fp8" not in (passes or []):
                raise DscError(
                    "--fp8-include / --fp8-exclude configure lower_fp8: add --fp8 (or lower_fp8 to --passes)"
                )
            options.append(f"lower_fp8.{key}={flag}")
    return passes, options


def cmd_optimize(args) -> int:
    from dsc.fsutil import check_writable
    from dsc.machine import target
    from dsc.optimize import check_output_dir, optimize, write_output
    from dsc.report import node_changes

    check_output_dir(args.output, args.force, [args.model])
    if args.dump_dir:
        check_writable(args.dump_dir, "--dump-dir", directory=True)
    machine = target(args.target)
    t0 = time.perf_counter()

    def on_event(kind: str, msg: str) -> None:
        if not args.json:
            console.print(f"[dim]{time.perf_counter() - t0:7.1f}s[/] {kind:>6}: {escape(msg)}", highlight=False)

    passes, options = _fp8_flags(args)
    with console.status("optimizing...", spinner="dots"):
        result = optimize(
            args.model, passes, _split(args.disable_pass, "--disable-pass"), verify=not args.no_verify, measure=not args.no_measure,
            trust_pickle=args.trust_pickle, on_event=on_event, options=options, machine=machine,
            dump_dir=Path(args.dump_dir) if args.dump_dir else None, frontend=args.frontend,
        )  # fmt: skip
        result.report["command"] = command_line(args)
        on_event("stage", f"writing {args.output}")
        write_output(result, args.output, force=args.force)
    if args.json:
        print(json.dumps(result.report, indent=2, default=str))
        return 0
    t = Table(title=escape(f"dsc optimize {args.model or '(default)'} -> {args.output}"))
    t.add_column("pass", no_wrap=True)
    t.add_column("sites", justify="right")
    t.add_column("nodes by entry", justify="right", no_wrap=True)
    for col in ("max abs err", "top-1", "SQNR dB", "s"):
        t.add_column(col, justify="right")
    for r in result.records:
        n = r.numerics
        t.add_row(
            r.name, str(r.matches) if r.changed else "0 (unchanged)",
            "\n".join(node_changes(r.nodes_before, r.nodes_after)),
            f"{n.max_abs_err:.1e}" if n else "-", f"{n.top1_agreement:.3f}" if n else "-",
            ("exact" if n.sqnr_db == float("inf") else f"{n.sqnr_db:.1f}") if n else "-", f"{r.seconds:.1f}",
        )  # fmt: skip
    out.print(t)
    from dsc.report import measured_lines

    for what, times, slower in measured_lines(result.report.get("measured")):
        out.print(f"measured {what}: {times}" + ("  [bold red]slower than what it replaces[/]" if slower else ""))
    out.print(escape(f"wrote {args.output}/ (Program + report.json) in {time.perf_counter() - t0:.1f} s"))
    return 0


# ---- export -----------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from dsc.cost import human
    from dsc.export.common import MANIFEST
    from dsc.export.onnx import export_onnx, require_onnx
    from dsc.fsutil import check_replaceable, check_writable
    from dsc.program import Program

    if args.format == "onnx":
        require_onnx()  # before any work: the extra, the output path, the Program
    elif args.check:
        raise DscError("--check trt is about ONNX models; leave it out with --format aoti")
    dest = (
        Path(args.output) if args.output else Path(args.program).with_name(f"{Path(args.program).name}.{args.format}")
    )
    check_writable(dest, "export output directory (-o)", directory=True)
    check_replaceable(dest, args.force, MANIFEST)
    if Path(args.program).resolve() in (dest.resolve(), *dest.resolve().parents):
        raise DscError(f"-o {dest} is inside the Program {args.program}; choose a path outside it")
    program = Program.load(args.program)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not args.json:
            console.print(f"[dim]{time.perf_counter() - t0:7.1f}s[/]  {escape(msg)}", highlight=False)

    if args.format == "aoti":
        return _export_aoti(args, program, dest, log, t0)
    res = export_onnx(
        program, dest, verify=not args.no_verify, check_trt=args.check == "trt", overwrite=args.force,
        entries=_split(args.entries, "--entries"), log=log,
    )  # fmt: skip
    manifest = json.loads((dest / MANIFEST).read_text())
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    t = Table(title=escape(f"dsc export {args.program} --format onnx -> {dest}"))
    for col in ("entry", "file", "size", "ONNX nodes", "inputs", "s"):
        t.add_column(col, justify="left" if col in ("entry", "file", "inputs") else "right")
    for name, e in res.entries.items():
        t.add_row(
            name, e.file, human(res.bytes[name], "B"), str(sum(res.ops[name].values())),
            ", ".join(e.inputs[: len(e.inputs) - len(e.reads)]) + f" + {len(e.reads)} caches",
            f"{res.seconds[name]:.1f}",
        )  # fmt: skip
    out.print(t)
    for o, text in res.fusion.items():
        out.print(escape(f"dsc::{o}: {text}"))
    if res.trt:
        out.print(f"[yellow]not TensorRT-ready[/] ({len(res.trt)} findings; --check trt makes them errors):")
        for f in res.trt:
            out.print(escape(f"  {f}"))
    else:
        out.print("TensorRT-ready: constant TopK K <= 3840, no data-dependent shapes, element types it takes")
    if res.numerics:
        n = res.numerics
        out.print(escape(
            f"onnxruntime ({', '.join(n['providers'])}) agrees with the Program on the verification scenario: max abs err "
            f"{n['max_abs_err']:.1e}, top-1 {n['top1_agreement']:.3f}, SQNR {n['sqnr_db'] or 'exact'} dB"
        ))  # fmt: skip
    else:
        out.print("not verified (--no-verify)")
    out.print(escape(f"wrote {dest}/ ({len(res.entries)} models + export.json) in {time.perf_counter() - t0:.1f} s"))
    return 0


def _export_aoti(args, program, dest: Path, log, t0: float) -> int:
    from dsc.cost import human
    from dsc.export.aoti import export_aoti

    with console.status("compiling with AOTInductor...", spinner="dots"):
        manifest = export_aoti(
            program, dest, verify=not args.no_verify, overwrite=args.force, entries=_split(args.entries, "--entries"),
            log=log,
        )  # fmt: skip
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    t = Table(title=escape(f"dsc export {args.program} --format aoti -> {dest}"))
    for col in ("entry", "package", "size", "compile s"):
        t.add_column(col, justify="left" if col in ("entry", "package") else "right")
    for name, f in manifest["entries"].items():
        t.add_row(name, f, human(manifest["bytes"].get(name, 0), "B"), str(manifest["seconds"].get(name, "-")))
    out.print(t)
    n = manifest["numerics"]
    out.print(
        escape(f"the packages agree with the Program on the verification scenario: max abs err {n['max_abs_err']:.1e}, "
               f"top-1 {n['top1_agreement']:.3f}") if n else "not verified (--no-verify)"
    )  # fmt: skip
    out.print(escape(f"wrote {dest}/ in {time.perf_counter() - t0:.1f} s; run it with `dsc generate {dest}`"))
    return 0


# ---- generate -----------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from dsc.frontends import load
    from dsc.program import MANIFEST, Program
    from dsc.runtime import SamplingParams, generate
    from dsc.tokenizer import ByteTokenizer

    if bool(args.prompt) == bool(args.prompt_tokens):
        raise DscError("give the prompts as --prompt TEXT or as --prompt-tokens IDS (one of the two, repeatable)")
    if args.model and (Path(args.model) / "export.json").exists():  # an AOTInductor export (`dsc export --format aoti`)
        from dsc.export.aoti import AotiBackend

        if args.frontend or args.compile:
            raise DscError(f"{args.model} is an AOTInductor export; --frontend and --compile do not apply to it")
        backend = AotiBackend(args.model)
    elif args.model and (Path(args.model) / MANIFEST).exists():
        if args.frontend:
            raise DscError(f"{args.model} is a compiled Program; --frontend is for loading a model, leave it out")
        backend = Program.load(args.model)
        backend.inductor = args.compile
    else:
        if args.compile:
            raise DscError(
                "--compile runs an optimized Program's entries through Inductor; give a `dsc optimize` output directory"
            )
        backend = load(args.model, args.frontend, trust_pickle=args.trust_pickle).eager()
    tok = None
    if args.prompt:
        if backend.config.vocab_size < 256:
            raise DscError(
                f"this model's vocabulary ({backend.config.vocab_size} ids) is not byte-level; give --prompt-tokens"
            )
        tok = ByteTokenizer.for_config(backend.config)
        prompts = [tok.encode(p) for p in args.prompt]
    else:
        prompts = [_token_ids(p, backend.config.vocab_size) for p in args.prompt_tokens]
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed, not args.ignore_eos)
    res = generate(backend, prompts, params, -1 if args.prefill_chunk is None else args.prefill_chunk, args.speculative)
    texts = [tok.decode(t) if tok else None for t in res.tokens]
    if args.json:
        if len(texts) == 1:
            print(json.dumps({"text": texts[0], "tokens": res.tokens[0], "stats": res.stats}))
        else:
            rows = [{"text": x, "tokens": t} for x, t in zip(texts, res.tokens)]
            print(json.dumps({"results": rows, "stats": res.stats}))
        return 0
    for p, x, t in zip(args.prompt or args.prompt_tokens, texts, res.tokens):
        print(p + x if tok else f"{p} -> {','.join(map(str, t))}")
    st = res.stats
    spec = (
        f", {st['tokens_per_step']} tokens/verify step, acceptance {st['acceptance_rate']:.2f} "
        f"(per position {', '.join(f'{x:.2f}' for x in st['acceptance_per_position'])})"
        if "speculative" in st else ""
    )  # fmt: skip
    console.print(f"{st['new_tokens']} tokens, {st['ms_per_step']} ms/step, {st['tokens_per_s']} tok/s{spec}")
    return 0


def _token_ids(text: str, vocab: int) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DscError(f"--prompt-tokens {text!r}: write comma-separated integers, e.g. 5,17,3") from None
    bad = [i for i in ids if not 0 <= i < vocab]
    if not ids or bad:
        raise DscError(
            f"--prompt-tokens {text!r}: token ids must be in 0..{vocab - 1}" + (f", got {bad}" if bad else "")
        )
    return ids


def command_line(args) -> str:
    """The command as the user typed it, for the report's header."""
    import shlex

    return shlex.join(["dsc", *args.argv])


# ---- diff / view --------------------------------------------------------------------------------
def _sides(args):
    """-> (A, B, label A, label B): two saved Programs, or (B omitted) the optimize output A against its
    input, re-captured through the frontend it came through."""
    from dsc.diff import input_of, load_side

    a = load_side(args.a)
    if args.b:
        return a, load_side(args.b), args.a, args.b
    source, frontend = a.provenance.get("source"), a.provenance.get("frontend", "reference")
    with console.status(escape(f"re-capturing the input ({source}, {frontend} frontend) with torch.export...")):
        t0 = time.perf_counter()
        before = input_of(a, trust_pickle=args.trust_pickle)
    if not getattr(args, "json", False):
        console.print(escape(f"captured the input {source} in {time.perf_counter() - t0:.1f} s"), highlight=False)
    return before, a, f"input ({source})", args.a


def cmd_view(args) -> int:
    from dsc.view import require_explorer, view

    require_explorer()  # the optional extra: say it is missing before any work
    a, b, label_a, label_b = _sides(args)
    console.print(
        escape(f"Model Explorer on {args.entry}: A = {label_a}, B = {label_b}, at http://localhost:{args.port} "
               "(Ctrl-C stops it)"), highlight=False,
    )  # fmt: skip
    view(a, b, args.entry, (label_a, label_b), args.context, args.port, browser=not args.no_browser)
    return 0


def cmd_diff(args) -> int:
    from dsc.cost import human
    from dsc.diff import diff
    from dsc.fsutil import atomic_write_text, check_writable
    from dsc.report import render_html

    if args.html:
        check_writable(args.html, "--html", directory=False)
    a, b, label_a, label_b = _sides(args)
    report, graphs = diff(a, b, label_a, label_b, args.context)
    report["command"] = command_line(args)
    if args.html:
        atomic_write_text(args.html, render_html(report, None, diff_graphs=graphs))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    if report["config_differs"]:
        console.print(
            escape(f"note: A and B are different models (their configs differ in {', '.join(report['config_differs'])})"
            "; the figures compare the models, not only the passes"), highlight=False,
        )  # fmt: skip
    bf, af = report["before"], report["after"]
    t = Table(title=escape(f"dsc diff: A = {label_a}, B = {label_b}"))
    for col in ("", "A", "B", "A/B"):
        t.add_column(col)

    def row(label, x, y, unit=""):
        t.add_row(label, human(x, unit), human(y, unit), f"{x / y:.2f}x" if x and y else "-")

    for e in list(bf["nodes"]) + [e for e in af["nodes"] if e not in bf["nodes"]]:
        row(f"nodes in {e}", bf["nodes"].get(e, 0), af["nodes"].get(e, 0))
    row("parameter bytes", bf["param_bytes"], af["param_bytes"], "B")
    row(f"KV cache bytes / token ({af['cache_scope']})", bf["cache_bytes_per_token"], af["cache_bytes_per_token"], "B")
    ctx = bf["context_len"]
    row(f"FLOPs / decode step @ {ctx}", bf["flops_per_decode_step"], af["flops_per_decode_step"])
    row(f"bytes moved / decode step @ {ctx}", bf["bytes_per_decode_step"], af["bytes_per_decode_step"], "B")
    row(f"FLOPs / prefill of {ctx}", bf["flops_per_prefill"], af["flops_per_prefill"])
    out.print(t)
    ops = Table(title="op counts that differ (A -> B)")
    for col in ("entry", "op", "A", "B"):
        ops.add_column(col)
    for e, changes in report["op_changes"].items():
        for op, (x, y) in changes.items():
            ops.add_row(e, op, str(x), str(y))
    out.print(ops)
    if args.html:
        out.print(escape(f"wrote {args.html}"))
    return 0


# ---- bench --------------------------------------------------------------------------------------
def _ints(v: str | None, flag: str, lo: int = 1) -> tuple[int, ...] | None:
    if not v:
        return None
    try:
        out = tuple(int(x) for x in v.split(","))
    except ValueError:
        raise DscError(f"{flag} takes comma-separated integers, got {v!r}") from None
    if any(n < lo for n in out):
        raise DscError(f"{flag} takes integers >= {lo}, got {v!r}")
    return out


def cmd_bench(args) -> int:
    from dsc.bench import (
        OPT_IN_VARIANTS,
        SCENARIOS,
        VARIANTS,
        BenchConfig,
        check_bench_output,
        run_bench,
        write_results,
    )  # fmt: skip

    kw = {}
    for flag, value, choices in (
        ("--variants", args.variants, VARIANTS + OPT_IN_VARIANTS), ("--scenario", args.scenario, SCENARIOS),
    ):  # fmt: skip
        if value:
            chosen = tuple(_split(value, flag))
            bad = [c for c in chosen if c not in choices and not (flag == "--variants" and c.startswith("dsc:"))]
            if bad:
                raise DscError(f"{flag}: unknown {bad}; choose from {', '.join(choices)}")
            kw["variants" if flag == "--variants" else "scenarios"] = chosen
    for name, flag in (("contexts", "--contexts"), ("prompts", "--prompts"), ("drafts", "--drafts"),
                       ("gemv_sizes", "--gemv-sizes")):  # fmt: skip
        v = _ints(getattr(args, name), flag, 0 if name == "drafts" else 1)
        if v:
            kw[name] = v
    for name in ("repeat", "warmup", "generate"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.model:
        kw["model"] = args.model
    check_bench_output(Path(args.output), args.force)
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig(**kw)
    t0 = time.perf_counter()

    def on_event(kind, msg):
        console.print(f"[dim]{time.perf_counter() - t0:7.1f}s[/] {kind:>7}: {escape(msg)}", highlight=False)

    res = run_bench(cfg, on_event)
    paths = write_results(res, Path(args.output))
    t = Table(
        title=f"dsc bench {escape(cfg.model)} — memory bandwidth {res.bandwidth_gbs} GB/s, {res.config['threads']} threads",
        caption="speed-up against eager (decode, prefill, speculative: eager's plain decoding) or the per-head form "
        "(attention) or the fp32 matmul (gemv); speculative n: drafted tokens per step (0: plain), median ms per generate call",
    )
    for col in (
        "scenario",
        "tokens",
        "variant",
        "median ms",
        "speed-up",
        "x bandwidth bound",
        "tokens/step",
        "peak MB",
    ):
        t.add_column(col, no_wrap=col in ("scenario", "variant"))
    for p in res.points:
        spec = "draft_tokens" in p
        t.add_row(
            p["scenario"], str(p["tokens"]), f"{p['variant']} n={p['draft_tokens']}" if spec else p["variant"],
            f"{p['median_ms']:.2f}", f"{p['speedup_vs_eager']:.2f}x" if p["speedup_vs_eager"] else "-",
            f"{p['x_bound'] or '-'}", f"{p['tokens_per_step']:.2f}" if spec else "", f"{p['peak_rss_mb']:.0f}",
        )  # fmt: skip
    out.print(t)
    out.print(escape("wrote " + ", ".join(str(p) for p in paths)))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsc")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsc", description="A compiler for DeepSeek-V3.2-style language models.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    ap.add_argument("--version", action="version", version=f"dsc {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="config summary, parameter counts and KV-cache size of a model")
    p.add_argument("model", nargs="?", help="checkpoint directory, model.pt or preset name (default: built-in model)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("passes", help="list the registered passes in pipeline order")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("optimize", help="capture a model, run the verified pass pipeline, write Program + report")
    p.add_argument("model", nargs="?", help="checkpoint directory, model.pt or preset name (default: built-in model)")
    p.add_argument("-o", "--output", required=True, help="output directory (created atomically)")
    p.add_argument("--passes", help="comma-separated passes to run, in this order (default: the default pipeline)")
    p.add_argument("--disable-pass", help="comma-separated passes to leave out")
    p.add_argument(
        "--pass-option", action="append", metavar="PASS.OPTION=VALUE",
        help="a pass's option, e.g. absorb_mla.products=always (repeatable; `dsc passes` lists them)",
    )  # fmt: skip
    p.add_argument(
        "--fp8", choices=("w8a8", "w8a16"), nargs="?", const="w8a8",
        help="add lower_fp8 to the pipeline: FP8 e4m3 matmuls, W8A8 as deployed (default) or weights only",
    )  # fmt: skip
    p.add_argument("--fp8-include", metavar="PATTERNS", help="module paths to lower to FP8 besides the default policy")
    p.add_argument("--fp8-exclude", metavar="PATTERNS", help="module paths to keep in high precision (e.g. '*.mlp.*')")
    p.add_argument("--no-verify", action="store_true", help="skip the numerical check after each pass")
    p.add_argument(
        "--no-measure", action="store_true",
        help="skip timing a decode step and a prefill (eager, before, after) on this machine for the report",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--trust-pickle", action="store_true", help="allow a model.pt holding pickled objects (runs code)")
    p.add_argument(
        "--frontend", metavar="NAME",
        help="how the model is read: reference (default: dsc's reference model), transformers (HF's modeling code), "
        "module:PKG.MOD:CLASS or module (your own nn.Module; see the README), pt2 (torch.export.save files)",
    )  # fmt: skip
    p.add_argument(
        "--target", default="h200", choices=sorted(TARGETS),
        help="machine the cost choices are made for: h200 (datasheet) or cpu (measured here); default h200",
    )  # fmt: skip
    p.add_argument("--dump-dir", metavar="DIR", help="write each changed pass's graphs before and after into DIR")
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("diff", help="compare two saved Programs (or an optimize output against its input)")
    p.add_argument("a", help="a `dsc optimize` output directory")
    p.add_argument("--trust-pickle", action="store_true", help="re-load a pickled input (module / pt2 frontends)")
    p.add_argument("b", nargs="?", help="another one; omitted: compare A against the model it was made from")
    p.add_argument(
        "--context", type=_at_least(1), default=4096, help="context length for the cost figures (default 4096)"
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--html", metavar="FILE", help="also write the comparison as a self-contained HTML page")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("view", help="Model Explorer on an entry's graph before and after (extra 'view')")
    p.add_argument("a", help="a `dsc optimize` output directory")
    p.add_argument("b", nargs="?", help="another one; omitted: A against the model it was made from")
    p.add_argument("--entry", default="decode", help="the entry point to show (default decode)")
    p.add_argument("--context", type=_at_least(1), default=4096, help="context for the cost overlays (default 4096)")
    p.add_argument("--port", type=_at_least(1), default=8080, help="the local server's port (default 8080)")
    p.add_argument("--no-browser", action="store_true", help="start the server without opening a browser")
    p.add_argument("--trust-pickle", action="store_true", help="re-load a pickled input (module / pt2 frontends)")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("bench", help="latency and memory of eager / torch.compile / dsc side by side")
    p.add_argument("model", nargs="?", help="checkpoint, model.pt or preset (default: small; tiny with --quick)")
    p.add_argument("--scenario", help="comma-separated: decode, prefill, attention, speculative, gemv (default: all)")
    p.add_argument(
        "--variants",
        help="comma-separated: eager, compile, dsc, dsc+inductor (the Program's entries under torch.compile), "
        "dsc+onnx (its prefill and decode exported to ONNX, run by onnxruntime), dsc+aoti (the same as AOTInductor "
        "packages), dsc+fp8 (the default pipeline with lower_fp8, W8A8), or dsc:PASS+PASS ablations (default: "
        "eager,compile,dsc)",
    )
    p.add_argument("--contexts", help="decode / attention context lengths (default 1024,8192,32768)")
    p.add_argument("--gemv-sizes", help="gemv: n of the n x n weights, fp32 against FP8 (default 1024,4096)")
    p.add_argument("--prompts", help="prefill prompt lengths (default 1024,4096)")
    p.add_argument("--repeat", type=_at_least(1), help="timed calls per point (default 5)")
    p.add_argument("--warmup", type=_at_least(0), help="untimed calls per point (default 2)")
    p.add_argument("--drafts", help="speculative: drafted tokens per step to compare (default 0,1,2,3; 0: plain)")
    p.add_argument("--generate", type=_at_least(2), help="speculative: greedy tokens per generate call (default 256)")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run on the tiny preset")
    p.add_argument(
        "-o", "--output", default="bench", help="directory for bench.json and the SVG plots (default ./bench)"
    )
    p.add_argument("--force", action="store_true", help="replace an earlier bench.json in the output directory")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "export",
        help="write an optimized Program as ONNX models (extra 'onnx') or AOTInductor packages, checked against it",
    )
    p.add_argument("program", help="a `dsc optimize` output directory")
    p.add_argument(
        "--format", choices=("onnx", "aoti"), default="onnx",
        help="onnx: ONNX models checked with onnxruntime (default); aoti: AOTInductor packages torch runs without dsc",
    )  # fmt: skip
    p.add_argument(
        "-o", "--output", help="output directory (default: PROGRAM.onnx / PROGRAM.aoti beside it; created atomically)"
    )
    p.add_argument("--entries", help="comma-separated entry points to write (default: all of the Program's)")
    p.add_argument(
        "--no-verify", action="store_true", help="skip running the models in onnxruntime against the Program"
    )
    p.add_argument(
        "--check", choices=("trt",),
        help="trt: fail on anything TensorRT's ONNX parser rejects (TopK K > 3840 or not constant, data-dependent "
        "shapes, element types); without it they are reported",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an earlier export in the output directory")
    p.add_argument("--json", action="store_true", help="print export.json to stdout instead of the table")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text with a model or an optimized Program directory")
    p.add_argument("model", nargs="?", help="dsc optimize output, checkpoint, model.pt or preset (default: built-in)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument(
        "--prompt-tokens", action="append", metavar="IDS",
        help="a prompt as comma-separated token ids (models without a byte-level vocabulary); repeat for a batch",
    )  # fmt: skip
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the EOS token")
    p.add_argument(
        "--prefill-chunk", type=_at_least(0), metavar="N",
        help="prefill longer prompts as N-token chunks (default: a Program's prefill_chunk, the prompt length its "
        "prefill form was chosen for; 0: the whole prompt in one call)",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=_at_least(1), default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument(
        "--speculative", type=_at_least(0), default=0, metavar="N",
        help="speculative decoding: the MTP module drafts N tokens per step, the main model verifies them in one "
        "call (a Program made by draft_mtp, or the reference model); the same output as without (default 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="run the Program's entry points through Inductor (torch.compile, dynamic shapes; dsc:: ops stay "
        "custom ops): seconds of compilation per entry on first use, faster steps after",
    )  # fmt: skip
    p.add_argument("--temperature", type=_finite, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=_finite, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--trust-pickle", action="store_true", help="allow a model.pt holding pickled objects (runs code)")
    p.add_argument(
        "--frontend", metavar="NAME",
        help="how the model is read: reference (default: dsc's reference model), transformers (HF's modeling code), "
        "module:PKG.MOD:CLASS or module (your own nn.Module; see the README), pt2 (torch.export.save files)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print {text, tokens, stats} as JSON")
    p.set_defaults(func=cmd_generate)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse has printed what was wrong with the arguments (or the help)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except DscError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PassVerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing half-written is left
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`dsc generate ... | head`): not a failure of dsc
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - interpreter shutdown flushes stdout once more
        return 0
    except Exception:  # noqa: BLE001 - last resort: an internal failure, shown in full
        path = Path(tempfile.mkdtemp(prefix="dsc-crash-")) / "traceback.txt"
        path.write_text(traceback.format_exc())
        print(
            f"internal error (please report): {traceback.format_exc(limit=-3)}\nfull traceback: {path}", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
