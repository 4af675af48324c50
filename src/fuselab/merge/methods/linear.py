"""Linear merge ("model soups", Wortsman et al. 2022, arXiv 2203.05482).

W = Σ_k w_k W_k / Σ_k w_k (``normalize: true``, the default), or Σ_k w_k W_k. No base model is needed; the base,
if named, is an input only when it is listed under ``models``.
"""

from __future__ import annotations

import torch

from fuselab.merge.registry import Param, register_merge_method
from fuselab.utils.errors import ConfigError


@register_merge_method(
    "linear",
    inputs="weights",
    params=(
        Param("weight", float, per_model=True, help="coefficient of each model"),
        Param("normalize", bool, default=True, help="divide by the sum of weights"),
    ),
    reference="https://arxiv.org/abs/2203.05482",
    summary="weighted average of the models' weights",
)
def linear(tensors: list[torch.Tensor], *, weight: list[float], normalize: bool = True) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weight):
        out.add_(t, alpha=w)
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ConfigError("linear merge with normalize: the weights sum to zero; change the weights")
        out.div_(total)
    return out
