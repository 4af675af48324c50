"""Built-in merge methods; importing this package registers them.

One file per method: ``linear.py``, ``task_arithmetic.py``, ``ties.py``, ``dare.py``, ``sce.py``, ``varm.py``;
shared building blocks (magnitude and random masks, sign consensus) live in ``masks.py``.
"""

from fuselab.merge.methods import dare, linear, sce, task_arithmetic, ties, varm  # noqa: F401
