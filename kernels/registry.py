"""``custom_op``: how a ``dsc::`` operator is registered, and the plain function behind each.

An op is defined with ``torch.library`` (the schema inferred from the function's annotations, as
``torch.library.custom_op`` does) and its function registered as the CPU kernel directly: a call
through ``torch.ops.dsc.*`` then costs ~2.5 µs of dispatch, against ~17 µs through the Python
layers ``torch.library.custom_op`` wraps around its kernels (an Inductor-compiled Program calls
the ops this way, a few dozen times a step). The returned ``Op`` has custom_op's
``register_kernel`` / ``register_fake`` / ``register_autograd``.

A Program's runtime on CPU calls the function itself from the graph (``cpu_function``): the same
code the dispatcher reaches, without even that. Inductor, torch.export and the exporters see the
registered ``torch.ops.dsc.*`` op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIB = torch.library.Library("dsc", "DEF")  # alive as long as the module: the ops' registrations
_CPU: dict[str, Callable] = {}


class Op:
    """A registered ``dsc::`` operator; calling it calls ``torch.ops.dsc.<name>.default``."""

    def __init__(self, qualname: str, fn: Callable, mutates_args: tuple[str, ...]):
        self.qualname, self.name = qualname, qualname.split("::")[1]
        self.__doc__, self.__name__, self.__wrapped__ = fn.__doc__, fn.__name__, fn
        _LIB.define(self.name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(self.name, fn, "CPU")
        _CPU[qualname] = fn
        self.default = getattr(torch.ops.dsc, self.name).default

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)

    def register_kernel(self, device: str):
        def register(fn: Callable) -> Callable:
            _LIB.impl(self.name, fn, device.upper())
            return fn

        return register

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fn, lib=_LIB)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIB)


def custom_op(qualname: str, *, mutates_args: tuple[str, ...] = ()):
    def register(fn: Callable) -> Op:
        return Op(qualname, fn, mutates_args)

    return register


def cpu_function(op) -> Callable | None:
    """The plain function behind a ``dsc::`` op overload (its CPU kernel), else None."""
    if isinstance(op, torch._ops.OpOverload) and op.namespace == "dsc":
        return _CPU.get(op._schema.name)
    return None
