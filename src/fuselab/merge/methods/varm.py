"""VaRM: variation-ratio merge (FuseChat-1, Wan et al. 2024, arXiv 2402.16107).

Each fused target k moved away from the pivot (base) by δ_k. VaRM weights the targets, per parameter matrix,
by how much each one changed it: Δ_k = mean(δ_k²), w_k = Δ_k / Σ_j Δ_j, and W = Σ_k w_k W_k = W_base + Σ_k w_k δ_k.
A matrix that one fusion changed much and the other barely is taken mostly from the first.

Granularities:
- ``matrix`` (default; the paper's): one weight per target and tensor.
- ``layer``: Δ_k is the mean squared change over all tensors of a decoder layer (needs a first pass over the
  model, done by the engine); tensors outside the layers use their own matrix-level Δ.
- ``element``: w_k = δ_k² / Σ_j δ_j² per entry.

Where every Δ is zero the weights are uniform (the merged delta is then zero anyway). The released scripts
read one analysis file for every model and compare target against target, which degenerates to a uniform
average (spec fusechat.md §6.1); here each target's variation is measured against the base.
"""

from __future__ import annotations

import torch

from fuselab.merge.parameters import layer_index
from fuselab.merge.registry import GroupStatistic, Param, register_merge_method


def _squared_change(deltas: list[torch.Tensor]) -> torch.Tensor:
    """[Σ δ_1², …, Σ δ_K², numel] in float64: the per-group statistic for ``granularity: layer``."""
    sums = [float(torch.linalg.vector_norm(d)) ** 2 for d in deltas]
    return torch.tensor([*sums, float(deltas[0].numel())], dtype=torch.float64)


def _layer_group(name: str) -> str:
    i = layer_index(name)
    return f"layer:{i}" if i is not None else f"tensor:{name}"


def ratio_weights(variation: torch.Tensor) -> list[float]:
    total = float(variation.sum())
    if total <= 0:
        return [1.0 / variation.numel()] * variation.numel()
    return (variation / total).tolist()


@register_merge_method(
    "varm",
    inputs="deltas",
    params=(
        Param(
            "granularity",
            str,
            default="matrix",
            choices=("matrix", "layer", "element"),
            help="unit over which the variation ratio is measured",
        ),
    ),
    reference="https://arxiv.org/abs/2402.16107",
    summary="weights each target by its share of the total squared change, per matrix, layer or element",
    group_statistic=GroupStatistic(
        needed=lambda params: params.get("granularity") == "layer",
        group_of=_layer_group,
        compute=_squared_change,
    ),
)
def varm(
    deltas: list[torch.Tensor], *, granularity: str = "matrix", group_stat: torch.Tensor | None = None
) -> torch.Tensor:
    if granularity == "element":
        den = torch.zeros_like(deltas[0])
        for d in deltas:
            den.add_(d.square())
        safe = torch.where(den > 0, den, torch.ones_like(den))
        out = torch.zeros_like(deltas[0])
        for d in deltas:
            out.add_(d * d.square() / safe)
        return out
    if granularity == "layer":
        if group_stat is None:
            raise ValueError("varm with granularity 'layer' needs the per-layer statistic (group_stat)")
        variation = group_stat[:-1] / group_stat[-1]
    else:
        variation = _squared_change(deltas)
        variation = variation[:-1] / variation[-1]
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, ratio_weights(variation)):
        out.add_(d, alpha=w)
    return out
