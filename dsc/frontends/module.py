"""The module frontend: the user's own DeepSeek implementation, an ``nn.Module`` with the protocol

    config                          HF config.json keys (a dict, an object with ``to_dict()``, or a ModelConfig)
    cache_spec()                    the cache tensors prefill / decode take, in order (``CacheSpec.from_description``)
    prefill(tokens, caches)         -> logits (B, S, V), or (logits, final hidden state)
    decode(tokens, positions, caches) -> the same; tokens / positions (B, S), S >= 1 new tokens per row
    mtp(hidden, tokens, positions, caches)   optional: the MTP module's logits (with num_nextn_predict_layers)

``caches`` is a list of views of the first T positions of each cache tensor; a call writes its new
positions in place. With ``min_len`` 1 the prefill's views are exactly the prompt long.

It is found either by import path (``--frontend module:pkg.mod:Class`` with a checkpoint: built by
``Class.from_checkpoint(path)`` when the class has one, else ``Class(config_dict)`` and
``load_state_dict`` of the checkpoint's tensors, strictly) or unpickled from a ``model.pt`` the user
trusts (``--frontend module --trust-pickle``).
"""

from __future__ import annotations

import importlib
import json
import pickle
import sys
from pathlib import Path

import torch

from dsc.cache import CacheSpec
from dsc.errors import DscError
from dsc.frontends.export import export_entries
from dsc.model.config import ModelConfig
from dsc.program import Program

REQUIRED = ("prefill", "decode", "cache_spec")


def import_class(target: str):
    mod_name, _, cls_name = target.partition(":")
    if not (mod_name and cls_name):
        raise DscError(f"--frontend module:{target}: write module:PKG.MOD:CLASS, e.g. module:mymodels.ds:MyDeepSeek")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: the user's own package in the working directory
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise DscError(
            f"cannot import {mod_name!r} for --frontend module:{target} ({e}); check the module path"
        ) from None
    cls = getattr(mod, cls_name, None)
    if cls is None:
        raise DscError(f"{mod_name} has no {cls_name!r} (--frontend module:{target})")
    return cls


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from dsc.model.checkpoint import read_hf_tensors

    if path.is_dir():
        return read_hf_tensors(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise DscError(f"{path}: not a plain torch.save of tensors ({str(e).splitlines()[0]})") from None
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict):
        raise DscError(f'{path} must hold a state dict (or {{"config": ..., "state_dict": ...}})')
    return obj


def _config_dict(path: Path) -> dict:
    f = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if not f.exists():
        raise DscError(f"no config.json beside {path}; the module frontend builds Class(config) from it")
    return json.loads(f.read_text())


def build(target: str, path: Path) -> torch.nn.Module:
    cls = import_class(target)
    make = (
        (lambda: cls.from_checkpoint(str(path)))
        if hasattr(cls, "from_checkpoint")
        else (lambda: cls(_config_dict(path)))
    )
    try:
        m = make()
    except DscError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's constructor: report, do not crash
        how = f"{target}.from_checkpoint({str(path)!r})" if hasattr(cls, "from_checkpoint") else f"{target}(config)"
        raise DscError(f"{how} failed: {type(e).__name__}: {e}") from None
    if hasattr(cls, "from_checkpoint"):
        return m
    try:
        m.load_state_dict(_read_tensors(path), strict=True)
    except RuntimeError as e:
        raise DscError(f"{path} does not fit {target}: {e}") from None
    return m


def unpickle(path: Path, trust_pickle: bool) -> torch.nn.Module:
    if not trust_pickle:
        raise DscError(
            f"loading a pickled module from {path} runs the code it names; pass --trust-pickle if you trust its author, "
            "or name the class with --frontend module:PKG.MOD:CLASS and give a checkpoint"
        )
    try:
        m = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ModuleNotFoundError) as e:
        raise DscError(f"cannot unpickle {path} ({e})") from None
    if not isinstance(m, torch.nn.Module):
        raise DscError(f"{path} holds a {type(m).__name__}, not an nn.Module")
    return m


def config_of(m) -> ModelConfig:
    c = getattr(m, "config", None)
    if isinstance(c, ModelConfig):
        return c
    if hasattr(c, "to_dict"):
        c = c.to_dict()
    if not isinstance(c, dict):
        raise DscError(
            f"{type(m).__name__}.config must be the model's HF config (a dict of config.json keys), got {type(c).__name__}"
        )
    return ModelConfig.from_dict(c)


def load(spec: str, target: str | None, trust_pickle: bool):
    path = Path(spec)
    if not path.exists():
        raise DscError(f"{spec} does not exist")
    m = build(target, path) if target else unpickle(path, trust_pickle)
    name = f"{type(m).__module__}.{type(m).__qualname__}"
    missing = [a for a in REQUIRED if not callable(getattr(m, a, None))]
    if missing or not hasattr(m, "config"):
        raise DscError(
            f"{name} does not implement the module protocol: missing {missing + ([] if hasattr(m, 'config') else ['config'])}. "
            "It needs config, cache_spec(), prefill(tokens, caches) and decode(tokens, positions, caches); see the README"
        )
    cfg = config_of(m)
    cache = CacheSpec.from_description(m.cache_spec(), f"{name}.cache_spec()")
    notes = []
    if cfg.num_nextn_predict_layers and not callable(getattr(m, "mtp", None)):
        notes.append(f"{name} has no mtp(); its MTP layers are not captured")
        cfg.num_nextn_predict_layers = 0
    return m.eval(), cache, cfg, notes


def capture(m, cache: CacheSpec, cfg: ModelConfig, max_batch: int = 256) -> Program:
    return export_entries(
        m, cache, cfg, {}, max_len=cfg.max_position_embeddings, max_batch=max_batch, tied_prefill=cache.min_len <= 1
    )
