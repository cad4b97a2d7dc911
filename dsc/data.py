"""The demo corpus: the Python standard library's own source files, as bytes.

Available offline on any machine with Python. Files are split deterministically by a hash of their
path relative to the stdlib root, so every machine with the same Python holds out the same files.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

HELD_OUT_PERCENT = 5


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in sorted(root.rglob("*.py"))
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
        and "idle_test" not in p.parts
    ]  # fmt: skip
    return files


def _is_held_out(path: Path) -> bool:
    rel = str(path.relative_to(sysconfig.get_paths()["stdlib"]))
    return int(hashlib.md5(rel.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def load_corpus(split: str, bos: int, eos: int, max_bytes: int | None = None) -> torch.Tensor:
    """All files of a split as one long int64 token stream: BOS + file bytes + EOS per file."""
    assert split in ("train", "heldout"), split
    chunks, total = [], 0
    for p in stdlib_files():
        if _is_held_out(p) != (split == "heldout"):
            continue
        data = p.read_bytes()
        chunks.append(torch.tensor([bos, *data, eos], dtype=torch.long))
        total += len(data) + 2
        if max_bytes is not None and total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no {split} files found under {sysconfig.get_paths()['stdlib']}")
    return torch.cat(chunks)


def random_windows(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping windows spread evenly over the stream (deterministic)."""
    step = max((len(stream) - length) // count, length)
    return torch.stack([stream[i * step : i * step + length] for i in range(count) if i * step + length <= len(stream)])
