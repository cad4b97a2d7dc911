"""The Program: named torch.export entry points sharing one set of weights, plus the CacheSpec.

Every pass consumes and produces a Program. Entry points are ``ExportedProgram``s in torch.export's
training IR (before ``run_decompositions``): ``linear``, ``einsum``, ``layer_norm`` are single nodes
and cache writes stay in-place ``index_put_`` on the cache inputs.

On disk a Program is a directory:

    manifest.json         format version, config, CacheSpec, entry signatures, provenance
    graphs/<entry>.json   torch.export's serialized program (graph + signature), without tensors
    weights.safetensors   the union of the entries' parameters and buffers, stored once
    constants.safetensors non-persistent tensors the graphs read (RoPE tables, Hadamard matrices)

Loading reads JSON and safetensors only: nothing is unpickled (``torch.export.load`` may fall back
to ``weights_only=False``; this format never needs it), and the entries share weight tensors again.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch._export.serde.serialize import SerializedArtifact, deserialize, serialize
from torch.export import ExportedProgram

import dsc.kernels  # noqa: F401  (registers the dsc:: ops the graphs call)
from dsc.cache import CacheSpec, CacheTensor  # noqa: F401  (re-exported: the Program's cache types)
from dsc.errors import DscError
from dsc.fx_utils import stamp_meta
from dsc.model.config import ModelConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Positional inputs of each entry point, in order; "caches" is the CacheSpec's tensors as a list.
ENTRY_INPUTS = {
    "prefill": ["tokens", "caches"],
    "decode": ["tokens", "positions", "caches"],
    "mtp": ["hidden", "tokens", "positions", "caches"],
    "draft": ["hidden", "tokens", "positions", "caches"],
    "verify": ["tokens", "positions", "caches"],
}


def nonfinite(named: dict[str, torch.Tensor]) -> list[str]:
    """The names of floating-point tensors holding NaN or Inf (fp8 is widened to check: torch has no
    isfinite for it)."""

    def bad(t: torch.Tensor) -> bool:
        t = t.detach()
        return not torch.isfinite(t.float() if t.element_size() == 1 else t).all()

    return [k for k, t in named.items() if t.is_floating_point() and bad(t)]


@dataclass
class Program:
    entries: dict[str, ExportedProgram]
    cache: CacheSpec
    config: ModelConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    # the prompt length the prefill entry's form was chosen for (the cost model's context): the runtime
    # prefills a longer prompt in chunks of this length, the rest as decode extends (``runtime.prefill``)
    prefill_chunk: int | None = None
    # a checkpoint's own FP8 weights by checkpoint name: (e4m3, weight_scale_inv), for lower_fp8 to use
    # bit for bit; in memory only (a saved Program holds whatever the passes made of them)
    fp8_source: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False, compare=False)
    # run each entry through Inductor (torch.compile, dynamic shapes) on its first call: a runtime
    # choice (``dsc generate --compile``), never saved
    inductor: bool = field(default=False, repr=False, compare=False)
    _modules: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False, compare=False)

    # ---- running --------------------------------------------------------------------------------
    def module(self, entry: str):
        """The runnable entry point. Export's per-call input-constraint checks (sympy, about half
        of a small model's step time) are left out; ``check_inputs`` validates against the CacheSpec.
        On CPU the graph calls the ``dsc::`` ops' functions directly (``_direct_calls``)."""
        if entry not in self._modules:
            mod = _flat_attrs(unlifted(self.entries[entry]))
            if not self.inductor and all(t.device.type == "cpu" for t in self.weights().values()):
                mod = _direct_calls(mod)
            if self.inductor:  # dsc:: ops stay opaque calls; the ATen ops around them become Inductor kernels
                mod = torch.no_grad()(torch.compile(mod, dynamic=True))  # an inference graph: never traced for grad
            self._modules[entry] = mod
        return self._modules[entry]

    def check_inputs(self, tokens: Tensor, caches: list[Tensor]) -> None:
        if len(caches) != len(self.cache.tensors):
            raise DscError(f"the Program takes {len(self.cache.tensors)} cache tensors, got {len(caches)}")
        for spec, c in zip(self.cache.tensors, caches):
            want = spec.shape(tokens.shape[0], "T")
            got = list(c.shape)
            if (
                c.ndim != len(want)
                or str(c.dtype) != f"torch.{spec.dtype}"
                or any(w != g for w, g in zip(want, got) if w != "T")
            ):
                raise DscError(
                    f"cache {spec.name}: got {str(c.dtype).removeprefix('torch.')}{got}, expected "
                    f"{spec.dtype}[{', '.join(map(str, want))}]"
                )

    def prefill(self, tokens: Tensor, caches: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """(logits, final hidden state or None where the captured code returns only logits)."""
        return logits_hidden(self.module("prefill")(tokens, caches))

    def decode(self, tokens: Tensor, positions: Tensor, caches: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        return logits_hidden(self.module("decode")(tokens, positions, caches))

    def mtp(self, hidden: Tensor, tokens: Tensor, positions: Tensor, caches: list[Tensor]) -> Tensor:
        return self.module("mtp")(hidden, tokens, positions, caches)

    def draft(self, hidden: Tensor, tokens: Tensor, positions: Tensor, caches: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(logits of t_{i+2}, the MTP hidden state the next draft takes) from h_i and t_{i+1} (``draft_mtp``)."""
        return logits_hidden(self.module("draft")(hidden, tokens, positions, caches))

    def verify(self, tokens: Tensor, positions: Tensor, caches: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The main model over 1 + n new tokens: (logits, final hidden) at every position (``draft_mtp``)."""
        return logits_hidden(self.module("verify")(tokens, positions, caches))

    # ---- size -------------------------------------------------------------------------------------
    def weights(self) -> dict[str, Tensor]:
        """Every distinct parameter / buffer the entries read, by name."""
        out: dict[str, Tensor] = {}
        for ep in self.entries.values():
            out.update(ep.state_dict)
        return out

    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights().values())

    # ---- copying --------------------------------------------------------------------------------
    def clone(self) -> Program:
        """New graphs and signatures, the same weight tensors: what a pass may edit freely."""
        entries = {name: clone_entry(ep) for name, ep in self.entries.items()}
        return Program(
            entries, copy.deepcopy(self.cache), self.config, copy.deepcopy(self.provenance), self.prefill_chunk,
            self.fp8_source,
        )  # fmt: skip

    # ---- saving ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write into the directory ``path`` (which the caller makes atomic)."""
        path = Path(path)
        (path / "graphs").mkdir(parents=True, exist_ok=True)
        weights: dict[str, Tensor] = {}
        consts: dict[str, Tensor] = {}
        entries = {}
        for name, ep in self.entries.items():
            art = serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
            (path / "graphs" / f"{name}.json").write_bytes(art.exported_program)
            for k, t in ep.state_dict.items():
                _put_once(weights, k, t, name)
            tensor_consts = {}
            for k, c in ep.constants.items():
                if not isinstance(c, Tensor):
                    raise DscError(f"entry {name!r} holds a non-tensor constant {k!r}; it cannot be saved")
                _put_once(consts, k, c, name)
                tensor_consts[k] = True
            entries[name] = {
                "graph": f"graphs/{name}.json",
                "inputs": ENTRY_INPUTS.get(name, []),
                "state_dict": sorted(ep.state_dict),
                "parameters": sorted(k for k, t in ep.state_dict.items() if isinstance(t, torch.nn.Parameter)),
                "constants": sorted(tensor_consts),
                # the pass that made each node (meta["dsc_pass"]): torch.export's serializer drops custom meta
                "made_by": {n.name: n.meta["dsc_pass"] for n in ep.graph.nodes if n.meta.get("dsc_pass")},
            }
        _save_tensors(weights, path / "weights.safetensors")
        _save_tensors(consts, path / "constants.safetensors")
        manifest = {
            "format": "dsc-program",
            "format_version": FORMAT_VERSION,
            "torch_version": torch.__version__,
            "config": self.config.to_dict(),
            "cache": self.cache.to_dict(),
            "entries": entries,
            "provenance": self.provenance,
            "prefill_chunk": self.prefill_chunk,
        }
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Program:
        """Read a saved Program, checking it whole first: the manifest's fields, every graph file, the
        tensors each entry needs (names, shapes, dtypes, finite parameters), and that the cache spec and
        the config agree with the graphs. Each mismatch is a ``DscError`` naming the file and field."""
        path = Path(path)
        manifest = _read_manifest(path)
        try:
            weights = load_file(str(path / "weights.safetensors"))
            consts = load_file(str(path / "constants.safetensors"))
        except (OSError, Exception) as e:  # safetensors raises its own error type for corrupt files
            raise DscError(
                f"{path}: cannot read the Program's tensors ({e}); the directory may be incomplete"
            ) from None
        try:
            config = ModelConfig.from_dict(manifest["config"])
        except DscError as e:
            raise DscError(f"{path / MANIFEST} field 'config': {e}") from None
        try:
            cache = CacheSpec.from_dict(manifest["cache"])
        except (TypeError, KeyError, AttributeError) as e:
            raise DscError(f"{path / MANIFEST} field 'cache' is not a cache spec ({e!r})") from None
        params = {k for info in manifest["entries"].values() for k in info.get("parameters", [])}
        bad = nonfinite({k: weights[k] for k in params if k in weights})
        if bad:
            raise DscError(f"{path / 'weights.safetensors'}: non-finite (NaN/Inf) parameters {sorted(bad)[:5]}")
        # one tensor object per name, shared by every entry
        weights = {k: torch.nn.Parameter(t, requires_grad=False) if k in params else t for k, t in weights.items()}
        entries = {}
        for name, info in manifest["entries"].items():
            missing = [k for k in info["state_dict"] if k not in weights] + [
                k for k in info["constants"] if k not in consts
            ]
            if missing:
                raise DscError(f"{path}: entry {name!r} needs tensors absent from its safetensors: {missing[:5]}")
            graph = path / info["graph"]
            try:
                art = SerializedArtifact(
                    graph.read_bytes(),
                    {k: weights[k] for k in info["state_dict"]},
                    {k: consts[k] for k in info["constants"]},
                    None,
                )
                entries[name] = deserialize(art)
            except FileNotFoundError:
                raise DscError(f"{path / MANIFEST}: entry {name!r} names {info['graph']}, which is missing") from None
            except Exception as e:  # noqa: BLE001 - torch.export's deserializer raises many kinds
                raise DscError(
                    f"{graph} is not a readable torch.export graph ({type(e).__name__}: {e})"[:400]
                ) from None
            _check_entry(entries[name], name, cache, config, path)
            made_by = info.get("made_by", {})
            for n in entries[name].graph.nodes:
                if isinstance(made_by, dict) and isinstance(made_by.get(n.name), str):
                    n.meta["dsc_pass"] = made_by[n.name]
        return cls(entries, cache, config, manifest.get("provenance", {}), manifest.get("prefill_chunk"))


def _read_manifest(path: Path) -> dict:
    """``manifest.json`` as a dict with the fields ``load`` reads, each of the right kind."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise DscError(f"{path} is not a saved dsc Program (no {MANIFEST}); run `dsc optimize` to make one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DscError(f"{file} is corrupt ({e}); re-run `dsc optimize`") from None
    if not isinstance(manifest, dict):
        raise DscError(f"{file} must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != "dsc-program" or manifest.get("format_version") != FORMAT_VERSION:
        raise DscError(
            f"{path} holds format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this dsc reads dsc-program version {FORMAT_VERSION}. Re-run `dsc optimize` with this version."
        )
    for key, kind in (("config", dict), ("cache", dict | list), ("entries", dict)):
        if not isinstance(manifest.get(key), kind):
            raise DscError(f"{file} field {key!r} is missing or not a JSON {'object' if kind is dict else 'value'}")
    if not manifest["entries"]:
        raise DscError(f"{file} field 'entries' is empty: a Program has at least prefill and decode")
    for name, info in manifest["entries"].items():
        ok = isinstance(info, dict) and isinstance(info.get("graph"), str)
        ok = ok and all(isinstance(info.get(k, []), list) for k in ("state_dict", "constants", "parameters"))
        if not ok or "state_dict" not in info or "constants" not in info:
            raise DscError(f"{file} entry {name!r} needs 'graph' (a path), 'state_dict' and 'constants' (name lists)")
    missing = [e for e in ("prefill", "decode") if e not in manifest["entries"]]
    if missing:
        raise DscError(f"{file} field 'entries' lacks {missing}: a Program has at least prefill and decode")
    return manifest


def _check_entry(ep: ExportedProgram, name: str, cache: CacheSpec, config: ModelConfig, path: Path) -> None:
    """The manifest against one deserialized graph: its weights' shapes and dtypes, its cache inputs
    against the cache spec, its logits against the config's vocabulary."""
    where = f"{path}: entry {name!r}"
    phs = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for spec in ep.graph_signature.input_specs:
        val = phs[spec.arg.name].meta.get("val") if hasattr(spec.arg, "name") else None
        t = ep.state_dict.get(spec.target) if spec.target else None
        if t is None and spec.target:
            t = ep.constants.get(spec.target)
        if isinstance(val, Tensor) and isinstance(t, Tensor) and (val.shape != t.shape or val.dtype != t.dtype):
            raise DscError(
                f"{where}: tensor {spec.target!r} is {t.dtype}{list(t.shape)} in the safetensors, but the graph "
                f"reads {val.dtype}{list(val.shape)}; the weights do not belong to these graphs"
            )
    users = [phs[s.arg.name] for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    n = len(cache.tensors)
    if len(users) < n:
        raise DscError(f"{where} takes {len(users)} inputs, fewer than the {n} cache tensors of manifest.json 'cache'")
    for ct, ph in zip(cache.tensors, users[-n:]):
        val = ph.meta.get("val")
        want = ct.shape("batch", "T")
        got = list(val.shape) if isinstance(val, Tensor) else None
        fixed = [i for i, w in enumerate(want) if i not in (0, ct.time_dim)]
        if (
            got is None
            or len(got) != len(want)
            or str(val.dtype) != f"torch.{ct.dtype}"
            or any(isinstance(got[i], int) and got[i] != want[i] for i in fixed)
        ):
            raise DscError(
                f"{where}: manifest.json 'cache' says {ct.name} is {ct.dtype}[{', '.join(map(str, want))}], the graph takes "
                f"{str(getattr(val, 'dtype', '?')).removeprefix('torch.')}{got}; the manifest was edited or is from "
                "another Program"
            )
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    first = out[0] if isinstance(out, list | tuple) else out
    logits = first.meta.get("val") if isinstance(first, torch.fx.Node) else None
    if isinstance(logits, Tensor) and isinstance(logits.shape[-1], int) and logits.shape[-1] != config.vocab_size:
        raise DscError(
            f"{where} returns {logits.shape[-1]} logits per token, but manifest.json 'config' says vocab_size "
            f"{config.vocab_size}; the config was edited or is from another model"
        )


def unlifted(ep: ExportedProgram) -> torch.fx.GraphModule:
    """The entry as a plain GraphModule without export's per-call input checks (its guards and the
    pre-hook that runs them), the ``dsc::`` ops still custom-op calls."""
    mod = ep.module(check_guards=False)
    mod._forward_pre_hooks.clear()
    return mod


def _flat_attrs(mod: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Every weight the graph reads (``get_attr`` of a dotted path like ``m.model.layers.0...``) as one
    plain instance attribute: the generated code then reads each with one dict lookup instead of a
    chain of ``nn.Module.__getattr__`` calls (hundreds a call: a tenth of a small model's step)."""
    flat: dict[str, str] = {}
    for n in mod.graph.nodes:
        if n.op == "get_attr" and "." in n.target:
            if n.target not in flat:
                name = f"_dsc_w{len(flat)}"
                obj = mod
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                if isinstance(obj, torch.nn.Module):  # a submodule (e.g. a subgraph): leave it
                    continue
                mod.__dict__[name] = obj
                flat[n.target] = name
            n.target = flat[n.target]
    if flat:
        mod.recompile()
    return mod


def _direct_calls(mod: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Each ``dsc::`` op node calling the op's CPU function itself instead of going through the
    dispatcher (``dsc.kernels.registry``): the same code, without the per-call dispatch an inference
    graph on CPU tensors does not need (it was ~40 µs a call through ``torch.library.custom_op``).
    ``aten.linear`` calls ``dsc.kernels.linear.linear``: the native kernel for a few fp32 rows, torch
    for the rest."""
    from dsc.kernels.linear import linear
    from dsc.kernels.registry import cpu_function

    changed = False
    for n in mod.graph.nodes:
        if n.op != "call_function":
            continue
        fn = linear if n.target is torch.ops.aten.linear.default else cpu_function(n.target)
        if fn is not None:
            n.target, changed = fn, True
    if changed:
        mod.recompile()
    return mod


def logits_hidden(out) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, Tensor):
        return out, None
    return out[0], (out[1] if len(out) > 1 else None)


def clone_entry(ep: ExportedProgram) -> ExportedProgram:
    """New graph, signature and call signature (a pass may drop inputs), the same weight tensors."""
    with warnings.catch_warnings():  # deepcopy of pytree specs warns about a deprecated isinstance
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(ep.graph_module)
        sig = copy.deepcopy(ep.graph_signature)
        new = ep._update(gm, sig, state_dict=dict(ep.state_dict), constants=dict(ep.constants))
        new._module_call_graph = copy.deepcopy(ep.module_call_graph)
    stamp_meta(new)  # the copy's values are current: a pass's refresh_meta redoes only what it changes
    return new


def _put_once(store: dict[str, Tensor], key: str, t: Tensor, entry: str) -> None:
    prev = store.get(key)
    if prev is None:
        store[key] = t
    elif prev is not t and not (prev.shape == t.shape and prev.data_ptr() == t.data_ptr()):
        raise DscError(f"entry {entry!r} binds {key!r} to a different tensor than another entry; names must be unique")


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        # safetensors refuses shared storage: store views and aliases as their own copies
        out[k] = t.clone() if key in seen or not t.is_contiguous() or t.storage_offset() else t
        seen.add(key)
    save_file(out, str(path))
