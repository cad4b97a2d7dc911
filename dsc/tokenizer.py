"""Byte-level tokenizer: ids 0..255 are bytes; BOS/EOS come from the config (outside 0..255)."""

from __future__ import annotations


class ByteTokenizer:
    def __init__(self, bos_token_id: int, eos_token_id: int, vocab_size: int):
        assert vocab_size >= 256, f"a byte-level vocabulary needs >= 256 ids, got {vocab_size}"
        self.bos, self.eos, self.vocab_size = bos_token_id, eos_token_id, vocab_size

    @classmethod
    def for_config(cls, cfg) -> ByteTokenizer:
        return cls(cfg.bos_token_id, cfg.eos_ids[0], cfg.vocab_size)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos] if bos and self.bos < self.vocab_size else []) + ids

    def to_bytes(self, ids: list[int]) -> bytes:
        """The byte ids of ``ids`` (BOS / EOS and other specials dropped)."""
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids: list[int]) -> str:
        return self.to_bytes(ids).decode("utf-8", errors="replace")
