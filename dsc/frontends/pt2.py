"""The pt2 frontend: entry points the user exported with ``torch.export.export`` and saved with
``torch.export.save``, one file per entry point, in one directory:

    prefill.pt2    prefill(tokens, caches)
    decode.pt2     decode(tokens, positions, caches)
    mtp.pt2        optional: mtp(hidden, tokens, positions, caches)
    cache.json     the cache description (``CacheSpec.from_description``)
    config.json    the model's HF config

Export them before ``run_decompositions()`` (torch.export's default IR) so ``linear``, ``einsum`` and
SDPA are still single nodes. ``torch.export.load`` unpickles, so dsc loads ``.pt2`` files only with
``--trust-pickle``. Weights the entries share by name must be equal; they are bound to one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsc.cache import CacheSpec, cache_inputs
from dsc.errors import DscError
from dsc.fx_utils import VIEW_OPS, mutated_inputs
from dsc.model.config import ModelConfig
from dsc.program import ENTRY_INPUTS, Program


def _json(path: Path) -> object:
    if not path.exists():
        raise DscError(
            f"{path.parent} has no {path.name}; a .pt2 model directory needs prefill.pt2, decode.pt2, cache.json and config.json"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DscError(f"{path} is not valid JSON ({e})") from None


def load(spec: str, trust_pickle: bool) -> Program:
    root = Path(spec)
    if not root.is_dir():
        raise DscError(
            f"{spec} is not a directory; the pt2 frontend takes a directory of prefill.pt2, decode.pt2, cache.json, config.json"
        )
    cfg = ModelConfig.from_json(root / "config.json")
    cache = CacheSpec.from_description(_json(root / "cache.json"), str(root / "cache.json"))
    names = [n for n in ENTRY_INPUTS if (root / f"{n}.pt2").exists()]
    if "prefill" not in names or "decode" not in names:
        raise DscError(
            f"{spec} needs prefill.pt2 and decode.pt2 (found: {', '.join(f'{n}.pt2' for n in names) or 'none'})"
        )
    if not trust_pickle:
        raise DscError(
            f"torch.export.load unpickles, so loading {spec}/*.pt2 can run code; pass --trust-pickle if you trust "
            "the files' author"
        )
    entries = {}
    for n in names:
        try:
            ep = torch.export.load(root / f"{n}.pt2")
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
            raise DscError(f"cannot load {root / f'{n}.pt2'} ({type(e).__name__}: {e})") from None
        want = len(ENTRY_INPUTS[n]) - 1 + len(cache.tensors)
        got = len(cache_inputs(ep))
        if got != want:
            raise DscError(
                f"{n}.pt2 takes {got} inputs; {n}({', '.join(ENTRY_INPUTS[n])}) with the {len(cache.tensors)} cache "
                f"tensors of cache.json takes {want}"
            )
        _check_cache_writes(n, ep, cache)
        entries[n] = ep
    _share_weights(entries)
    if "mtp" not in entries:
        cfg.num_nextn_predict_layers = 0
    return Program(entries, cache, cfg, {"passes": []})


def _check_cache_writes(name: str, ep, cache: CacheSpec) -> None:
    """Every cache tensor is written by every entry point (each call stores its new positions). One
    that is not usually means the export was given one example tensor for several caches
    (``[torch.zeros(...)] * L``): export then ties them together and the graph writes one of them."""
    written = set()
    for n in mutated_inputs(ep):
        while n.op == "call_function" and n.target in VIEW_OPS and n.args:
            n = n.args[0]
        written.add(n)
    phs = cache_inputs(ep)[-len(cache.tensors) :]
    unwritten = [t.name for t, ph in zip(cache.tensors, phs) if ph not in written]
    if unwritten:
        raise DscError(
            f"{name}.pt2 never writes the cache tensors {unwritten[:4]}{' ...' if len(unwritten) > 4 else ''}. "
            "Export each entry point with a distinct example tensor per cache ([torch.zeros(...) for _ in range(L)], "
            "not [torch.zeros(...)] * L, which export ties into one input)."
        )


def _share_weights(entries: dict) -> None:
    """Bind equal weights (and tensor constants) of one name to one tensor, as the Program format requires."""
    for store in ("state_dict", "constants"):
        shared: dict[str, torch.Tensor] = {}
        for n, ep in entries.items():
            tensors = getattr(ep, store)
            for k, t in tensors.items():
                if not isinstance(t, torch.Tensor):
                    continue
                first = shared.setdefault(k, t)
                if first is t:
                    continue
                if first.shape != t.shape or first.dtype != t.dtype or not torch.equal(first, t):
                    raise DscError(
                        f"{n}.pt2 holds a tensor {k!r} that differs from another entry's; the entries must share one "
                        "set of weights"
                    )
                tensors[k] = first
