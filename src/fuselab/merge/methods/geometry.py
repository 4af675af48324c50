"""Inner products between tensors seen as vectors: the building block of the spherical methods.

SLERP, NuSLERP, Multi-SLERP and Model Stock only need, per vector, the Gram matrix G_jk = x_j · x_k of their K
inputs, and then return a linear combination Σ_k c_k x_k. A "vector" is the whole tensor (``all``), each row
(the last axis, ``rows``) or each column (the first axis, ``columns``). Both steps run in blocks: G is
accumulated in float64 from block-sized copies, and the combination is written into one output tensor, so
memory holds the inputs, the output and block-sized temporaries, never a stack of the inputs.
"""

from __future__ import annotations

from typing import Literal

import torch

from fuselab.merge.methods.masks import blocks, row_blocks

Axis = Literal["all", "rows", "columns"]


def as_matrix(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """A 2-D view: one row per vector for ``all`` / ``rows``; vectors along the first axis for ``columns``."""
    if axis == "all" or x.dim() < 2:
        return x.reshape(1, -1)
    if axis == "rows":
        return x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], -1)


def gram(tensors: list[torch.Tensor], axis: Axis) -> torch.Tensor:
    """float64 Gram matrices, shape [V, K, K] for V vectors per tensor (V = 1 for ``all``)."""
    k = len(tensors)
    device = tensors[0].device
    if axis == "all" or tensors[0].dim() < 2:  # one vector: accumulate over blocks of entries
        flat = [t.reshape(-1) for t in tensors]
        out = torch.zeros(1, k, k, dtype=torch.float64, device=device)
        for sl in blocks(flat[0].numel()):
            x = torch.stack([f[sl].double() for f in flat])
            out[0] += x @ x.T
        return out
    columns = axis == "columns"
    mats = [as_matrix(t, axis) for t in tensors]
    rows, cols = mats[0].shape
    out = torch.zeros(cols if columns else rows, k, k, dtype=torch.float64, device=device)
    for sl in row_blocks(mats[0]):
        x = torch.stack([m[sl].double() for m in mats])  # [K, b, C]
        if columns:
            out += torch.einsum("jbc,kbc->cjk", x, x)
        else:
            out[sl] = torch.einsum("jbc,kbc->bjk", x, x)
    return out


def combine(tensors: list[torch.Tensor], coeffs: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Σ_k c_k x_k per vector; ``coeffs`` has shape [V, K] (V as in :func:`gram`). float32 output."""
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    view = as_matrix(out, axis)
    c = coeffs.to(torch.float32)
    for k, t in enumerate(tensors):
        x = as_matrix(t, axis)
        if c.shape[0] == 1:
            view.add_(x, alpha=float(c[0, k]))
        elif axis == "columns":
            view.addcmul_(x, c[:, k].reshape(1, -1))
        else:
            view.addcmul_(x, c[:, k].reshape(-1, 1))
    return out


def cosines(g: torch.Tensor, floor: float, small_norm_as_one: bool = False) -> torch.Tensor:
    """cos θ_jk = G_jk / (‖x_j‖ ‖x_k‖), clamped to [−1, 1]; shape as ``g``.

    A norm below ``floor`` is replaced by ``floor`` (NuSLERP, Model Stock) or, with ``small_norm_as_one``, by 1
    (SLERP): either way a zero vector gets cosine 0 with everything instead of a division by zero.
    """
    norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    norms = torch.where(norms > floor, norms, 1.0) if small_norm_as_one else norms.clamp_min(floor)
    return (g / (norms.unsqueeze(-1) * norms.unsqueeze(-2))).clamp(-1.0, 1.0)
