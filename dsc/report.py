"""report.json and a self-contained report.html (inline CSS and SVG, no scripts, opens offline).

``report.json`` (schema_version 1) is documented in the README; scripts rely on it. The HTML shows
the same content for people: a before/after summary, the cost curves, the pass table, and for every
pass that changed something the graph diff of each entry point, each new node tagged with its pass.
"""

from __future__ import annotations

import difflib
import html
import json
import math
import re
from pathlib import Path

from dsc.cache import CacheTensor
from dsc.cost import human, tokens_label

SCHEMA_VERSION = 1
COLORS = {"before": "#b4441c", "after": "#1f6fb2"}

CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#5b6573;margin-bottom:18px}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0001;margin:6px 0 14px;font-variant-numeric:tabular-nums}
th,td{padding:6px 12px;border-bottom:1px solid #eceff3;text-align:right;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td:first-child,th:first-child{text-align:left}
.good{color:#19753a;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#7a8491}
.cards{display:flex;gap:14px;flex-wrap:wrap}.card{background:#fff;box-shadow:0 1px 2px #0001;padding:12px 16px;min-width:200px}
.card b{display:block;font-size:20px}.charts{display:flex;gap:18px;flex-wrap:wrap}
svg{background:#fff;box-shadow:0 1px 2px #0001}
pre.diff{background:#fff;box-shadow:0 1px 2px #0001;padding:10px;overflow:auto;font:12px/1.4 Menlo,Consolas,monospace;max-height:520px;white-space:pre-wrap;overflow-wrap:anywhere}
.pics{display:flex;gap:12px;align-items:flex-start;margin:6px 0}.pic{flex:1 1 0;min-width:0;overflow:auto;max-height:760px;background:#fff;box-shadow:0 1px 2px #0001}
.pic svg{box-shadow:none}h4{font-size:13px;margin:14px 0 4px;color:#39424e}
.add{background:#e6f4ea;display:block}.del{background:#fce8e6;display:block}.hunk{color:#6b4fbb;display:block}
.tag{background:#1f6fb2;color:#fff;border-radius:3px;padding:0 4px;margin-left:6px;font-size:11px}
details{margin:4px 0 12px}summary{cursor:pointer;color:#1f6fb2}
code{background:#eef1f4;padding:1px 4px;border-radius:3px}
"""


def log_ticks(e0: float, e1: float) -> list[float]:
    """Round tick values between 10**e0 and 10**e1: 1, 3 per decade over a short range (never 3.16),
    one per decade otherwise."""
    steps = (1, 3) if e1 - e0 <= 3 else (1,)
    return [
        m * 10.0**k
        for k in range(math.floor(e0), math.ceil(e1) + 1)
        for m in steps
        if e0 - 1e-9 <= math.log10(m * 10.0**k) <= e1 + 1e-9
    ]


def svg_chart(
    series: list[dict], title: str, ylabel: str, xlabel: str = "context length (tokens)", w=540, h=320
) -> str:
    """Log-log line chart. series: [{label, x, y, color}]."""
    pts = [(x, y) for s in series for x, y in zip(s["x"], s["y"]) if x > 0 and y > 0]
    if not pts:
        return ""
    lx = [math.log10(x) for x, _ in pts]
    ly = [math.log10(y) for _, y in pts]
    x0, x1 = min(lx), max(lx)
    y0, y1 = math.floor(min(ly) * 2) / 2, math.ceil(max(ly) * 2) / 2
    if y1 == y0:
        y1 += 0.5
    L, R, Tm, B = 62, 16, 34, 44

    def sx(v):
        return L + (math.log10(v) - x0) / max(x1 - x0, 1e-9) * (w - L - R)

    def sy(v):
        return h - B - (math.log10(v) - y0) / (y1 - y0) * (h - Tm - B)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{html.escape(title)}" font-family="Helvetica, Arial, sans-serif" style="background:#fff">'
    ]
    out.append(f'<text x="{L}" y="20" font-size="13" font-weight="600">{html.escape(title)}</text>')
    for v in log_ticks(y0, y1):
        y = sy(v)
        out.append(f'<line x1="{L}" x2="{w - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e9ed"/>')
        out.append(
            f'<text x="{L - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#5b6573">{human(v)}</text>'
        )
    xs = sorted({x for s in series for x in s["x"]})
    for x in xs:
        out.append(
            f'<text x="{sx(x):.1f}" y="{h - B + 16}" font-size="11" text-anchor="middle" fill="#5b6573">{tokens_label(x)}</text>'
        )
    out.append(
        f'<text x="{(L + w - R) / 2}" y="{h - 8}" font-size="11" text-anchor="middle" fill="#5b6573">{xlabel}</text>'
    )
    out.append(
        f'<text x="14" y="{(Tm + h - B) / 2}" font-size="11" fill="#5b6573" transform="rotate(-90 14 {(Tm + h - B) / 2})" text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    for i, s in enumerate(series):
        p = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(s["x"], s["y"]) if x > 0 and y > 0)
        dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
        out.append(f'<polyline fill="none" stroke="{s["color"]}" stroke-width="2.2"{dash} points="{p}"/>')
        for x, y in zip(s["x"], s["y"]):
            if x > 0 and y > 0:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s["color"]}"/>')
        lx_ = w - R - 90 * (len(series) - i)
        out.append(f'<rect x="{lx_}" y="12" width="14" height="4" fill="{s["color"]}"/>')
        out.append(f'<text x="{lx_ + 18}" y="18" font-size="11">{html.escape(s["label"])}</text>')
    out.append("</svg>")
    return "".join(out)


def diff_html(before: str, after: str, context: int = 3) -> tuple[str, int, int]:
    lines = list(
        difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after", n=context, lineterm="")
    )
    added = sum(1 for ln in lines if ln.startswith("+") and not ln.startswith("+++"))
    removed = sum(1 for ln in lines if ln.startswith("-") and not ln.startswith("---"))
    out = []
    for ln in lines[2:]:
        esc = html.escape(ln)
        if ln.startswith("+"):
            if "  &lt;- " in esc:
                body, _, tag = esc.rpartition("  &lt;- ")
                esc = f'{body}<span class="tag">{tag}</span>'
            out.append(f'<span class="add">{esc}</span>')
        elif ln.startswith("-"):
            out.append(f'<span class="del">{esc}</span>')
        elif ln.startswith("@@"):
            out.append(f'<span class="hunk">{esc}</span>')
        else:
            out.append(esc + "\n")
    return "".join(out), added, removed


def measured_lines(m: dict | None) -> list[tuple[str, str, bool]]:
    """(what, "eager X ms, before Y ms, after Z ms", after slower than eager or before) per measured point."""
    out = []
    for key, what in (("decode", "decode step at {context} context"), ("prefill", "prefill of {tokens} tokens")):
        d = (m or {}).get(key)
        if not d or "after_ms" not in d:
            continue
        times = ", ".join(f"{n} {d[f'{n}_ms']:.2f} ms" for n in ("eager", "before", "after") if f"{n}_ms" in d)
        slower = any(d["after_ms"] > d.get(f"{n}_ms", float("inf")) for n in ("eager", "before"))
        ratio = f" (after: {d['eager_ms'] / d['after_ms']:.2f}x eager)" if "eager_ms" in d else ""
        out.append(
            (what.format(context=tokens_label(d.get("context", 0)), tokens=d.get("tokens")), times + ratio, slower)
        )
    return out


def measured_html(m: dict | None, b: dict, a: dict) -> str:
    lines = measured_lines(m)
    if not lines:
        return "<p class='muted'>Not measured on this machine (--no-measure).</p>"
    bytes_ratio = _ratio(b.get("bytes_per_decode_step") or 0, a.get("bytes_per_decode_step") or 0)
    h = [
        f"<h2>Measured on this machine ({m.get('threads')} threads)</h2><table><tr><th></th><th>medians</th><th></th></tr>"
    ]
    for what, times, slower in lines:
        mark = "<span class='bad'>slower than what it replaces</span>" if slower else "<span class='good'>faster</span>"
        h.append(f"<tr><td>{what}</td><td>{times}</td><td>{mark}</td></tr>")
    h.append(
        f"</table><p class='muted'>The cost model's figures below are for the target machine at its context "
        f"(bytes per decode step {bytes_ratio}); these are this machine's, at a short context.</p>"
    )
    return "".join(h)


def node_changes(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Per entry "name before→after"; an entry a pass made reads "(new)→n", one it removed "n→(gone)"."""
    names = list(before) + [e for e in after if e not in before]
    return [f"{e} {before.get(e, '(new)')}→{after.get(e, '(gone)')}" for e in names]


def _ratio(b: float, a: float) -> str:
    if not b or not a:
        return ""
    r = b / a
    cls = "good" if r > 1.0001 else "bad" if r < 0.9999 else "muted"
    return f'<span class="{cls}">{r:.2f}x</span>'


def _fmt_num(n) -> str:
    if not n:
        return "-"
    if n.get("sqnr_db") is None:
        return "exact"
    return f"{n['sqnr_db']:.1f} dB"


LABELS = {
    # canonicalize
    "asserts_and_casts": "asserts and no-op casts dropped", "views": "view chains folded",
    "cse": "common subexpressions merged", "dce": "dead nodes removed",
    "unused_weight_inputs": "weight inputs an entry never reads (dropped from that entry; the Program keeps the weight)",
    # normalize
    "grad_mode": "grad-mode wrappers inlined", "noops": "no-op copies dropped", "assembly": "in-place assemblies as cat",
    "cache_writes": "cache writes made canonical", "layout": "transposes as permute", "masks": "masks made additive",
    "contractions": "contractions as einsum", "split_sums": "split sums merged", "declined": "spellings declined",
    # absorb_mla / fuse_dsa
    "sites": "sites", "latent_style": "latent caches", "per_head_cache_style": "per-head K/V caches",
    "products": "W_UK·W_UV products", "form": "form", "why": "why", "topk": "top-k", "entries": "entries",
    "cache_bytes_per_token_per_layer": "cache bytes per token per layer", "index_cache": "index-key cache",
    "recall_vs_fp32": "top-k recall vs the fp32 indexer", "option": "option", "inflation": "weight inflation (x)",
    "param_bytes_per_layer": "parameter bytes per layer", "layers": "layers", "before": "before", "after": "after", "factored": "factored", "sites_per_entry": "sites per entry", "rms_norms_per_entry": "other RMSNorms made one aten.rms_norm, per entry",
    # lower_fp8
    "mode": "numerics mode", "scales": "scale format", "matmuls": "matmuls", "weights": "weights",
    "lowered": "lowered", "from_checkpoint": "taken from the FP8 checkpoint as they are", "bytes_before": "bytes before",
    "bytes_after": "bytes after", "sqnr_db": "output SQNR (dB)", "not_lowered_yet": "not lowered yet",
    # draft_mtp
    "draft": "draft entry", "verify": "verify entry", "hidden": "hidden state", "from": "made from", "order": "order",
    "attention_sites": "attention sites", "chained_hidden": "chained hidden state", "mtp_cache_layers": "MTP cache layers",
}  # fmt: skip


def stat_label(key: str) -> str:
    """A stat key as a person reads it (dotted keys label each part)."""
    return " · ".join(LABELS.get(k, k.replace("_", " ")) for k in str(key).split("."))


def _is_table(v) -> bool:
    return isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = _cell(v) if isinstance(v, list) else v
    return out


def _facts_table(title: str, d: dict) -> str:
    """A nested dict of facts as key / value rows (byte counts also in SI units)."""
    rows = []
    for k, v in _flatten(d).items():
        shown = f"{v} ({human(v, 'B')})" if "bytes" in k and isinstance(v, int) and v >= 1000 else str(v)
        rows.append(
            f"<tr><td>{html.escape(stat_label(k))}</td><td style='text-align:left'>{html.escape(shown)}</td></tr>"
        )
    return f"<table><tr><th colspan='2' style='text-align:left'>{html.escape(stat_label(title))}</th></tr>{''.join(rows)}</table>"


def _cell(v) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "—"
    if isinstance(v, dict):
        return ", ".join(f"{stat_label(k)} {x}" for k, x in v.items()) or "—"
    return str(v)


def _stats_table(title: str, rows: dict[str, dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    out = [
        f"<table><tr><th>{html.escape(stat_label(title))}</th>"
        + "".join(f"<th>{html.escape(stat_label(c))}</th>" for c in cols)
        + "</tr>"
    ]
    for name, r in rows.items():
        cells = "".join(f"<td style='text-align:left'>{html.escape(_cell(r.get(c, '')))}</td>" for c in cols)
        out.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return "".join(out) + "</table>"


def header_line(report: dict) -> str:
    """Versions, machine, what ran (the passes, or the two sides of a diff) and the command line."""
    host = report.get("host") or {}
    parts = [f"dsc {report.get('dsc_version', '?')}", f"torch {report.get('torch_version', '?')}"]
    if host:
        parts.append(f"{host.get('cpu') or host.get('platform', '')}, {host.get('threads')} threads")
    if "passes" in report and "a" not in report:
        passes = report["passes"]
        changed = sum(1 for p in passes if p["changed"])
        parts.append(f"{len(passes)} passes, {changed} changed the program")
        parts.append("verification " + ("on" if report.get("verified", True) else "<b>off</b>"))
    if "a" in report:
        for side in ("a", "b"):
            ran = ", ".join(report.get(f"passes_{side}") or []) or "no passes (as captured)"
            parts.append(f"{side.upper()} = {html.escape(str(report[side]))}: {html.escape(ran)}")
    line = " · ".join(parts)
    if report.get("command"):
        line += f"<br><code>{html.escape(report['command'])}</code>"
    return line


def cache_table(b: dict, a: dict) -> str:
    """The CacheSpec before and after: one row per kind of cache tensor (the layers folded)."""
    if "cache" not in b or "cache" not in a:
        return ""

    def rows(spec: dict) -> dict[tuple, dict]:
        out: dict[tuple, dict] = {}
        for t in spec["tensors"]:
            name = re.sub(r"\blayers\.\d+\.", "layers.*.", t["name"])
            tail = list(t["tail"])
            dims = ["B", *tail[: t.get("time_dim", 1) - 1], "T", *tail[t.get("time_dim", 1) - 1 :]]
            key = (name, tuple(dims), t["dtype"])
            row = out.setdefault(
                key, {"meaning": t["meaning"], "layers": [], "bytes": CacheTensor(**t).bytes_per_token}
            )
            row["layers"].append(t["layer"])
        return out

    h = ["<h2>KV cache layout (CacheSpec)</h2><table><tr><th></th><th>tensor</th><th>shape</th><th>dtype</th>"
         "<th>layers</th><th>bytes / token / layer</th><th>bytes / token</th><th>holds</th></tr>"]  # fmt: skip
    for side, spec in (("before", b["cache"]), ("after", a["cache"])):
        for (name, dims, dtype), r in rows(spec).items():
            n = len(r["layers"])
            h.append(
                f"<tr><td>{side}</td><td style='text-align:left'><code>{html.escape(name)}</code></td>"
                f"<td><code>({', '.join(map(str, dims))})</code></td><td>{dtype}</td><td>{n}</td>"
                f"<td>{r['bytes']:,}</td><td>{r['bytes'] * n:,}</td>"
                f"<td style='text-align:left'>{html.escape(r['meaning'])}</td></tr>"
            )
    h.append("</table>")
    return "".join(h)


def graph_change_html(entry: str, change: tuple, open_: bool = False) -> str:
    """One entry's change: the before/after pictures (when sketches are given) and the listing diff."""
    from dsc.picture import before_after

    gb, ga = change[0], change[1]
    out = []
    if len(change) == 4 and (change[2] or change[3]):
        pb, pa = before_after(change[2], change[3], gb, ga, entry)
        if pb or pa:
            out.append(f"<div class='pics' data-entry='{html.escape(entry)}'>")
            out += [f"<div class='pic'>{p}</div>" for p in (pb, pa) if p]
            out.append("</div>")
    body, added, removed = diff_html(gb, ga)
    out.append(
        f"<details{' open' if open_ else ''}><summary>listing of <code>{entry}</code>: "
        f"+{added} / −{removed} lines</summary><pre class='diff'>{body}</pre></details>"
    )
    return "".join(out)


def render_html(
    report: dict, graphs: dict[str, dict[str, tuple]] | None = None, diff_graphs: dict | None = None
) -> str:
    """``graphs``: per pass, per entry, its ``pass_manager.graph_changes``; ``diff_graphs``: the same for
    the one change from A to B of ``dsc diff``."""
    b, a = report["before"], report["after"]
    ctx = b.get("context_len", 4096)
    title = f"dsc report — {report.get('model', '')}"
    h = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    h.append(f"<style>{CSS}</style></head><body><main>")
    h.append(f"<h1>{html.escape(title)}</h1>")
    passes = report.get("passes", [])
    h.append(f"<div class='sub'>{header_line(report)}</div>")
    cards = [
        (
            "FLOPs per decode step",
            b.get("flops_per_decode_step"),
            a.get("flops_per_decode_step"),
            "FLOP",
            f"at {tokens_label(ctx)} context",
        ),
        (
            "bytes moved per decode step",
            b.get("bytes_per_decode_step"),
            a.get("bytes_per_decode_step"),
            "B",
            "unfused estimate",
        ),
        ("KV cache per token", b["cache_bytes_per_token"], a["cache_bytes_per_token"], "B", a.get("cache_scope", "")),
        ("weights", b["param_bytes"], a["param_bytes"], "B", "read by the entries"),
    ]
    h.append("<div class='cards'>")
    for label, vb, va, unit, note in cards:
        if vb is None:
            continue
        h.append(
            f"<div class='card'>{label}<b>{human(va, unit)}</b>"
            f"<span class='muted'>before {human(vb, unit)} {_ratio(vb, va)} · {note}</span></div>"
        )
    h.append("</div>")
    h.append(measured_html(report.get("measured"), b, a))

    h.append("<h2>Before and after</h2><table><tr><th></th><th>before</th><th>after</th><th>before/after</th></tr>")
    for entry in list(b["nodes"]) + [e for e in a["nodes"] if e not in b["nodes"]]:
        nb, na = b["nodes"].get(entry), a["nodes"].get(entry)
        h.append(
            f"<tr><td>nodes in <code>{entry}</code></td><td>{'-' if nb is None else nb}</td><td>{'-' if na is None else na}</td><td>{_ratio(nb or 0, na or 0)}</td></tr>"
        )
    rows = [
        ("parameter bytes", "param_bytes"),
        (f"KV cache bytes per token ({a.get('cache_scope', 'all layers')})", "cache_bytes_per_token"),
        (f"FLOPs per decode step ({tokens_label(ctx)} ctx)", "flops_per_decode_step"),
        (f"bytes moved per decode step ({tokens_label(ctx)} ctx)", "bytes_per_decode_step"),
        (f"FLOPs per prefill ({tokens_label(ctx)} tokens)", "flops_per_prefill"),
    ]  # fmt: skip
    for label, key in rows:
        if key in b:
            h.append(
                f"<tr><td>{label}</td><td>{human(b[key])}</td><td>{human(a[key])}</td><td>{_ratio(b[key], a[key])}</td></tr>"
            )
    h.append("</table>")
    h.append(cache_table(b, a))
    eb, ea = b.get("entry_costs", {}), a.get("entry_costs", {})
    if ea:
        what = {"prefill": f"a prompt of {tokens_label(ctx)}", "decode": "1 new token",
                "verify": "1 + 1 draft tokens", "draft": "1 draft", "mtp": "1 token"}  # fmt: skip
        h.append(
            f"<h3>Cost per call of each entry point ({tokens_label(ctx)} context)</h3><table><tr><th>entry</th>"
            "<th>one call</th><th>FLOPs before</th><th>FLOPs after</th><th>bytes before</th><th>bytes after</th></tr>"
        )
        for entry in list(eb) + [e for e in ea if e not in eb]:
            x, y = eb.get(entry, {}), ea.get(entry, {})
            cells = "".join(
                f"<td>{human(d[k], u) if k in d else '-'}</td>"
                for k, u in (("flops", ""), ("bytes", "B"))
                for d in (x, y)
            )
            h.append(f"<tr><td><code>{entry}</code></td><td>{what.get(entry, '')}</td>{cells}</tr>")
        h.append("</table>")
    if "decode_formula" in b:
        h.append(
            "<details><summary>cost formulas (T = context length)</summary><table><tr><th></th><th>before</th><th>after</th></tr>"
        )
        for kind in ("decode", "prefill"):
            for q in ("flops", "bytes"):
                h.append(
                    f"<tr><td>{kind} {q}</td><td><code>{html.escape(b[kind + '_formula'][q])}</code></td><td><code>{html.escape(a[kind + '_formula'][q])}</code></td></tr>"
                )
        h.append("</table></details>")

    if "decode_curve" in b:
        h.append("<h2>Cost against context length</h2><div class='charts'>")
        for key, q, title_, unit in (
            ("decode_curve", "flops", "FLOPs per decode step", "FLOPs"),
            ("decode_curve", "bytes", "bytes moved per decode step", "bytes"),
            ("prefill_curve", "flops", "FLOPs per prefill of T tokens", "FLOPs"),
        ):
            series = [
                {"label": "before", "x": b[key]["context"], "y": b[key][q], "color": COLORS["before"]},
                {"label": "after", "x": a[key]["context"], "y": a[key][q], "color": COLORS["after"], "dashed": True},
            ]
            h.append(svg_chart(series, title_, unit))
        h.append("</div>")

    if passes:
        h.append("<h2>Passes</h2><table><tr><th>#</th><th>pass</th><th>changed</th><th>sites</th><th>nodes</th>"
                 "<th>max abs err</th><th>max rel err</th><th>top-1</th><th>SQNR</th><th>tolerance</th><th>s</th></tr>")  # fmt: skip
        for i, p in enumerate(passes, 1):
            n = p.get("numerics") or {}
            nodes = ", ".join(node_changes(p["nodes_before"], p["nodes_after"]))
            tol = p["tolerance"]
            h.append(
                f"<tr><td>{i}</td><td><a href='#pass-{p['name']}'>{p['name']}</a></td><td>{'yes' if p['changed'] else '<span class=muted>no</span>'}</td>"
                f"<td>{p['matches']}</td><td>{nodes}</td><td>{n.get('max_abs_err', 0):.2e}</td><td>{n.get('max_rel_err', 0):.2e}</td>"
                f"<td>{n.get('top1_agreement', 1):.3f}</td><td>{_fmt_num(n) if n else '-'}</td>"
                f"<td>atol {tol['atol']:g}, rtol {tol['rtol']:g}</td><td>{p.get('seconds', 0):.2f}</td></tr>"
            )
        h.append("</table>")
        for i, p in enumerate(passes, 1):
            h.append(f"<h3 id='pass-{p['name']}'>{i}. {p['name']}</h3>")
            if not p["changed"]:
                h.append("<p class='muted'>Found nothing to rewrite: the program is unchanged.</p>")
                continue
            flat = {k: v for k, v in p.get("stats", {}).items() if not isinstance(v, dict)}
            stats = ", ".join(f"{stat_label(k)}: {_cell(v)}" for k, v in flat.items())
            if p.get("options"):
                stats += " · options: " + ", ".join(f"{k}={v}" for k, v in p["options"].items())
            h.append(f"<p>{p['matches']} sites · {html.escape(stats)} · parameters {human(p['param_bytes']['before'], 'B')} → "
                     f"{human(p['param_bytes']['after'], 'B')} · cache {p['cache_bytes_per_token']['before']} → "
                     f"{p['cache_bytes_per_token']['after']} B/token</p>")  # fmt: skip
            for k, v in p.get("stats", {}).items():
                if _is_table(v):
                    h.append(_stats_table(k, v))
                elif isinstance(v, dict) and v:
                    h.append(_facts_table(k, v))
            ob, oa = p["ops_before"], p["ops_after"]
            entries = list(ob) + [e for e in oa if e not in ob]  # a pass may add or remove entries
            ops = sorted(set().union(*[set(ob.get(e, {})) | set(oa.get(e, {})) for e in entries]))
            delta = [op for op in ops if any(oa.get(e, {}).get(op, 0) != ob.get(e, {}).get(op, 0) for e in entries)]
            if delta:
                h.append("<table><tr><th>op</th>" + "".join(f"<th>{e} before → after</th>" for e in entries) + "</tr>")
                for op in delta:
                    cells = "".join(
                        f"<td>{ob[e].get(op, 0) if e in ob else '-'} → {oa[e].get(op, 0) if e in oa else '-'}</td>"
                        for e in entries
                    )
                    h.append(f"<tr><td><code>{html.escape(op)}</code></td>{cells}</tr>")
                h.append("</table>")
            seen: dict[tuple, str] = {}
            for entry, change in (graphs or {}).get(p["name"], {}).items():
                if change[0] == change[1]:
                    continue
                h.append(f"<h4>{p['name']} on <code>{entry}</code></h4>")
                if not change[0]:
                    h.append("<p class='muted'>A new entry point made by this pass (its listing below).</p>")
                    h.append(graph_change_html(entry, change[:2]))
                elif (change[0], change[1]) in seen:  # verify is made from decode: one picture for both
                    h.append(f"<p class='muted'>The same change as in <code>{seen[change[0], change[1]]}</code>.</p>")
                else:
                    seen[change[0], change[1]] = entry
                    h.append(graph_change_html(entry, change))
    if diff_graphs:
        h.append("<h2>What changed from A to B</h2>")
        for entry, change in diff_graphs.items():
            if change[0] != change[1]:
                h.append(
                    f"<h4><code>{entry}</code></h4>" + graph_change_html(entry, change if change[0] else change[:2])
                )
    h.append("</main></body></html>")
    return "".join(h)


def write_report(out_dir: Path, report: dict, graphs: dict | None = None) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.html").write_text(render_html(report, graphs))
