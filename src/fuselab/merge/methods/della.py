"""DELLA (Deep et al. 2024, arXiv 2406.11617): drop task-vector entries at random, larger ones less often.

DARE drops every entry with the same probability. DELLA's MagPrune ranks the entries of each row of δ_k by
magnitude and keeps them with probabilities spread linearly over [density − ε, density + ε]: the smallest
entry of a row with density − ε, the largest with density + ε, the mean keep rate still ``density``. Large
changes carry most of what a fine-tune learnt, so they survive more often, while the random drop keeps the
interference-reducing effect of DARE. Per row of n entries, rank r = 0 … n − 1 by |δ| (ties: lower index
first):

    p_keep(r) = density − ε + 2ε · r / (n − 1)          (a row of one entry: density).

Rows are the second axis, as in mergekit (a 1-D tensor is one row). The kept deltas are rescaled (``rescale``,
default true) so that each keeps its L1 norm, as mergekit does; the paper divides each kept entry by its own
p_keep instead, which agrees in expectation for the whole tensor but not entry by entry. ``della`` then merges
with TIES' sign election and disjoint mean (``normalize`` true), ``della_linear`` adds them (``normalize``
false). ``density: 1`` keeps everything; density ± ε must lie inside (0, 1).

The masks come from a generator the engine seeds per tensor from the recipe's ``seed`` (drawn row block by
row block, in model order), so a merge is reproducible whatever the processing order.
"""

from __future__ import annotations

from typing import Any

import torch

from fuselab.merge.methods.masks import row_blocks
from fuselab.merge.methods.task_arithmetic import SCALE, WEIGHT, merge_task_vectors
from fuselab.merge.methods.ties import CONSENSUS, DENSITY, INT8_MASK, l1_scales
from fuselab.merge.registry import Param, register_merge_method

EPSILON = Param(
    "epsilon",
    float,
    default=0.15,
    per_model=True,
    minimum=0.0,
    maximum=1.0,
    help="keep probabilities run from density − ε (smallest entry of a row) to density + ε (largest)",
)
RESCALE = Param("rescale", bool, default=True, help="scale each pruned delta back to its L1 norm")


def _as_rows(delta: torch.Tensor) -> torch.Tensor:
    """The rows MagPrune ranks within: the second axis runs along each row."""
    if delta.dim() < 2:
        return delta.reshape(1, -1)
    return delta.movedim(1, -1).reshape(-1, delta.shape[1])


def _from_rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() < 2:
        return mask.reshape(like.shape)
    return mask.reshape(like.movedim(1, -1).shape).movedim(-1, 1)


def magnitude_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row, 0 for the smallest (ties: lower index first), as float32.

    Non-negative float32 values order like their bit patterns, so one sort of the int64 keys
    ``bits << s | column`` orders each row by magnitude and then by index, and its low bits say where each
    sorted entry came from; on the CPU numpy's vectorised sort of those keys is about twice as fast as a
    stable ``argsort``.
    """
    rows, n = magnitudes.shape
    shift = max(1, (n - 1).bit_length())
    column = torch.arange(n, device=magnitudes.device)
    keys = magnitudes.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    keys.mul_(1 << shift).add_(column)
    if keys.device.type == "cpu":
        keys.numpy().sort(axis=1)
    else:
        keys = torch.sort(keys, dim=1).values
    origin = keys.bitwise_and_((1 << shift) - 1)
    ranks = torch.empty((rows, n), dtype=torch.float32, device=magnitudes.device)
    return ranks.scatter_(1, origin, column.to(torch.float32).expand(rows, n))


def keep_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p_keep of each entry of a block of rows (float32, same shape), from its magnitude rank in its row."""
    n = magnitudes.shape[1]
    if n == 1:
        return torch.full_like(magnitudes, density, dtype=torch.float32)
    return magnitude_ranks(magnitudes).mul_(2 * epsilon / (n - 1)).add_(density - epsilon)


def magprune_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None
) -> torch.Tensor | None:
    """DELLA's random keep-mask of one task vector (None: keep everything)."""
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    rows = _as_rows(delta)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=delta.device)
    for sl in row_blocks(rows):
        probs = keep_probabilities(rows[sl].abs(), density, epsilon)
        keep[sl] = torch.rand(probs.shape, generator=generator, device=delta.device) < probs
    return _from_rows(keep, delta)


def check_epsilon(kwargs: dict[str, Any], labels: list[str]) -> str | None:
    """density ± epsilon must stay inside (0, 1) wherever MagPrune runs (0 < density < 1)."""
    for label, p, e in zip(labels, kwargs["density"], kwargs["epsilon"]):
        if 0 < p < 1 and (p + e >= 1 or p - e <= 0):
            return (
                f"{label}: density ± epsilon must lie inside (0, 1), got density {p:g} and epsilon {e:g}; "
                f"set `epsilon` below {min(p, 1 - p):g}"
            )
    return None


def della_masks(
    deltas: list[torch.Tensor],
    density: list[float],
    epsilon: list[float],
    rescale: bool,
    generator: torch.Generator | None,
) -> tuple[list[torch.Tensor | None], list[float] | None]:
    keep = [magprune_mask(d, p, e, generator) for d, p, e in zip(deltas, density, epsilon)]
    return keep, l1_scales(deltas, keep, rescale)


@register_merge_method(
    "della",
    inputs="deltas",
    params=(
        WEIGHT,
        DENSITY,
        EPSILON,
        Param("normalize", bool, default=True, help="divide by the weights of agreeing deltas"),
        SCALE,
        RESCALE,
        CONSENSUS,
        INT8_MASK,
    ),
    reference="https://arxiv.org/abs/2406.11617",
    summary="drop delta entries with magnitude-ranked probabilities, rescale, then TIES sign election",
    random=True,
    check=check_epsilon,
)
def della(
    deltas: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: bool = True,
    consensus: str = "sum",
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    keep, scales = della_masks(deltas, density, epsilon, rescale, generator)
    return merge_task_vectors(
        deltas, weight, keep, scales, normalize=normalize, lambda_=lambda_, consensus=consensus
    )


@register_merge_method(
    "della_linear",
    inputs="deltas",
    params=(
        WEIGHT,
        DENSITY,
        EPSILON,
        Param("normalize", bool, default=False, help="divide by the sum of weights"),
        SCALE,
        RESCALE,
        INT8_MASK,
    ),
    reference="https://arxiv.org/abs/2406.11617",
    summary="drop delta entries with magnitude-ranked probabilities, rescale, and add the task vectors",
    random=True,
    check=check_epsilon,
)
def della_linear(
    deltas: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = True,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    keep, scales = della_masks(deltas, density, epsilon, rescale, generator)
    return merge_task_vectors(deltas, weight, keep, scales, normalize=normalize, lambda_=lambda_)
