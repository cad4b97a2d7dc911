"""Where a model comes from: a checkpoint path, a preset name, or the built-in default."""

from __future__ import annotations

import logging
from pathlib import Path

from dsc.errors import DscError
from dsc.model.checkpoint import Checkpoint, build_model, checkpoint_from_model, load_checkpoint
from dsc.model.config import PRESETS, ModelConfig, preset
from dsc.model.model import DeepseekV32ForCausalLM

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "assets" / "demo"
# The built-in default: the trained demo model when it ships with the package, else the tiny preset.
DEFAULT_MODEL = str(DEMO_DIR) if (DEMO_DIR / "config.json").exists() else "tiny"
META_ONLY = {"deepseek-v3.2"}
SEED = 0


def resolve_config(spec: str | None) -> ModelConfig:
    """Config only (no weights): works for every preset, including the 671B one."""
    spec = spec or DEFAULT_MODEL
    if spec in PRESETS:
        return preset(spec)
    _check_exists(spec)
    return load_checkpoint(spec).config


def _check_exists(spec: str) -> None:
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
    _check_exists(spec)
    ckpt = load_checkpoint(spec, trust_pickle=trust_pickle)
    return build_model(ckpt), ckpt
