"""Run one pass on a toy module or a Program, the way the pass manager does (on a clone)."""

from __future__ import annotations

import torch

from dsc.fx_utils import op_histogram
from dsc.pass_manager import registry
from dsc.program import CacheSpec, Program

# the default pipeline, in order: what every test of the whole pipeline expects to have run
DEFAULT_PASSES = ["canonicalize", "normalize", "draft_mtp", "absorb_mla", "fuse_dsa", "fuse_add_rms_norm"]


def toy_program(module: torch.nn.Module, *args) -> Program:
    ep = torch.export.export(module, args)
    return Program({"forward": ep}, CacheSpec([]), config=None)


def apply(name: str, program: Program, options: dict | None = None) -> tuple[Program, int, dict]:
    work = program.clone()
    info = registry()[name]
    matches, stats = info.fn(work, info.context(options))
    return work, matches, stats


def ops(program: Program, entry: str = "forward") -> dict[str, int]:
    return op_histogram(program.entries[entry])
