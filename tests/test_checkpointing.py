"""When checkpoints are written (``fuselab.utils.checkpointing``): by wall time with ``save_minutes``, never on
the last step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fuselab.utils.checkpointing import CheckpointPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _step(cb: CheckpointPolicy, step: int, max_steps: int = 10, asked: bool = False) -> bool:
    """Whether the Trainer saves after ``step``; ``asked``: transformers' step count asked for a save."""
    control = SimpleNamespace(should_save=asked)
    cb.on_step_end(
        SimpleNamespace(device="cpu"), SimpleNamespace(global_step=step, max_steps=max_steps), control
    )
    return control.should_save


def test_a_checkpoint_when_the_minutes_have_passed_and_not_before():
    clock = Clock()
    cb = CheckpointPolicy(2.0, clock=clock)
    clock.now = 100.0  # the model loaded: the clock starts with training, not with the callback
    cb.on_train_begin(None, None, None)
    clock.now = 100.0 + 119.0
    assert not _step(cb, 1)
    clock.now = 100.0 + 120.0
    assert _step(cb, 2)
    cb.on_save(None, None, None)  # the Trainer saved: the next one is two minutes later
    clock.now += 60.0
    assert not _step(cb, 3)
    clock.now += 61.0
    assert _step(cb, 4)
    # the last step writes no checkpoint: the finished model follows it
    assert not _step(cb, 10)


def test_a_step_count_checkpoint_resets_the_clock():
    clock = Clock()
    cb = CheckpointPolicy(1.0, clock=clock)
    cb.on_train_begin(None, None, None)
    clock.now = 50.0
    cb.on_save(None, None, None)  # save_steps wrote one
    clock.now = 70.0
    assert not _step(cb, 5)
    clock.now = 110.0
    assert _step(cb, 6)


def test_minutes_must_be_positive():
    with pytest.raises(ValueError, match="save_minutes must be positive"):
        CheckpointPolicy(0)


def test_the_last_step_never_checkpoints_and_step_counts_still_do():
    cb = CheckpointPolicy(None, clock=Clock())
    assert _step(cb, 4, asked=True)  # save_steps asked, mid-training: kept
    assert not _step(cb, 5)
    assert not _step(cb, 10, asked=True)  # transformers' save after the last step: cancelled
