"""Multi-SLERP: a weighted spherical mean of several models (mergekit's ``multislerp``; Goddard,
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; spherical averages: Buss & Fillmore 2001,
https://doi.org/10.1145/502122.502124).

SLERP generalised to K models: the direction of the result is the weighted mean of the unit vectors
x̂_k = x_k / (‖x_k‖ + ε), renormalised, and its length the weighted mean of the norms:

    m = Σ_k w_k x̂_k,   result = (Σ_k w_k ‖x_k‖) · m / ‖m‖        (w normalised to sum 1 by default).

With a base, x_k are the task vectors and the base is added back. mergekit also projects each x̂_k onto the
tangent space at m̂ and maps the weighted tangent sum back with the exponential map; that sum is Σ_k w_k
(x̂_k − (x̂_k·m̂) m̂) = m − (m·m̂) m̂ = 0 identically, so the map returns m̂ (up to rounding) and it is not
computed here. Everything is done from the Gram matrix of the inputs (float64), without stacking them.

Limits: one model is returned unchanged; where the unit vectors cancel (‖m‖ < ε) two models fall back to
Σ w_k x_k and more than two are an error, as in mergekit.
"""

from __future__ import annotations

import torch

from fuselab.merge.methods.geometry import combine, gram
from fuselab.merge.methods.task_arithmetic import WEIGHT
from fuselab.merge.registry import Param, register_merge_method
from fuselab.utils.errors import ConfigError


@register_merge_method(
    "multislerp",
    inputs="deltas_if_base",
    params=(
        WEIGHT,
        Param("normalize_weights", bool, default=True, help="divide the weights by their sum"),
        Param("eps", float, default=1e-8, minimum=0.0, help="added to norms before dividing by them"),
    ),
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    summary="weighted spherical mean of the models (or of their task vectors) on the hypersphere",
)
def multislerp(
    tensors: list[torch.Tensor], *, weight: list[float], normalize_weights: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    w = torch.tensor(weight, dtype=torch.float64)
    if normalize_weights:
        total = float(w.sum())
        if total == 0:
            raise ConfigError(
                "multislerp with normalize_weights: the weights sum to zero; change the weights"
            )
        w = w / total
    g = gram(tensors, "all")[0]
    norms = torch.diagonal(g).clamp_min(0).sqrt()
    alpha = w / (norms + eps)  # m = Σ alpha_k x_k
    mean_norm = float(alpha @ g @ alpha) ** 0.5
    if mean_norm < eps:
        if len(tensors) == 2:
            return combine(tensors, w.reshape(1, -1), "all")
        raise ConfigError(
            "multislerp: the weighted unit vectors cancel out (antipodal models with balancing weights); "
            "change the weights"
        )
    scale = float(w @ norms) / mean_norm
    return combine(tensors, (alpha * scale).reshape(1, -1), "all")
