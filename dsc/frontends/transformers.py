"""The transformers frontend: a DeepSeek-V3 / V3.2 checkpoint run by Hugging Face transformers' own
modeling code (``DeepseekV3ForCausalLM`` / ``DeepseekV32ForCausalLM``), captured as it runs.

The entry points drive HF's forward over a ``StaticCache`` whose tensors are the entry's cache
inputs: ``HFEntries`` builds the cache object around the tensors it is handed and HF writes them in
place (``index_copy_`` at the step's position). Nothing of HF's code is changed or re-implemented.
The CacheSpec is read off the cache tensors HF allocates in one eager step (names, shapes, dtypes;
meanings from the sizes the config gives). What HF's code implies for the runtime:

- a StaticCache writes every row of a batch at one position (``shared_positions``): a batch is one
  prompt length;
- HF's V3.2 indexer keeps min(index_topk, T) keys, which export fixes at index_topk, so every call
  gets a cache view of at least index_topk positions (``min_len``; the extra slots are masked);
- transformers has no MTP module, so there is no ``mtp`` entry point.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path

import torch
from torch import Tensor

from dsc.cache import CacheSpec, CacheTensor
from dsc.errors import DscError
from dsc.frontends.export import export_entries
from dsc.model.config import ModelConfig
from dsc.program import Program

log = logging.getLogger(__name__)

# the StaticCache layer attributes HFEntries sets, per kind of cached tensor
CACHE_ATTRS = ("keys", "values", "indexer_keys")
_PROBE_LEN = 37  # an odd length no model dimension equals, to find each cache tensor's time dim


def bind_installed(name: str) -> None:
    """Run from a source checkout (``python -m dsc.cli`` in its root puts the root on sys.path), the
    checkout's source folders ``kernels/``, ``model/``, ``passes/``, ``export/`` (installed as
    ``dsc.kernels``, ...) would also import as top-level packages of those names, and transformers
    imports Hugging Face's ``kernels`` package when it is installed. Bind ``name`` to the installed
    package before anything imports it; nothing changes outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    if name in sys.modules or not (root / "pyproject.toml").is_file() or not (root / name).is_dir():
        return
    path = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def require_transformers():
    bind_installed("kernels")
    try:
        import transformers
    except ImportError:
        raise DscError(
            "the transformers frontend runs Hugging Face transformers' modeling code, which is not installed; "
            "install it with: pip install 'dsc[hf]'"
        ) from None
    return transformers


def load_hf(path: str | Path, attn: str = "sdpa"):
    """(HF model in eval mode, fp32; dsc's reading of its config.json)."""
    transformers = require_transformers()
    path = Path(path)
    if not path.is_dir():
        raise DscError(f"{path} is not a directory; the transformers frontend takes an HF checkpoint directory")
    cfg = ModelConfig.from_json(path / "config.json")  # a DeepSeek config, or a clear error before HF loads
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn,
            experts_implementation="batched_mm",  # the default loops over the experts hit (data-dependent)
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as e:
        raise DscError(f"transformers could not load {path}: {e}") from None
    return m.eval(), cfg


class HFEntries(torch.nn.Module):
    """The entry-point protocol over an HF model: ``prefill`` / ``decode`` hand HF a StaticCache made
    of the given cache tensors and return (logits, final hidden state)."""

    def __init__(self, hf, spec: CacheSpec, layout: list[tuple[int, str]]):
        super().__init__()
        # HF's own submodules, registered here: the Program's weights carry HF's state-dict names
        # (model.layers.0.self_attn.q_a_proj, lm_head), as lower_fp8's patterns and the report show them
        self.model, self.lm_head, self.hf_config = hf.model, hf.lm_head, hf.config
        self.layout = layout  # (layer, attribute) per cache tensor
        self.time_dim = spec.tensors[0].time_dim

    def _cache(self, caches: list[Tensor], start: Tensor, device):
        from transformers import StaticCache

        cache = StaticCache(config=self.hf_config, max_cache_len=caches[0].shape[self.time_dim])
        for (i, attr), c in zip(self.layout, caches):
            layer = cache.layers[i]
            setattr(layer, attr, c)
            if attr == "indexer_keys":
                layer.indexer_cumulative_length, layer.is_indexer_initialized = start.clone(), True
                layer.indexer_dtype, layer.indexer_device = c.dtype, device
            else:
                layer.cumulative_length, layer.is_initialized, layer.device = start.clone(), True, device
        return cache

    def _run(self, tokens: Tensor, positions: Tensor, caches: list[Tensor], start: Tensor):
        cache = self._cache(caches, start, tokens.device)
        h = self.model(input_ids=tokens, position_ids=positions, cache=cache, use_cache=True).last_hidden_state
        return self.lm_head(h), h

    def prefill(self, tokens: Tensor, caches: list[Tensor]):
        B, S = tokens.shape
        positions = torch.arange(S, device=tokens.device).unsqueeze(0).expand(B, S)
        return self._run(tokens, positions, caches, torch.zeros((), dtype=torch.long, device=tokens.device))

    def decode(self, tokens: Tensor, positions: Tensor, caches: list[Tensor]):
        return self._run(tokens, positions, caches, positions[0, 0])


def _meaning(attr: str, last: int, cfg: ModelConfig) -> str:
    if attr == "indexer_keys":
        return "indexer key: RoPE(LayerNorm(wk x)) (transformers rotates no Hadamard)"
    if attr == "keys" and last == cfg.kv_lora_rank:
        return "MLA latent c_KV = RMSNorm(W_DKV x) (transformers cache keys)"
    if attr == "values" and last == cfg.qk_rope_head_dim:
        return "rope key RoPE(k_pe), shared by all heads (transformers cache values)"
    return f"transformers cache {attr}"


def cache_spec(hf, cfg: ModelConfig) -> tuple[CacheSpec, list[tuple[int, str]]]:
    """The CacheSpec of the tensors HF's StaticCache allocates, found by one eager step."""
    from transformers import StaticCache

    cache = StaticCache(config=hf.config, max_cache_len=_PROBE_LEN)
    with torch.no_grad():
        hf.model(input_ids=torch.zeros(1, 1, dtype=torch.long), cache=cache, use_cache=True)
    tensors, layout = [], []
    for i, layer in enumerate(cache.layers):
        for attr in CACHE_ATTRS:
            t = getattr(layer, attr, None)
            if not isinstance(t, Tensor):
                continue
            dims = [d for d, n in enumerate(t.shape) if n == _PROBE_LEN]
            if len(dims) != 1 or dims[0] == 0:
                raise DscError(
                    f"transformers' cache tensor {attr} of layer {i} has shape {tuple(t.shape)}; dsc cannot tell its length dim"
                )
            if not hasattr(layer, "is_initialized" if attr != "indexer_keys" else "is_indexer_initialized"):
                raise DscError(
                    f"this transformers version's {type(layer).__name__} is not a cache layer dsc knows how to feed; "
                    "the transformers frontend is tested with transformers 5 StaticCache layers"
                )
            tail = [n for d, n in enumerate(t.shape) if d not in (0, dims[0])]
            dtype = str(t.dtype).removeprefix("torch.")
            tensors.append(CacheTensor(f"layers.{i}.{attr}", tail, dtype, _meaning(attr, tail[-1], cfg), i, dims[0]))
            layout.append((i, attr))
    if not tensors:
        raise DscError("transformers' StaticCache allocated no cache tensors for this model; dsc cannot capture it")
    min_len = cfg.index_topk if cfg.has_indexer else 1
    return CacheSpec(tensors, min_len=min_len, shared_positions=True), layout


def program_config(cfg: ModelConfig, source: str) -> tuple[ModelConfig, list[str]]:
    """dsc's view of the config (verification, the runtime, the report). HF builds no MTP module."""
    notes = []
    if cfg.num_nextn_predict_layers and "num_nextn_predict_layers" not in cfg.absent:
        notes.append(
            f"transformers' modeling code has no MTP module; the {cfg.num_nextn_predict_layers} MTP layer(s) "
            "of the config are not captured (no `mtp` entry point)"
        )
    for n in notes:
        log.warning("%s: %s", source, n)
    cfg.num_nextn_predict_layers = 0
    return cfg, notes


def load(path: str | Path, attn: str = "sdpa"):
    """(HFEntries, CacheSpec, ModelConfig, notes): the eager model behind the Program interface."""
    hf, cfg = load_hf(path, attn)
    cfg, notes = program_config(cfg, str(path))
    spec, layout = cache_spec(hf, cfg)
    return HFEntries(hf, spec, layout).eval(), spec, cfg, notes


def capture(entries: HFEntries, spec: CacheSpec, cfg: ModelConfig, source: str, max_batch: int = 256) -> Program:
    return export_entries(
        entries, spec, cfg, {"source": source, "frontend": "transformers"},
        max_len=cfg.max_position_embeddings, max_batch=max_batch, tied_prefill=False,
    )  # fmt: skip
