"""Summed response log-probs of a batch built by :class:`fuselab.wrpo.data.WRPOCollator`.

One forward over all rows (cheaper than three under FSDP/ZeRO, as in the reference code). The language-model
head runs only from the first position any row needs (``logits_to_keep``): prompt positions before it never
reach the vocabulary projection, which is the largest activation for small models with big vocabularies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fuselab.wrpo.data import COLUMN_NAMES
from fuselab.wrpo.loss import sequence_logps


def _first_needed_position(completion_mask: torch.Tensor) -> int:
    """Index of the first logit any row needs: one before the earliest completion token."""
    has = completion_mask.any(dim=1)
    if not bool(has.all()):
        raise ValueError("a row of the batch has no completion token (an empty response after truncation?)")
    first = int(completion_mask.float().argmax(dim=1).min().item())
    return max(first - 1, 0)


def forward_logps(
    model: Any, batch: dict[str, torch.Tensor], columns: Sequence[str] = COLUMN_NAMES
) -> torch.Tensor:
    """[B, 3] summed log-probs (columns ws, wt, l); columns not in ``columns`` are zeros."""
    input_ids = batch["input_ids"]
    completion = batch["completion_mask"]
    offset = _first_needed_position(completion)
    keep = input_ids.shape[1] - offset
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": batch["attention_mask"],
        "use_cache": False,
    }
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model class without logits_to_keep: full logits, same numbers
        logits = model(**kwargs).logits
        offset = 0
    if logits.shape[1] != input_ids.shape[1] - offset:  # the model ignored logits_to_keep
        offset = input_ids.shape[1] - logits.shape[1]
    logps = sequence_logps(logits, input_ids, completion, offset=offset)
    b = logps.shape[0] // len(columns)
    out = logps.new_zeros((b, 3))
    for k, c in enumerate(columns):
        out[:, COLUMN_NAMES.index(c)] = logps[k * b : (k + 1) * b]
    return out
