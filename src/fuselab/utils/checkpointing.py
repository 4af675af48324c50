"""When the Trainer writes checkpoints: by wall time beside transformers' step count, and never on the last
step.

Why: a checkpoint of a model trained with Adam holds the weights, the gradients' two moments and the RNG
states: 12 bytes per parameter in float32, 1.6 GB for SmolLM2-135M. ``save_steps`` picks the cadence in steps,
but what a user wants to bound is the *time* an interruption can cost, and the right step count depends on the
hardware. On a 2-core AMD EPYC (Zen 4, float32) the demo's 19-step trainings took 58-68 s with a checkpoint
every 8 steps plus transformers' final one (three per training) and 47-49 s with none (benchmarks/RESULTS.md,
"Checkpoints and the training stage"): about 4-6 s per checkpoint. ``save_minutes`` saves when that much training time
has passed since the last checkpoint, so a short training writes none and a long one loses at most that much.

transformers 5 also writes a checkpoint after the last step whenever ``save_strategy`` is ``steps``; fuselab
writes the finished model right after it and deletes the checkpoints, so that one is 1.6 GB written for
nothing, in every training. :class:`CheckpointPolicy` cancels it.

Every process of a distributed run must agree on whether to save (saving under FSDP or DeepSpeed is
collective): rank 0's clock decides and is broadcast to the others at each step.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


class CheckpointPolicy(TrainerCallback):
    """No checkpoint on the last step (the finished model is written right after it), and, with ``minutes``,
    a checkpoint when that much training time passed since the last one (or the start).

    Runs after transformers' DefaultFlowCallback, which sets ``should_save`` by step count. ``clock`` is
    injectable for tests."""

    def __init__(self, minutes: float | None = None, clock: Any = time.monotonic) -> None:
        if minutes is not None and not minutes > 0:
            raise ValueError(f"save_minutes must be positive, got {minutes}")
        self.seconds = None if minutes is None else minutes * 60.0
        self.clock = clock
        self.last = clock()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last = self.clock()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = False  # the same on every rank: the step count is
            return
        if self.seconds is not None and _agree(self.clock() - self.last >= self.seconds, args):
            control.should_save = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last = self.clock()  # a step-count checkpoint resets the clock too


def _agree(due: bool, args: Any) -> bool:
    """Rank 0's decision, on every rank (a no-op in one process)."""
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return due
    flag = torch.tensor([1 if due else 0], dtype=torch.int32, device=args.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
