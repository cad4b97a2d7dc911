"""``torch.compile(model, backend="dsc")``: the dsc pass pipeline on Dynamo graphs, then Inductor.

Each Dynamo graph is exported (non-strict) to the same training IR the passes run on elsewhere,
wrapped as a one-entry Program, put through the selected passes, and handed to Inductor's
``compile_fx``. Verification is off here (a Dynamo graph is an arbitrary function, with no
prefill/decode scenario); the pass tests and ``dsc optimize`` carry the numerical checks.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch._dynamo import register_backend

from dsc.pass_manager import run_pipeline, select_passes
from dsc.program import CacheSpec, Program

log = logging.getLogger(__name__)


def compile_graph(gm: torch.fx.GraphModule, example_inputs, passes: list[str] | None = None):
    ep = torch.export.export(gm, tuple(example_inputs), strict=False)
    program = Program({"forward": ep}, CacheSpec([]), config=None, provenance={"source": "torch.compile"})
    program, records = run_pipeline(program, select_passes(passes), verify=False)
    log.info("dsc backend: %s", {r.name: r.matches for r in records})
    from torch._inductor.compile_fx import compile_fx

    unlifted = program.module("forward")
    # Dynamo already guards its graphs; export's own guard module cannot be pickled by Inductor's cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree spec deepcopy
        graph = copy.deepcopy(unlifted.graph)
    for n in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(n)
    flat = torch.fx.GraphModule(unlifted, graph)
    return compile_fx(flat, list(example_inputs))


@register_backend(name="dsc")
def dsc_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    return compile_graph(gm, example_inputs, kwargs.get("options", {}).get("passes") if kwargs else None)
