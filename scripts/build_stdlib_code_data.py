"""Build benchmark coding conversations from the Python standard library into ``benchmarks/data/``.

Run from the repository root::

    .venv/bin/python scripts/build_stdlib_code_data.py

It walks the standard library of the running interpreter (``sysconfig.get_paths()["stdlib"]``), reads
every ``.py`` file in sorted path order and parses it with ``ast``. Nothing is downloaded or installed.

Skipped files: anything under ``site-packages``, ``test`` or ``tests`` folders, ``test_*.py`` files, the
``idlelib``, ``lib2to3``, ``ensurepip``, ``turtledemo``, ``tkinter``, ``pydoc_data`` and ``__phello__``
packages, and files that cannot be decoded or parsed.

Selected functions: module-level ``def`` statements (``ast.FunctionDef`` directly in the module body; no
``async def``, no methods, nothing nested under ``if``/``try``) that

- have a public name (no leading underscore) and no decorators;
- have a docstring (``ast.get_docstring``) of at least 20 characters, and nothing else (not even a
  comment) after the docstring's closing quotes on its last line;
- have 3 to 40 source lines after the docstring's last line (blank and comment lines count);
- are at most 2000 characters from ``def`` to the end of the last line, all of it ASCII.

The function text is taken from the source lines as written (``lineno`` to ``end_lineno``). Each one
becomes a conversation in OpenAI ``messages`` form, like the bundled HumanEval rows
(``src/fuselab/data/bundled/code.*.jsonl``): the user asks, with the same request text
(``CODE_REQUEST``), to complete the function whose signature and docstring (the source up to and
including the docstring's last line) are given; the assistant answers with the full function in a
```python block. ``metadata.body_start``/``metadata.body_end`` are character offsets into the assistant
content: the body after the docstring is ``content[body_start:body_end]`` (``body_end`` is where the closing
fence starts). They live under ``metadata`` so that fuselab's conversation loader accepts the rows as they are.

Dedupe, in sorted path order: a function whose body after the docstring (whitespace-normalised) equals an
earlier one is dropped, as is one whose name is an ``entry_point`` of a bundled HumanEval row (train or
heldout), so that held-out HumanEval problems never appear in this training data; a second module-level
function of the same name in one module is dropped too (ids must be unique).

Split, by top-level package (``email``, ``json``, ``xml``, ... ; a top-level module is its own group) so
that near-copies within a package (``genericpath.exists`` / ``posixpath.lexists``, the ``email`` header
parsers) never straddle it: the sorted group names are shuffled with ``random.Random(SEED)`` and whole groups
are held out in that order until at least ``HELDOUT_ROWS`` rows are; the rest are train. Both files keep
the id order.

Also written: ``humaneval_bodies.json``, the same ``body_start``/``body_end`` offsets for every bundled
HumanEval row (the body is the canonical solution after the prompt), and ``README.md`` with the source,
licence, rules, counts and size statistics. Every row is checked: the body is not empty and the text
before ``body_start`` ends with the docstring's closing-quotes line. The output is deterministic for a
given interpreter: rerunning gives byte-identical files.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import random
import statistics
import sysconfig
import tokenize
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "benchmarks" / "data"
BUNDLED_DIR = REPO_ROOT / "src" / "fuselab" / "data" / "bundled"
BUNDLED_CODE_FILES = ("code.train.jsonl", "code.heldout.jsonl")

SEED = 20240817
HELDOUT_ROWS = 150

SKIP_DIRS = frozenset(
    {
        "site-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "ensurepip",
        "turtledemo",
        "tkinter",
        "pydoc_data",
        "__phello__",
    }
)
MIN_BODY_LINES = 3
MAX_BODY_LINES = 40
MAX_SOURCE_CHARS = 2000
MIN_DOCSTRING_CHARS = 20

# The same request text as scripts/build_bundled_data.py, so that both data sets look alike.
CODE_REQUEST = (
    "Complete the following Python function. Reply with the full function, including the signature "
    "and the docstring, in a single ```python code block.\n\n```python\n{prompt}```"
)
FENCE_OPEN = "```python\n"
FENCE_CLOSE = "```"

ROW_KEYS = ("id", "domain", "source", "messages", "entry_point", "metadata")


@dataclass
class BuildStats:
    """What was read and what was skipped, for the README."""

    files_read: int = 0
    files_unparsable: list[str] = field(default_factory=list)
    functions_seen: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    duplicate_bodies: list[str] = field(default_factory=list)
    humaneval_names: list[str] = field(default_factory=list)
    duplicate_ids: int = 0


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def interpreter_name() -> str:
    """E.g. ``CPython 3.11.7``."""
    return f"{platform.python_implementation()} {platform.python_version()}"


def stdlib_files(root: Path) -> list[Path]:
    """Every ``.py`` file under ``root`` that the skip rules keep, sorted by relative POSIX path."""
    kept: list[Path] = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        if path.is_file():
            kept.append(rel)
    return sorted(kept, key=lambda p: p.as_posix())


def module_name(rel: Path) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def read_module(path: Path) -> tuple[str, ast.Module] | None:
    """(source text with ``\\n`` newlines, tree), or None when it cannot be decoded or parsed."""
    try:
        with tokenize.open(path) as handle:
            source = handle.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    return source, tree


@dataclass
class Candidate:
    """One selected function, before dedupe."""

    module: str
    rel_path: str
    lineno: int
    name: str
    prompt: str
    source: str
    body: str


def select_function(
    node: ast.FunctionDef, lines: list[str], stats: BuildStats
) -> tuple[str, str, str] | None:
    """(prompt, full source, body) of a function that passes the selection rules, or None.

    ``lines`` are the module's lines without their newlines. ``prompt`` is the source up to and including
    the docstring's last line with a trailing newline; ``body`` is the rest (up to the last line, no
    trailing newline); ``source == prompt + body``.
    """
    reason = _reject_reason(node, lines)
    if reason is not None:
        stats.rejected[reason] += 1
        return None
    doc_end = node.body[0].end_lineno
    assert doc_end is not None and node.end_lineno is not None
    prompt = "\n".join(lines[node.lineno - 1 : doc_end]) + "\n"
    body = "\n".join(lines[doc_end : node.end_lineno])
    return prompt, prompt + body, body


def _reject_reason(node: ast.FunctionDef, lines: list[str]) -> str | None:
    """Why ``node`` fails the selection rules (a short README label), or None when it passes."""
    if node.name.startswith("_"):
        return "private name"
    if node.decorator_list:
        return "decorated"
    docstring = ast.get_docstring(node)
    if docstring is None:
        return "no docstring"
    if len(docstring) < MIN_DOCSTRING_CHARS:
        return f"docstring under {MIN_DOCSTRING_CHARS} characters"
    doc_node = node.body[0]
    assert doc_node.end_lineno is not None and doc_node.end_col_offset is not None
    assert node.end_lineno is not None
    source = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    if not source.isascii():
        return "not ASCII"
    # end_col_offset counts UTF-8 bytes, which equal characters on an ASCII line.
    if lines[doc_node.end_lineno - 1][doc_node.end_col_offset :].strip():
        return "text after the docstring on its line"
    body_lines = node.end_lineno - doc_node.end_lineno
    if not MIN_BODY_LINES <= body_lines <= MAX_BODY_LINES:
        return f"body not {MIN_BODY_LINES}-{MAX_BODY_LINES} lines"
    if len(source) > MAX_SOURCE_CHARS:
        return f"over {MAX_SOURCE_CHARS} characters"
    return None


def collect_candidates(root: Path, stats: BuildStats) -> list[Candidate]:
    """Every function of the kept stdlib files that passes the selection rules, in path/line order."""
    candidates: list[Candidate] = []
    for rel in stdlib_files(root):
        parsed = read_module(root / rel)
        if parsed is None:
            stats.files_unparsable.append(rel.as_posix())
            continue
        stats.files_read += 1
        source, tree = parsed
        lines = source.split("\n")
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            stats.functions_seen += 1
            selected = select_function(node, lines, stats)
            if selected is None:
                continue
            prompt, function_source, body = selected
            candidates.append(
                Candidate(
                    module=module_name(rel),
                    rel_path=rel.as_posix(),
                    lineno=node.lineno,
                    name=node.name,
                    prompt=prompt,
                    source=function_source,
                    body=body,
                )
            )
    return candidates


def humaneval_rows(bundled_dir: Path) -> list[dict[str, Any]]:
    """The bundled HumanEval rows, train then heldout, in file order."""
    rows: list[dict[str, Any]] = []
    for name in BUNDLED_CODE_FILES:
        with (bundled_dir / name).open(encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return rows


def dedupe(candidates: list[Candidate], banned_names: set[str], stats: BuildStats) -> list[Candidate]:
    """Drop HumanEval entry-point names, repeated bodies (whitespace-normalised) and repeated ids."""
    kept: list[Candidate] = []
    seen_bodies: dict[str, str] = {}
    seen_ids: set[str] = set()
    for candidate in candidates:
        if candidate.name in banned_names:
            stats.humaneval_names.append(f"{candidate.module}.{candidate.name}")
            continue
        normalised = " ".join(candidate.body.split())
        if normalised in seen_bodies:
            stats.duplicate_bodies.append(
                f"{candidate.module}.{candidate.name} (= {seen_bodies[normalised]})"
            )
            continue
        row_id = f"stdlib/{candidate.module}/{candidate.name}"
        if row_id in seen_ids:
            stats.duplicate_ids += 1
            continue
        seen_bodies[normalised] = f"{candidate.module}.{candidate.name}"
        seen_ids.add(row_id)
        kept.append(candidate)
    return kept


def check_body(row_id: str, content: str, body_start: int, body_end: int) -> None:
    """Raise unless the body is non-empty and the text before it ends with the docstring's closing line."""
    if not 0 < body_start < body_end <= len(content) or not content[body_start:body_end].strip():
        raise ValueError(f"{row_id}: empty body ({body_start}, {body_end})")
    if content[body_end:] != FENCE_CLOSE:
        raise ValueError(f"{row_id}: body_end is not where the closing fence starts")
    before = content[:body_start]
    if not before.endswith("\n"):
        raise ValueError(f"{row_id}: body does not start a line")
    last_line = before[:-1].rsplit("\n", 1)[-1].rstrip()
    if not last_line.endswith(('"""', "'''", '"', "'")):
        raise ValueError(f"{row_id}: the line before the body does not end with the docstring's quotes")


def stdlib_row(candidate: Candidate, interpreter: str) -> dict[str, Any]:
    """One conversation row; keys in ``ROW_KEYS`` order."""
    content = f"{FENCE_OPEN}{candidate.source}\n{FENCE_CLOSE}"
    body_start = len(FENCE_OPEN) + len(candidate.prompt)
    body_end = len(content) - len(FENCE_CLOSE)
    row_id = f"stdlib/{candidate.module}/{candidate.name}"
    check_body(row_id, content, body_start, body_end)
    row = {
        "id": row_id,
        "domain": "code",
        "source": f"{interpreter} stdlib Lib/{candidate.rel_path}:{candidate.lineno}",
        "messages": [
            {"role": "user", "content": CODE_REQUEST.format(prompt=candidate.prompt)},
            {"role": "assistant", "content": content},
        ],
        "entry_point": candidate.name,
        "metadata": {"body_start": body_start, "body_end": body_end},
    }
    assert tuple(row) == ROW_KEYS
    return row


def humaneval_bodies(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{task id: {"body_start", "body_end"}} for the bundled HumanEval rows, in task-number order."""
    request_head, request_tail = CODE_REQUEST.split("{prompt}")
    bodies: dict[str, dict[str, int]] = {}
    for row in sorted(rows, key=lambda r: int(r["id"].rsplit("/", 1)[1])):
        user, assistant = (message["content"] for message in row["messages"])
        if not (user.startswith(request_head) and user.endswith(request_tail)):
            raise ValueError(f"{row['id']}: user message is not CODE_REQUEST")
        prompt = user[len(request_head) : len(user) - len(request_tail)]
        if not assistant.startswith(FENCE_OPEN + prompt):
            raise ValueError(f"{row['id']}: assistant reply does not start with the prompt")
        body_start = len(FENCE_OPEN) + len(prompt)
        body_end = len(assistant) - len(FENCE_CLOSE)
        check_body(row["id"], assistant, body_start, body_end)
        bodies[row["id"]] = {"body_start": body_start, "body_end": body_end}
    return bodies


def split_rows(rows: list[dict[str, Any]], heldout_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout) by top-level package: whole groups, in a seeded shuffle of the sorted group names, are
    held out until at least ``heldout_rows`` rows are. Both parts are in id order."""
    ordered = sorted(rows, key=lambda row: row["id"])
    ids = [row["id"] for row in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError("row ids are not unique")

    def group(row: dict[str, Any]) -> str:
        return row["id"].split("/")[1].split(".")[0]

    names = sorted({group(row) for row in ordered})
    random.Random(seed).shuffle(names)
    sizes = {name: sum(1 for row in ordered if group(row) == name) for name in names}
    held: set[str] = set()
    count = 0
    for name in names:
        if count >= heldout_rows:
            break
        held.add(name)
        count += sizes[name]
    train = [row for row in ordered if group(row) not in held]
    heldout = [row for row in ordered if group(row) in held]
    return train, heldout


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One compact JSON object per line, UTF-8, ``\\n`` line endings."""
    text = "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8", newline="\n")


def size_stats(rows: list[dict[str, Any]]) -> tuple[float, float, float, float]:
    """(mean, median) characters of the assistant reply, then (mean, median) of the body."""
    replies = [len(row["messages"][1]["content"]) for row in rows]
    bodies = [row["metadata"]["body_end"] - row["metadata"]["body_start"] for row in rows]
    return (
        statistics.fmean(replies),
        statistics.median(replies),
        statistics.fmean(bodies),
        statistics.median(bodies),
    )


def readme_text(
    files: dict[str, list[dict[str, Any]]],
    humaneval: list[dict[str, Any]],
    bodies: dict[str, dict[str, int]],
    stats: BuildStats,
    interpreter: str,
    candidates: int,
) -> str:
    """The README.md written next to the data files."""
    groups = {f"`{name}.jsonl`": rows for name, rows in files.items()}
    groups["both stdlib files"] = [row for rows in files.values() for row in rows]
    groups["bundled HumanEval (train + heldout)"] = [
        {**row, "metadata": bodies[row["id"]]} for row in humaneval
    ]
    stat_lines = []
    for label, rows in groups.items():
        reply_mean, reply_median, body_mean, body_median = size_stats(rows)
        stat_lines.append(
            f"| {label} | {len(rows)} | {reply_mean:.0f} | {reply_median:.0f} | {body_mean:.0f} | {body_median:.0f} |"
        )
    table = "\n".join(stat_lines)
    rejected = ", ".join(f"{reason} {count}" for reason, count in sorted(stats.rejected.items()))
    unparsable = ", ".join(f"`{name}`" for name in stats.files_unparsable) or "none"
    humaneval_names = ", ".join(f"`{name}`" for name in stats.humaneval_names) or "none"
    duplicate_bodies = ", ".join(f"`{name}`" for name in stats.duplicate_bodies) or "none"
    skip_dirs = ", ".join(f"`{name}`" for name in sorted(SKIP_DIRS))
    return f"""# Benchmark coding data from the Python standard library

Module-level functions of the {interpreter} standard library, as coding conversations in OpenAI `messages`
form (one JSON object per line), in the same shape as the bundled HumanEval rows
(`src/fuselab/data/bundled/code.*.jsonl`). Generated; do not edit by hand.

Rebuilt with (the output depends on the interpreter; these files came from {interpreter}):

```bash
.venv/bin/python scripts/build_stdlib_code_data.py
```

## Source and licence

The `.py` files of the {interpreter} standard library (`sysconfig.get_paths()["stdlib"]`, shown as
`Lib/...` in `source`), © Python Software Foundation, under the PSF License Agreement (Python Software
Foundation License Version 2). The function text is copied as written, docstrings and comments included.

## Files

| File | What |
|---|---|
| `stdlib_code.train.jsonl` | training rows |
| `stdlib_code.heldout.jsonl` | held-out rows |
| `humaneval_bodies.json` | `{{task id: {{"body_start", "body_end"}}}}` for the {len(bodies)} bundled HumanEval rows |

Row keys: `id` (`stdlib/<dotted module>/<function name>`), `domain` (`"code"`), `source`
(`{interpreter} stdlib Lib/<path>:<line of def>`), `messages` (user, assistant), `entry_point` (the function
name), `metadata` (`body_start`, `body_end`). The user message is the request text of the bundled HumanEval rows with the
function's signature and docstring (the source up to and including the docstring's last line) in a
```` ```python ```` block; the assistant reply is ```` ```python\\n ```` + the full function + ```` \\n``` ````
(the HumanEval rows end the same way). `assistant_content[body_start:body_end]` is the function body after
the docstring (from the start of the line after the docstring's closing quotes to the end of the function's
last line, the newline before the closing fence included); `body_end` is where the closing fence starts. For
HumanEval, `humaneval_bodies.json` gives the same offsets into the bundled assistant content: the body is
the canonical solution after the prompt. A scorer can thus score only function bodies in both data sets.

## Selection rules

Files: every `.py` file, in sorted path order, except

- files in a folder named one of {skip_dirs} (at any depth);
- `test_*.py` files;
- files that cannot be decoded or parsed with `ast`: {unparsable}.

{stats.files_read} files were parsed; they hold {stats.functions_seen} module-level `def` statements.

A function is kept when it is an `ast.FunctionDef` directly in the module body (no `async def`, no methods,
nothing nested in `if`/`try` blocks) and:

- its name is public (no leading underscore) and it has no decorators;
- it has a docstring (`ast.get_docstring`) of at least {MIN_DOCSTRING_CHARS} characters, with nothing
  (not even a comment) after the closing quotes on the docstring's last line;
- {MIN_BODY_LINES} to {MAX_BODY_LINES} source lines follow the docstring's last line (blank and comment
  lines count);
- the source from `def` to the end of its last line is at most {MAX_SOURCE_CHARS} characters and ASCII.

{candidates} functions passed. Rejected, each under the first rule it fails (in the order private name,
decorated, no docstring, short docstring, not ASCII, text after the docstring, body lines, size):
{rejected}.

Near-duplicates are not removed: the stdlib has families of similar functions (`bz2`/`lzma`, `ntpath`/
`posixpath`, the `fileinput` and `pickletools` helpers, `traceback.format_*`/`print_*`), and members of one
family can land on both sides of the split.

## Dedupe

In sorted path order, dropped:

- {len(stats.humaneval_names)} functions whose name is an `entry_point` of a bundled HumanEval row (train or
  heldout), so that held-out HumanEval problems never appear in this training data: {humaneval_names};
- {len(stats.duplicate_bodies)} functions whose body after the docstring, whitespace-normalised
  (`" ".join(body.split())`), equals an earlier one: {duplicate_bodies};
- {stats.duplicate_ids} functions that repeat a function name within one module (ids are unique).

## Split rule

By top-level package (a top-level module is its own group), so that near-copies inside a package never
straddle the split: the sorted group names are shuffled with `random.Random({SEED})` and whole groups are held
out in that order until at least {HELDOUT_ROWS} rows are; the rest are train. Both files are in id order.
Train and held-out ids, and their packages, are disjoint.

## Rows and sizes

Characters (not tokens) of the assistant reply and of the body (`body_end - body_start`):

| Rows of | Rows | Reply mean | Reply median | Body mean | Body median |
|---|---|---|---|---|---|
{table}
"""


def build(out_dir: Path, root: Path, bundled_dir: Path) -> dict[str, int]:
    """Read, select, dedupe, split and write everything into ``out_dir``; returns the row counts."""
    stats = BuildStats()
    interpreter = interpreter_name()
    humaneval = humaneval_rows(bundled_dir)
    bodies = humaneval_bodies(humaneval)
    banned = {row["entry_point"] for row in humaneval}
    candidates = collect_candidates(root, stats)
    kept = dedupe(candidates, banned, stats)
    rows = [stdlib_row(candidate, interpreter) for candidate in kept]
    train, heldout = split_rows(rows, HELDOUT_ROWS, SEED)
    files = {"stdlib_code.train": train, "stdlib_code.heldout": heldout}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, file_rows in files.items():
        write_jsonl(out_dir / f"{name}.jsonl", file_rows)
    (out_dir / "humaneval_bodies.json").write_text(
        json.dumps(bodies, indent=1) + "\n", encoding="utf-8", newline="\n"
    )
    readme = readme_text(files, humaneval, bodies, stats, interpreter, len(candidates))
    (out_dir / "README.md").write_text(readme, encoding="utf-8", newline="\n")
    return {name: len(file_rows) for name, file_rows in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"default: {OUT_DIR}")
    parser.add_argument("--bundled-dir", type=Path, default=BUNDLED_DIR, help=f"default: {BUNDLED_DIR}")
    args = parser.parse_args(argv)
    counts = build(args.out_dir, stdlib_root(), args.bundled_dir)
    for name, count in counts.items():
        path = args.out_dir / f"{name}.jsonl"
        print(f"{path}: {count} rows, {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
