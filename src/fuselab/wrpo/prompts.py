"""Prompts for ``fuselab wrpo build``: JSON/JSONL prompt files or fuselab's bundled data.

A row gives its prompt either as ``prompt`` (a string, i.e. one user turn, or a list of messages) or as
OpenAI ``messages``; a conversation that ends with assistant turns loses them (those are the reference
answers, not part of the prompt). Every other key of the row (``test``, ``entry_point``, ...) is kept for the
scorer. Prompts are rendered with each model's own chat template when sampling, and with the target's when
training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from fuselab.utils.errors import ConfigError
from fuselab.wrpo.config import PromptsConfig
from fuselab.wrpo.data import read_jsonl


@dataclass
class PromptRow:
    id: str
    messages: list[dict[str, str]]
    row: dict[str, Any] = field(default_factory=dict)
    number: int = 0  # the row's place in its file, counted from 1 (0: not from a file)
    source: str = ""  # the file (or bundled data) it came from


_EMPTY_FIX = "give it a question to answer, or remove the row"


def prompt_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The prompt turns of a row: ``prompt`` (string or messages) or ``messages`` minus final assistant turns.

    An empty prompt (an empty string, no messages, or a last user turn without text) is an error naming
    ``where``: a model sampled on nothing gives responses no scorer can judge."""
    if "prompt" in row and isinstance(row["prompt"], str):
        if not row["prompt"].strip():
            raise ConfigError(f"{where}: empty prompt (`prompt` has no text); {_EMPTY_FIX}")
        return [{"role": "user", "content": row["prompt"]}]
    key = "prompt" if isinstance(row.get("prompt"), list) else "messages"
    msgs = row.get(key)
    if isinstance(msgs, list) and not msgs:
        raise ConfigError(f"{where}: empty prompt (`{key}` is an empty list); {_EMPTY_FIX}")
    if not isinstance(msgs, list):
        raise ConfigError(f"{where}: a prompt row needs `prompt` (string or messages) or `messages`")
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"{where}: every message needs `role` and `content`")
        if not isinstance(m["content"], str):
            raise ConfigError(
                f"{where}: message content must be text, got {type(m['content']).__name__} for a "
                f"{m['role']} turn"
            )
    msgs = [{"role": str(m["role"]), "content": m["content"]} for m in msgs]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise ConfigError(f"{where}: the prompt must end with a user turn")
    if not msgs[-1]["content"].strip():
        raise ConfigError(f"{where}: empty prompt (the last user turn has no text); {_EMPTY_FIX}")
    return msgs


def load_prompts(cfg: PromptsConfig) -> list[PromptRow]:
    if cfg.bundled is not None:
        from fuselab.data.bundled import load_bundled

        domain, split = cfg.bundled.split(":")
        rows, source = load_bundled(domain, split), f"bundled {cfg.bundled}"
    else:
        rows, source = read_jsonl(cfg.path or ""), str(cfg.path)
    out: list[PromptRow] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        pid = str(row.get("id", row.get("task_id", i)))
        if pid in seen:
            raise ConfigError(f"{where}: duplicate id {pid!r}; ids must be unique")
        seen.add(pid)
        out.append(PromptRow(pid, prompt_messages(row, where), row, number=i + 1, source=source))
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(out)
    if cfg.limit is not None:
        out = out[: cfg.limit]
    if not out:
        raise ConfigError(f"{source}: no prompts")
    return out


def split_sft(prompts: list[PromptRow], share: float, seed: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """Deterministic split into (SFT prompts, WRPO prompts), both in the original order."""
    ids = [p.id for p in prompts]
    random.Random(seed).shuffle(ids)
    sft_ids = set(ids[: round(share * len(ids))])
    return [p for p in prompts if p.id in sft_ids], [p for p in prompts if p.id not in sft_ids]
