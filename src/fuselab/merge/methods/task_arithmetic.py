"""Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089).

δ* = λ · Σ_k w_k δ_k (divided by Σ_k w_k when ``normalize``); W = W_base + δ*.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fuselab.merge.methods.masks import weighted_consensus_mean
from fuselab.merge.registry import Param, register_merge_method

SCALE = Param("lambda", float, default=1.0, help="scale of the merged task vector")
WEIGHT = Param("weight", float, per_model=True, help="coefficient of each task vector")


@register_merge_method(
    "task_arithmetic",
    inputs="deltas",
    params=(WEIGHT, Param("normalize", bool, default=False, help="divide by the sum of weights"), SCALE),
    reference="https://arxiv.org/abs/2212.04089",
    summary="base + λ·Σ w_k·(W_k − base)",
)
def task_arithmetic(
    deltas: list[torch.Tensor], *, weight: list[float], normalize: bool = False, lambda_: float = 1.0
) -> torch.Tensor:
    return weighted_sum(deltas, weight, normalize, lambda_)


def weighted_sum(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool,
    lambda_: float,
    keep: Sequence[torch.Tensor | None] | None = None,
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """λ · Σ_k w_k·scale_k·(δ_k ⊙ keep_k), divided by Σ_k w_k when ``normalize`` (unless that sum is ~0)."""
    out = torch.zeros_like(deltas[0])
    for k, (d, w) in enumerate(zip(deltas, weights)):
        m = None if keep is None else keep[k]
        out.add_(d if m is None else torch.where(m, d, 0.0), alpha=w * (1.0 if scales is None else scales[k]))
    if normalize:
        total = sum(weights)
        out.div_(total if abs(total) >= 1e-8 else 1.0)
    if lambda_ != 1.0:
        out.mul_(lambda_)
    return out


def merge_task_vectors(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    keep: Sequence[torch.Tensor | None] | None = None,
    scales: Sequence[float] | None = None,
    *,
    normalize: bool,
    lambda_: float,
    consensus: str | None = None,
) -> torch.Tensor:
    """The merge step the sparsifying task-vector methods share (TIES, DARE, breadcrumbs, DELLA; mergekit's
    "generalized task arithmetic"): with a ``consensus`` method, TIES' sign election and disjoint mean of the
    masked, rescaled deltas; without, their weighted sum."""
    if consensus is None:
        return weighted_sum(deltas, weights, normalize, lambda_, keep, scales)
    return weighted_consensus_mean(
        deltas,
        weights,
        consensus,  # type: ignore[arg-type]
        normalize,
        keep,
        scales,
        lambda_=lambda_,
    )
