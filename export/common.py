"""What the exports share (``dsc export --format onnx | aoti``): the example calls they trace, the
checks before any work, which entries share one graph, and the comparison with the Program."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from dsc.errors import DscError
from dsc.program import Program
from dsc.verify import TOLERANCES, Scenario, compare, run_scenario

MANIFEST = "export.json"


def sample_calls(program: Program, scenario: Scenario) -> dict[str, tuple]:
    """An example call of each entry (arguments before the caches, the caches' length): what the
    export traces with. Sizes avoid 0 and 1 so that batch, sequence and context stay dynamic."""
    B, P = scenario.batch, scenario.prompt.shape[1]
    toks = torch.randint(0, min(program.config.vocab_size, 256), (B, 3), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(P, P + 3).expand(B, 3).contiguous()
    calls = {"prefill": ((scenario.prompt,), P), "decode": ((toks, pos), P + 3), "verify": ((toks, pos), P + 3)}
    drafts = [name for name in ("draft", "mtp") if name in program.entries]
    if drafts:  # the MTP module over the prompt: h_i with t_{i+1}
        with torch.no_grad():
            _, hidden = program.prefill(scenario.prompt, program.cache.allocate(B, P))
        for name in drafts:
            calls[name] = ((hidden[:, :-1], scenario.prompt[:, 1:], torch.arange(P - 1).expand(B, P - 1)), P - 1)
    # fresh tensors, not views: export would guard on a view's base
    return {k: (tuple(a.clone(memory_format=torch.contiguous_format) for a in args), n)
            for k, (args, n) in calls.items() if k in program.entries}  # fmt: skip


def dsc_ops(program: Program) -> list[str]:
    """The ``dsc::`` ops the Program's entries call (each is translated by ``onnx_ops.TABLE``)."""
    names = set()
    for ep in program.entries.values():
        for n in ep.graph.nodes:
            if n.op == "call_function" and str(n.target).startswith("dsc."):
                names.add(str(n.target).split(".")[1])
    return sorted(names)


def numerics_tolerance(program: Program):
    """Program and onnxruntime run the same graph in a different fp32 order; with FP8 activations a
    value near a rounding boundary of e4m3 may round the other way, which only the distribution-level
    contract of the FP8 passes covers."""
    return TOLERANCES["fp8_w8a8"] if "act_quant" in dsc_ops(program) else TOLERANCES["fp32_rewrite"]


def preflight(program: Program, dest: str | Path, overwrite: bool, entries: list[str] | None, what: str) -> list[str]:
    """Before any work: ``dest`` can be written (an earlier export replaced only with ``overwrite``)
    and ``entries`` are the Program's; the entries to export."""
    from dsc.fsutil import check_replaceable, check_writable

    check_writable(dest, f"{what} output directory", directory=True)
    check_replaceable(dest, overwrite, MANIFEST)
    chosen = list(program.entries) if entries is None else entries
    unknown = [e for e in chosen if e not in program.entries]
    if unknown:
        raise DscError(f"the Program has no entry {', '.join(unknown)} (its entries: {', '.join(program.entries)})")
    return chosen


def same_graph(a, b) -> bool:
    """The same code on the same weights (one storage: entries share the Program's tensors)."""

    def same(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(one_tensor(x[k], y[k]) for k in x)

    code = a.graph_module.code == b.graph_module.code and str(a.graph_signature) == str(b.graph_signature)
    return code and same(a.state_dict, b.state_dict) and same(a.constants, b.constants)


def one_tensor(t, u) -> bool:
    if t is u:
        return True
    if not (isinstance(t, Tensor) and isinstance(u, Tensor)):
        return False
    return (t.data_ptr(), t.shape, t.stride(), t.dtype) == (u.data_ptr(), u.shape, u.stride(), u.dtype)


def check_against_program(program: Program, backend, scenario: Scenario, who: str) -> dict:
    """``backend`` (an export's runner, with the Program interface) against the Program on
    ``scenario``, over the entries it has; raises ``DscError`` "<who> with the Program: ..." naming
    each output out of tolerance."""
    tol = numerics_tolerance(program)
    exported = {k: program.entries[k] for k in backend.entries}  # the Program as far as it was exported
    ref = run_scenario(
        program if exported == program.entries else dataclasses.replace(program, entries=exported), scenario
    )
    numerics, violations = compare(ref, run_scenario(backend, scenario), tol)
    if violations:
        raise DscError(f"{who} with the Program:\n  " + "\n  ".join(violations[:8]))
    return {"tolerance": tol.to_dict(), **numerics.to_dict()}


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def export_plan(program: Program, scenario: Scenario, chosen: list[str], done: dict) -> Iterator[tuple]:
    """The chosen entries in call order as (name, example args, cache length, the already exported
    entry with the same graph and weights or None); ``done``: the entries exported so far."""
    for name, (args, length) in sample_calls(program, scenario).items():
        if name in chosen:
            yield (
                name,
                args,
                length,
                next((k for k in done if same_graph(program.entries[k], program.entries[name])), None),
            )
