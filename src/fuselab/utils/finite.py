"""NaN/inf weights, named as such (issue 16).

A model with a NaN in one weight gives NaN logits, and the checks downstream of the forward then blamed the
architecture (extraction's LM-head check suggested ``backend: vllm``, prune's exactness probe refused the block
layout). :func:`nonfinite_weights_error` finds the tensor, so that the message says what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fuselab.utils.errors import NonFiniteError


def first_nonfinite(model: Any) -> tuple[str, int, int] | None:
    """``(name, NaN/inf count, size)`` of the first floating-point parameter of ``model`` that holds NaN or
    ±inf, or None. One reduction per tensor (a sum is finite exactly when every entry is, barring overflow of
    the sum, which then takes the exact count)."""
    import torch

    for name, t in model.named_parameters():
        if not t.is_floating_point():
            continue
        with torch.no_grad():
            if bool(torch.isfinite(t.sum())):
                continue
            bad = sum(int((~torch.isfinite(c)).sum()) for c in t.detach().reshape(-1).split(1 << 20))
        if bad:
            return name, bad, t.numel()
    return None


def nonfinite_weights_error(model: Any, where: str | Path) -> NonFiniteError | None:
    """The error naming the first NaN/inf weight of ``model`` (loaded from ``where``), or None when every
    weight is finite."""
    found = first_nonfinite(model)
    if found is None:
        return None
    name, bad, size = found
    return NonFiniteError(
        f"model {where} has NaN/inf in tensor `{name}` ({bad} of {size} values): the checkpoint itself is "
        "damaged (a diverged training run or a merge of such inputs writes these), not unsupported; use an "
        "earlier checkpoint of it, or re-download or re-export the model"
    )


def check_finite_weights(model: Any, where: str | Path) -> None:
    """Raise :class:`NonFiniteError` naming the tensor when a weight of ``model`` holds NaN or inf."""
    err = nonfinite_weights_error(model, where)
    if err is not None:
        raise err
