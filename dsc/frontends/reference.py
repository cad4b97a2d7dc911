"""The reference frontend: a checkpoint (HF directory, ``model.pt``), a preset name or the built-in
default, loaded into dsc's own reference model (``dsc.model``) and captured with torch.export."""

from __future__ import annotations

import logging
from pathlib import Path

from dsc.cache import CacheSpec, CacheTensor
from dsc.errors import DscError
from dsc.frontends.export import export_entries
from dsc.model.checkpoint import Checkpoint, build_model, checkpoint_from_model, load_checkpoint
from dsc.model.config import PRESETS, ModelConfig, preset
from dsc.model.model import DeepseekV32ForCausalLM, cache_layout
from dsc.program import Program

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent.parent / "assets" / "demo"
# The built-in default: the trained demo model when it ships with the package, else the tiny preset.
DEFAULT_MODEL = str(DEMO_DIR) if (DEMO_DIR / "config.json").exists() else "tiny"
META_ONLY = {"deepseek-v3.2"}
SEED = 0


def resolve_config(spec: str | None) -> ModelConfig:
    """Config only (no weights): works for every preset, including the 671B one."""
    spec = spec or DEFAULT_MODEL
    if spec in PRESETS:
        return preset(spec)
    check_exists(spec)
    return load_checkpoint(spec).config


def check_exists(spec: str) -> None:
    if not Path(spec).exists():
        raise DscError(f"{spec!r} is neither a checkpoint path nor a preset ({', '.join(PRESETS)})")


def load_model(spec: str | None, trust_pickle: bool = False) -> tuple[DeepseekV32ForCausalLM, Checkpoint]:
    """An eval-mode fp32 reference model and its checkpoint (presets get seeded random weights)."""
    spec = spec or DEFAULT_MODEL
    if spec in META_ONLY:
        raise DscError(
            f"preset {spec!r} is for shape and cost analysis only (`dsc info {spec}`); it has no weights here"
        )
    if spec in PRESETS:
        model = DeepseekV32ForCausalLM(preset(spec)).init_weights(SEED).eval()
        return model, checkpoint_from_model(model)
    check_exists(spec)
    ckpt = load_checkpoint(spec, trust_pickle=trust_pickle)
    return build_model(ckpt), ckpt


def cache_spec_of(model: DeepseekV32ForCausalLM) -> CacheSpec:
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    return CacheSpec([CacheTensor(e.name, list(e.tail), dtype, e.meaning, e.layer) for e in cache_layout(model.config)])


def capture(model: DeepseekV32ForCausalLM, max_batch: int = 256, source: str = "") -> Program:
    """Export ``prefill``, ``decode`` and (with an MTP module) ``mtp`` of an eval-mode reference model.

    ``mtp(hidden, tokens, positions, caches)``: the MTP module's logits for t_{i+2} from the main
    model's final hidden state h_i and the token t_{i+1}; it writes the MTP layer's caches."""
    cfg = model.config
    return export_entries(
        model, cache_spec_of(model), cfg, {"source": source, "frontend": "reference"},
        max_len=cfg.max_position_embeddings, max_batch=max_batch,
    )  # fmt: skip
