"""Checkpoint I/O: HF safetensors directories (plain or sharded, bf16/fp32 or FP8 + block scales) and ``model.pt``.

Loading validates everything before a single weight is assigned, so a bad checkpoint is a clear
``CheckpointError`` and never a half-loaded model. Saving writes to a temporary sibling and renames,
so an existing checkpoint is never half-overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from dsc.model.config import MODEL_TYPES, ModelConfig
from dsc.model.fp8 import FP8, block_dequant, scale_shape
from dsc.model.model import DeepseekV32ForCausalLM
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dsc.errors import CheckpointError
from dsc.fsutil import atomic_dir

log = logging.getLogger(__name__)
SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" + "_scale_inv"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """A checkpoint as stored: ``tensors`` hold the file's dtypes (FP8 weights stay e4m3, with their scales)."""

    config: ModelConfig
    tensors: dict[str, Tensor]
    source: str = ""
    metadata: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the loader inferred or left out (also logged)

    @property
    def fp8_weights(self) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (e4m3 weight, scale_inv), for the FP8 pass to reuse bit for bit."""
        return {k: (t, self.tensors[k + SCALE_SUFFIX]) for k, t in self.tensors.items() if t.dtype == FP8}

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Model state dict: FP8 weights dequantised exactly (fp32 math), scales dropped."""
        out = {}
        for k, t in self.tensors.items():
            if k.endswith(SCALE_SUFFIX):
                continue
            if t.dtype == FP8:
                t = block_dequant(t, self.tensors[k + SCALE_SUFFIX])
            out[k] = t.to(dtype)
        return out


def _fmt_keys(keys: list[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more + f" ({len(keys)} in all)"


def validate_tensors(cfg: ModelConfig, tensors: dict[str, Tensor], source: str) -> None:
    """Check names, shapes, dtypes and FP8 scales against the model ``cfg`` describes."""
    with torch.device("meta"):
        expected = DeepseekV32ForCausalLM(cfg).state_dict()
    scales = {k for k in tensors if k.endswith(SCALE_SUFFIX)}
    weights = {k: t for k, t in tensors.items() if k not in scales}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    orphan = sorted(s for s in scales if s[: -len(SCALE_SUFFIX)] not in weights)
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if unexpected or orphan:
        problems.append(f"unexpected keys: {_fmt_keys(unexpected + orphan)}")
    if not cfg.has_indexer and any(".indexer." in k for k in unexpected):
        problems.insert(
            0, f"these are DeepSeek-V3.2 indexer weights, but config.json says model_type {cfg.model_type!r}"
        )
    for k, t in weights.items():
        if k not in expected:
            continue
        if tuple(t.shape) != tuple(expected[k].shape):
            problems.append(f"{k}: shape {tuple(t.shape)}, expected {tuple(expected[k].shape)} from config.json")
        if not t.is_floating_point():
            problems.append(f"{k}: dtype {t.dtype}, expected a floating-point tensor")
        if t.dtype == FP8:
            s = tensors.get(k + SCALE_SUFFIX)
            if s is None:
                problems.append(f"{k}: FP8 weight without its {k + SCALE_SUFFIX}")
            elif t.ndim != 2 or tuple(s.shape) != scale_shape(tuple(t.shape)):
                want = scale_shape(tuple(t.shape)) if t.ndim == 2 else "a 2-D weight"
                problems.append(f"{k + SCALE_SUFFIX}: shape {tuple(s.shape)}, expected {want}")
            elif not torch.isfinite(s.float()).all():
                problems.append(f"{k + SCALE_SUFFIX}: non-finite scales")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more problems"] if len(problems) > 12 else [])
        raise CheckpointError(
            f"checkpoint {source} does not match its config (model_type {cfg.model_type}, "
            f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}):\n  - "
            + "\n  - ".join(shown)
            + "\nCheck that config.json belongs to these weights."
        )


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def reconcile(
    cfg: ModelConfig, tensors: dict[str, Tensor], source: str
) -> tuple[ModelConfig, dict[str, Tensor], list[str]]:
    """What the weights say and the config does not: HF's fused in-memory experts are split into the
    checkpoint's per-expert names, and the MTP layer count is taken from the weights when the config
    leaves it unset (or declares layers that transformers' ``save_pretrained`` dropped). Each such
    decision is returned as a note and logged."""
    tensors, notes = unfuse_experts(tensors), []
    n_main = cfg.num_hidden_layers
    found = len({int(m.group(1)) for k in tensors if (m := _LAYER.match(k)) and int(m.group(1)) >= n_main})
    if "num_nextn_predict_layers" in cfg.absent:
        notes.append(
            f"config.json does not set num_nextn_predict_layers; the weights hold {found} MTP layer(s), so dsc uses {found}"
        )
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=found)
    elif found == 0 and cfg.num_nextn_predict_layers:
        notes.append(
            f"config.json declares num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the checkpoint holds no MTP "
            "weights (transformers' save_pretrained drops them); loading without MTP, so there is no `mtp` entry point"
        )
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    for n in notes:
        log.warning("%s: %s", source, n)
    return cfg, tensors, notes


def unfuse_experts(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers 5 holds a MoE layer's experts fused in memory: ``experts.gate_up_proj`` (E, 2I, D)
    (gate rows first) and ``experts.down_proj`` (E, D, I). Checkpoints name them per expert."""
    out = {}
    for k, t in tensors.items():
        if k.endswith(".experts.gate_up_proj") and t.ndim == 3:
            base = k.removesuffix("gate_up_proj")
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate[e], up[e]
        elif k.endswith(".experts.down_proj") and t.ndim == 3:
            base = k.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e]
        else:
            out[k] = t
    return out


# ---- HF directories -----------------------------------------------------------------------------
def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt"
        ) from None


def read_hf_tensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    """The tensors of an HF directory as stored (one ``model.safetensors``, or shards and their
    index, checked against each other), with the single file's metadata."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (path / s).exists()]
        if absent:
            raise CheckpointError(f"{index} names shards that are not in {path}: {_fmt_keys(absent)}")
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(_read_safetensors(path / shard)[0])
        listed, stored = set(weight_map), set(tensors)
        if listed != stored:
            raise CheckpointError(
                f"{index} disagrees with the shards: listed but absent {_fmt_keys(sorted(listed - stored))}; "
                f"stored but unlisted {_fmt_keys(sorted(stored - listed))}"
            )
        return tensors, {}
    if (path / "model.safetensors").exists():
        return _read_safetensors(path / "model.safetensors")
    raise CheckpointError(f"{path} has neither model.safetensors nor {INDEX_FILE}")


def load_hf(path: str | Path) -> Checkpoint:
    path = Path(path)
    cfg = ModelConfig.from_json(path / "config.json")
    tensors, meta = read_hf_tensors(path)
    cfg, tensors, notes = reconcile(cfg, tensors, str(path))
    validate_tensors(cfg, tensors, str(path))
    return Checkpoint(cfg, tensors, str(path), meta, notes)


def save_hf(
    ckpt: Checkpoint, dest: str | Path, max_shard_bytes: int | None = None, overwrite: bool = False,
    marker: str = "manifest.json",
) -> None:  # fmt: skip
    """Write ``config.json`` + ``model.safetensors`` (or shards + index) atomically; tensors keep their
    dtypes. ``overwrite`` replaces a directory holding ``marker`` (by default only a dsc output)."""
    tensors = {k: v.contiguous() for k, v in ckpt.tensors.items()}

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(ckpt.config.to_json())
        if max_shard_bytes is None:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            return
        shards: list[dict[str, Tensor]] = [{}]
        size = 0
        for k in sorted(tensors):
            n = tensors[k].numel() * tensors[k].element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = tensors[k]
            size += n
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )

    atomic_dir(Path(dest), write, overwrite, marker)


# ---- model.pt -----------------------------------------------------------------------------------
def load_pt(path: str | Path, trust_pickle: bool = False) -> Checkpoint:
    """A ``torch.save``d ``{"config": dict, "state_dict": dict}``, loaded with ``weights_only=True``."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a readable torch.save file (not a zip archive); it may be truncated")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "not plain tensors")
            raise CheckpointError(
                f"{path} holds pickled Python objects (such as a whole nn.Module), which can run arbitrary code "
                f"when loaded, so dsc refuses it ({why}). Save "
                '{"config": config_dict, "state_dict": model.state_dict()} instead, or pass --trust-pickle if you '
                "trust the file's author."
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch.save file ({e})") from None
    if isinstance(obj, torch.nn.Module):
        obj = _module_checkpoint(obj, path)
    if not (isinstance(obj, dict) and isinstance(obj.get("config"), dict) and isinstance(obj.get("state_dict"), dict)):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f'{path} must hold {{"config": dict, "state_dict": dict}}; got {got}')
    cfg = ModelConfig.from_dict(obj["config"])
    cfg, tensors, notes = reconcile(cfg, dict(obj["state_dict"]), str(path))
    validate_tensors(cfg, tensors, str(path))
    return Checkpoint(cfg, tensors, str(path), notes=notes)


def _module_checkpoint(m: torch.nn.Module, path: Path) -> dict:
    """A pickled model: dsc's own reference model, or an HF DeepSeek model (config + state dict)."""
    cls = type(m)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(m, DeepseekV32ForCausalLM):
        return {"config": m.config.to_dict(), "state_dict": m.state_dict()}
    config = getattr(m, "config", None)
    if cls.__module__.startswith("transformers.") and getattr(config, "model_type", None) in MODEL_TYPES:
        return {"config": config.to_dict(), "state_dict": m.state_dict()}
    raise CheckpointError(
        f"{path} holds a pickled {name}, which is not a model dsc's reference frontend can load (it loads dsc's "
        "DeepseekV32ForCausalLM and transformers' DeepseekV3/V32ForCausalLM). To compile your own module, load it "
        "with --frontend module (it must implement the module protocol: prefill, decode, cache_spec; see the README) "
        "or export its entry points with torch.export.save and use --frontend pt2."
    )


def save_pt(ckpt: Checkpoint, dest: str | Path) -> None:
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        torch.save({"config": ckpt.config.to_dict(), "state_dict": ckpt.tensors}, tmp)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


# ---- one entry point ----------------------------------------------------------------------------
def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> Checkpoint:
    p = Path(path)
    if p.is_dir():
        return load_hf(p)
    if p.is_file():
        if p.suffix == ".safetensors":
            raise CheckpointError(f"{p} is a single safetensors file; pass its directory (with config.json) instead")
        return load_pt(p, trust_pickle=trust_pickle)
    raise CheckpointError(f"{p} does not exist")


def build_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> DeepseekV32ForCausalLM:
    """An eval-mode reference model holding the checkpoint's (dequantised) weights."""
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(ckpt.config)
    state = ckpt.state_dict(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()  # RoPE tables and Hadamard matrices are derived, not stored
    return model.eval()


def checkpoint_from_model(model: DeepseekV32ForCausalLM) -> Checkpoint:
    return Checkpoint(model.config, {k: v.detach().clone() for k, v in model.state_dict().items()})
