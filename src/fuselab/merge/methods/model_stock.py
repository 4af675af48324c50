"""Model Stock (Jang et al. 2024, arXiv 2403.19522): how far to move from the base towards the average of the
fine-tunes, from the angle between their task vectors.

The paper observes that fine-tuned weights lie on a thin shell around a centre that performs better than any
of them, and that the angle θ between task vectors is nearly constant per layer. With N fine-tunes the point of
the segment [base, average] closest to that centre is at

    t = N cos θ / (1 + (N − 1) cos θ),   W = (1 − t)·W_base + t·mean_k W_k = W_base + t · mean_k δ_k,

where cos θ is the mean pairwise cosine of the δ_k. Identical (or colinear) fine-tunes give cos θ = 1, t = 1:
their average; orthogonal ones give t = 0: the base, since their average is mostly noise.

As in mergekit: cosines divide by max(‖δ_j‖ ‖δ_k‖, 1e-6); where the denominator 1 + (N − 1) cos θ is within 1e-6
of zero t is 0 (the base); ``filter_wise: true`` computes t per row (each output filter) instead of per tensor
(1-D tensors stay one vector). At least two fine-tunes are needed to measure an angle.
"""

from __future__ import annotations

import itertools

import torch

from fuselab.merge.methods.geometry import Axis, combine, gram
from fuselab.merge.registry import Param, register_merge_method

PRODUCT_FLOOR = 1e-6
SINGULAR = 1e-6


def stock_ratio(g: torch.Tensor) -> torch.Tensor:
    """t per vector from Gram matrices [V, N, N] of the task vectors (float64, shape [V])."""
    n = g.shape[-1]
    norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    pairs = list(itertools.combinations(range(n), 2))
    cos = torch.stack(
        [(g[:, j, k] / (norms[:, j] * norms[:, k]).clamp_min(PRODUCT_FLOOR)).clamp(-1, 1) for j, k in pairs]
    ).mean(0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


@register_merge_method(
    "model_stock",
    inputs="deltas",
    params=(Param("filter_wise", bool, default=False, help="one ratio per row instead of per tensor"),),
    reference="https://arxiv.org/abs/2403.19522",
    summary="base + t·mean task vector, t from the angle between the task vectors",
    min_models=2,
)
def model_stock(deltas: list[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    axis: Axis = "rows" if filter_wise else "all"
    t = stock_ratio(gram(deltas, axis))
    coeffs = (t / len(deltas)).unsqueeze(-1).expand(-1, len(deltas))
    return combine(deltas, coeffs, axis)
