"""Fusion functions: combine the candidate distributions (pivot + aligned sources) into one target.

Candidates are scored on how well each one predicts the gold text, by NLL **per byte** of supervised text so
that different tokenizers compare fairly (the reference compares mean per-token CE, which favours tokenizers
that cut text into more pieces, FuseChat spec §9.2 item 10), in float32. What is scored (``fuse.score``):

- ``projected`` (default): the candidate's *projected target*, the distribution the pivot is trained on, on
  the pivot's gold tokens (:func:`projected_scores`). A source can predict its own tokens far better than its
  projection predicts the pivot's: in issue 12 Qwen-Coder won all 12 code sequences at 0.039 NLL/byte on its
  own tokens while its projected target scored 0.427 NLL/byte on SmolLM2's, 4.5 times worse than the pivot
  itself. Rows where any candidate fell back to one-hot (no information) are left out of every candidate's
  score, so a candidate is not rewarded for having fallen back.
- ``own``: each model's gold NLL on its own tokenisation (what FuseLLM/FuseChat do).

Registered functions:

- ``mince`` (FuseLLM/FuseChat default): per sequence, the candidate with the lowest per-byte NLL; ties go to
  the first candidate (the pivot).
- ``mince_token``: per position, the candidate with the highest probability on the gold pivot token under its
  *aligned* distribution (gold outside the top-k: the candidate's tail mass spread evenly over the rest of the
  vocabulary, spec §10 item 12). Fallback rows (one-hot gold, no information) never win unless all candidates
  fell back. Not implemented in any released trainer (§4.3).
- ``avgce`` (FuseLLM): per sequence, Σ_k w_k P_k with w = softmax(−per-byte NLL). At each position, candidates
  that fell back are left out and the weights renormalised. (FuseLLM uses softmax(exp(−CE)), which is nearly
  uniform, §4.4.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fuselab.fusion.align.project import Projected
from fuselab.utils.registry import Registry


@dataclass
class Candidate:
    name: str
    dist: Projected
    score: float  # per-byte NLL of the sequence under this model (lower is better)


FusionFn = Callable[[Sequence[Candidate], np.ndarray, int, Counter], Projected]
FUSIONS: Registry[FusionFn] = Registry("fusion function")
register_fusion = FUSIONS.register
fusion_names = FUSIONS.names


def fuse(
    name: str,
    candidates: Sequence[Candidate],
    gold: np.ndarray,
    vocab_size: int,
    choices: Counter | None = None,
) -> Projected:
    """Fuse ``candidates`` (each [n, K] on pivot ids) into one target; ``choices`` counts who was picked."""
    fn = FUSIONS.get(name)
    if not candidates:
        raise ValueError("no candidates to fuse")
    return fn(candidates, gold, vocab_size, choices if choices is not None else Counter())


@register_fusion("mince")
def mince(candidates: Sequence[Candidate], gold: np.ndarray, vocab_size: int, choices: Counter) -> Projected:
    scores = np.array([c.score for c in candidates], dtype=np.float64)
    best = int(np.argmin(scores))  # first minimum: the pivot wins ties
    choices[candidates[best].name] += 1
    return candidates[best].dist


def gold_nll(dist: Projected, gold: np.ndarray, vocab_size: int) -> np.ndarray:
    """−log Q(gold) per row under a (top-k + tail) distribution; inf for fallback rows."""
    p = np.exp(dist.logp.astype(np.float64))
    hit = dist.ids == gold[:, None]
    p_gold = (p * hit).sum(axis=1)
    kept = (dist.ids >= 0).sum(axis=1)
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    floor = tail / np.maximum(vocab_size - kept, 1)
    q = np.where(hit.any(axis=1), p_gold, floor)
    nll = -np.log(np.maximum(q, 1e-30))
    return np.where(dist.fallback, np.inf, nll)


@register_fusion("mince_token")
def mince_token(
    candidates: Sequence[Candidate], gold: np.ndarray, vocab_size: int, choices: Counter
) -> Projected:
    nll = np.stack([gold_nll(c.dist, gold, vocab_size) for c in candidates])  # [C, n]
    best = np.argmin(nll, axis=0)  # ties and all-inf rows: the first candidate
    width = max(c.dist.ids.shape[1] for c in candidates)
    ids = np.full((len(gold), width), -1, dtype=np.int64)
    logp = np.full((len(gold), width), -np.inf, dtype=np.float32)
    fallback = np.ones(len(gold), dtype=bool)
    for ci, c in enumerate(candidates):
        rows = best == ci
        k = c.dist.ids.shape[1]
        ids[rows, :k] = c.dist.ids[rows]
        logp[rows, :k] = c.dist.logp[rows]
        fallback[rows] = c.dist.fallback[rows]
        choices[c.name] += int((rows & ~c.dist.fallback).sum())
    choices["fallback"] += int(fallback.sum())
    return Projected(ids, logp, fallback)


@register_fusion("avgce")
def avgce(candidates: Sequence[Candidate], gold: np.ndarray, vocab_size: int, choices: Counter) -> Projected:
    scores = np.array([c.score for c in candidates], dtype=np.float64)
    w = np.exp(-(scores - scores.min()))
    use = np.stack([~c.dist.fallback for c in candidates])  # [C, n]
    all_fb = ~use.any(axis=0)
    use[0, all_fb] = True  # nothing informative: keep the first (one-hot gold)
    weights = use * w[:, None]
    weights /= weights.sum(axis=0, keepdims=True)
    n = len(gold)
    rows_l, ids_l, p_l = [], [], []
    for ci, c in enumerate(candidates):
        valid = c.dist.ids >= 0
        r = np.broadcast_to(np.arange(n)[:, None], valid.shape)[valid]
        rows_l.append(r)
        ids_l.append(c.dist.ids[valid])
        p_l.append(np.exp(c.dist.logp[valid].astype(np.float64)) * weights[ci, r])
        choices[c.name] += float(weights[ci].sum())
    rows, tok, prob = np.concatenate(rows_l), np.concatenate(ids_l), np.concatenate(p_l)
    big = int(max(vocab_size, tok.max() + 1 if len(tok) else 1))
    uniq, inv = np.unique(rows.astype(np.int64) * big + tok, return_inverse=True)
    mass = np.bincount(inv, weights=prob, minlength=len(uniq))
    u_row, u_id = uniq // big, uniq % big
    rank = np.arange(len(uniq)) - np.searchsorted(u_row, u_row, side="left")
    width = int(rank.max()) + 1 if len(rank) else 1
    ids = np.full((n, width), -1, dtype=np.int64)
    logp = np.full((n, width), -np.inf, dtype=np.float32)
    keep = mass > 0
    ids[u_row[keep], rank[keep]] = u_id[keep]
    logp[u_row[keep], rank[keep]] = np.log(mass[keep])
    return Projected(ids, logp, all_fb)


def projected_scores(
    dists: Sequence[Projected], gold: np.ndarray, vocab_size: int, gold_bytes: np.ndarray
) -> np.ndarray:
    """Per-byte NLL of each candidate distribution on the pivot's gold tokens, over the rows where no candidate
    fell back (``gold_bytes``: [n] bytes of each gold token). All zeros (a tie: the first candidate wins) when
    no row is common to all."""
    nll = np.stack([gold_nll(d, gold, vocab_size) for d in dists])  # [C, n], inf on fallback rows
    common = np.isfinite(nll).all(axis=0)
    if not common.any():
        return np.zeros(len(dists))
    total = nll[:, common].astype(np.float32).sum(axis=1, dtype=np.float64)
    return total / max(1, int(np.asarray(gold_bytes)[common].sum()))


def per_byte_nll(gold_nll: np.ndarray, supervised_bytes: int) -> float:
    """Sequence score: summed gold NLL (float32 accumulation) over supervised bytes."""
    return float(np.asarray(gold_nll, dtype=np.float32).sum(dtype=np.float64)) / max(1, supervised_bytes)
