"""Progress bars for long work (tqdm on stderr). ``FUSELAB_PROGRESS=0`` turns them off."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("FUSELAB_PROGRESS", "1") not in ("0", "false", "no")


def silence_other_bars() -> None:
    """With ``FUSELAB_PROGRESS=0``, also the bars fuselab does not draw itself: transformers' checkpoint
    loading and the Hub's downloads (``HF_HUB_DISABLE_PROGRESS_BARS``), the Trainer's and any other tqdm
    (``TQDM_DISABLE``, tqdm's own default). The CLI calls it before any library is imported."""
    if not progress_enabled():
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar; ``FUSELAB_PROGRESS=0`` wins over a caller's ``disable=False`` (e.g. ``--no-progress``
    not given), so the variable silences every bar."""
    from tqdm.auto import tqdm  # imported here: tqdm reads TQDM_DISABLE once, when it is first imported

    kwargs["disable"] = bool(kwargs.get("disable", False)) or not progress_enabled()
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
