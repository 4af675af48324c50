"""Loader of fuselab's bundled lm-eval tasks: JSON Lines files next to this file, read without the hub.

lm-eval calls ``custom_dataset`` with the task's ``dataset_kwargs`` (and ``metadata``); ``data_files`` maps a
split name to a file name relative to this folder, so the task works wherever fuselab is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def local_jsonl(data_files: dict[str, str] | None = None, **_: Any) -> dict[str, Any]:
    import datasets

    if not data_files:
        raise ValueError("dataset_kwargs.data_files must map split names to .jsonl files in " + str(HERE))
    out = {}
    for split, name in data_files.items():
        lines = (HERE / name).read_text(encoding="utf-8").splitlines()
        out[split] = datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])
    return out
