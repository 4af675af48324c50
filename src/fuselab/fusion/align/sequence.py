"""Sequence alignment: for each pivot position, the source position that has read exactly the same text.

A stored distribution at position p predicts what follows the text the model has read, ``text[:ends[p]]``.
A source distribution can stand in for the pivot's at p only if the source has a position with the same
right boundary (FuseChat spec §3.3 states the principle; the reference approximates it with ``endswith``).

Registered strategies (each returns the same :class:`SequenceAlignment`):

- ``offsets`` (default): both tokenisations of the same text carry exact byte spans, so the donor of pivot
  position p is the last source position ending at ``ends[p]``: one vectorised merge (``searchsorted``) over
  the two sorted boundary lists, O((n + m) log m) in C.
- ``mined``: FuseLLM's DTW over token texts with an edit-distance cost (:mod:`fuselab.fusion.align.dtw`);
  within each pivot position's group the member with the same right boundary is the donor (exact check rather
  than ``endswith``), otherwise none. Faithful to the paper's alignment, and it shows where DTW pairs the
  wrong neighbours around split words.
- ``exact``: the two tokenisations must be identical (same-vocabulary sources); the donor of p is p.

Coverage at the pivot-token level (supervised tokens only) is reported as 1-1 (same span as one source
token), 1-n (the pivot token covers several whole source tokens), n-1 (it lies inside one longer source
token), and crossing (its boundaries cut through source tokens).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fuselab.data.render import Encoded
from fuselab.data.token_spans import Vocabulary
from fuselab.utils.errors import FuselabError
from fuselab.utils.registry import Registry


@dataclass
class SequenceAlignment:
    """``donor[r]`` = source stored row for pivot stored row r, or -1 (no source position with that boundary)."""

    donor: np.ndarray  # int64 [n_pivot_rows]
    coverage: Counter[str] = field(default_factory=Counter)  # 1-1 / 1-n / n-1 / crossing, pivot tokens


Aligner = Callable[[Encoded, Encoded, Vocabulary, Vocabulary], np.ndarray]
SEQUENCE_ALIGNERS: Registry[Aligner] = Registry("sequence alignment")
register_sequence_aligner = SEQUENCE_ALIGNERS.register
sequence_aligner_names = SEQUENCE_ALIGNERS.names


def align_sequences(
    method: str, pivot: Encoded, source: Encoded, pivot_vocab: Vocabulary, source_vocab: Vocabulary
) -> SequenceAlignment:
    """Align ``source`` to ``pivot`` (two tokenisations of one text) with the named strategy."""
    aligner = SEQUENCE_ALIGNERS.get(method)
    if pivot.spans.ends[-1] != source.spans.ends[-1]:
        raise FuselabError(
            f"the pivot and the source tokenised texts of different lengths ({int(pivot.spans.ends[-1])} vs "
            f"{int(source.spans.ends[-1])} bytes); they must read the same text"
        )
    positions = aligner(pivot, source, pivot_vocab, source_vocab)  # source position per pivot position
    rows = _rows(source)
    piv_pos = pivot.predicting_positions()
    src_pos = positions[piv_pos]
    donor = np.where(src_pos >= 0, rows[np.maximum(src_pos, 0)], -1)
    return SequenceAlignment(donor=donor.astype(np.int64), coverage=coverage(pivot, source))


def _rows(enc: Encoded) -> np.ndarray:
    """Position -> stored row index (-1 where the position is not stored)."""
    rows = np.full(len(enc.ids), -1, dtype=np.int64)
    pos = enc.predicting_positions()
    rows[pos] = np.arange(len(pos))
    return rows


@register_sequence_aligner("offsets")
def _offsets(pivot: Encoded, source: Encoded, pv: Vocabulary, sv: Vocabulary) -> np.ndarray:
    src_ends = source.spans.ends
    idx = np.searchsorted(src_ends, pivot.spans.ends, side="right") - 1
    ok = (idx >= 0) & (src_ends[np.maximum(idx, 0)] == pivot.spans.ends)
    return np.where(ok, idx, -1)


@register_sequence_aligner("exact")
def _exact(pivot: Encoded, source: Encoded, pv: Vocabulary, sv: Vocabulary) -> np.ndarray:
    same = len(pivot.ids) == len(source.ids) and all(
        pv.surfaces[a] == sv.surfaces[b] for a, b in zip(pivot.ids.tolist(), source.ids.tolist())
    )
    if not same:
        raise FuselabError(
            "sequence alignment 'exact' needs identical tokenisations (a source with the pivot's vocabulary); "
            "these differ, use 'offsets'"
        )
    return np.arange(len(pivot.ids))


# Band half-width (in source positions) of the DTW; wide enough for chat text, where the two tokenisations
# drift apart by a few tokens per sentence at most.
DTW_BAND = 64


@register_sequence_aligner("mined")
def _mined(pivot: Encoded, source: Encoded, pv: Vocabulary, sv: Vocabulary) -> np.ndarray:
    from fuselab.fusion.align.dtw import dtw_align, groups_from_path

    a = [sv.text(t) for t in source.ids.tolist()]
    b = [pv.text(t) for t in pivot.ids.tolist()]
    groups = groups_from_path(dtw_align(a, b, DTW_BAND), len(b))
    out = np.full(len(b), -1, dtype=np.int64)
    for j, members in enumerate(groups):
        for i in reversed(members):
            if source.spans.ends[i] == pivot.spans.ends[j]:
                out[j] = i
                break
    return out


def coverage(pivot: Encoded, source: Encoded) -> Counter[str]:
    """Classify each supervised pivot token by how its span meets the source tokens (see module doc)."""
    sup = pivot.supervised
    s, e = pivot.spans.starts[sup], pivot.spans.ends[sup]
    ss, se = source.spans.starts, source.spans.ends
    if len(se) == 0 or len(s) == 0:
        return Counter()
    boundaries = np.union1d(se, ss)
    i_start = np.searchsorted(se, s, side="right")  # the source token containing byte s
    i_end = np.searchsorted(se, e, side="left")  # the first source token ending at or after e
    i_start = np.minimum(i_start, len(se) - 1)
    i_end = np.minimum(i_end, len(se) - 1)
    single = i_start == i_end
    identical = single & (ss[i_start] == s) & (se[i_end] == e)
    on_bounds = np.isin(s, boundaries) & np.isin(e, boundaries)
    counts: Counter[str] = Counter()
    counts["1-1"] = int(identical.sum())
    counts["n-1"] = int((single & ~identical).sum())
    counts["1-n"] = int((~single & on_bounds).sum())
    counts["crossing"] = int((~single & ~on_bounds).sum())
    return counts
