"""The progressive α schedule of WRPO (spec §3).

The reference code ramps α linearly from 0 to α_final over the optimiser updates of training, reading the
number of *completed* updates (``trainer.state.global_step``), so α is constant inside a gradient-accumulation
window. It derives the number of updates T from ``num_train_epochs`` only and ignores ``max_steps``; here T
is always the trainer's real total (``trainer.state.max_steps``, which the transformers Trainer computes from
the sharded dataloader, accumulation and ``max_steps``), so a run capped by ``max_steps`` still reaches its
intended α.

Kinds:

- ``linear`` (paper): α(step) = α_final · step / T, clipped to [0, α_final]. Like the reference, the last
  update uses step T−1 and so never quite reaches α_final; ``reach_final=True`` uses T−1 as the denominator
  so that the last update does.
- ``cosine``: α_final · (1 − cos(π·p))/2 with the same progress p; a smooth variant for ablations.
- ``constant``: α_final throughout (the paper's "static α" ablation; α = 0 / 1 give DPO on (y_wt, y_l) /
  (y_ws, y_l)).
"""

from __future__ import annotations

import math
from typing import Literal

AlphaKind = Literal["linear", "cosine", "constant"]
ALPHA_KINDS: tuple[str, ...] = ("linear", "cosine", "constant")


def alpha_at(
    step: int, total_steps: int, alpha_final: float, kind: AlphaKind = "linear", reach_final: bool = False
) -> float:
    """α for the update that follows ``step`` completed optimiser updates out of ``total_steps``."""
    if kind not in ALPHA_KINDS:
        raise ValueError(f"unknown alpha schedule {kind!r}; valid: {', '.join(ALPHA_KINDS)}")
    if kind == "constant":
        return float(alpha_final)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    denom = max(total_steps - 1, 1) if reach_final else total_steps
    progress = min(max(step / denom, 0.0), 1.0)
    if kind == "linear":
        return float(alpha_final * progress)
    return float(alpha_final * (1.0 - math.cos(math.pi * progress)) / 2.0)
