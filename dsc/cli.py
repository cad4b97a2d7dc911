"""The ``dsc`` command line. Library code raises; only this module prints.

Exit codes: 0 success, 2 bad input (the message says what to do), 1 internal failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rich.console import Console
from rich.table import Table

from dsc.errors import DscError

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
    from dsc.model.stats import info
    from dsc.sources import resolve_config

    data = info(resolve_config(args.model))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    t = Table(title=f"dsc info {args.model or '(default)'}", show_header=False)
    for k, v in data["config"].items():
        t.add_row(k, str(v))
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
            f"{c['bytes_per_token_per_layer'][form]:,} B/layer, {c['bytes_per_token'][form]:,} B over "
            f"{c['layers']} layers ({_fmt_bytes(c['bytes_per_token'][form] * 131072)} per 128K tokens, {c['dtype']})",
        )
    out.print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsc", description="A compiler for DeepSeek-V3.2-style language models.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="config summary, parameter counts and KV-cache size of a model")
    p.add_argument("model", nargs="?", help="checkpoint directory, model.pt or preset name (default: built-in model)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except DscError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
