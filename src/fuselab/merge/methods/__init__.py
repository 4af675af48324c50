"""Built-in merge methods; importing this package registers them.

One file per method (or family): ``linear.py``, ``task_arithmetic.py``, ``ties.py``, ``dare.py``, ``sce.py``,
``varm.py``, ``slerp.py`` (SLERP, NuSLERP), ``multislerp.py``, ``model_stock.py``, ``breadcrumbs.py``,
``della.py``, ``passthrough.py``; shared building blocks live in ``masks.py`` (magnitude and random masks, sign
consensus) and ``geometry.py`` (Gram matrices and linear combinations of whole tensors, rows or columns).
"""

from fuselab.merge.methods import (  # noqa: F401
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    multislerp,
    passthrough,
    sce,
    slerp,
    task_arithmetic,
    ties,
    varm,
)
