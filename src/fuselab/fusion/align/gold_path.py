"""The chain rule along the gold text: the source's probability of a pivot token longer than its own.

At a pivot position with a same-boundary source position, the source's next-token candidates start where the
pivot's next token starts. When the pivot's next (gold) token ends *before or where* the source's gold token
ends, the prefix mapping (:mod:`fuselab.fusion.align.vocab`) puts the source's gold mass on it. When it ends
*after* (SmolLM2 writes ``\\n   `` where Qwen writes ``\\n`` then ``   ``; a word one tokenizer merges and the
other splits), no single source candidate spells it: the source's probability of the pivot's gold token is
the probability of the text it spells, the product of the source's probabilities along that text:

    P(pivot gold) = p(v1) · p(v2 | v1) · … · p(vm | v1…vm-1)

where v1…vm are the source's gold tokens covering it, read from the stored gold NLLs (no re-extraction), when
vm ends exactly where the pivot token ends (``chain``). When vm runs past it (the source has no boundary
there: Gemma writes ``\\n`` + ``    `` + ``for`` against SmolLM2's ``\\n   `` + `` for``), the last factor is
the source's probability that its next token *starts with* the rest of the pivot token, summed over the
stored top-k candidates (plus the gold token if it is outside the top-k) (``chain, last step by prefix``):
an approximation, since what the pivot tokenizer does after a longer continuation is not known, and counted.

The mass found this way is moved from the pivot token that v1 itself maps to (its prefix, e.g. ``\\n``) to the
pivot's gold token; the rest of v1's mass (continuations other than the gold text) stays on the prefix,
which is what the pivot would write for most of them. Only the gold path has stored continuations, so other
candidates whose text is a proper prefix of a longer pivot token are not extended (counted as
``gold path: other candidates not extended`` in the diagnostics of :mod:`fuselab.fusion.align.project`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fuselab.data.render import Encoded
from fuselab.data.token_spans import Vocabulary

# Status of each pivot row (codes in :attr:`GoldPath.status`).
NO_DONOR, DIRECT, CHAIN, CHAIN_PREFIX, UNAVAILABLE = 0, 1, 2, 3, 4
STATUS_NAMES = {
    NO_DONOR: "no same-boundary source position",
    DIRECT: "source gold token as long as the pivot's or longer",
    CHAIN: "chain rule along the gold text",
    CHAIN_PREFIX: "chain rule, last step by prefix",
    UNAVAILABLE: "chain rule unavailable (unscored source position)",
}


@dataclass
class GoldPath:
    """Per pivot stored row: the chain-rule probability of the pivot's gold token under the source."""

    logp: np.ndarray  # float64 [n]: log P_source(pivot gold token), nan where the chain rule was not applied
    first: np.ndarray  # int64 [n]: the source's gold token v1 at the donor position (-1 without a donor)
    status: np.ndarray  # int8 [n]: one of the codes above
    # bool [n]: another stored candidate spells a proper prefix of the pivot's gold token; its continuation
    # is not stored, so its mass stays on the shorter pivot token it maps to (approximated, counted)
    unextended: np.ndarray | None = None


def gold_path(
    pivot: Encoded,
    source: Encoded,
    donor: np.ndarray,
    source_ids: np.ndarray,
    source_logp: np.ndarray,
    source_gold_nll: np.ndarray,
    source_vocab: Vocabulary,
    text: bytes,
) -> GoldPath:
    """Chain-rule probabilities of the pivot's gold tokens (see the module doc).

    ``donor``: [n] source stored row per pivot stored row (-1: none), as from
    :func:`~fuselab.fusion.align.sequence.align_sequences`; ``source_ids``/``source_logp``/``source_gold_nll``:
    the source's stored rows (top-k ids, log-probs, gold NLL); ``text``: the UTF-8 bytes both tokenised.
    """
    p_pos = pivot.predicting_positions()
    s_pos = source.predicting_positions()
    s_row = np.full(len(source.ids), -1, dtype=np.int64)
    s_row[s_pos] = np.arange(len(s_pos))
    n = len(p_pos)
    logp = np.full(n, np.nan)
    first = np.full(n, -1, dtype=np.int64)
    status = np.full(n, NO_DONOR, dtype=np.int8)
    has = donor >= 0
    unextended = np.zeros(n, dtype=bool)
    if not has.any():
        return GoldPath(logp, first, status, unextended)
    p_end = pivot.spans.ends[p_pos + 1]  # end of the pivot's gold token
    q = np.where(has, s_pos[np.maximum(donor, 0)], 0)  # donor source position
    s_end = source.spans.ends
    first[has] = source.ids[q[has] + 1]
    e1 = s_end[q + 1]
    status[has] = DIRECT
    s_starts = source.spans.starts
    for r in np.flatnonzero(has & (e1 < p_end)).tolist():
        e = int(p_end[r])
        j = int(q[r]) + 1  # source token j is predicted by stored row s_row[j - 1]
        total = 0.0
        ok = True
        while True:
            row = s_row[j - 1]
            if row < 0:
                ok = False
                break
            if s_end[j] < e:
                total -= float(source_gold_nll[row])
                j += 1
                continue
            if s_end[j] == e:
                total -= float(source_gold_nll[row])
                status[r] = CHAIN
            else:
                rest = text[int(s_starts[j]) : e]
                total += _log_prefix_mass(
                    source_ids[row], source_logp[row], float(source_gold_nll[row]), int(source.ids[j]),
                    rest, source_vocab,
                )  # fmt: skip
                status[r] = CHAIN_PREFIX
            break
        if ok:
            logp[r] = total
        else:
            status[r] = UNAVAILABLE
    p_start = pivot.spans.starts[p_pos + 1]
    surfaces = source_vocab.surfaces
    for r in np.flatnonzero(has & (p_end - p_start > 1)).tolist():
        gold_text = text[int(p_start[r]) : int(p_end[r])]
        for c in np.asarray(source_ids[donor[r]]).tolist():
            if c != first[r] and 0 <= c < len(surfaces):
                sc = surfaces[c]
                if 0 < len(sc) < len(gold_text) and gold_text.startswith(sc):
                    unextended[r] = True
                    break
    return GoldPath(logp, first, status, unextended)


def _log_prefix_mass(
    ids: np.ndarray, logp: np.ndarray, gold_nll: float, gold_id: int, rest: bytes, vocab: Vocabulary
) -> float:
    """log Σ p(c) over the stored candidates c whose text starts with ``rest``, the gold token included."""
    mass = 0.0
    seen_gold = False
    for c, lp in zip(np.asarray(ids).tolist(), np.asarray(logp, dtype=np.float64).tolist()):
        if c < 0 or c >= len(vocab) or not np.isfinite(lp):
            continue
        if vocab.surfaces[c].startswith(rest):
            mass += float(np.exp(lp))
            seen_gold |= c == gold_id
    if not seen_gold:
        mass += float(np.exp(-gold_nll))
    return float(np.log(min(max(mass, 1e-30), 1.0)))
