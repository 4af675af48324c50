"""Building blocks shared by the task-vector methods: sparsification masks and sign consensus.

Memory is the constraint here (a 128k-vocabulary embedding is hundreds of MB per copy): thresholds are found by
in-place selection, masks are stored as booleans rather than as masked copies, and element-wise work runs in
blocks so its temporaries stay small whatever the tensor size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

Consensus = Literal["sum", "count"]
BLOCK = 1 << 20  # entries per block of element-wise work


def blocks(numel: int, block: int = BLOCK) -> list[slice]:
    return [slice(i, min(i + block, numel)) for i in range(0, numel, block)]


def row_blocks(matrix: torch.Tensor, block: int = BLOCK) -> list[slice]:
    """Slices of whole rows of a 2-D tensor, about ``block`` entries each."""
    per = max(1, block // max(matrix.shape[1], 1))
    return [slice(i, min(i + per, matrix.shape[0])) for i in range(0, matrix.shape[0], per)]


def _kth_largest_inplace(work: torch.Tensor, k: int) -> float:
    """The k-th largest value of ``work`` (1-based); ``work`` is a scratch copy and gets reordered.

    On the CPU this is an in-place introselect (numpy ``partition``): O(n) and no extra memory, where
    ``torch.kthvalue`` copies the values plus an int64 index array (3x the tensor) and runs slower.
    """
    n = work.numel()
    if work.device.type == "cpu":
        a = work.numpy()
        a.partition(n - k)
        return float(a[n - k])
    return float(torch.kthvalue(work, n - k + 1).values)


def _mask_from_threshold(
    flat: torch.Tensor, threshold: float, k: int, transform: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Mask of the k entries above ``threshold``, filled up with entries equal to it in index order."""
    mask = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
    for sl in blocks(flat.numel()):
        v = flat[sl] if transform is None else transform(flat[sl])
        mask[sl] = v > threshold
    missing = k - int(torch.count_nonzero(mask))
    for sl in blocks(flat.numel()):
        if missing <= 0:
            break
        v = flat[sl] if transform is None else transform(flat[sl])
        ties = torch.nonzero(v == threshold).squeeze(1)[:missing]
        mask[ties + sl.start] = True
        missing -= ties.numel()
    return mask


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``score`` (ties towards the lower flat index)."""
    n = score.numel()
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    flat = score.reshape(-1)
    threshold = _kth_largest_inplace(flat.clone(), k)
    return _mask_from_threshold(flat, threshold, k, None).reshape(score.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the ``k = max(1, int(density * numel))`` entries of largest ``|delta|``.

    TIES-Merging's "trim" step (Yadav et al. 2023, arXiv 2306.01708). ``density >= 1`` keeps everything and
    ``density <= 0`` nothing. Ties at the threshold are broken towards the lower flat index, so the mask is
    deterministic. The threshold is found by selection (O(n)), not by sorting (mergekit's ``argsort``).
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    flat = delta.reshape(-1)
    threshold = _kth_largest_inplace(flat.abs(), k)
    return _mask_from_threshold(flat, threshold, k, torch.abs).reshape(delta.shape)


def magnitude_band_mask(delta: torch.Tensor, skip: int, keep: int) -> torch.Tensor:
    """Boolean mask of the entries ranked ``skip`` … ``skip + keep − 1`` by descending ``|delta|``.

    The ranking is the one :func:`magnitude_mask` uses (ties towards the lower flat index), so ``skip = 0`` is
    the top-``keep`` mask. Model Breadcrumbs' step: drop the ``skip`` largest entries (outliers) and everything
    below the band. Both thresholds come from one scratch copy of ``|delta|`` by selection.
    """
    n = delta.numel()
    hi = min(n, skip + keep)
    if hi <= skip:
        return torch.zeros_like(delta, dtype=torch.bool)
    flat = delta.reshape(-1)
    work = flat.abs()

    def top(k: int) -> torch.Tensor:
        if k >= n:
            return torch.ones(n, dtype=torch.bool, device=delta.device)
        return _mask_from_threshold(flat, _kth_largest_inplace(work, k), k, torch.abs)

    mask = top(hi)
    if skip > 0:
        mask &= ~top(skip)
    return mask.reshape(delta.shape)


def bernoulli_mask(
    like: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boolean mask keeping each entry independently with probability ``density`` (DARE's drop step)."""
    if density >= 1:
        return torch.ones_like(like, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(like, dtype=torch.bool)
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    return u < density


def _kept(delta: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return delta if keep is None else torch.where(keep, delta, 0.0)


def majority_sign(
    deltas: Sequence[torch.Tensor],
    method: Consensus = "sum",
    weights: Sequence[float] | None = None,
    keep: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Elected sign per entry as a boolean tensor: True for +, False for − (TIES "elect"; + on a tie).

    The vote is over the weighted, kept deltas w_k·(δ_k ⊙ keep_k) (``weights`` and ``keep`` default to 1).
    ``sum``: the sign of their sum, a magnitude-weighted majority (TIES and mergekit). ``count``: the sign held
    by more of them (zeros do not vote). Masks are applied on the fly, so no masked copy is kept.
    """
    acc = torch.zeros_like(deltas[0])
    for k, d in enumerate(deltas):
        w = 1.0 if weights is None else float(weights[k])
        dk = _kept(d, None if keep is None else keep[k])
        if method == "sum":
            acc.add_(dk, alpha=w)
        else:
            acc.add_(torch.sign(dk), alpha=(w > 0) - (w < 0))
    return acc >= 0


def agrees(delta: torch.Tensor, positive: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Entries where w·δ has the elected sign (``positive``: True for +); zeros never agree."""
    if weight == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    up, down = (delta > 0, delta < 0) if weight > 0 else (delta < 0, delta > 0)
    return torch.where(positive, up, down)


def weighted_consensus_mean(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: Consensus = "sum",
    normalize: bool = True,
    keep: Sequence[torch.Tensor | None] | None = None,
    scales: Sequence[float] | None = None,
    vote_weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """TIES "disjoint merge": λ·Σ_k w_k·1[agree_k]·δ̂_k, divided by Σ_k w_k·1[agree_k] when ``normalize``.

    δ̂_k = scale_k·(δ_k ⊙ keep_k): the trimmed (TIES) or dropped-and-rescaled (DARE) delta; ``keep`` holds
    boolean masks (None: keep all), ``scales`` default to 1. The sign is elected on v_k·δ̂_k with
    ``vote_weights`` v (default: the weights w, as mergekit does for TIES; SCE votes unweighted). Where no delta
    agrees the merged delta is 0.

    Everything here is element-wise once the masks are known, so it runs block by block: besides the output,
    memory holds only block-sized temporaries, whatever the tensor size and the number of inputs.
    """
    n = len(deltas)
    scales = [1.0] * n if scales is None else list(scales)
    votes = list(weights) if vote_weights is None else list(vote_weights)
    vote_scale = [v * s for v, s in zip(votes, scales)]
    flat = [d.reshape(-1) for d in deltas]
    kept = [None] * n if keep is None else [None if m is None else m.reshape(-1) for m in keep]
    out = torch.empty_like(deltas[0])
    out_flat = out.view(-1)
    for sl in blocks(out.numel()):
        ds = [f[sl] if m is None else torch.where(m[sl], f[sl], 0.0) for f, m in zip(flat, kept)]
        positive = majority_sign(ds, method, vote_scale)
        num = torch.zeros_like(ds[0])
        den = torch.zeros_like(ds[0]) if normalize else None
        for k, dk in enumerate(ds):
            agree = agrees(dk, positive, float(votes[k])).to(dk.dtype)
            num.addcmul_(dk, agree, value=float(weights[k]) * scales[k])
            if den is not None:
                den.add_(agree, alpha=float(weights[k]))
        if den is not None:
            den[den == 0] = 1.0
            num.div_(den)
        out_flat[sl] = num
    if lambda_ != 1.0:
        out.mul_(lambda_)
    return out
