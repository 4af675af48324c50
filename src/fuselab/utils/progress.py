"""Progress bars for long work (tqdm on stderr). ``FUSELAB_PROGRESS=0`` turns them off."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("FUSELAB_PROGRESS", "1") not in ("0", "false", "no")


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
