"""SCE: Select, Calculate, Erase (FuseChat-2, Wan et al. 2024, arXiv 2408.07990).

For the task vectors δ_k of one tensor (K targets fused from one pivot):

1. **Select**: σ² = Var_k(δ_k) per entry (population variance); keep the ``s = int(τ · #{σ² > 0})`` entries of
   largest variance, τ = ``select_topk`` (mask M). Entries where the targets disagree most carry what
   each fusion taught.
2. **Calculate**: η_k = ||δ_k ⊙ M||² / numel, normalised to sum 1 (uniform when all are zero).
3. **Erase**: elect the sign of Σ_k δ_k per entry (magnitude-weighted, as in TIES); drop the δ_k that disagree.
4. **Merge**: δ* = Σ_k η_k·1[agree]·δ̃_k / Σ_k η_k·1[agree] (0 where nothing agrees); W = W_base + δ*.

What δ̃_k is differs between the two published implementations (spec fusechat.md §6.2), so it is explicit:

- ``select_applies_to: deltas`` (default; upstream mergekit ``sce``): δ̃_k = δ_k ⊙ M, and the election runs on
  the masked deltas; entries outside the selection keep the base value.
- ``select_applies_to: weights`` (the FuseChat release's fork): M only shapes η; the election and the merge
  use the full δ_k, so selection sparsifies nothing.

Differences from mergekit's code, all at its numerical edges: η is computed in float64 and falls back to
uniform only when every masked delta is exactly zero (mergekit: when Σ e_k < 1e-6, which for typical
fine-tuning deltas of ~1e-3 silently turns the weights uniform); the final division is guarded by "no
agreeing delta" rather than clamping the denominator at 1e-6.
"""

from __future__ import annotations

import torch

from fuselab.merge.methods.masks import blocks, topk_mask, weighted_consensus_mean
from fuselab.merge.methods.ties import CONSENSUS, INT8_MASK
from fuselab.merge.registry import Param, register_merge_method


def variance_mask(deltas: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """SCE's selection mask: the ``select_topk`` fraction of non-zero-variance entries with largest variance."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    k = len(deltas)
    flat = [d.reshape(-1) for d in deltas]
    var = torch.empty_like(deltas[0])
    var_flat = var.view(-1)
    for sl in blocks(var.numel()):  # population variance, block by block (two-pass, no cancellation)
        mean = sum(f[sl] for f in flat) / k
        var_flat[sl] = sum((f[sl] - mean).square_() for f in flat) / k
    s = int(int(torch.count_nonzero(var)) * select_topk)
    return topk_mask(var, s)


def mean_square(t: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """mean((t ⊙ mask)²) over all entries of ``t``, without a squared copy."""
    kept = t if mask is None else t[mask]
    return float(torch.linalg.vector_norm(kept)) ** 2 / max(t.numel(), 1)


@register_merge_method(
    "sce",
    inputs="deltas",
    params=(
        Param(
            "select_topk",
            float,
            default=1.0,
            minimum=0.0,
            maximum=1.0,
            help="fraction τ of entries selected by variance",
        ),
        Param(
            "select_applies_to",
            str,
            default="deltas",
            choices=("deltas", "weights"),
            help="deltas: mergekit (mask sparsifies the deltas); weights: FuseChat release (mask only sets η)",
        ),
        CONSENSUS,
        INT8_MASK,
    ),
    reference="https://arxiv.org/abs/2408.07990",
    summary="FuseChat's select (by variance), calculate (weights), erase (sign conflicts)",
)
def sce(
    deltas: list[torch.Tensor],
    *,
    select_topk: float = 1.0,
    select_applies_to: str = "deltas",
    consensus: str = "sum",
    int8_mask: bool = False,
) -> torch.Tensor:
    mask = variance_mask(deltas, select_topk) if select_topk < 1 else None
    energy = torch.tensor([mean_square(d, mask) for d in deltas], dtype=torch.float64)
    total = float(energy.sum())
    eta = (energy / total).tolist() if total > 0 else [1.0 / len(deltas)] * len(deltas)
    keep = [mask] * len(deltas) if (mask is not None and select_applies_to == "deltas") else None
    return weighted_consensus_mean(
        deltas,
        eta,
        consensus,
        normalize=True,
        keep=keep,
        vote_weights=[1.0] * len(deltas),  # type: ignore[arg-type]
    )
