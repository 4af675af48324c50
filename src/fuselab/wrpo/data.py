"""WRPO training data: the preference file, its tokenisation, the truncation rule and the collator.

File format (written by ``fuselab wrpo build``; one JSON object per line, TRL's conversational preference
format plus WRPO's third response)::

    {"id": ..., "prompt": [{"role": "user", "content": ...}],
     "chosen": [{"role": "assistant", "content": y_wt}],            # best target sample
     "rejected": [{"role": "assistant", "content": y_l}],          # worst target sample
     "source_chosen": [{"role": "assistant", "content": y_ws}],    # best source sample
     "source_model": ..., "scores": {"ws": ..., "wt": ..., "l": ...}, ...}

Because ``chosen``/``rejected`` are the on-policy pair, TRL's DPOTrainer reads the same file as the α = 0
baseline. ``prompt`` may also be a plain string (TRL's "standard" format): it is then used as already
rendered text. Responses may be strings or one-message lists.

Tokenisation (spec §10.2): ``prompt_ids`` = the target's chat template with the generation prompt; each
response is ``ids(response)`` followed by the end-of-turn token (``tokenizer.eos_token``) unless it already
ends with it. Prompt and responses are tokenised separately, as the model saw them at sampling time.

**Truncation rule** (fixing spec §9.1, where one long response cut *all three* to
``max_length − max_prompt_length`` tokens): the prompt keeps its last ``max_prompt_length`` tokens; then each
response is cut only by its *own* overflow, to at most ``max_length − len(prompt)`` tokens. A response that
fits is never touched, whatever the length of the others. Truncated responses are flagged and counted, and
``drop_truncated`` can drop such examples instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fuselab.utils.boundary import read_text
from fuselab.utils.errors import ConfigError

RESPONSE_KEYS = {"ws": "source_chosen", "wt": "chosen", "l": "rejected"}
COLUMN_NAMES = ("ws", "wt", "l")

DropTruncated = Literal["none", "source", "any"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (or a JSON list), with the line number in any parse error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    text = read_text(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: a .json data file must hold a list of objects")
        return data
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{n}: not valid JSON: {err}") from None
    return rows


def response_text(value: Any, where: str) -> str:
    """The text of a response given as a string or as a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        if len(value) != 1 or value[0].get("role", "assistant") != "assistant":
            raise ConfigError(f"{where}: a response must be a string or a single assistant message")
        return str(value[0]["content"])
    raise ConfigError(f"{where}: a response must be a string or [{{'role': 'assistant', 'content': ...}}]")


def prompt_ids(tokenizer: Any, prompt: Any, where: str = "prompt") -> list[int]:
    """Token ids of a prompt: chat template with the generation prompt for messages, raw text for a string."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                f"{where}: the prompt is a list of messages but the tokenizer has no chat template; "
                "use a chat model or give prompts as rendered strings"
            )
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    raise ConfigError(f"{where}: a prompt must be a string or a list of {{'role', 'content'}} messages")


def end_of_turn_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token; set one (it ends every response)")
    return int(eos)


def response_ids(tokenizer: Any, text: str, eot: int) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids or ids[-1] != eot:
        ids.append(eot)
    return ids


def truncate(
    prompt: list[int], responses: Sequence[list[int]], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[list[int]], list[bool]]:
    """The truncation rule of this module's docstring: prompt keeps its tail; each response its own budget."""
    if max_prompt_length >= max_length:
        raise ConfigError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})"
        )
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    budget = max_length - len(prompt)
    out, flags = [], []
    for r in responses:
        flags.append(len(r) > budget)
        out.append(list(r[:budget]))
    return list(prompt), out, flags


@dataclass(frozen=True)
class TokenizeOptions:
    max_length: int = 1024
    max_prompt_length: int = 512
    drop_truncated: DropTruncated = "none"


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    dropped_truncated: int = 0
    truncated: dict[str, int] | None = None
    prompt_truncated: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "dropped_truncated": self.dropped_truncated,
            "prompt_truncated": self.prompt_truncated,
            "responses_truncated": dict(self.truncated or {}),
        }


def tokenize_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Any, options: TokenizeOptions, source: str = "data"
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenise preference rows into ``{index, id, prompt_ids, ws_ids, wt_ids, l_ids, truncated}``."""
    eot = end_of_turn_id(tokenizer)
    stats = TokenizeStats(truncated=dict.fromkeys(COLUMN_NAMES, 0))
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        stats.rows += 1
        missing = [k for k in ("prompt", *RESPONSE_KEYS.values()) if k not in row]
        if missing:
            raise ConfigError(
                f"{where}: missing key(s) {', '.join(missing)}; WRPO rows need prompt, source_chosen "
                "(y_ws), chosen (y_wt) and rejected (y_l), as `fuselab wrpo build` writes them"
            )
        p = prompt_ids(tokenizer, row["prompt"], where)
        resp = [
            response_ids(tokenizer, response_text(row[RESPONSE_KEYS[c]], f"{where} {RESPONSE_KEYS[c]}"), eot)
            for c in COLUMN_NAMES
        ]
        p2, resp, flags = truncate(p, resp, options.max_length, options.max_prompt_length)
        stats.prompt_truncated += int(len(p2) < len(p))
        for c, f in zip(COLUMN_NAMES, flags):
            stats.truncated[c] += int(f)  # type: ignore[index]
        if (options.drop_truncated == "source" and flags[0]) or (
            options.drop_truncated == "any" and any(flags)
        ):
            stats.dropped_truncated += 1
            continue
        out.append(
            {
                "index": len(out),
                "id": str(row.get("id", i)),
                "prompt_ids": p2,
                "ws_ids": resp[0],
                "wt_ids": resp[1],
                "l_ids": resp[2],
                "truncated": flags,
            }
        )
    stats.kept = len(out)
    return out, stats


class WRPOCollator:
    """Builds one forward batch of ``len(columns)·B`` rows, ``[ws block; wt block; l block]``.

    Each row is ``prompt_ids + response_ids``, right-padded with ``pad_token_id`` to the longest row (optionally
    rounded up to ``pad_to_multiple_of``). ``attention_mask`` marks real tokens; ``completion_mask`` marks the
    response tokens whose log-probs are summed (prompt and padding are 0). With ``columns`` a subset (static
    α = 0 or 1, where one response has weight 0), only those responses are forwarded. Precomputed reference
    log-probs, when the features carry them, come through as ``ref_logps`` [B, 3].
    """

    def __init__(
        self,
        pad_token_id: int,
        columns: Sequence[str] = COLUMN_NAMES,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        bad = [c for c in columns if c not in COLUMN_NAMES]
        if bad or not columns:
            raise ValueError(f"columns must be a non-empty subset of {COLUMN_NAMES}, got {columns}")
        self.pad_token_id = pad_token_id
        self.columns = tuple(c for c in COLUMN_NAMES if c in columns)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        seqs: list[list[int]] = []
        prompt_lens: list[int] = []
        for c in self.columns:
            for f in features:
                seqs.append(list(f["prompt_ids"]) + list(f[f"{c}_ids"]))
                prompt_lens.append(len(f["prompt_ids"]))
        width = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(seqs)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        completion = torch.zeros((n, width), dtype=torch.long)
        for i, (s, pl) in enumerate(zip(seqs, prompt_lens)):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention[i, : len(s)] = 1
            completion[i, pl : len(s)] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "completion_mask": completion,
            "index": torch.tensor([int(f["index"]) for f in features], dtype=torch.long),
        }
        if all("ref_logps" in f for f in features):
            batch["ref_logps"] = torch.tensor([list(f["ref_logps"]) for f in features], dtype=torch.float32)
        return batch
