"""SLERP and NuSLERP: spherical linear interpolation between two models (Shoemake 1985,
https://doi.org/10.1145/325165.325242).

Two fine-tunes of one base point in nearly the same direction but not quite. Moving along the straight line
between them (linear interpolation) passes closer to the origin than either end, so the merged weights come
out with a smaller norm than both inputs; moving along the arc between them keeps the norm profile:

    slerp(t; a, b) = sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b,   cos θ = a·b / (‖a‖ ‖b‖).

``t = 0`` gives ``a`` and ``t = 1`` gives ``b``. Where the two are (anti)parallel, sin θ → 0 and the formula is
0/0, so both methods fall back to ``(1 − t)·a + t·b``, which it tends to.

- ``slerp`` (mergekit's): ``a`` is the base model, which must be one of the two models; each tensor is one
  vector; the linear fallback is taken when |cos θ| > 0.9995, and a norm below 1e-8 counts as 1.
- ``nuslerp``: the two models given by ``weight`` (t = w_2 / (w_1 + w_2), 0.5 when the weights sum to ~0);
  with a base it interpolates the task vectors and adds the base back; ``nuslerp_flatten: false`` treats each
  row (or, with ``nuslerp_row_wise: true``, each column) as its own vector. The linear fallback is taken only
  where sin²θ ≤ 1e-16, norms are floored at 1e-7.

Cosines are computed in float64 from float32 inputs (mergekit: float32), so a tensor whose cosine lies within
rounding of 0.9995 may take the other branch; both branches agree to O(θ²) there.
"""

from __future__ import annotations

import torch

from fuselab.merge.methods.geometry import Axis, combine, cosines, gram
from fuselab.merge.methods.task_arithmetic import WEIGHT
from fuselab.merge.registry import Param, register_merge_method

DOT_THRESHOLD = 0.9995  # SLERP: |cos θ| above this interpolates linearly
SLERP_NORM_EPS = 1e-8
NUSLERP_NORM_EPS = 1e-7
NUSLERP_COLINEAR = 1e-16  # sin²θ at or below this interpolates linearly


def slerp_coefficients(t: float, cos: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """[V, 2] coefficients of (a, b) for each of V vectors; ``linear`` marks where to interpolate linearly."""
    theta = torch.acos(torch.where(linear, 0.0, cos))
    sin_theta = torch.where(linear, 1.0, torch.sin(theta))
    ca = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return torch.stack([ca, cb], dim=-1)


@register_merge_method(
    "slerp",
    inputs="base_and_weights",
    params=(Param("t", float, help="0 keeps the base, 1 the other model"),),
    reference="https://doi.org/10.1145/325165.325242",
    summary="spherical interpolation from the base (t = 0) to the other model (t = 1)",
    min_models=1,
    max_models=1,
)
def slerp(tensors: list[torch.Tensor], *, base: torch.Tensor, t: float) -> torch.Tensor:
    pair = [base, tensors[0]]
    cos = cosines(gram(pair, "all"), SLERP_NORM_EPS, small_norm_as_one=True)[:, 0, 1]
    return combine(pair, slerp_coefficients(t, cos, cos.abs() > DOT_THRESHOLD), "all")


@register_merge_method(
    "nuslerp",
    inputs="deltas_if_base",
    params=(
        WEIGHT,
        Param("nuslerp_row_wise", bool, default=False, help="one vector per column instead of per row"),
        Param("nuslerp_flatten", bool, default=True, help="the whole tensor is one vector"),
    ),
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp",
    summary="spherical interpolation of two models (or of their task vectors), t from the weights",
    min_models=2,
    max_models=2,
)
def nuslerp(
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    axis: Axis = "all" if nuslerp_flatten else ("columns" if nuslerp_row_wise else "rows")
    cos = cosines(gram(tensors, axis), NUSLERP_NORM_EPS)[:, 0, 1]
    return combine(tensors, slerp_coefficients(t, cos, (1 - cos.square()) <= NUSLERP_COLINEAR), axis)
