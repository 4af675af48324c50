"""Passthrough: copy one model's tensors, optionally scaled; with ``slices``, stack layers of several models.

With ``slices`` a recipe builds a model from layer ranges of its inputs ("frankenmerges"), the way depth
up-scaling builds a deeper model from two copies of one (Kim et al. 2023, SOLAR, arXiv 2312.15166: layers
0–23 and 8–31 of a 32-layer model stacked into 48). Each slice has exactly one source, whose tensors are copied
unchanged; the engine renumbers the layers and writes the new layer count into the config. ``scale`` (per
model, optional) multiplies the tensors it applies to, e.g. ``scale: [{filter: o_proj, value: 0.0}, {value:
1.0}]`` to make duplicated layers start as identities, as mergekit allows.
"""

from __future__ import annotations

import torch

from fuselab.merge.registry import Param, register_merge_method


@register_merge_method(
    "passthrough",
    inputs="weights",
    params=(Param("scale", float, default=None, per_model=True, help="multiply the tensor by this"),),
    reference="https://arxiv.org/abs/2312.15166",
    summary="copy the one input (per slice) unchanged or scaled; slices stack layers of several models",
    max_models=1,
)
def passthrough(tensors: list[torch.Tensor], *, scale: list[float | None]) -> torch.Tensor:
    factor = scale[0]
    return tensors[0] if factor is None else tensors[0] * factor
