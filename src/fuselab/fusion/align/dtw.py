"""FuseLLM's dynamic-programming token alignment (DTW with an edit-distance cell cost), vectorised and banded.

Recurrence (FuseChat spec §3.1; FuseLLM credits Fu et al. 2023): D[0,0] = 0, D[i,0] = D[0,j] = inf,
D[i,j] = c(i,j) + min(D[i-1,j], D[i,j-1], D[i-1,j-1]) with c = Levenshtein distance between the token texts.
The reference runs it as n·m Python iterations with one ``editdistance`` call each (~9 s per 2048² example).
Here the cost cells come from rapidfuzz's C++ ``cdist`` (multi-threaded) and the recurrence runs one row at a
time as a numpy prefix scan (see :func:`dtw_path`), both restricted to a band around the proportional diagonal. Backtracking uses the FuseLLM tie order (diagonal, then up, then left),
so the path is deterministic (reference issue #30).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

INF = np.float64(np.inf)


def cost_matrix(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Levenshtein distance between every pair of token texts, float64 [n, m]."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    if not a or not b:
        return np.zeros((len(a), len(b)))
    return cdist(list(a), list(b), scorer=Levenshtein.distance, dtype=np.int32, workers=-1).astype(np.float64)


def band_windows(n: int, m: int, band: int | None) -> tuple[np.ndarray, np.ndarray]:
    """1-based column range [lo_i, hi_i] of every row i = 1..n inside the band around j = i·m/n."""
    rows = np.arange(1, n + 1)
    if band is None:
        return np.ones(n, dtype=np.int64), np.full(n, m, dtype=np.int64)
    width = max(band, abs(n - m) + 1, -(-m // n) + 1)
    centre = rows * m / n
    lo = np.clip(np.floor(centre - width).astype(np.int64), 1, m)
    hi = np.clip(np.ceil(centre + width).astype(np.int64), 1, m)
    return lo, hi


def banded_cost(
    a: Sequence[str], b: Sequence[str], band: int | None, block: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Edit distances of the cells inside the band only: (cost [n, W], lo [n]), cell (i, j) at [i, j - lo_i]
    (0-based i, 1-based j). Memory is n·W, not n·m; cells past a row's window are never read."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    n, m = len(a), len(b)
    lo, hi = band_windows(n, m, band)
    width = int((hi - lo).max()) + 1
    cost = np.zeros((n, width))
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        c0, c1 = int(lo[r0:r1].min()) - 1, int(hi[r0:r1].max())
        d = cdist(list(a[r0:r1]), list(b[c0:c1]), scorer=Levenshtein.distance, dtype=np.int32, workers=1)
        for r in range(r0, r1):
            x, y = int(lo[r]) - 1 - c0, int(hi[r]) - c0
            cost[r, : y - x] = d[r - r0, x:y]
    return cost, lo


def dtw_path(cost: np.ndarray, band: int | None = None) -> list[tuple[int, int]]:
    """Minimum-cost monotone path through a dense ``cost`` [n, m] (see :func:`dtw_banded`)."""
    n, m = cost.shape
    if n == 0 or m == 0:
        return []
    lo, hi = band_windows(n, m, band)
    width = int((hi - lo).max()) + 1
    banded = np.zeros((n, width))
    for r in range(n):
        banded[r, : hi[r] - lo[r] + 1] = cost[r, lo[r] - 1 : hi[r]]
    return dtw_banded(banded, lo, hi, m)


def dtw_align(a: Sequence[str], b: Sequence[str], band: int | None) -> list[tuple[int, int]]:
    """The DTW path between token texts ``a`` (rows) and ``b`` (columns), computed inside the band."""
    if not a or not b:
        return []
    cost, lo = banded_cost(a, b, band)
    _, hi = band_windows(len(a), len(b), band)
    return dtw_banded(cost, lo, hi, len(b))


def dtw_banded(cost: np.ndarray, lo: np.ndarray, hi: np.ndarray, m: int) -> list[tuple[int, int]]:
    """The recurrence on banded storage (row i holds columns lo_i..hi_i, 1-based), then the backtrack.

    Row by row: within a row the left-neighbour chain D[i,j] = c + D[i,j-1] is a min-plus prefix scan,
    D[i,j] = S[j] + min_{k<=j}(A[k] - S[k]) with S the running sum of the row's costs and
    A[k] = c[i,k] + min(D[i-1,k], D[i-1,k-1]), i.e. a ``cumsum`` and a ``minimum.accumulate``. Costs are
    integers, so the sums are exact and ties are the same as in the cell-by-cell recurrence.
    """
    n, width = cost.shape
    D = np.full((n + 1, width + 1), INF)  # D[i, t] = D(i, lo_i + t); row 0 holds D(0, 0) = 0 at t = 0
    lo0 = np.concatenate([[0], lo])
    D[0, 0] = 0.0
    for i in range(1, n + 1):
        a, b = int(lo0[i]), int(hi[i - 1])
        k = b - a + 1
        prev_lo = int(lo0[i - 1])
        prev = np.full(k + 1, INF)  # D(i-1, j) for j = a-1 .. b
        x0, x1 = max(a - 1, prev_lo), min(b, prev_lo + width - 1 if i > 1 else 0)
        if x1 >= x0:
            prev[x0 - (a - 1) : x1 - (a - 1) + 1] = D[i - 1, x0 - prev_lo : x1 - prev_lo + 1]
        c = cost[i - 1, :k]
        s = np.cumsum(c)
        D[i, :k] = s + np.minimum.accumulate(c + np.minimum(prev[1:], prev[:-1]) - s)
    if not np.isfinite(D[n, m - int(lo0[n])]):
        raise ValueError("no path within the band; widen it")

    def at(i: int, j: int) -> float:
        if i == 0:
            return 0.0 if j == 0 else INF
        t = j - int(lo0[i])
        return D[i, t] if 0 <= t <= int(hi[i - 1]) - int(lo0[i]) else INF

    return backtrack(at, n, m)


def backtrack(at: Callable[[int, int], float], n: int, m: int) -> list[tuple[int, int]]:
    """Walk back from (n, m) to (1, 1) through the accumulated costs ``at(i, j)`` (1-based, inf outside),
    preferring diagonal, then up, then left on ties (FuseLLM's order)."""
    i, j = n, m
    path = [(i - 1, j - 1)]
    while (i, j) != (1, 1):
        diag = at(i - 1, j - 1) if i > 1 and j > 1 else INF
        up = at(i - 1, j) if i > 1 else INF
        left = at(i, j - 1) if j > 1 else INF
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i - 1, j - 1))
    path.reverse()
    return path


def reference_dtw(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """The DP as the reference code runs it: a Python loop over all n·m cells, one edit-distance call each.

    Kept as the baseline that ``benchmarks/fusion_align.py`` times; the tests check :func:`dtw_align`
    against their own independent copy of this loop.
    """
    from rapidfuzz.distance import Levenshtein

    n, m = len(a), len(b)
    D = [[float(INF)] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            D[i][j] = Levenshtein.distance(a[i - 1], b[j - 1]) + min(
                D[i - 1][j], D[i][j - 1], D[i - 1][j - 1]
            )
    return backtrack(lambda i, j: D[i][j], n, m)


def groups_from_path(path: Sequence[tuple[int, int]], m: int) -> list[list[int]]:
    """For every column j (pivot position), the ascending rows i (source positions) matched to it."""
    groups: list[list[int]] = [[] for _ in range(m)]
    for i, j in path:
        groups[j].append(i)
    return groups
