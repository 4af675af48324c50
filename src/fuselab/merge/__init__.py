"""Parameter-space merging, streamed tensor by tensor.

Python API::

    from fuselab.merge import run_merge
    run_merge("configs/merge/demo-sce.yaml", "out/merged", device="cpu", force=True)

Methods are pure functions in :mod:`fuselab.merge.methods` (one file each); :func:`get_merge_method` returns
a registered method by name. Names are imported lazily, so that ``fuselab --help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MergeOptions": "fuselab.merge.engine",
    "MergeResult": "fuselab.merge.engine",
    "run_merge": "fuselab.merge.engine",
    "MergeRecipe": "fuselab.merge.recipe",
    "get_merge_method": "fuselab.merge.registry",
    "merge_method_names": "fuselab.merge.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fuselab.merge' has no attribute {name!r}")
