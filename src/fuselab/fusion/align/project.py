"""Projection of a source top-k distribution onto pivot ids, at the aligned positions.

Each source candidate becomes its mapped pivot id; candidates that land on the same pivot id have their
probabilities *summed* (the reference keeps the first and drops the rest, FuseChat spec §3.3), unmapped ones are
dropped. Positions without a donor, or whose candidates all vanish, or whose gold pivot token is a special token
the source vocabulary cannot spell as one token, fall back to a one-hot target on the gold next token (v2's
rule; FuseLLM used the current token, issue #27) and are counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from fuselab.fusion.align.vocab import VocabMap


@dataclass
class Projected:
    """A candidate distribution on pivot ids, one row per pivot stored position (pad: id -1, logp -inf)."""

    ids: np.ndarray  # int64 [n, K]
    logp: np.ndarray  # float32 [n, K]
    fallback: np.ndarray  # bool [n]: one-hot gold (no usable source distribution)


def one_hot(gold: np.ndarray, k: int) -> Projected:
    ids = np.full((len(gold), k), -1, dtype=np.int64)
    logp = np.full((len(gold), k), -np.inf, dtype=np.float32)
    ids[:, 0] = gold
    logp[:, 0] = 0.0
    return Projected(ids, logp, np.ones(len(gold), dtype=bool))


def project(
    source_ids: np.ndarray,
    source_logp: np.ndarray,
    donor: np.ndarray,
    gold: np.ndarray,
    vocab_map: VocabMap,
    *,
    unsupported_gold: np.ndarray | None = None,
    counts: Counter[str] | None = None,
) -> Projected:
    """Project rows ``source_ids[donor[r]]`` onto pivot ids; see the module doc for fallbacks.

    ``source_ids``/``source_logp``: [n_src, k] stored source rows; ``donor``: [n] source row per pivot row or
    -1; ``gold``: [n] pivot gold next tokens; ``unsupported_gold``: [n] bool, gold is a pivot special token the
    source lacks.
    """
    n = len(donor)
    k = source_ids.shape[1] if source_ids.ndim == 2 else 1
    out = one_hot(gold, k)
    has = donor >= 0
    if unsupported_gold is not None:
        has &= ~unsupported_gold
    rows = np.flatnonzero(has)
    if len(rows):
        cand = vocab_map(np.asarray(source_ids[donor[rows]], dtype=np.int64))  # [r, k] pivot ids
        prob = np.exp(np.asarray(source_logp[donor[rows]], dtype=np.float64))
        valid = (cand >= 0) & (prob > 0)
        r_idx = np.broadcast_to(np.arange(len(rows))[:, None], cand.shape)[valid]
        big = int(cand.max()) + 2 if cand.size else 1
        keys = r_idx.astype(np.int64) * big + cand[valid]
        uniq, inverse = np.unique(keys, return_inverse=True)
        mass = np.bincount(inverse, weights=prob[valid], minlength=len(uniq))
        u_row, u_id = uniq // big, uniq % big
        first = np.searchsorted(u_row, u_row, side="left")
        rank = np.arange(len(uniq)) - first
        got = np.zeros(len(rows), dtype=bool)
        got[u_row] = True
        target = rows[u_row]
        out.ids[rows[got]] = -1
        out.logp[rows[got]] = -np.inf
        out.ids[target, rank] = u_id
        out.logp[target, rank] = np.log(mass).astype(np.float32)
        out.fallback[rows[got]] = False
    if counts is not None:
        counts["positions"] += n
        counts["projected"] += int((~out.fallback).sum())
        counts["fallback: no source position with the same boundary"] += int((donor < 0).sum())
        if unsupported_gold is not None:
            counts["fallback: gold is a special token the source lacks"] += int(
                (unsupported_gold & (donor >= 0)).sum()
            )
        counts["fallback: no candidate maps to the pivot vocabulary"] += int((out.fallback & has).sum())
    return out
