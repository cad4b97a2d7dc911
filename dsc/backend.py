"""``torch.compile(model, backend="dsc")``: the dsc pass pipeline on Dynamo graphs, then Inductor.

Each Dynamo graph is exported (non-strict) to the same training IR the passes run on elsewhere,
wrapped as a one-entry Program, put through the selected passes, and handed to Inductor's
``compile_fx``. Verification is off here (a Dynamo graph is an arbitrary function, with no
prefill/decode scenario); the pass tests and ``dsc optimize`` carry the numerical checks. A graph
dsc cannot take (e.g. data-dependent slicing that its export route cannot hand to Inductor) falls
back to plain Inductor for that graph, with one warning saying why.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch._dynamo import register_backend

from dsc.errors import DscError
from dsc.pass_manager import run_pipeline, select_passes
from dsc.program import CacheSpec, Program, unlifted

log = logging.getLogger(__name__)


def compile_graph(gm: torch.fx.GraphModule, example_inputs, passes: list[str] | None = None):
    """The graph through dsc's passes and Inductor; a graph dsc cannot export, rewrite or hand to
    Inductor goes to plain Inductor as Dynamo gave it, with one warning naming why."""
    from torch._inductor.compile_fx import compile_fx

    data_dependent = _data_dependent(gm)
    if data_dependent:  # exporting would add guards on unbacked sizes to Dynamo's own shape env
        warnings.warn(
            f"dsc backend: this graph runs on plain Inductor, without dsc's passes (data-dependent sizes from "
            f"{', '.join(data_dependent[:3])})",
            stacklevel=2,
        )
        return compile_fx(gm, list(example_inputs))
    try:
        flat = _rewritten(gm, example_inputs, passes)
        return compile_fx(flat, list(example_inputs))
    except Exception as e:  # noqa: BLE001 - any failure of dsc's route has the same answer: plain Inductor
        if isinstance(e, DscError):
            raise  # bad options are the user's to fix, not a reason to fall back
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        warnings.warn(f"dsc backend: this graph runs on plain Inductor, without dsc's passes ({why})", stacklevel=2)
        return compile_fx(gm, list(example_inputs))


DATA_DEPENDENT = {"item", "tolist", "nonzero", "unique", "masked_select"}


def _data_dependent(gm: torch.fx.GraphModule) -> list[str]:
    """Nodes whose results have data-dependent values or sizes (``.item()``, ``nonzero``, ...)."""
    out = []
    for n in gm.graph.nodes:
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
        v = n.meta.get("example_value")
        unhinted = isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool) and not v.node.has_hint()
        if n.op in ("call_method", "call_function") and (str(name).split(".")[0] in DATA_DEPENDENT or unhinted):
            out.append(n.name)
    return out


def _rewritten(gm: torch.fx.GraphModule, example_inputs, passes: list[str] | None) -> torch.fx.GraphModule:
    chosen = select_passes(passes)
    ep = torch.export.export(gm, tuple(example_inputs), strict=False)
    program = Program({"forward": ep}, CacheSpec([]), config=None, provenance={"source": "torch.compile"})
    program, records = run_pipeline(program, chosen, verify=False)
    log.info("dsc backend: %s", {r.name: r.matches for r in records})
    # the dsc:: ops stay opaque custom ops for Inductor (``Program.module`` would call their CPU functions
    # directly, which Inductor would then trace into)
    mod = unlifted(program.entries["forward"])
    # Dynamo already guards its graphs; export's own guard module cannot be pickled by Inductor's cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree spec deepcopy
        graph = copy.deepcopy(mod.graph)
    for n in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(n)
    return torch.fx.GraphModule(mod, graph)


@register_backend(name="dsc")
def dsc_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    return compile_graph(gm, example_inputs, kwargs.get("options", {}).get("passes") if kwargs else None)
