"""Sequence alignment, vocabulary mapping, projection and fusion functions on hand-made and random cases."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

from fuselab.data.render import Encoded, RenderedText, encode
from fuselab.data.token_spans import TokenSpans, Vocabulary
from fuselab.fusion.align import align_sequences, build_vocab_map
from fuselab.fusion.align.dtw import cost_matrix, dtw_align, dtw_path, groups_from_path
from fuselab.fusion.align.project import Projected, project
from fuselab.fusion.align.sequence import coverage
from fuselab.fusion.align.vocab import count_pairs
from fuselab.fusion.fuse import Candidate, fuse, gold_nll
from fuselab.utils.errors import ConfigError
from helpers.tokenizers import byte_level_bpe, metaspace_bpe


def make(pieces: list[str]) -> tuple[Encoded, Vocabulary]:
    """An Encoded text from explicit token pieces (ids = positions in a private vocabulary); all supervised."""
    surfaces = tuple(p.encode() for p in pieces)
    ends = np.cumsum([len(s) for s in surfaces])
    starts = np.concatenate([[0], ends[:-1]])
    spans = TokenSpans(ids=np.arange(len(pieces)), starts=starts, ends=ends, n_prefix=0)
    vocab = Vocabulary(surfaces=surfaces, special=frozenset(), unk_id=None, name="hand")
    return Encoded(spans=spans, supervised=np.ones(len(pieces), bool)), vocab


def donors(method, pivot_pieces, source_pieces):
    p, pv = make(pivot_pieces)
    s, sv = make(source_pieces)
    return align_sequences(method, p, s, pv, sv).donor.tolist()


# Rows are predicting positions 0..n-2 (each predicts the next token); donors are source rows.
@pytest.mark.parametrize(
    ("pivot", "source", "expected"),
    [
        (["the", " world", " wide", " web"], ["the", " world", " wide", " web"], [0, 1, 2]),
        # The source merges "worldwide": the pivot row after " world" has no same-boundary source position.
        (["the", " world", "wide", " web"], ["the", " worldwide", " web"], [0, -1, 1]),
        # The pivot merges: its row after " worldwide" reuses the source row after " wide".
        (["the", " worldwide", " web"], ["the", " world", "wide", " web"], [0, 2]),
        # Space markers on either side of the boundary ("Ġ" after vs "▁" before) do not matter for spans.
        (["a", "b", " c", "d"], ["ab", " ", "cd"], [-1, 0, -1]),
        # Digits split one by one vs in groups; emoji split into bytes on one side only.
        (["1", "2", "3", "4"], ["12", "34"], [-1, 0, -1]),
    ],
)
def test_offsets_alignment_hand_cases(pivot, source, expected):
    assert donors("offsets", pivot, source) == expected


def test_mined_misses_the_donors_that_offsets_finds():
    """The FuseChat spec's worked example: DTW pairs pivot 'worldwide' with ' world' only."""
    pivot, source = ["the", " worldwide", " web", "!"], ["the", " world", "wide", " web", "!"]
    assert donors("offsets", pivot, source) == [0, 2, 3]
    mined = donors("mined", pivot, source)
    assert mined[0] == 0 and mined[2] == 3 and mined[1] in (-1, 2)


def brute_force_offsets(p: Encoded, s: Encoded) -> list[int]:
    rows = {pos: r for r, pos in enumerate(s.predicting_positions().tolist())}
    out = []
    for pos in p.predicting_positions().tolist():
        matches = [i for i in range(len(s.ids)) if s.spans.ends[i] == p.spans.ends[pos]]
        out.append(rows.get(matches[-1], -1) if matches else -1)
    return out


def random_text(rng: random.Random) -> str:
    words = [
        "the",
        "fox",
        "jumps",
        "12345",
        "😀",
        "你好",
        "def",
        "(a, b):",
        "\n",
        "  ",
        "Paris",
        "hello",
        "x=1",
    ]
    return "".join(rng.choice(words) + rng.choice([" ", "", "\n"]) for _ in range(rng.randint(3, 25)))


def test_offsets_equals_brute_force_span_matcher_on_real_tokenizers():
    a, b = byte_level_bpe(300), metaspace_bpe(400, style="gemma")
    rng = random.Random(0)
    for _ in range(40):
        text = random_text(rng)
        r = RenderedText("t", text, ((0, len(text.encode())),))
        p, s = encode(a, r), encode(b, r)
        from fuselab.data.token_spans import vocabulary

        got = align_sequences("offsets", p, s, vocabulary(a), vocabulary(b)).donor.tolist()
        assert got == brute_force_offsets(p, s), text


def slow_dtw(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """The reference kind: a Python double loop, one edit distance per cell, tie order diag > up > left."""
    n, m = len(a), len(b)
    inf = float("inf")
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            D[i][j] = Levenshtein.distance(a[i - 1], b[j - 1]) + min(
                D[i - 1][j], D[i][j - 1], D[i - 1][j - 1]
            )
    i, j, path = n, m, [(n - 1, m - 1)]
    while (i, j) != (1, 1):
        diag = D[i - 1][j - 1] if i > 1 and j > 1 else inf
        up = D[i - 1][j] if i > 1 else inf
        left = D[i][j - 1] if j > 1 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i - 1, j - 1))
    return path[::-1]


def test_vectorised_dtw_equals_plain_dp():
    a_tok, b_tok = byte_level_bpe(300), metaspace_bpe(400)
    rng = random.Random(1)
    for _ in range(25):
        text = random_text(rng)
        a = [a_tok.decode([t]) for t in a_tok(text, add_special_tokens=False)["input_ids"]]
        b = [b_tok.decode([t]) for t in b_tok(text, add_special_tokens=False)["input_ids"]]
        assert dtw_path(cost_matrix(a, b)) == slow_dtw(a, b)
        assert dtw_path(cost_matrix(a, b), band=max(len(a), len(b))) == slow_dtw(a, b)
        assert dtw_align(a, b, None) == slow_dtw(a, b)
        assert dtw_align(a, b, max(len(a), len(b))) == slow_dtw(a, b)


def test_dtw_groups_are_contiguous_and_cover_everything():
    path = dtw_path(cost_matrix(["ab", "c", "d"], ["a", "bcd"]))
    groups = groups_from_path(path, 2)
    assert sorted(i for g in groups for i in g) == [0, 1, 2] or all(groups)
    assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)


def test_coverage_categories():
    p, _ = make(["the", " worldwide", " web", "x"])
    s, _ = make(["the", " world", "wide", " w", "eb", "x"])
    c = coverage(p, s)
    assert c == Counter({"1-1": 2, "1-n": 2, "n-1": 0, "crossing": 0})
    p2, _ = make(["ab", "cd"])
    s2, _ = make(["a", "bc", "d"])
    assert coverage(p2, s2)["crossing"] == 2
    p3, _ = make(["a", "b"])
    s3, _ = make(["ab"])
    assert coverage(p3, s3)["n-1"] == 2


def test_exact_alignment_refuses_different_tokenisations():
    with pytest.raises(Exception, match="identical tokenisations"):
        donors("exact", ["a", "b"], ["ab"])
    assert donors("exact", ["a", "b", "c"], ["a", "b", "c"]) == [0, 1]


def test_unknown_names_list_the_valid_ones():
    p, pv = make(["a"])
    with pytest.raises(ConfigError, match="valid: exact, mined, offsets"):
        align_sequences("dtw", p, p, pv, pv)
    with pytest.raises(ConfigError, match="valid: exact, mined, prefix, statistics"):
        build_vocab_map("nearest", pv, pv)


def vocab(pieces, special=()):
    return Vocabulary(tuple(p.encode() for p in pieces), frozenset(special), None, "toy")


PIVOT = vocab(["<s>", " the", " cat", "cat", " dog", "s", "<|im_end|>"], special=[0, 6])
SOURCE = vocab(["</s>", " the", " cats", "cat", " dogs", "<|im_end|>", " do"], special=[0, 5])


def test_exact_mapping():
    m = build_vocab_map("exact", SOURCE, PIVOT)
    assert m.table.tolist() == [-1, 1, -1, 3, -1, 6, -1]


def test_mined_mapping_is_argmin_edit_distance_over_the_whole_vocabulary():
    m = build_vocab_map("mined", SOURCE, PIVOT)
    ordinary = [i for i in range(len(PIVOT)) if i not in PIVOT.special]
    for v in (2, 4, 6):
        dists = [Levenshtein.distance(SOURCE.text(v), PIVOT.text(u)) for u in ordinary]
        assert m.table[v] == ordinary[int(np.argmin(dists))]
    assert m.table[2] == 2 and m.table[4] == 4  # " cats" -> " cat", " dogs" -> " dog"


def test_statistics_mapping_uses_the_most_frequent_partner():
    # " dogs" aligned 3 times with " dog" and once with "s"; " do" never seen -> exact fallback (none).
    pairs = count_pairs(
        [(np.array([4, 4, 4, 2]), np.array([4, 4, 5, 2])), (np.array([4]), np.array([4]))], len(PIVOT)
    )
    assert list(zip(*[x.tolist() for x in pairs])) == [(2, 2, 1), (4, 4, 3), (4, 5, 1)]
    m = build_vocab_map("statistics", SOURCE, PIVOT, pair_counts=pairs)
    assert m.table[4] == 4 and m.table[2] == 2 and m.table[1] == 1 and m.table[6] == -1


def test_projection_sums_duplicates_and_counts_fallbacks():
    m = build_vocab_map("mined", SOURCE, PIVOT)
    src_ids = np.array([[2, 3, 4], [1, 0, 6]])
    src_logp = np.log(np.array([[0.5, 0.2, 0.1], [0.6, 0.3, 0.05]], dtype=np.float32)).astype(np.float16)
    mm = build_vocab_map("exact", SOURCE, PIVOT)
    mm.table[2] = 3  # make " cats" land on the same pivot id as "cat": probabilities must add up
    counts = Counter()
    out = project(
        src_ids,
        src_logp,
        donor=np.array([0, -1, 1]),
        gold=np.array([5, 5, 1]),
        vocab_map=mm,
        counts=counts,
        dropped_mass="tail",
    )

    def row(r):
        return {t: p for t, p in zip(out.ids[r].tolist(), np.exp(out.logp[r]).tolist()) if t >= 0}

    row0 = row(0)
    assert row0.keys() == {3} and row0[3] == pytest.approx(0.7, rel=2e-3)  # 0.5 + 0.2; " dogs" unmapped
    assert out.fallback.tolist() == [False, True, False]
    assert out.ids[1, 0] == 5 and out.logp[1, 0] == 0.0  # one-hot on the gold next token
    row2 = row(2)
    assert row2 == pytest.approx({1: 0.6}, rel=2e-3)  # "</s>" (special) and " do" have no pivot twin: dropped
    assert counts["fallback: no source position with the same boundary"] == 1 and counts["projected"] == 2
    assert m.table[4] == 4
    # the default spreads the dropped mass over the mapped candidates: the tail stays the source's own
    out = project(src_ids, src_logp, donor=np.array([0, -1, 1]), gold=np.array([5, 5, 1]), vocab_map=mm)
    assert row(0) == pytest.approx({3: 0.8}, rel=2e-3) and row(2) == pytest.approx({1: 0.95}, rel=2e-3)


def dist(rows, fallback=None):
    k = max(len(r) for r in rows)
    ids = np.full((len(rows), k), -1)
    logp = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for i, r in enumerate(rows):
        for c, (t, p) in enumerate(r.items()):
            ids[i, c], logp[i, c] = t, np.log(p)
    return Projected(ids, logp, np.zeros(len(rows), bool) if fallback is None else np.array(fallback))


def test_mince_picks_the_lower_per_byte_nll_and_the_pivot_on_ties():
    a, b = dist([{1: 0.9}]), dist([{2: 0.9}])
    choices = Counter()
    assert (
        fuse("mince", [Candidate("pivot", a, 1.0), Candidate("src", b, 0.5)], np.array([1]), 10, choices) is b
    )
    assert (
        fuse("mince", [Candidate("pivot", a, 0.5), Candidate("src", b, 0.5)], np.array([1]), 10, choices) is a
    )
    assert choices == {"src": 1, "pivot": 1}


def test_mince_token_scores_each_position_with_a_tail_floor():
    gold = np.array([1, 2, 3])
    a = dist([{1: 0.6, 2: 0.3}, {1: 0.9}, {3: 0.2}])
    b = dist([{1: 0.5}, {2: 0.4, 1: 0.5}, {1: 0.99}], fallback=[False, False, True])
    # Row 2: gold 3 is outside b's top-1, but b fell back anyway; a wins with 0.2.
    nll_b = gold_nll(b, gold, vocab_size=10)
    assert nll_b[2] == np.inf and nll_b[1] == pytest.approx(-np.log(0.4), rel=1e-5)
    nll_a = gold_nll(a, gold, vocab_size=10)
    assert nll_a[1] == pytest.approx(-np.log(0.1 / 9), rel=1e-4)  # tail 0.1 spread over 9 other ids
    out = fuse("mince_token", [Candidate("a", a, 0), Candidate("b", b, 0)], gold, 10)
    assert out.ids[:, 0].tolist() == [1, 2, 3]
    assert np.exp(out.logp[1, :2]).tolist() == pytest.approx([0.4, 0.5])


def test_avgce_weights_by_softmax_of_negative_scores_and_skips_fallbacks():
    gold = np.array([1, 1])
    a = dist([{1: 0.8}, {1: 0.8}])
    b = dist([{2: 0.6}, {1: 1.0}], fallback=[False, True])
    out = fuse("avgce", [Candidate("a", a, 1.0), Candidate("b", b, 2.0)], gold, 10)
    w = np.exp([-1.0, -2.0]) / np.exp([-1.0, -2.0]).sum()
    row0 = dict(zip(out.ids[0].tolist(), np.exp(out.logp[0]).tolist()))
    assert row0[1] == pytest.approx(w[0] * 0.8) and row0[2] == pytest.approx(w[1] * 0.6)
    row1 = {t: p for t, p in zip(out.ids[1].tolist(), np.exp(out.logp[1]).tolist()) if t >= 0}
    assert row1 == pytest.approx({1: 0.8})  # b fell back here: a alone, weight renormalised to 1
