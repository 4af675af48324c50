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


def prompt_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The prompt turns of a row: ``prompt`` (string or messages) or ``messages`` minus final assistant turns."""
    if "prompt" in row and isinstance(row["prompt"], str):
        if not row["prompt"].strip():
            raise ConfigError(f"{where}: empty prompt")
        return [{"role": "user", "content": row["prompt"]}]
    msgs = row.get("prompt") if isinstance(row.get("prompt"), list) else row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ConfigError(f"{where}: a prompt row needs `prompt` (string or messages) or `messages`")
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"{where}: every message needs `role` and `content`")
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise ConfigError(f"{where}: the prompt must end with a user turn")
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
        out.append(PromptRow(pid, prompt_messages(row, where), row))
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
