"""Calibration and evaluation text: local files -> fixed token chunks, as BlockPruner builds them.

The reference code (MrGGLS/BlockPruner, ``utils.py``) samples rows, joins them with ``"\\n\\n"``, tokenizes
the result once, cuts it into non-overlapping chunks of ``seqlen`` tokens and drops the remainder. Note that
the paper's "256 samples" counts *rows*, not chunks; here ``num_chunks`` says how many chunks are used, and
``num_rows`` optionally samples rows first (Python ``random.Random(seed).sample``, like the reference).

Rows come from ``.txt`` files (a file is one row), or ``.json`` / ``.jsonl`` files whose rows are strings,
objects with a ``text`` field, or objects with OpenAI-style ``messages`` (rendered with the tokenizer's chat
template, as a chat model sees them). ``bundled:chat.train.jsonl`` names a file bundled with fuselab.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch

from fuselab.utils.boundary import read_text
from fuselab.utils.errors import ConfigError

BUNDLED_PREFIX = "bundled:"


def resolve_data_file(ref: str) -> Path:
    """A data file path; ``bundled:NAME`` is a file shipped with fuselab (``fuselab/data/bundled``)."""
    if ref.startswith(BUNDLED_PREFIX):
        from fuselab.data.bundled import bundled_path

        try:
            return bundled_path(ref[len(BUNDLED_PREFIX) :])
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ConfigError(f"data file {ref} does not exist")
    return path


def _row_text(row: Any, tokenizer: Any, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        if isinstance(row.get("messages"), list):
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    f"{where}: rows have `messages` but the model's tokenizer has no chat template; give "
                    "plain `text` rows or a model with a chat template"
                )
            return tokenizer.apply_chat_template(row["messages"], tokenize=False)
        raise ConfigError(
            f"{where}: a row has neither a `text` string nor a `messages` list (keys: {', '.join(row)})"
        )
    raise ConfigError(f"{where}: rows must be strings or objects, got {type(row).__name__}")


def read_rows(ref: str, tokenizer: Any) -> list[str]:
    """The text rows of one file (see the module docstring for the formats)."""
    path = resolve_data_file(ref)
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, where = [], []
        for n, line in enumerate(text.split("\n"), start=1):  # 1-based, as an editor counts
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"{ref} line {n}: not valid JSON ({err.msg} at column {err.colno}); fix or remove that line"
                ) from None
            row = len(rows)
            where.append(f"{ref} row {row}" + (f" (line {n})" if n != row else ""))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{ref}: not valid JSON ({err})") from None
        rows = data if isinstance(data, list) else [data]
        where = [f"{ref} row {n}" for n in range(1, len(rows) + 1)]
    else:
        rows, where = [text], [ref]
    return [_row_text(r, tokenizer, w) for r, w in zip(rows, where)]


def tokenize_chunks(
    texts: list[str], tokenizer: Any, seqlen: int, num_chunks: int | None, source: str = "text"
) -> torch.Tensor:
    """Join ``texts`` with blank lines, tokenize once, cut into ``seqlen`` chunks (remainder dropped).

    Returns a ``[N, seqlen]`` long tensor with the first ``num_chunks`` chunks (all when None).
    """
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    available = ids.numel() // seqlen
    want = available if num_chunks is None else num_chunks
    if available == 0 or want > available:
        raise ConfigError(
            f"{source} gives {ids.numel()} tokens, i.e. {available} chunk(s) of {seqlen}; {want or 1} needed. "
            "Add text, or lower num_chunks / seqlen"
        )
    return ids[: want * seqlen].reshape(want, seqlen).clone()


def calibration_chunks(
    files: list[str],
    tokenizer: Any,
    seqlen: int,
    num_chunks: int | None,
    num_rows: int | None = None,
    seed: int = 42,
) -> torch.Tensor:
    """Rows of ``files`` (optionally ``num_rows`` sampled with ``seed``) -> ``[num_chunks, seqlen]`` tokens."""
    rows = [r for f in files for r in read_rows(f, tokenizer)]
    if num_rows is not None:
        if num_rows > len(rows):
            raise ConfigError(f"num_rows is {num_rows} but the calibration files hold {len(rows)} rows")
        rows = random.Random(seed).sample(rows, num_rows)
    return tokenize_chunks(rows, tokenizer, seqlen, num_chunks, source="the calibration files")


def tensor_fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
