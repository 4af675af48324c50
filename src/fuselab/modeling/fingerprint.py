"""Cheap, content-based fingerprints of checkpoints, for cache keys.

Hashing every weight byte of a multi-gigabyte model on each run would cost more than some stages it guards, so
a fingerprint covers all of ``config.json``, the tokenizer and template files, and, for each weight file, its
size, its header (names, dtypes, shapes, offsets) and its first and last MiB. Fine-tuning changes every
tensor, so a changed model changes the fingerprint; a renamed folder with the same files does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_TEXT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
_EDGE = 1 << 20


def model_fingerprint(path: str | Path) -> str:
    path = Path(path)
    h = hashlib.sha256()
    for name in _TEXT_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    for f in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_EDGE))
            if size > 2 * _EDGE:
                fh.seek(size - _EDGE)
                h.update(fh.read(_EDGE))
    return h.hexdigest()


def tokenizer_fingerprint(path: str | Path) -> str:
    path = Path(path)
    h = hashlib.sha256()
    for name in _TEXT_FILES[2:]:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
