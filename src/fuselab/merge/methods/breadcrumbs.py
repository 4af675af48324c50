"""Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795): sparsify each task vector from both ends.

TIES keeps the largest entries of each δ_k. Breadcrumbs argues that the very largest ones are outliers, a few
weights that one fine-tune moved far and that dominate (and damage) the merge, while the smallest are noise;
so it drops both: the ``gamma`` fraction of largest |δ| and enough of the smallest to keep a ``density``
fraction. Per model, with n entries (as mergekit computes it):

    keep = int(density · n),  top = min(int(gamma · n), n − keep);  the entries ranked top … top + keep − 1.

``breadcrumbs`` then adds the masked deltas like task arithmetic (W_b + λ Σ w_k δ̂_k, ``normalize`` divides by
Σ w_k); ``breadcrumbs_ties`` merges them with TIES' sign election and disjoint mean. ``density: 1`` disables the
masking altogether (``gamma`` included), ``gamma: 0`` is TIES' top-k trim. ``rescale: true`` scales each masked
delta back to its L1 norm. Ties in |δ| at a threshold are broken towards the lower index, so masks are
deterministic (mergekit: whatever its unstable sort returns).
"""

from __future__ import annotations

import torch

from fuselab.merge.methods.masks import magnitude_band_mask
from fuselab.merge.methods.task_arithmetic import SCALE, WEIGHT, merge_task_vectors
from fuselab.merge.methods.ties import CONSENSUS, DENSITY, INT8_MASK, l1_scales
from fuselab.merge.registry import Param, register_merge_method

GAMMA = Param(
    "gamma",
    float,
    default=0.01,
    per_model=True,
    minimum=0.0,
    maximum=1.0,
    help="fraction of the largest-magnitude entries dropped as outliers",
)
NORMALIZE = Param("normalize", bool, default=False, help="divide by the sum of weights")
RESCALE = Param("rescale", bool, default=False, help="scale each masked delta back to its L1 norm")


def breadcrumb_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """The mask of one task vector (None: keep everything, as for ``density >= 1``)."""
    if density >= 1:
        return None
    n = delta.numel()
    keep = int(density * n) if density > 0 else 0
    top = min(int(gamma * n), n - keep)
    return magnitude_band_mask(delta, top, keep)


def breadcrumb_masks(
    deltas: list[torch.Tensor], density: list[float], gamma: list[float], rescale: bool
) -> tuple[list[torch.Tensor | None], list[float] | None]:
    keep = [breadcrumb_mask(d, p, g) for d, p, g in zip(deltas, density, gamma)]
    return keep, l1_scales(deltas, keep, rescale)


@register_merge_method(
    "breadcrumbs",
    inputs="deltas",
    params=(WEIGHT, DENSITY, GAMMA, NORMALIZE, SCALE, RESCALE, INT8_MASK),
    reference="https://arxiv.org/abs/2312.06795",
    summary="drop the largest (gamma) and smallest entries of each task vector, then add them",
)
def breadcrumbs(
    deltas: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    keep, scales = breadcrumb_masks(deltas, density, gamma, rescale)
    return merge_task_vectors(deltas, weight, keep, scales, normalize=normalize, lambda_=lambda_)


@register_merge_method(
    "breadcrumbs_ties",
    inputs="deltas",
    params=(WEIGHT, DENSITY, GAMMA, NORMALIZE, SCALE, RESCALE, CONSENSUS, INT8_MASK),
    reference="https://arxiv.org/abs/2312.06795",
    summary="breadcrumbs' two-sided sparsification, then TIES sign election and disjoint merge",
)
def breadcrumbs_ties(
    deltas: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
    consensus: str = "sum",
    int8_mask: bool = False,
) -> torch.Tensor:
    keep, scales = breadcrumb_masks(deltas, density, gamma, rescale)
    return merge_task_vectors(
        deltas, weight, keep, scales, normalize=normalize, lambda_=lambda_, consensus=consensus
    )
