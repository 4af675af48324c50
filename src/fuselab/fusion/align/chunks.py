"""Chunks between shared byte boundaries, for the chunk-level likelihood loss (``train.loss: alm``).

Approximate Likelihood Matching (Minixhofer et al., NeurIPS 2025, arXiv 2503.20083) compares two models of
different tokenizers only where both can be compared exactly: on *chunks* of text that begin and end on a
byte boundary both tokenisations share. A chunk's likelihood under a model is the product of its token
probabilities inside it, so the teacher's comes from its stored gold NLLs and the student's from its own
logits, whatever the two segmentations inside the chunk. Unlike token-level targets this covers the positions
where the pivot's token boundaries cut through the source's tokens (13–16% of positions in the demo).

:func:`source_chunks` cuts the supervised pivot rows into such chunks (each pivot row belongs to at most one);
:func:`token_chunks` is the degenerate case of a teacher with the pivot's own tokens (every row its own chunk).
"""

from __future__ import annotations

import numpy as np

from fuselab.data.render import Encoded


def source_chunks(
    pivot: Encoded, source: Encoded, source_gold_nll: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(chunk_of_row, chunk_logp)``: for each pivot stored row the index of its chunk (-1: in none), and for
    each chunk the source's log-likelihood of its text (sum of stored gold log-probs).

    A chunk is a run of consecutive supervised pivot rows whose gold tokens tile ``[B, E)``, with B and E both
    pivot and source token boundaries and no shared boundary in between; every source token inside must be a
    stored (scored) source position, otherwise the chunk is left out.
    """
    p_pos = pivot.predicting_positions()
    n = len(p_pos)
    chunk_of_row = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return chunk_of_row, np.zeros(0)
    s_pos = source.predicting_positions()
    s_row = np.full(len(source.ids), -1, dtype=np.int64)
    s_row[s_pos] = np.arange(len(s_pos))
    s_starts, s_ends = source.spans.starts, source.spans.ends
    shared = np.intersect1d(pivot.spans.ends, s_ends)
    g_start = pivot.spans.starts[p_pos + 1]
    g_end = pivot.spans.ends[p_pos + 1]
    start_shared = np.isin(g_start, shared)
    end_shared = np.isin(g_end, shared)
    logps: list[float] = []
    r = 0
    while r < n:
        if not start_shared[r] or g_end[r] <= g_start[r]:
            r += 1
            continue
        last = r
        while not end_shared[last] and last + 1 < n and p_pos[last + 1] == p_pos[last] + 1:
            last += 1
        if not end_shared[last]:
            r = last + 1
            continue
        b, e = int(g_start[r]), int(g_end[last])
        j0 = int(np.searchsorted(s_starts, b, side="left"))
        j1 = int(np.searchsorted(s_ends, e, side="left"))  # the source token ending at e
        rows = s_row[np.arange(j0, j1 + 1) - 1] if j0 >= 1 else np.array([-1])
        if j1 < j0 or s_starts[j0] != b or s_ends[j1] != e or (rows < 0).any():
            r = last + 1
            continue
        chunk_of_row[r : last + 1] = len(logps)
        logps.append(-float(np.asarray(source_gold_nll, dtype=np.float64)[rows].sum()))
        r = last + 1
    return chunk_of_row, np.asarray(logps, dtype=np.float64)


def token_chunks(gold_nll: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row its own chunk, with the teacher's own gold log-prob (a teacher with the pivot's tokens)."""
    n = len(gold_nll)
    return np.arange(n, dtype=np.int64), -np.asarray(gold_nll, dtype=np.float64)
