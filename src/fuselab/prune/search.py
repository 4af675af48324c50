"""Greedy block search (BlockPruner, Alg. 1), its whole-layer variant, and ShortGPT's one-shot ranking.

BlockPruner (Zhong et al., 2024, arXiv:2406.10594, Alg. 1): in each round, every remaining block is removed
tentatively on top of the blocks already removed and the calibration perplexity is measured; the block whose
removal gives the lowest perplexity is removed for good. Rounds repeat until a block count or a parameter
ratio is reached. Ties go to the earlier candidate in the reference code's order (every attention block by
layer index, then every MLP block), because the reference keeps the first strict minimum.

``fast=True`` selects exactly the same blocks, faster:

1. layer-input caching: a candidate in layer ``i`` runs from layer ``i`` (see :mod:`fuselab.prune.runner`,
   whose cached and plain paths give bitwise-equal scores);
2. early abandoning as an exact best-first race over micro-batches (:func:`race`): a candidate's running NLL
   sum is a lower bound of its total (token NLLs are >= 0), and the candidate with the least running sum is
   always the one advanced, so every candidate stops as soon as its running sum passes the winner's total,
   whatever order the candidates come in; the winner is the minimum of (total, tie order), as in the plain
   search.

After each round the winner's model is rescored while the cache is refreshed; the score must equal the
winner's bitwise, which checks at run time that cached and uncached computations agree.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fuselab.prune.blocks import Block, BlockLayout, BlockMasker
from fuselab.prune.runner import CalibrationRunner
from fuselab.utils.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A removal unit: one block (BlockPruner) or both blocks of a layer (layer-level search)."""

    name: str
    blocks: tuple[Block, ...]
    order: int  # position in the tie-breaking order

    @property
    def start_layer(self) -> int:
        return min(b.layer for b in self.blocks)


def _bar(iterable: Any, show: bool, **kwargs: Any) -> Any:
    return progress(iterable, **kwargs) if show else progress(iterable, disable=True, **kwargs)


def block_candidates(layout: BlockLayout, kinds: Sequence[str] = ("attn", "mlp")) -> list[Candidate]:
    blocks = [b for b in layout.all_blocks() if b.kind in kinds]
    return [Candidate(str(b), (b,), k) for k, b in enumerate(blocks)]


def layer_candidates(layout: BlockLayout) -> list[Candidate]:
    return [Candidate(f"layer.{i}", (Block("attn", i), Block("mlp", i)), i) for i in range(layout.num_layers)]


@dataclass(frozen=True)
class StopRule:
    """Stop once ``num_blocks`` blocks are removed or the removed-parameter ratio reaches ``target_ratio``."""

    num_blocks: int | None = None
    target_ratio: float | None = None

    def reached(self, layout: BlockLayout, removed: set[Block]) -> bool:
        if self.num_blocks is not None and len(removed) >= self.num_blocks:
            return True
        return self.target_ratio is not None and layout.ratio(removed) >= self.target_ratio - 1e-12


@dataclass
class Round:
    """One removal step of a search (also one entry of ``search.json``)."""

    step: int
    removed: str  # candidate name, e.g. "attn.12" or "layer.7"
    blocks: list[str]
    nll: float  # summed calibration NLL of the model after this round
    ppl: float
    params_removed: int
    params_left: int
    ratio: float
    num_attn_removed: int
    num_mlp_removed: int
    evaluated: int = 0  # candidates scored this round
    abandoned: int = 0  # ... of which abandoned early
    seconds: float = 0.0
    scores: dict[str, float | None] = field(default_factory=dict)  # complete totals (None: abandoned)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _round_record(
    step: int,
    cand: Candidate,
    nll: float,
    runner: CalibrationRunner,
    layout: BlockLayout,
    removed: set[Block],
) -> Round:
    params = layout.removed_params(removed)
    return Round(
        step=step,
        removed=cand.name,
        blocks=[str(b) for b in cand.blocks],
        nll=nll,
        ppl=runner.ppl(nll),
        params_removed=params,
        params_left=layout.total_params - params,
        ratio=params / layout.total_params,
        num_attn_removed=sum(b.kind == "attn" for b in removed),
        num_mlp_removed=sum(b.kind == "mlp" for b in removed),
    )


def _beats(total: float, cand: Candidate, best_total: float, best: Candidate | None) -> bool:
    if best is None:
        return True
    return total < best_total or (total == best_total and cand.order < best.order)


def race(
    candidates: Sequence[Candidate], num_batches: int, batch_nll: Callable[[Candidate, int], float]
) -> tuple[Candidate, float, dict[str, float | None], int]:
    """Exact best-first race: the candidate of least (total NLL, tie order), computing as few batches as the
    lower bound allows.

    Each candidate's running sum over its first ``k`` micro-batches (added in batch order, exactly as a plain
    score adds them) is a lower bound of its total, because every micro-batch NLL is >= 0 and adding a
    non-negative float never lowers a float sum. A heap keyed by (running sum, tie order) always advances the
    candidate with the least key by one micro-batch; the first *complete* candidate popped has total ``T``
    and every other key is > (T, its order), so every other candidate's total is > T, or = T with a later tie
    order: it is the plain search's winner. A candidate is thus computed only until its running sum passes
    ``T``, whatever order the candidates come in (no need to guess good candidates first, unlike a
    sequential scan with a best-so-far bound, which reaches the same work only when the winner comes first).

    ``batch_nll(cand, b)`` is the NLL sum of micro-batch ``b`` with ``cand`` removed. Returns (winner, its
    total, complete totals by name (None: not complete), number of candidates not computed to the end).
    """
    if not candidates:
        raise ValueError("no candidates")
    heap: list[tuple[float, int, int, int]] = [(0.0, c.order, 0, k) for k, c in enumerate(candidates)]
    heapq.heapify(heap)
    while True:
        partial, order, done, k = heapq.heappop(heap)
        if done == num_batches:
            break
        value = batch_nll(candidates[k], done)
        if not value >= 0:  # NaN, or a negative NLL that would void the lower bound
            if value != value:
                value = math.inf
            else:
                raise RuntimeError(f"{candidates[k].name}: micro-batch {done} gave a negative NLL {value!r}")
        heapq.heappush(heap, (partial + value, order, done + 1, k))
    winner = candidates[k]
    scores: dict[str, float | None] = {c.name: None for c in candidates}
    scores[winner.name] = partial
    for p, _, d, j in heap:
        if d == num_batches:
            scores[candidates[j].name] = p
    abandoned = sum(v is None for v in scores.values())
    return winner, partial, scores, abandoned


def score_round(
    runner: CalibrationRunner,
    masker: BlockMasker,
    remaining: list[Candidate],
    fast: bool,
    previous: dict[str, float | None] | None = None,
    show_progress: bool = True,
) -> tuple[Candidate, float, dict[str, float | None], int]:
    """Score the remaining candidates; return (winner, its total NLL, scores, number abandoned).

    Plain: every candidate in full, from layer 0, in tie order (the paper's loop). Fast: :func:`race` over
    micro-batches, each candidate run from its first layer on cached inputs. ``previous`` (last round's
    scores) is accepted for compatibility; the race does not need an order.
    """
    if fast:
        bar = _bar(None, show_progress, desc="micro-batches", total=len(remaining) * len(runner.batches))

        def batch_nll(cand: Candidate, b: int) -> float:
            with masker.also_removed(cand.blocks):
                value = runner.batch_nll(b, cand.start_layer)
            bar.update(1)
            return value

        try:
            return race(remaining, len(runner.batches), batch_nll)
        finally:
            bar.close()
    best: Candidate | None = None
    best_total = math.inf
    scores: dict[str, float | None] = {}
    for cand in _bar(remaining, show_progress, desc="candidates"):
        total = 0.0
        with masker.also_removed(cand.blocks):
            for nll in runner.iter_nll(0):
                total += nll
        scores[cand.name] = total
        log.debug("%s: NLL %.6f", cand.name, total)
        if _beats(total, cand, best_total, best):
            best, best_total = cand, total
    assert best is not None
    return best, best_total, scores, 0


def greedy_search(
    runner: CalibrationRunner,
    masker: BlockMasker,
    candidates: list[Candidate],
    stop: StopRule,
    fast: bool = True,
    history: list[Round] | None = None,
    on_round: Callable[[Round, list[Round]], None] | None = None,
    show_progress: bool = True,
) -> list[Round]:
    """Run (or continue, given ``history``) the greedy search; returns the rounds in removal order.

    ``on_round`` is called after every round (the command saves its resumable state there).
    """
    layout = masker.layout
    rounds = list(history or [])
    by_name = {c.name: c for c in candidates}
    removed: set[Block] = {Block.parse(b) for r in rounds for b in r.blocks}
    masker.set_removed(removed)
    if fast:
        runner.refresh(0)
    previous = rounds[-1].scores if rounds else None
    bar = _bar(None, show_progress, desc="rounds")
    while not stop.reached(layout, removed):
        remaining = [c for c in candidates if not set(c.blocks) & removed]
        if not remaining:
            break
        t0 = time.perf_counter()
        best, total, scores, abandoned = score_round(runner, masker, remaining, fast, previous, show_progress)
        removed |= set(best.blocks)
        masker.set_removed(removed)
        if fast:
            check = runner.refresh(best.start_layer)
            if check != total:
                raise RuntimeError(
                    f"round {len(rounds) + 1}: rescoring the winner {best.name} gave NLL {check!r}, the search "
                    f"gave {total!r}; the backend is not deterministic, so the fast search cannot be exact here. "
                    "Set search.fast: false"
                )
        rec = _round_record(len(rounds) + 1, by_name[best.name], total, runner, layout, removed)
        rec.evaluated, rec.abandoned, rec.scores = len(remaining), abandoned, scores
        rec.seconds = time.perf_counter() - t0
        rounds.append(rec)
        previous = scores
        log.info(
            "round %d: removed %s, ppl %.3f, %.2f M parameters left (%.2f%% removed), %d/%d candidates abandoned",
            rec.step,
            rec.removed,
            rec.ppl,
            rec.params_left / 1e6,
            100 * rec.ratio,
            abandoned,
            len(remaining),
        )
        bar.update(1)
        if on_round is not None:
            on_round(rec, rounds)
    bar.close()
    return rounds


def shortgpt_search(
    runner: CalibrationRunner, masker: BlockMasker, stop: StopRule, show_progress: bool = True
) -> tuple[list[Round], list[float]]:
    """ShortGPT (Men et al., 2024, arXiv:2403.03853): remove the layers of lowest Block Influence, one shot.

    BI is measured once on the dense model; layers go in ascending BI (ties: lower index) until ``stop``.
    Each step's calibration perplexity is reported for comparison (it does not steer the selection).
    """
    layout = masker.layout
    masker.set_removed(set())
    bi = runner.block_influence()
    order = sorted(range(layout.num_layers), key=lambda i: (bi[i], i))
    rounds: list[Round] = []
    removed: set[Block] = set()
    for i in order:
        if stop.reached(layout, removed):
            break
        t0 = time.perf_counter()
        cand = Candidate(f"layer.{i}", (Block("attn", i), Block("mlp", i)), i)
        removed |= set(cand.blocks)
        masker.set_removed(removed)
        rec = _round_record(len(rounds) + 1, cand, runner.total_nll(), runner, layout, removed)
        rec.seconds = time.perf_counter() - t0
        rounds.append(rec)
        log.info("ShortGPT step %d: removed layer %d (BI %.5f), ppl %.3f", rec.step, i, bi[i], rec.ppl)
    return rounds, bi
