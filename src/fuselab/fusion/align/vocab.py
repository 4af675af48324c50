"""Vocabulary mapping: which pivot id a source candidate token becomes when its distribution is projected.

Tokens are compared by their *surface* (the text they spell: ``Ġthe`` and ``▁the`` are both " the"), which
replaces the reference's class-keyed marker tables (FuseChat spec §3.1, §9.2 item 13).

Registered mappings (``-1`` = unmapped; the candidate's probability is dropped and counted):

- ``exact``: same surface (special tokens by content). FuseLLM's "EM".
- ``mined``: exact where possible, otherwise the pivot token at minimum edit distance over the whole pivot
  vocabulary (lowest id on ties). FuseLLM's "MinED", computed for real with rapidfuzz's C++ ``cdist`` (the
  FuseChat v2 release maps every such token to the first vocabulary entry, §3.2.2), and only for the source
  ids that actually occur in the stored top-k.
- ``statistics``: FuseChat-2's mapping from alignment statistics. Counted over the corpus: at every aligned
  position, (source next token, pivot next token), kept as sparse counts (``np.unique`` on int64 pair keys;
  the reference allocates a dense |V_p|×|V_s| float64 matrix, 38.8 GB for Mistral×Qwen). A source id maps to
  its most frequent pivot partner (ties: smaller edit distance, then lower id); ids never seen fall back to
  ``exact``. (The release's score, edit distance × sigmoid(count), makes frequency nearly irrelevant, §3.2.3;
  "most frequent partner" is the semantics the paper describes.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from fuselab.data.token_spans import Vocabulary
from fuselab.utils.errors import ConfigError
from fuselab.utils.registry import Registry


@dataclass
class VocabMap:
    """``table[v]`` = pivot id of source id v, -1 if unmapped."""

    name: str
    table: np.ndarray  # int64 [|V_s|]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.table[ids]

    def stats(self, ids: Iterable[int]) -> dict[str, int]:
        ids = np.unique(np.fromiter(ids, dtype=np.int64))
        mapped = int((self.table[ids] >= 0).sum()) if len(ids) else 0
        return {"source_ids": len(ids), "mapped": mapped, "unmapped": len(ids) - mapped}


Builder = Callable[..., np.ndarray]
VOCAB_MAPPINGS: Registry[Builder] = Registry("vocabulary mapping")
register_vocab_mapping = VOCAB_MAPPINGS.register
vocab_mapping_names = VOCAB_MAPPINGS.names


def build_vocab_map(
    method: str,
    source: Vocabulary,
    pivot: Vocabulary,
    *,
    needed: np.ndarray | None = None,
    pair_counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> VocabMap:
    """Build the named mapping. ``needed``: source ids that must be mapped (default: all).
    ``pair_counts``: (source ids, pivot ids, counts) for ``statistics`` (see :func:`count_pairs`)."""
    builder = VOCAB_MAPPINGS.get(method)
    if needed is None:
        needed = np.arange(len(source))
    return VocabMap(name=method, table=builder(source, pivot, np.unique(needed), pair_counts))


def _surface_index(pivot: Vocabulary) -> dict[bytes, int]:
    """Pivot surface -> id; ordinary tokens win over special ones with the same text, then lower ids."""
    index: dict[bytes, int] = {}
    for i, s in enumerate(pivot.surfaces):
        if i not in pivot.special and s and s not in index:
            index[s] = i
    for i in sorted(pivot.special):
        s = pivot.surfaces[i]
        if s and s not in index:
            index[s] = i
    return index


@register_vocab_mapping("exact")
def _exact(source: Vocabulary, pivot: Vocabulary, needed: np.ndarray, pair_counts=None) -> np.ndarray:
    index = _surface_index(pivot)
    specials = {pivot.surfaces[i]: i for i in sorted(pivot.special)}
    table = np.full(len(source), -1, dtype=np.int64)
    for v in needed.tolist():
        s = source.surfaces[v]
        if v in source.special:
            table[v] = specials.get(s, index.get(s, -1))
        else:
            table[v] = index.get(s, -1)
    return table


@register_vocab_mapping("mined")
def _mined(source: Vocabulary, pivot: Vocabulary, needed: np.ndarray, pair_counts=None) -> np.ndarray:
    table = _exact(source, pivot, needed)
    missing = [v for v in needed.tolist() if table[v] < 0 and v not in source.special and source.surfaces[v]]
    if missing:
        table[missing] = nearest_pivot_ids([source.text(v) for v in missing], pivot)
    return table


def nearest_pivot_ids(queries: list[str], pivot: Vocabulary, chunk: int = 256) -> np.ndarray:
    """For each query, the ordinary pivot token at minimum Levenshtein distance (first minimum = lowest id)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    choice_ids = np.array([i for i in range(len(pivot)) if i not in pivot.special and pivot.surfaces[i]])
    choices = [pivot.text(int(i)) for i in choice_ids]
    out = np.empty(len(queries), dtype=np.int64)
    for a in range(0, len(queries), chunk):
        d = cdist(queries[a : a + chunk], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
        out[a : a + chunk] = choice_ids[d.argmin(axis=1)]
    return out


@register_vocab_mapping("statistics")
def _statistics(source: Vocabulary, pivot: Vocabulary, needed: np.ndarray, pair_counts=None) -> np.ndarray:
    if pair_counts is None:
        raise ConfigError(
            "vocabulary mapping 'statistics' needs alignment pair counts (built from the corpus)"
        )
    from rapidfuzz.distance import Levenshtein

    table = _exact(source, pivot, needed)
    src, piv, cnt = pair_counts
    needed_set = set(needed.tolist())
    # Pairs are sorted by source id; walk each source id's partners.
    bounds = np.flatnonzero(np.diff(src)) + 1
    for seg in np.split(np.arange(len(src)), bounds):
        if not len(seg):
            continue
        v = int(src[seg[0]])
        if v not in needed_set:
            continue
        best = max(
            seg.tolist(),
            key=lambda r: (cnt[r], -Levenshtein.distance(source.text(v), pivot.text(int(piv[r]))), -piv[r]),
        )
        table[v] = int(piv[best])
    return table


def count_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray]], pivot_size: int) -> tuple[np.ndarray, ...]:
    """Sparse counts of (source id, pivot id) pairs: returns (source ids, pivot ids, counts), sorted."""
    keys = [s.astype(np.int64) * pivot_size + p.astype(np.int64) for s, p in pairs if len(s)]
    if not keys:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    uniq, counts = np.unique(np.concatenate(keys), return_counts=True)
    return uniq // pivot_size, uniq % pivot_size, counts
