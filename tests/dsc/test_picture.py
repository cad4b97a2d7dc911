"""The report's before/after pictures (dsc.picture) and the report's labels, ticks, cache table and header."""

import re

import torch
from torch import nn

from dsc.optimize import program_summary
from dsc.picture import changed_nodes, picture, sketch
from dsc.report import LABELS, SCHEMA_VERSION, diff_html, log_ticks, render_html
from tests.passes.helpers import toy_program


def _svgs(page: str) -> list[str]:
    return re.findall(r'<svg[^>]*class="graph".*?</svg>', page, re.S)


def _accounted(svg: str) -> tuple[set, set]:
    """(changed nodes the picture accounts for: drawn, folded or omitted; context nodes drawn)."""
    side = re.search(r'data-side="(\w+)"', svg).group(1)
    drawn = set(re.findall(rf'<g class="node {side}" data-node="([^"]+)"', svg))
    folded = {n for f in re.findall(r'data-folded="([^"]*)"', svg) for n in f.split()}
    omitted = set(re.search(r'data-omitted="([^"]*)"', svg).group(1).split())
    context = set(re.findall(r'<g class="node context" data-node="([^"]+)"', svg))
    return drawn | folded | omitted, context


def _report(before, program, records):
    return {
        "schema_version": SCHEMA_VERSION,
        "model": "tiny",
        "command": "dsc optimize tiny -o out",
        "host": {"cpu": "test cpu", "threads": 2},
        "torch_version": torch.__version__,
        "passes": [r.to_dict() for r in records],
        "before": program_summary(before),
        "after": program_summary(program),
    }, {r.name: r.graphs for r in records if r.changed}


def test_changed_nodes_are_the_listing_diff():
    before = "x: float32[2]  # input\na = sin(x)  # f\nb = cos(a)  # f\nreturn (b,)"
    after = "x: float32[2]  # input\na = sin(x)  # f\nc = tanh(a)  # f  <- p\nreturn (c,)"
    removed, added = changed_nodes(before, after)
    assert (removed, added) == (["b", "output"], ["c", "output"])
    _, n_added, n_removed = diff_html(before, after)
    assert (n_added, n_removed) == (len(added), len(removed))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.proj(x)) * 2


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_identical_layers_fold_and_every_changed_node_is_accounted_for():
    p = toy_program(_Stack(), torch.randn(2, 8))
    sk = sketch(p.entries["forward"])
    relus = [n for n, d in sk.items() if d["op"] == "relu"]
    muls = [n for n, d in sk.items() if d["op"] == "mul"]
    assert [sk[n]["module"] for n in relus] == [f"layers.{i}" for i in range(3)]
    changed = relus + muls + ["output"]  # the same change in each of the three layers, and the output
    svg = picture(sk, changed, "removed", "forward: before")
    accounted, context = _accounted(svg)
    assert accounted == set(changed)
    drawn = set(re.findall(r'<g class="node removed" data-node="([^"]+)"', svg))
    assert drawn == {relus[0], muls[0], "output"}  # one layer drawn ...
    assert "× 3 layers" in svg  # ... standing for three
    assert not context & set(changed) and context  # inputs and users drawn as grey context
    # weights carry their module's name, new nodes (no module stack) take their inputs' module
    assert (
        sk["p_layers_0_proj_weight"]["op"] == "proj.weight"
        and sk["p_layers_0_proj_weight"]["module"] == "layers.0.proj"
    )


def test_report_has_a_picture_per_changed_pass_and_entry(tiny_program, tiny_optimized):
    program, records = tiny_optimized
    report, graphs = _report(tiny_program, program, records)
    page = render_html(report, graphs)
    assert "<script" not in page and "<link" not in page
    assert set(re.findall(r"https?://[^\"' ]+", page)) <= {"http://www.w3.org/2000/svg"}
    pics = {}
    for block in re.findall(r"<div class='pics' data-entry='(\w+)'>(.*?)</div></div>", page, re.S):
        pics.setdefault(block[0], []).append(block[1])
    sections = re.split(r"<h4>", page)[1:]
    checked = 0
    for name, per_entry in graphs.items():
        for entry, (gb, ga, sb, sa) in per_entry.items():
            if gb == ga:
                continue
            section = next(s for s in sections if s.startswith(f"{name} on <code>{entry}</code>"))
            if not gb:
                assert "A new entry point" in section
                continue
            if "The same change as" in section:
                continue
            removed, added = changed_nodes(gb, ga)
            svgs = {re.search(r'data-side="(\w+)"', s).group(1): s for s in _svgs(section.split("<details")[0])}
            for side, nodes, sk in (("removed", removed, sb), ("added", added, sa)):
                want = {n for n in nodes if n in sk}
                if want:  # the picture's node sets are the graph diff's
                    assert _accounted(svgs[side])[0] == want, (name, entry, side)
                    checked += 1
                else:
                    assert side not in svgs
    assert checked >= 10
    absorb = next(s for s in sections if s.startswith("absorb_mla on <code>decode</code>"))
    assert "dsc::mla_decode" in absorb and "× 2 layers" in absorb  # tiny's two main layers, drawn once
    assert len(page) < 3_000_000


def test_report_polish(tiny_program, tiny_optimized):
    program, records = tiny_optimized
    report, graphs = _report(tiny_program, program, records)
    page = render_html(report, graphs)
    # every stat key a pass reports on tiny has a label (raw keys like latent_cache_style never show)
    for r in records:
        for k, v in r.stats.items():
            assert k in LABELS, (r.name, k)
            if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
                assert all(c in LABELS for row in v.values() for c in row), (r.name, k)
    assert "weight inputs an entry never reads" in page and "unused_weight_inputs" not in page
    canon = next(r for r in records if r.name == "canonicalize")
    assert canon.matches == sum(v for k, v in canon.stats.items() if k != "unused_weight_inputs")
    # the cache layout before and after, the command line, versions and machine
    assert "KV cache layout (CacheSpec)" in page and "layers.*.kv_latent" in page and "layers.*.k<" in page
    assert "dsc optimize tiny -o out" in page and f"torch {torch.__version__}" in page and "test cpu" in page
    assert "white-space:pre-wrap" in page


def test_log_ticks_are_round():
    assert log_ticks(6, 7.5) == [1e6, 3e6, 1e7, 3e7]
    assert log_ticks(2, 8) == [1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8]


def test_saved_program_keeps_which_pass_made_each_node(tiny_optimized, tmp_path):
    """torch.export's serializer drops custom node meta: the manifest keeps meta["dsc_pass"], so a
    reloaded Program's listings, pictures and Model Explorer overlays still name the passes."""
    from dsc.fx_utils import listing
    from dsc.program import Program

    program = tiny_optimized[0]
    program.save(tmp_path / "p")
    back = Program.load(tmp_path / "p")

    def lines(ep):  # the serializer reorders getitems and adds one per unused output
        return sorted(ln for ln in listing(ep).splitlines() if " = getitem(" not in ln)

    for entry, ep in program.entries.items():
        assert lines(back.entries[entry]) == lines(ep)
    assert "<- absorb_mla" in listing(back.entries["decode"])
