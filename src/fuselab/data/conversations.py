"""Conversation files in, validated conversations out.

Accepted containers: JSON (a list of rows, or ``{"data": [...]}``), JSONL, Parquet and ``datasets``
``save_to_disk`` folders (read with pyarrow, so ``datasets`` itself is optional). Accepted row forms:

- OpenAI: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- ShareGPT: ``{"conversations": [{"from": "human", "value": "..."}, ...]}`` (``gpt``/``human``/``system``)

Rows are checked strictly (role order, empty content, unknown fields), because a malformed row that is
silently repaired changes what the model is trained on. ``on_error="skip"`` drops bad rows instead and
reports how many were dropped and why.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fuselab.utils.boundary import read_text
from fuselab.utils.errors import ConfigError, FuselabError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# Fields a row may carry besides its messages (kept as metadata, never rendered).
METADATA_FIELDS = {"id", "domain", "source", "split", "task_id", "entry_point", "test", "prompt", "metadata"}
MESSAGE_FIELDS = {"role", "content", "name"}
SHAREGPT_MESSAGE_FIELDS = {"from", "value", "name"}


class DataError(FuselabError):
    """A conversation row or file is malformed."""


@dataclass(frozen=True)
class Conversation:
    """One validated conversation: alternating user/assistant turns, optionally after one system turn."""

    id: str
    messages: tuple[dict[str, str], ...]
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def fingerprint(self) -> str:
        blob = json.dumps([self.id, list(self.messages)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class LoadReport:
    """What loading did: rows read, kept and skipped (with reasons)."""

    rows: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"{self.kept} of {self.rows} conversations kept"
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            text += f"; skipped: {reasons}"
        return text


def load_conversations(
    paths: str | Path | Sequence[str | Path],
    *,
    on_error: Literal["error", "skip"] = "error",
    report: LoadReport | None = None,
) -> list[Conversation]:
    """Read and validate conversations from one or more files/folders, in order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError("no conversation files given")
    report = report if report is not None else LoadReport()
    out: list[Conversation] = []
    for path in paths:
        path = Path(path)
        for index, (line, row) in enumerate(_read_rows(path)):
            report.rows += 1
            where = f"{path} row {index + 1}"  # 1-based, as an editor counts
            if line is not None and line != index + 1:  # JSON Lines with blank lines: where to look
                where += f" (line {line})"
            try:
                conv = parse_row(row, default_id=f"{path.stem}/{index}", where=where)
            except DataError as err:
                if on_error == "error":
                    raise DataError(f"{err} (pass on_bad_rows: skip to drop such rows)") from None
                report.skipped[err.reason] += 1  # type: ignore[attr-defined]
                continue
            out.append(conv)
            report.kept += 1
    if not out:
        raise DataError(f"no usable conversations in {', '.join(map(str, paths))} ({report.summary()})")
    return out


def _row_error(where: str, reason: str, detail: str) -> DataError:
    err = DataError(f"{where}: {detail}")
    err.reason = reason  # type: ignore[attr-defined]
    return err


def parse_row(row: Any, *, default_id: str, where: str) -> Conversation:
    """Validate one row in OpenAI or ShareGPT form."""
    if not isinstance(row, dict):
        raise _row_error(where, "not an object", f"expected an object, got {type(row).__name__}")
    if "messages" in row and "conversations" in row:
        raise _row_error(where, "ambiguous form", "has both 'messages' and 'conversations'; keep one")
    if "messages" in row:
        key, msg_fields = "messages", MESSAGE_FIELDS
    elif "conversations" in row:
        key, msg_fields = "conversations", SHAREGPT_MESSAGE_FIELDS
    else:
        raise _row_error(
            where, "no messages", "has no 'messages' (OpenAI form) or 'conversations' (ShareGPT form)"
        )
    unknown = set(row) - {key} - METADATA_FIELDS
    if unknown:
        raise _row_error(
            where,
            "unknown fields",
            f"unknown fields {sorted(unknown)} (allowed besides {key!r}: {sorted(METADATA_FIELDS)})",
        )
    raw = row[key]
    if not isinstance(raw, list) or not raw:
        raise _row_error(where, "empty conversation", f"{key!r} must be a non-empty list of messages")
    messages: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _row_error(where, "bad message", f"message {i + 1} is not an object")
        extra = set(m) - msg_fields
        if extra:
            raise _row_error(
                where,
                "unknown fields",
                f"message {i + 1} has unknown fields {sorted(extra)} (allowed: {sorted(msg_fields)})",
            )
        if key == "messages":
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise _row_error(
                    where, "bad role", f"message {i + 1} has role {role!r}; expected one of {list(ROLES)}"
                )
        else:
            sender, content = m.get("from"), m.get("value")
            if sender not in SHAREGPT_ROLES:
                raise _row_error(
                    where,
                    "bad role",
                    f"message {i + 1} has from={sender!r}; expected one of {sorted(SHAREGPT_ROLES)}",
                )
            role = SHAREGPT_ROLES[sender]
        if not isinstance(content, str) or not content.strip():
            raise _row_error(
                where, "empty content", f"message {i + 1} ({role}) has empty or non-text content"
            )
        messages.append({"role": role, "content": content})
    _check_order(messages, where)
    conv_id = str(row.get("id", default_id))
    metadata = {k: v for k, v in row.items() if k in METADATA_FIELDS and k != "id"}
    return Conversation(id=conv_id, messages=tuple(messages), metadata=metadata)


def _check_order(messages: list[dict[str, str]], where: str) -> None:
    """system? (user assistant)+ : what every chat template and the assistant mask assume."""
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise _row_error(where, "no assistant turn", "has only a system message")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            offset = len(messages) - len(body)
            raise _row_error(
                where,
                "wrong role order",
                f"message {i + offset + 1} is {m['role']!r} where {expected!r} was expected "
                "(roles must be: optional system, then user/assistant alternating)",
            )
    if body[-1]["role"] != "assistant":
        raise _row_error(where, "no final assistant turn", "does not end with an assistant message")


# --------------------------------------------------------------------------------------------------------------
# Containers


def _read_rows(path: Path) -> Iterator[tuple[int | None, Any]]:
    """``(line, row)`` for each row of ``path``: the 1-based line of a JSON Lines row, else None."""
    if path.is_file() and path.suffix.lower() == ".jsonl":
        yield from _read_jsonl(path)
        return
    for row in _read_container(path):
        yield None, row


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {n}: not UTF-8 text ({err.reason}); save it as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {n}: not valid JSON ({err.msg})") from None


def _read_container(path: Path) -> Iterator[Any]:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        yield from _read_arrow_folder(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON ({err}); JSON Lines files need the .jsonl suffix"
            ) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of conversations (or {{'data': [...]}})")
        yield from data
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from _table_rows(pq.read_table(path))
    else:
        raise DataError(
            f"{path}: unknown data format {suffix!r}; use .json, .jsonl, .parquet or a datasets save_to_disk folder"
        )


def _read_arrow_folder(path: Path) -> Iterator[Any]:
    """A ``datasets`` ``save_to_disk`` folder (one split, or a DatasetDict whose 'train' split is used)."""
    import pyarrow as pa

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        split = "train" if "train" in splits else splits[0]
        yield from _read_arrow_folder(path / split)
        return
    state = path / "state.json"
    if not state.exists():
        raise DataError(
            f"{path} is a folder but not a datasets save_to_disk folder (no state.json or dataset_dict.json)"
        )
    files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
            yield from _table_rows(reader.read_all())


def _table_rows(table: Any) -> Iterable[Any]:
    return table.to_pylist()
