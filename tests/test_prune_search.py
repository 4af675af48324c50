"""The greedy search: fast == plain == brute force, the tie rule, stopping, ShortGPT, resuming."""

from __future__ import annotations

import pytest
import torch

from fuselab.prune.blocks import Block, BlockMasker, inspect_blocks
from fuselab.prune.runner import CalibrationRunner
from fuselab.prune.search import (
    Candidate,
    StopRule,
    block_candidates,
    greedy_search,
    layer_candidates,
    race,
    shortgpt_search,
)
from helpers.models import random_model
from helpers.prune import (
    brute_force_nll,
    brute_force_search,
    gemma3_config,
    llama_config,
    planted_model,
    repeated_token_chunks,
    strong_model,
)


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
    assert fast_runner.forward_layers < plain_runner.forward_layers  # the caching really happened


def test_fast_search_abandons_candidates_and_still_matches_brute_force():
    # Scores spread as in a real model (random models score every candidate within a few per cent, so that
    # no running sum passes the winner's total before the last micro-batch).
    model, chunks = planted_model(), repeated_token_chunks()
    fast, fast_runner = _search(model, chunks, block_candidates, StopRule(num_blocks=4), fast=True)
    plain, plain_runner = _search(model, chunks, block_candidates, StopRule(num_blocks=4), fast=False)
    assert [r.removed for r in fast] == [r.removed for r in plain] == brute_force_search(model, chunks, 4)
    assert [r.nll for r in fast] == [r.nll for r in plain]
    assert fast[0].removed == "attn.2" and fast[1].removed == "mlp.1"  # the planted harmful blocks go first
    assert all(r.abandoned > 0 for r in fast)  # later rounds tie at NLL 0.0: ties are decided by the order
    # micro-batch forwards, refreshes included: fewer than the plain search's
    assert fast_runner.batches_run < 0.9 * plain_runner.batches_run


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


def _plain_winner(cands, table):
    """The paper's loop on a table of per-batch NLLs: sequential sums, strict '<' in tie order."""
    best, best_total = None, float("inf")
    for c in sorted(cands, key=lambda c: c.order):
        total = 0.0
        for v in table[c.name]:
            total += v
        if best is None or total < best_total:
            best, best_total = c, total
    return best, best_total


@pytest.mark.parametrize("seed", range(40))
def test_race_equals_the_plain_minimum_and_stops_each_candidate_at_the_bound(seed):
    import random

    rng = random.Random(seed)
    n_cands, n_batches = rng.randint(1, 9), rng.randint(1, 6)
    pool = [0.0, 1.0, 2.0, 2.5, 3.0, 0.1, 0.2, 0.3, float("inf")]  # 0.1 + 0.2 != 0.3: rounding matters
    # small integer-ish values and shared rows create many exact ties
    table = {f"c{k}": [rng.choice(pool) for _ in range(n_batches)] for k in range(n_cands)}
    if n_cands > 2 and rng.random() < 0.5:
        table["c2"] = list(table["c0"])  # an exact tie, decided by the tie order
    orders = rng.sample(range(100), n_cands)
    cands = [Candidate(f"c{k}", (Block("attn", k),), orders[k]) for k in range(n_cands)]
    want, want_total = _plain_winner(cands, table)

    for perm in range(3):  # the input order must not matter
        shuffled = rng.sample(cands, len(cands)) if perm else cands
        calls: list[tuple[str, int]] = []

        def batch_nll(c, b, calls=calls):
            calls.append((c.name, b))
            return table[c.name][b]

        winner, total, scores, abandoned = race(shuffled, n_batches, batch_nll)
        assert winner == want and total == want_total  # same winner, bitwise the same total
        assert scores[want.name] == want_total
        # each candidate computed in batch order, exactly until its running key passes the winner's
        done: dict[str, int] = {}
        for name, b in calls:
            assert b == done.get(name, 0)
            done[name] = b + 1
        for c in cands:
            partial, need = 0.0, 0
            while need < n_batches and (partial, c.order) < (want_total, want.order):
                partial += table[c.name][need]
                need += 1
            assert done.get(c.name, 0) == (n_batches if c == want else need), c.name
            complete = done.get(c.name, 0) == n_batches
            assert (scores[c.name] is not None) == complete
        assert abandoned == sum(v is None for v in scores.values())
