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
- ``prefix`` (default): each source candidate goes to the pivot token it *begins with* under the pivot's own
  tokenizer: the first token of the pivot's encoding of the candidate's text (encoded after a one-letter
  context, so that a tokenizer's phantom prefix space or "first word" rule does not leak in; where the
  context merges with the candidate, the candidate alone). Control tokens (added tokens flagged special) map
  to the pivot's control token with the same content, or are dropped; added tokens that spell plain text
  (Gemma's ``\n`` and whitespace runs) are mapped like any text. A candidate whose bytes are not valid UTF-8 on their own (a byte token, part
  of a character) and any candidate the pivot's encoding does not spell goes to the longest pivot token that
  is a byte prefix of it. See :func:`prefix_routes` for the counts of each route.

  Why: a source that merges what the pivot splits (Qwen's ``:\n``, ``)\n``, ``.append``; SmolLM2 has none of
  them) otherwise loses the candidate under ``exact``, and its mass ends up in the "any other token" class,
  pushing the pivot's right next token down (issue 12: 1,180 of 3,899 Qwen ids seen in the top-k). Mapping to
  the first token the pivot itself would write puts that mass where the pivot's gold token is. Two published
  forms of the idea: Byte-Prefix Marginalization (arXiv 2607.22334) sends each teacher token to the *longest
  student token that is a byte prefix of it*; X-Token (arXiv 2605.21699) learns a sparse projection
  initialised from string rules. fuselab follows BPM's byte-prefix principle but asks the pivot tokenizer
  which prefix it would really use (the longest vocabulary prefix is often not what BPE produces: SmolLM2
  writes ``_string`` as ``_`` + ``string``), and keeps BPM's longest prefix only where the pivot cannot encode
  the bytes. It needs no training, unlike X-Token's projection. Where the pivot's next token is *longer*
  than the source's (whitespace runs, merged words), the source candidate alone cannot tell which pivot token
  follows; :mod:`fuselab.fusion.align.gold_path` adds the chain rule along the gold text for that case.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fuselab.data.token_spans import Vocabulary
from fuselab.utils.errors import ConfigError
from fuselab.utils.registry import Registry


@dataclass
class VocabMap:
    """``table[v]`` = pivot id of source id v, -1 if unmapped."""

    name: str
    table: np.ndarray  # int64 [|V_s|]
    routes: dict[str, int] = field(default_factory=dict)  # how the needed ids were mapped (``prefix``)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.table[ids]

    def stats(self, ids: Iterable[int]) -> dict[str, int]:
        ids = np.unique(np.fromiter(ids, dtype=np.int64))
        mapped = int((self.table[ids] >= 0).sum()) if len(ids) else 0
        return {"source_ids": len(ids), "mapped": mapped, "unmapped": len(ids) - mapped}


Encoder = Callable[[list[str]], Sequence[Sequence[int]]]


@dataclass
class MappingInputs:
    """What some mappings need besides the two vocabularies."""

    pair_counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ``statistics``
    pivot_encode: Encoder | None = None  # ``prefix``: texts -> pivot ids (no special tokens added)


Builder = Callable[[Vocabulary, Vocabulary, np.ndarray, MappingInputs], "np.ndarray | VocabMap"]
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
    pivot_encode: Encoder | None = None,
) -> VocabMap:
    """Build the named mapping. ``needed``: source ids that must be mapped (default: all).
    ``pair_counts``: (source ids, pivot ids, counts) for ``statistics`` (see :func:`count_pairs`);
    ``pivot_encode``: the pivot tokenizer as a function of texts, for ``prefix`` (see :func:`tokenizer_encoder`).
    """
    builder = VOCAB_MAPPINGS.get(method)
    if needed is None:
        needed = np.arange(len(source))
    got = builder(source, pivot, np.unique(needed), MappingInputs(pair_counts, pivot_encode))
    if isinstance(got, VocabMap):
        return got
    return VocabMap(name=method, table=got)


def tokenizer_encoder(tokenizer) -> Encoder:
    """``texts -> ids`` of a Hugging Face tokenizer: no BOS/EOS added, special-token text not parsed."""

    def encode(texts: list[str]) -> Sequence[Sequence[int]]:
        try:
            return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        except TypeError:  # a tokenizer without split_special_tokens
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

    return encode


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
def _exact(
    source: Vocabulary, pivot: Vocabulary, needed: np.ndarray, inputs: MappingInputs | None = None
) -> np.ndarray:
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
def _mined(source: Vocabulary, pivot: Vocabulary, needed: np.ndarray, inputs: MappingInputs) -> np.ndarray:
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
def _statistics(
    source: Vocabulary, pivot: Vocabulary, needed: np.ndarray, inputs: MappingInputs
) -> np.ndarray:
    pair_counts = inputs.pair_counts
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


# The context a candidate is encoded after: one letter, which absorbs a tokenizer's phantom prefix space
# (Metaspace "first" scheme, add_prefix_space) and stands apart from what follows in most pre-tokenizers.
PREFIX_CONTEXT = "x"


@register_vocab_mapping("prefix")
def _prefix(source: Vocabulary, pivot: Vocabulary, needed: np.ndarray, inputs: MappingInputs) -> VocabMap:
    if inputs.pivot_encode is None:
        raise ConfigError("vocabulary mapping 'prefix' needs the pivot tokenizer (pivot_encode)")
    table = np.full(len(source), -1, dtype=np.int64)
    routes: Counter[str] = Counter()
    specials = {pivot.surfaces[i]: i for i in sorted(pivot.control_ids)}
    longest = _LongestPrefix(pivot)
    texts, text_ids = [], []
    control = source.control_ids
    for v in needed.tolist():
        s = source.surfaces[v]
        if v in control:
            table[v] = specials.get(s, -1)
            routes["special" if table[v] >= 0 else "dropped: special token the pivot lacks"] += 1
        elif not s:
            routes["dropped: empty token"] += 1
        else:
            try:
                texts.append(s.decode("utf-8"))
                text_ids.append(v)
            except UnicodeDecodeError:
                table[v] = longest(s)
                routes["bytes: longest pivot prefix"] += 1
    if texts:
        first = first_pivot_tokens(texts, pivot, inputs.pivot_encode)
        for v, u in zip(text_ids, first.tolist()):
            if u >= 0:
                table[v] = u
                whole = pivot.surfaces[u] == source.surfaces[v]
                routes["own encoding: same token" if whole else "own encoding: first of several"] += 1
            else:
                table[v] = longest(source.surfaces[v])
                routes["longest pivot prefix"] += 1
    missing = int(((table[needed] < 0) & ~np.isin(needed, list(control))).sum()) if len(needed) else 0
    if missing:
        routes["dropped: no pivot prefix"] += missing
    return VocabMap(name="prefix", table=table, routes=dict(routes))


def first_pivot_tokens(texts: list[str], pivot: Vocabulary, encode: Encoder) -> np.ndarray:
    """For each text, the first ordinary pivot token of the pivot's own encoding of it, -1 if none spells it.

    Encoded after :data:`PREFIX_CONTEXT`; the answer is the token that starts right after the context and spells
    exactly the bytes it covers (no phantom space). If no token starts there (the context merged with the
    text), the text is encoded alone and its first token must start at byte 0.
    """
    from fuselab.data.token_spans import TextMismatchError, _walk

    def first(ids: Sequence[int], data: bytes, at: int) -> int:
        try:
            starts, ends = _walk(pivot, list(ids), data)
        except TextMismatchError:
            return -1
        for k, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            if b <= at:
                continue  # the context, or a token that covers no text
            if a != at:
                return -2  # this token covers bytes of the context too
            u = int(ids[k])
            return u if u not in pivot.control_ids and pivot.surfaces[u] == data[a:b] else -1
        return -1

    ctx = PREFIX_CONTEXT.encode()
    out = np.full(len(texts), -1, dtype=np.int64)
    with_ctx = encode([PREFIX_CONTEXT + t for t in texts])
    retry = []
    for i, (t, ids) in enumerate(zip(texts, with_ctx)):
        u = first(ids, ctx + t.encode(), len(ctx))
        if u == -2:
            retry.append(i)
        else:
            out[i] = u
    if retry:
        alone = encode([texts[i] for i in retry])
        for i, ids in zip(retry, alone):
            u = first(ids, texts[i].encode(), 0)
            out[i] = u if u >= 0 else -1
    return out


class _LongestPrefix:
    """The longest ordinary pivot token that is a byte prefix of a string (BPM's rule), -1 if none."""

    def __init__(self, pivot: Vocabulary) -> None:
        self.index: dict[bytes, int] = {}
        for i, s in enumerate(pivot.surfaces):
            if s and i not in pivot.control_ids and s not in self.index:
                self.index[s] = i
        self.max_len = max((len(s) for s in self.index), default=0)

    def __call__(self, s: bytes) -> int:
        for n in range(min(len(s), self.max_len), 0, -1):
            u = self.index.get(s[:n])
            if u is not None:
                return u
        return -1
