"""The pass registry: what a pass declares about itself (``@register_pass``) and the context it runs
with. The passes import this module only; the pass manager imports the passes and this module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsc.errors import DscError
from dsc.machine import H200, Machine
from dsc.verify import Tolerance


@dataclass(frozen=True)
class PassInfo:
    name: str
    order: int
    purpose: str
    tolerance: Tolerance
    fn: Callable
    default: bool = True
    options: dict[str, tuple] = field(default_factory=dict)  # option -> allowed values, the first the default
    requires: tuple[str, ...] = ()  # passes that must have run before this one
    after: tuple[str, ...] = ()  # passes that, when they run too, must run before this one

    def context(self, options: dict[str, str] | None = None, machine: Machine | None = None) -> PassContext:
        """The pass's context: its options' defaults overridden by ``options``, the target machine."""
        for k, v in (options or {}).items():  # every caller's options checked here, once
            allowed = self.options.get(k)
            if allowed is None:
                raise DscError(f"{self.name} has no option {k!r} (its options: {', '.join(self.options) or 'none'})")
            if not isinstance(allowed, Text) and v not in allowed:
                raise DscError(f"{self.name}.{k} must be one of {', '.join(allowed)}, got {v!r}")
        opts = {k: v[0] for k, v in self.options.items()} | dict(options or {})
        return PassContext(self.name, opts, machine or H200)


class Text(tuple):
    """A free-text option (e.g. comma-separated patterns), default empty: ``options={"include": TEXT}``."""


TEXT = Text(("",))

REGISTRY: dict[str, PassInfo] = {}


def register_pass(
    name: str, order: int, purpose: str, tolerance: Tolerance, default: bool = True, options: dict | None = None,
    requires: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
):  # fmt: skip
    """``requires``: passes that must run before this one (``select_passes`` adds them and checks the order);
    ``after``: passes that must run before this one when they run at all (checked, not added)."""

    def deco(fn):
        assert name not in REGISTRY, f"pass {name!r} registered twice"
        REGISTRY[name] = PassInfo(
            name, order, purpose, tolerance, fn, default, dict(options or {}), tuple(requires), tuple(after)
        )
        return fn

    return deco


@dataclass
class PassContext:
    pass_name: str
    options: dict[str, Any] = field(default_factory=dict)
    machine: Machine = H200  # what cost choices are made for (``dsc optimize --target``)
    # a pass whose options change its numerics (e.g. fuse_dsa's FP8 index cache) states the contract
    # it then keeps here; verification holds it to this instead of its registered tolerance
    tolerance: Any = None
    # the passes that run after this one in its pipeline (None: not known, as when a pass is run on
    # its own; choices then assume the default pipeline follows)
    later: tuple[str, ...] | None = None
