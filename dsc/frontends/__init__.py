"""Frontends: where a model enters dsc, and how it becomes a Program.

Every frontend yields the same things: the model behind the entry-point protocol (``prefill``,
``decode``, optionally ``mtp``), its CacheSpec and its config, and a ``capture`` to a Program of
torch.export entry points. The passes never know which frontend a Program came from.

- ``reference`` (default): a checkpoint (HF directory, ``model.pt``), a preset or the built-in model,
  loaded into dsc's reference model (``dsc.frontends.reference``);
- ``transformers``: an HF checkpoint directory run by transformers' own modeling code
  (``dsc.frontends.transformers``);
- ``module:PKG.MOD:CLASS`` / ``module``: the user's own ``nn.Module`` implementing the protocol, built
  from a checkpoint or unpickled from a trusted ``model.pt`` (``dsc.frontends.module``);
- ``pt2``: entry points the user exported with ``torch.export.save`` (``dsc.frontends.pt2``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch.nn import Parameter

from dsc.cache import CacheSpec
from dsc.errors import DscError
from dsc.program import Program, nonfinite

FRONTENDS = ("reference", "transformers", "module", "pt2")


def _with_fp8_source(program: Program, ckpt) -> Program:
    program.fp8_source = ckpt.fp8_weights  # lower_fp8 reuses these bytes as they are
    return program


@dataclass
class Loaded:
    """A model as its frontend loaded it. ``model`` is None for ``pt2`` (only the exported graphs exist)."""

    frontend: str
    source: str
    model: object | None
    cache: CacheSpec
    config: object
    notes: list[str] = field(default_factory=list)
    _capture: Callable[[], Program] | None = None

    def capture(self) -> Program:
        p = self._capture()
        p.provenance.update({"source": self.source, "frontend": self.frontend})
        if self.notes:
            p.provenance["notes"] = list(self.notes)
        return p

    def eager(self):
        """The model run eagerly behind the runtime interface (for ``pt2``: its exported programs)."""
        from dsc.runtime import EagerBackend

        if self.model is None:
            return self.capture()
        return EagerBackend(self.model, self.cache, self.config)


def parse_frontend(frontend: str | None) -> tuple[str, str | None]:
    """``"module:pkg.mod:Class"`` -> ("module", "pkg.mod:Class"); None -> ("reference", None)."""
    name, _, target = (frontend or "reference").partition(":")
    if name not in FRONTENDS or (target and name != "module"):
        raise DscError(
            f"unknown frontend {frontend!r}; choose reference, transformers, module:PKG.MOD:CLASS, module "
            "(a trusted pickled module) or pt2"
        )
    return name, target or None


def check_finite(named: dict, source: str) -> None:
    """NaN / Inf in a model's parameters would run and print garbage (or blame a pass): refuse them at
    load, naming the tensors. One pass over the weights, cheap beside loading them."""
    bad = nonfinite(named)
    if bad:
        shown = ", ".join(bad[:5]) + (f" ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DscError(
            f"{source}: {len(bad)} weight tensor(s) hold NaN or Inf values ({shown}); the checkpoint is corrupt or "
            "came out of a diverged training run: use an earlier or re-converted checkpoint"
        )


def load(spec: str | None, frontend: str | None = None, trust_pickle: bool = False) -> Loaded:
    loaded = _load(spec, frontend, trust_pickle)
    if loaded.model is not None:
        check_finite(dict(loaded.model.named_parameters()), loaded.source)
    else:  # pt2: the exported programs' parameters (buffers may hold -inf masks on purpose)
        params = loaded._capture().weights()
        check_finite({k: t for k, t in params.items() if isinstance(t, Parameter)}, loaded.source)
    return loaded


def _load(spec: str | None, frontend: str | None, trust_pickle: bool) -> Loaded:
    name, target = parse_frontend(frontend)
    if name != "reference" and not spec:
        raise DscError(f"the {name} frontend needs a model path")
    if name == "reference":
        from dsc.frontends import reference

        if spec and (Path(spec) / "prefill.pt2").exists():
            raise DscError(f"{spec} holds exported .pt2 programs; load it with --frontend pt2")
        model, ckpt = reference.load_model(spec, trust_pickle=trust_pickle)
        source = spec or "default"
        return Loaded(
            name,
            source,
            model,
            reference.cache_spec_of(model),
            model.config,
            list(ckpt.notes),
            lambda: _with_fp8_source(reference.capture(model, source=source), ckpt),
        )
    if name == "transformers":
        from dsc.frontends import transformers

        model, cache, cfg, notes = transformers.load(spec)
        return Loaded(name, spec, model, cache, cfg, notes, lambda: transformers.capture(model, cache, cfg, spec))
    if name == "module":
        from dsc.frontends import module

        model, cache, cfg, notes = module.load(spec, target, trust_pickle)
        label = f"module:{target}" if target else "module"
        return Loaded(label, spec, model, cache, cfg, notes, lambda: module.capture(model, cache, cfg))
    from dsc.frontends import pt2

    program = pt2.load(spec, trust_pickle)
    return Loaded(name, spec, None, program.cache, program.config, [], lambda: program)
