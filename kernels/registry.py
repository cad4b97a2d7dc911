"""``custom_op``: ``torch.library.custom_op`` that also keeps the undecorated function, the op's CPU path.

A Program's runtime on CPU calls that function straight from the graph (``cpu_function``): the same
code the dispatcher reaches, without its per-call work around a Python custom op (the autograd,
schema and Python-kernel layers, ~40 µs a call: a tenth of a small model's decode step). Inductor,
torch.export and the exporters still see the registered ``torch.ops.dsc.*`` op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_CPU: dict[str, Callable] = {}


def custom_op(name: str, *, mutates_args: tuple[str, ...] = ()):
    def register(fn: Callable):
        _CPU[name] = fn
        return torch.library.custom_op(name, mutates_args=mutates_args)(fn)

    return register


def cpu_function(op) -> Callable | None:
    """The plain function behind a ``dsc::`` op overload (its default, CPU implementation), else None."""
    if isinstance(op, torch._ops.OpOverload) and op.namespace == "dsc":
        return _CPU.get(op._schema.name)
    return None
