"""DARE: drop and rescale (Yu et al. 2023, arXiv 2311.03099), combined linearly or with TIES' sign election.

Each entry of δ_k is kept with probability ``density`` and, with ``rescale`` (default), divided by
``density`` so that the expected task vector is unchanged (the paper's rescaling; mergekit ≥ 0.1 instead
matches the L1 norm of the kept entries, which agrees in expectation). The random masks come from a
generator the engine seeds per tensor from the recipe's ``seed``, so a merge is reproducible.
"""

from __future__ import annotations

import torch

from fuselab.merge.methods.masks import bernoulli_mask
from fuselab.merge.methods.task_arithmetic import SCALE, WEIGHT, merge_task_vectors
from fuselab.merge.methods.ties import CONSENSUS, DENSITY, INT8_MASK
from fuselab.merge.registry import Param, register_merge_method

RESCALE = Param("rescale", bool, default=True, help="divide kept entries by density")


def drop_masks(
    deltas: list[torch.Tensor], density: list[float], rescale: bool, generator: torch.Generator | None
) -> tuple[list[torch.Tensor | None], list[float]]:
    """DARE's random keep-masks (None: keep all) and the rescaling factor of each delta."""
    keep = [None if p >= 1 else bernoulli_mask(d, p, generator) for d, p in zip(deltas, density)]
    scales = [1.0 / p if rescale and 0 < p < 1 else 1.0 for p in density]
    return keep, scales


@register_merge_method(
    "dare_linear",
    inputs="deltas",
    params=(WEIGHT, DENSITY, Param("normalize", bool, default=False), SCALE, RESCALE),
    reference="https://arxiv.org/abs/2311.03099",
    summary="randomly drop delta entries, rescale, and add the weighted task vectors",
    random=True,
)
def dare_linear(
    deltas: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    keep, scales = drop_masks(deltas, density, rescale, generator)
    return merge_task_vectors(deltas, weight, keep, scales, normalize=normalize, lambda_=lambda_)


@register_merge_method(
    "dare_ties",
    inputs="deltas",
    params=(WEIGHT, DENSITY, Param("normalize", bool, default=False), SCALE, RESCALE, CONSENSUS, INT8_MASK),
    reference="https://arxiv.org/abs/2311.03099",
    summary="randomly drop delta entries, rescale, then TIES sign election and disjoint merge",
    random=True,
)
def dare_ties(
    deltas: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = True,
    consensus: str = "sum",
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    keep, scales = drop_masks(deltas, density, rescale, generator)
    return merge_task_vectors(
        deltas, weight, keep, scales, normalize=normalize, lambda_=lambda_, consensus=consensus
    )
