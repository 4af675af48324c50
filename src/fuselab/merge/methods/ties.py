"""TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint merge.

1. Trim: keep the ``density`` fraction of each δ_k with the largest magnitude.
2. Elect: per entry, the sign of Σ_k w_k δ̂_k (``consensus: sum``, TIES and mergekit) or of the majority
   count (``consensus: count``).
3. Merge: δ* = λ · Σ_k w_k 1[agree] δ̂_k / Σ_k w_k 1[agree] (the division when ``normalize``, the default).

``rescale: true`` multiplies each trimmed delta by ‖δ_k‖₁ / ‖δ̂_k‖₁, as mergekit does (not in the paper).
"""

from __future__ import annotations

import torch

from fuselab.merge.methods.masks import magnitude_mask
from fuselab.merge.methods.task_arithmetic import SCALE, WEIGHT, merge_task_vectors
from fuselab.merge.registry import Param, register_merge_method


def l1_rescale(delta: torch.Tensor, keep: torch.Tensor | None) -> float:
    """‖δ‖₁ / ‖δ ⊙ keep‖₁: the factor that restores a trimmed delta's L1 norm (mergekit's ``rescale``)."""
    if keep is None:
        return 1.0
    total = float(torch.linalg.vector_norm(delta, 1))
    kept = float(torch.linalg.vector_norm(delta[keep], 1))
    return total / kept if kept > 1e-7 and total > 1e-7 else 1.0


def l1_scales(
    deltas: list[torch.Tensor], keep: list[torch.Tensor | None], rescale: bool
) -> list[float] | None:
    """:func:`l1_rescale` of every masked delta when ``rescale``, else None (no rescaling)."""
    return [l1_rescale(d, m) for d, m in zip(deltas, keep)] if rescale else None


DENSITY = Param("density", float, default=1.0, per_model=True, minimum=0.0, maximum=1.0, help="fraction kept")
CONSENSUS = Param("consensus", str, default="sum", choices=("sum", "count"), help="how the sign is elected")
INT8_MASK = Param(
    "int8_mask", bool, default=False, help="accepted for mergekit recipes; masks are 1 byte here"
)


@register_merge_method(
    "ties",
    inputs="deltas",
    params=(
        WEIGHT,
        DENSITY,
        Param("normalize", bool, default=True, help="divide by the weights of agreeing deltas"),
        SCALE,
        CONSENSUS,
        Param(
            "rescale", bool, default=False, help="scale each trimmed delta back to its L1 norm (as mergekit)"
        ),
        INT8_MASK,
    ),
    reference="https://arxiv.org/abs/2306.01708",
    summary="trim small deltas, elect a sign per entry, average the agreeing deltas",
)
def ties(
    deltas: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    normalize: bool = True,
    lambda_: float = 1.0,
    consensus: str = "sum",
    rescale: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    keep = [None if p >= 1 else magnitude_mask(d, p) for d, p in zip(deltas, density)]
    scales = l1_scales(deltas, keep, rescale)
    return merge_task_vectors(
        deltas, weight, keep, scales, normalize=normalize, lambda_=lambda_, consensus=consensus
    )
