"""The greedy search: fast == plain == brute force, the tie rule, stopping, ShortGPT, resuming."""

from __future__ import annotations

import pytest
import torch

from fuselab.prune.blocks import Block, BlockMasker, inspect_blocks
from fuselab.prune.runner import CalibrationRunner
from fuselab.prune.search import StopRule, block_candidates, greedy_search, layer_candidates, shortgpt_search
from helpers.models import random_model
from helpers.prune import brute_force_nll, brute_force_search, gemma3_config, llama_config, strong_model


def _search(model, chunks, candidates_fn, stop, fast, batch_size=1, history=None, on_round=None):
    layout = inspect_blocks(model)
    runner = CalibrationRunner(model, layout, chunks, batch_size)
    masker = BlockMasker(model, layout)
    try:
        rounds = greedy_search(
            runner, masker, candidates_fn(layout), stop, fast, history, on_round, show_progress=False
        )
    finally:
        masker.set_removed(set())
    return rounds, runner


@pytest.fixture
def chunks():
    return torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(1))


def test_fast_and_plain_search_match_brute_force(chunks):
    model = strong_model(llama_config())
    fast, fast_runner = _search(model, chunks, block_candidates, StopRule(num_blocks=5), fast=True)
    plain, plain_runner = _search(model, chunks, block_candidates, StopRule(num_blocks=5), fast=False)
    expected = brute_force_search(model, chunks, 5)
    assert [r.removed for r in fast] == [r.removed for r in plain] == expected
    assert [r.nll for r in fast] == [r.nll for r in plain]  # bitwise, not approximately
    removed = [(b.split(".")[0], int(b.split(".")[1])) for r in fast for b in r.blocks]
    assert fast[-1].nll == pytest.approx(brute_force_nll(model, removed, chunks), rel=1e-6)
    # the speedups really happened
    assert sum(r.abandoned for r in fast) > 0
    assert fast_runner.forward_layers < plain_runner.forward_layers


def test_layer_search_matches_brute_force(chunks):
    model = strong_model(llama_config(), seed=3)
    fast, _ = _search(model, chunks, layer_candidates, StopRule(num_blocks=4), fast=True)
    plain, _ = _search(model, chunks, layer_candidates, StopRule(num_blocks=4), fast=False)
    assert [r.removed for r in fast] == [r.removed for r in plain]
    assert [r.removed for r in fast] == brute_force_search(model, chunks, 2, unit="layer")


def test_exact_ties_break_the_same_way(chunks):
    # With the usual 0.02-scale random weights, removing any MLP block changes no logit bit: exact ties.
    model = random_model(llama_config())
    plain, _ = _search(model, chunks, block_candidates, StopRule(num_blocks=6), fast=False)
    fast, _ = _search(model, chunks, block_candidates, StopRule(num_blocks=6), fast=True)
    scores = plain[0].scores
    assert len(set(scores.values())) < len(scores), "the test needs exact ties"
    assert [r.removed for r in fast] == [r.removed for r in plain]
    # the tie rule: the earliest candidate in (attention blocks by layer, then MLP blocks by layer) order
    best = min(scores.values())
    order = [str(b) for b in inspect_blocks(model).all_blocks()]
    assert plain[0].removed == next(n for n in order if scores[n] == best)


def test_batch_size_and_gemma3(chunks):
    model = strong_model(gemma3_config(), seed=2)
    fast, _ = _search(model, chunks, block_candidates, StopRule(num_blocks=4), fast=True, batch_size=2)
    plain, _ = _search(model, chunks, block_candidates, StopRule(num_blocks=4), fast=False, batch_size=2)
    assert [r.removed for r in fast] == [r.removed for r in plain]


def test_stops_at_parameter_ratio(chunks):
    model = strong_model(llama_config())
    rounds, _ = _search(model, chunks, block_candidates, StopRule(target_ratio=0.25), fast=True)
    assert rounds[-1].ratio >= 0.25 > rounds[-2].ratio
    layout = inspect_blocks(model)
    removed = {Block.parse(b) for r in rounds for b in r.blocks}
    assert rounds[-1].params_removed == layout.removed_params(removed)
    assert rounds[-1].params_left == layout.total_params - rounds[-1].params_removed


def test_resume_gives_the_same_trajectory(chunks):
    model = strong_model(llama_config())
    full, _ = _search(model, chunks, block_candidates, StopRule(num_blocks=4), fast=True)

    class Interrupt(Exception):
        pass

    saved = []

    def on_round(rec, rounds):
        saved[:] = list(rounds)
        if len(rounds) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _search(model, chunks, block_candidates, StopRule(num_blocks=4), fast=True, on_round=on_round)
    resumed, _ = _search(model, chunks, block_candidates, StopRule(num_blocks=4), fast=False, history=saved)
    assert [r.removed for r in resumed] == [r.removed for r in full]
    assert [r.nll for r in resumed] == [r.nll for r in full]


def test_shortgpt_block_influence_and_order(chunks):
    model = strong_model(llama_config())
    layout = inspect_blocks(model)
    runner = CalibrationRunner(model, layout, chunks, 2)
    masker = BlockMasker(model, layout)
    rounds, bi = shortgpt_search(runner, masker, StopRule(num_blocks=4), show_progress=False)
    masker.set_removed(set())
    with torch.no_grad():
        states = model(input_ids=chunks, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of layer i (the last entry is after the final norm, so layer 3 is skipped)
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1)
        assert bi[i] == pytest.approx(1 - cos.mean().item(), abs=1e-6)
    expected = sorted(range(4), key=lambda i: (bi[i], i))[:2]
    assert [r.removed for r in rounds] == [f"layer.{i}" for i in expected]
