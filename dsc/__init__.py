"""dsc: a compiler for DeepSeek-V3.2-style language models."""

__version__ = "0.1.0"
