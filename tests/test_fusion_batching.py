"""Length buckets: minimal padding, longest batch first, seeded, every example once per epoch."""

from __future__ import annotations

import random

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from fuselab.fusion.batching import LengthBucketSampler, padded_tokens


def _lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(20, 80), rng.randint(200, 512)]) for _ in range(n)]


def test_every_example_once_and_padding_is_the_minimum_of_any_batching():
    for seed in range(5):
        lengths = _lengths(77, seed)
        order = list(LengthBucketSampler(lengths, 4, seed=seed))
        assert sorted(order) == list(range(77))
        # Cutting the length-sorted list into consecutive batches is optimal for fixed-size batches; any
        # order of those batches pads the same.
        best = padded_tokens(lengths, sorted(range(77), key=lambda i: -lengths[i]), 4)
        assert padded_tokens(lengths, order, 4) == best
        hf = list(LengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
        assert padded_tokens(lengths, hf, 4) > best  # what transformers' sampler leaves on a small set


def test_longest_batch_first_then_a_seeded_order_that_changes_per_epoch():
    lengths = _lengths(40, 1)
    s = LengthBucketSampler(lengths, 4, seed=3)
    e0 = s.batches()
    assert max(lengths[i] for i in e0[0]) == max(lengths)
    assert e0 == LengthBucketSampler(lengths, 4, seed=3).batches()  # deterministic
    s.set_epoch(1)
    e1 = s.batches()
    assert e1 != e0 and e1[0] == e0[0]
    assert sorted(map(sorted, e1)) == sorted(map(sorted, e0))  # same buckets, another order
    assert LengthBucketSampler(lengths, 4, seed=4).batches() != e0


def test_small_and_degenerate_inputs():
    assert list(LengthBucketSampler([], 4)) == []
    assert list(LengthBucketSampler([5, 9, 7], 4)) == [1, 2, 0]
    assert LengthBucketSampler([1, 2, 3, 4, 5], 2).batches()[-1] == [0]  # the short remainder stays last
    assert len(LengthBucketSampler([1] * 10, 3).batches()) == 4
    try:
        LengthBucketSampler([1], 0)
    except ValueError as err:
        assert "batch_size" in str(err)
    else:
        raise AssertionError("batch_size 0 accepted")
