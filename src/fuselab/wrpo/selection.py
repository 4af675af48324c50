"""Picking y_ws, y_wt and y_l from scored samples (WRPO §3 data construction; shared/spec/wrpo.md §1).

- y_ws: the best-scoring response over all source samples;
- y_wt: the best-scoring target sample; y_l: the worst-scoring target sample (never the same sample).

Ties, stated once (see :class:`fuselab.wrpo.config.SelectionConfig`): among equal scores ``tie_break: first``
takes the earliest sample (sources in recipe order, then sample order), ``shortest`` the shortest text then
the earliest; y_l is the earliest of the worst that is not y_wt. NaN scores (a judge that did not answer with
a number) are ignored. When all target scores are equal, ``all_equal: drop`` drops the prompt and ``keep``
takes y_wt = the tie-break winner, y_l = the last other sample. Every case is counted.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from fuselab.wrpo.config import SelectionConfig


@dataclass(frozen=True)
class Sample:
    text: str
    score: float
    model: str
    index: int  # position among the samples it competes with (sources: across sources, in order)


@dataclass(frozen=True)
class Triplet:
    ws: Sample
    wt: Sample
    l: Sample  # noqa: E741


def _best(samples: list[Sample], tie_break: str) -> Sample:
    top = max(s.score for s in samples)
    tied = [s for s in samples if s.score == top]
    if tie_break == "shortest":
        return min(tied, key=lambda s: (len(s.text), s.index))
    return min(tied, key=lambda s: s.index)


def select_triplet(
    source: list[Sample], target: list[Sample], cfg: SelectionConfig, counts: Counter[str] | None = None
) -> Triplet | None:
    """The triplet for one prompt, or None when the prompt is dropped (the reason is counted)."""
    counts = counts if counts is not None else Counter()
    src = [s for s in source if not math.isnan(s.score)]
    tgt = [s for s in target if not math.isnan(s.score)]
    counts["unscored_samples"] += (len(source) - len(src)) + (len(target) - len(tgt))
    if not src or len(tgt) < 2:
        counts["dropped_too_few_scored"] += 1
        return None
    ws = _best(src, cfg.tie_break)
    if sum(s.score == ws.score for s in src) > 1:
        counts["source_best_tied"] += 1
    top, bottom = max(s.score for s in tgt), min(s.score for s in tgt)
    if top == bottom:
        counts["target_all_equal"] += 1
        if cfg.all_equal == "drop":
            counts["dropped_target_all_equal"] += 1
            return None
        wt = _best(tgt, cfg.tie_break)
        l_ = max((s for s in tgt if s is not wt), key=lambda s: s.index)
    else:
        wt = _best(tgt, cfg.tie_break)
        if sum(s.score == top for s in tgt) > 1:
            counts["target_best_tied"] += 1
        worst = [s for s in tgt if s.score == bottom and s is not wt]
        if len(worst) > 1:
            counts["target_worst_tied"] += 1
        l_ = min(worst, key=lambda s: s.index)
    if cfg.min_source_margin is not None and ws.score < wt.score - cfg.min_source_margin:
        counts["dropped_source_worse"] += 1
        return None
    if ws.score < wt.score:
        counts["source_below_target"] += 1
    if ws.score <= l_.score:
        counts["source_not_above_rejected"] += 1
    counts["kept"] += 1
    return Triplet(ws, wt, l_)
