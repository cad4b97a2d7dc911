"""Reference DeepSeek-V3.2 model, its config and presets, and checkpoint I/O."""

from dsc.model.config import PRESETS, ModelConfig, preset
from dsc.model.model import DeepseekV32ForCausalLM

__all__ = ["PRESETS", "ModelConfig", "preset", "DeepseekV32ForCausalLM"]
