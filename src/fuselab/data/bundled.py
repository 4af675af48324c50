"""Access to the conversation data bundled with fuselab (``src/fuselab/data/bundled/``).

Each row is ``{"id", "domain", "source", "messages": [{"role", "content"}, ...]}``; ``code`` rows also carry
``task_id``, ``entry_point`` and ``test`` (HumanEval's ``check(candidate)``). The files are package data,
read through :mod:`importlib.resources`, so they are available wherever fuselab is installed.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importlib.resources.abc is Python >= 3.11
    from importlib.resources.abc import Traversable

DOMAINS = ("chat", "code")
SPLITS = ("train", "heldout")


def _resource(name: str) -> Traversable:
    """The packaged file ``bundled/<name>``; FileNotFoundError listing the available files otherwise."""
    resource = files("fuselab.data").joinpath("bundled", name)
    if not resource.is_file():
        available = sorted(
            entry.name for entry in files("fuselab.data").joinpath("bundled").iterdir() if entry.is_file()
        )
        raise FileNotFoundError(f"no bundled data file {name!r}; available: {', '.join(available)}")
    return resource


def bundled_path(name: str) -> Path:
    """The file-system path of the bundled file ``name`` (e.g. ``"chat.train.jsonl"``, ``"README.md"``).

    Needs fuselab installed as ordinary files (a regular or editable install, not a zip); use
    :func:`load_bundled` to read the rows wherever fuselab is installed.
    """
    resource = _resource(name)
    if not isinstance(resource, Path):
        raise FileNotFoundError(
            f"bundled file {name!r} is not on the file system ({resource!r}); use load_bundled"
        )
    return resource


def load_bundled(domain: str, split: str) -> list[dict[str, Any]]:
    """The rows of ``{domain}.{split}.jsonl``; ``domain`` is ``chat`` or ``code``, ``split`` ``train`` or ``heldout``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    text = _resource(f"{domain}.{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
