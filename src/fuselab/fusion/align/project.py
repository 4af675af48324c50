"""Projection of a source top-k distribution onto pivot ids, at the aligned positions.

Each source candidate becomes its mapped pivot id (:mod:`fuselab.fusion.align.vocab`); candidates that land on
the same pivot id have their probabilities *summed* (the reference keeps the first and drops the rest,
FuseChat spec §3.3). Where the pivot's gold token is longer than the source's, the chain rule along the gold
text (:mod:`fuselab.fusion.align.gold_path`) gives the source's probability of it, moved from the pivot token
the source's first gold token maps to.

The mass outside the stored top-k is genuine: the loss's "any other token" class (``tail: bucket``) gets
``1 − Σ top-k``. Candidates that have no pivot id are *dropped*; with ``dropped_mass: redistribute`` (default)
their probability is spread over the mapped candidates in proportion, so the tail stays the source's own;
``dropped_mass: tail`` (fuselab before issue 12) lets it fall into the tail, where it pushes every stored
token down, the pivot's right next token included. The dropped mass is reported either way.

Positions without a donor, or whose candidates all vanish, or whose gold pivot token is a special token the
source vocabulary cannot spell as one token, fall back to a one-hot target on the gold next token (v2's
rule; FuseLLM used the current token, issue #27) and are counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from fuselab.fusion.align.gold_path import CHAIN, CHAIN_PREFIX, DIRECT, STATUS_NAMES, GoldPath
from fuselab.fusion.align.vocab import VocabMap

DROPPED_MASS_MODES = ("redistribute", "tail")


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
    counts: Counter | None = None,
    path: GoldPath | None = None,
    dropped_mass: str = "redistribute",
) -> Projected:
    """Project rows ``source_ids[donor[r]]`` onto pivot ids; see the module doc for fallbacks.

    ``source_ids``/``source_logp``: [n_src, k] stored source rows; ``donor``: [n] source row per pivot row or
    -1; ``gold``: [n] pivot gold next tokens; ``unsupported_gold``: [n] bool, gold is a pivot special token the
    source lacks; ``path``: chain-rule probabilities of the gold tokens (None: no chain rule). ``counts``
    receives the fallback counts and the diagnostics of :func:`summarize_counts`.
    """
    if dropped_mass not in DROPPED_MASS_MODES:
        raise ValueError(f"unknown dropped_mass {dropped_mass!r}; valid: {', '.join(DROPPED_MASS_MODES)}")
    n = len(donor)
    k = source_ids.shape[1] if source_ids.ndim == 2 else 1
    out = one_hot(gold, k + (path is not None))
    has = donor >= 0
    if unsupported_gold is not None:
        has &= ~unsupported_gold
    rows = np.flatnonzero(has)
    dropped = np.zeros(n)
    chained = np.zeros(n, dtype=bool)
    if len(rows):
        src = np.asarray(source_ids[donor[rows]], dtype=np.int64)
        cand = vocab_map(src)  # [r, k] pivot ids
        prob = np.exp(np.asarray(source_logp[donor[rows]], dtype=np.float64))
        in_context = 0
        if path is not None:
            # In context, the source's own gold token is known to continue as the gold text, so where it spells
            # at least the pivot's gold token, the pivot's own encoding of it is the pivot's gold token.
            direct = (path.status[rows] == DIRECT)[:, None] & (src == path.first[rows][:, None])
            in_context = int((direct & (cand != gold[rows][:, None])).any(axis=1).sum())
            cand = np.where(direct, gold[rows][:, None], cand)
        valid = (cand >= 0) & (prob > 0)
        total = np.where(prob > 0, prob, 0.0).sum(axis=1)
        mapped = np.where(valid, prob, 0.0).sum(axis=1)
        dropped[rows] = total - mapped
        if dropped_mass == "redistribute":
            prob = prob * np.where(mapped > 0, total / np.maximum(mapped, 1e-300), 1.0)[:, None]
        if path is not None:
            extra_id = np.full(len(rows), -1, dtype=np.int64)
            extra_p = np.zeros(len(rows))
            lp = path.logp[rows]
            use = np.isfinite(lp) & np.isin(path.status[rows], (CHAIN, CHAIN_PREFIX))
            m = np.exp(np.where(use, lp, -np.inf))
            is_first = (src == path.first[rows][:, None]) & use[:, None]
            # take the chain mass out of the first gold token's own entry (never below zero)
            take = np.minimum(np.where(is_first, prob, 0.0), m[:, None])
            prob = prob - take
            extra_id[use] = gold[rows][use]
            extra_p[use] = m[use]
            cand = np.concatenate([cand, extra_id[:, None]], axis=1)
            prob = np.concatenate([prob, extra_p[:, None]], axis=1)
            valid = (cand >= 0) & (prob > 0)
            chained[rows[use]] = True
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
        out.logp[target, rank] = np.log(np.minimum(mass, 1.0)).astype(np.float32)
        out.fallback[rows[got]] = False
    if counts is not None:
        counts["positions"] += n
        projected = ~out.fallback
        counts["projected"] += int(projected.sum())
        counts["fallback: no source position with the same boundary"] += int((donor < 0).sum())
        if unsupported_gold is not None:
            counts["fallback: gold is a special token the source lacks"] += int(
                (unsupported_gold & (donor >= 0)).sum()
            )
        counts["fallback: no candidate maps to the pivot vocabulary"] += int((out.fallback & has).sum())
        _diagnostics(out, gold, projected, dropped, path, chained, counts)
        if path is not None and len(rows):
            counts["gold path: gold candidate mapped in context"] += in_context  # differed from the table
    return out


def _diagnostics(
    out: Projected,
    gold: np.ndarray,
    projected: np.ndarray,
    dropped: np.ndarray,
    path: GoldPath | None,
    chained: np.ndarray,
    counts: Counter,
) -> None:
    """Sums behind the target diagnostics of :func:`summarize_counts` (projected rows only)."""
    if not projected.any():
        return
    p = np.exp(out.logp[projected].astype(np.float64))
    ids = out.ids[projected]
    g = gold[projected]
    counts["sum q(gold)"] += float((p * (ids == g[:, None])).sum())
    top = ids[np.arange(len(ids)), np.argmax(np.where(ids >= 0, p, -1.0), axis=1)]
    counts["top-1 is gold"] += int((top == g).sum())
    counts["sum dropped mass"] += float(dropped[projected].sum())
    counts["sum tail mass"] += float(np.clip(1.0 - p.sum(axis=1), 0.0, 1.0).sum())
    if path is not None:
        for code, name in STATUS_NAMES.items():
            hit = int((path.status[projected] == code).sum())
            if hit:
                counts[f"gold path: {name}"] += hit
        counts["gold path: chain mass added"] += int(chained[projected].sum())
        if path.unextended is not None:
            counts["gold path: other candidates not extended"] += int(path.unextended[projected].sum())


def summarize_counts(counts: Counter | dict) -> dict[str, float]:
    """The per-source target diagnostics, as reported: means over projected rows, shares of all positions.

    ``mean q(gold)``: the target's probability of the pivot's next token; ``top-1 is gold``: share of rows
    whose most probable target token is the pivot's next token; ``mean dropped mass``: source probability
    with no pivot id; ``mean tail mass``: mass outside the target's ids ("any other token").
    """
    c = dict(counts)
    projected = max(int(c.get("projected", 0)), 1)
    positions = max(int(c.get("positions", 0)), 1)
    out = {
        "positions": int(c.get("positions", 0)),
        "projected share": round(c.get("projected", 0) / positions, 4),
        "mean q(gold)": round(c.get("sum q(gold)", 0.0) / projected, 4),
        "top-1 is gold": round(c.get("top-1 is gold", 0) / projected, 4),
        "mean dropped mass": round(c.get("sum dropped mass", 0.0) / projected, 5),
        "mean tail mass": round(c.get("sum tail mass", 0.0) / projected, 4),
    }
    for key, value in c.items():
        if key.startswith(("fallback:", "gold path:")):
            out[key] = int(value)
    return out
