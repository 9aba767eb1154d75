"""Cut a sentence sequence into blocks: high boundary scores at the cuts, balanced block sizes.

Objective (the paper's, spec §5.1), for blocks of token sizes l_1..l_K and crossed scores s_b::

    J = sum(s_b) / K  -  lambda * std(l) / mean(l)        (population std; every l_k >= min_block_tokens)

(``score_mean="per_boundary"`` divides by K-1 instead: the mean over the crossed boundaries only.)

How it is optimised, and what is exact:

* For a fixed K the total T is fixed, so mean(l) = T/K and J depends on the partition only through
  S = sum of crossed scores and Q = sum(l_k^2): ``J = S/K - (lambda/T) * sqrt(K*Q - T^2)``. That is a
  *convex* function of (S, Q), increasing in S and decreasing in Q, so its maximum over the finite set
  of achievable (S, Q) lies on a vertex of their convex hull that maximises ``S - beta*Q`` for some
  beta >= 0. Such a vertex is built from prefixes that are themselves hull vertices of their own
  (position, blocks) state (an exchange argument), so a DP that keeps only the upper-left hull per
  state is **exact**. It is used when its estimated work is small (``method="auto"``: a few hundred
  sentences at most; always for the brute-force sized inputs of the tests).
* Otherwise (``"fast"``): a Lagrangian relaxation ``max S - beta*Q - gamma*K`` (additive, so a 1-D DP,
  vectorised over a grid of (beta, gamma) pairs in numpy) proposes partitions for many K, the
  original's DP (spec §5.2, with prefix sums) is added as a candidate when it is cheap enough, and a
  local search (move one cut, drop a cut, add a cut, evaluated in O(1) each) polishes the best
  candidates. This is not guaranteed optimal; the test-suite compares it with the exact method and
  with the original heuristic DP.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

Blocks = list[tuple[int, int]]

_EXACT_WORK_LIMIT = 250_000  # (state, predecessor) pairs the exact DP may visit in "auto" mode
_ORIGINAL_WORK_LIMIT = 6_000_000  # element operations for the vectorised original DP candidate


class SegmentationWarning(UserWarning):
    """An input had no segmentation satisfying the constraints; one block was returned."""


def objective(
    token_counts: Sequence[int],
    boundary_scores: Sequence[float],
    blocks: Sequence[tuple[int, int]],
    *,
    variance_penalty: float = 0.5,
    score_mean: str = "per_block",
) -> float:
    """J for given blocks (inclusive sentence ranges)."""
    sizes = [sum(token_counts[a : b + 1]) for a, b in blocks]
    crossed = sum(boundary_scores[a - 1] for a, _ in blocks[1:])
    return _j(
        len(blocks),
        crossed,
        float(sum(sizes)),
        float(sum(x * x for x in sizes)),
        variance_penalty,
        score_mean,
    )


def _j(k: int, s: float, t: float, q: float, lam: float, score_mean: str) -> float:
    if score_mean == "per_block":
        mean_score = s / k
    else:
        mean_score = s / (k - 1) if k > 1 else 0.0
    if t <= 0:
        return mean_score
    mu = t / k
    var = max(0.0, q / k - mu * mu)
    return mean_score - lam * math.sqrt(var) / mu


def segment(
    token_counts: Sequence[int],
    boundary_scores: Sequence[float],
    *,
    min_block_tokens: int = 200,
    variance_penalty: float = 0.5,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    score_mean: str = "per_block",
    method: str = "auto",
) -> Blocks:
    """Best blocks as inclusive sentence ranges ``[(start, end), ...]`` covering every sentence.

    An input with no valid split (too few tokens, or no block count in range is feasible) gets one
    block and a :class:`SegmentationWarning`.
    """
    n = len(token_counts)
    if len(boundary_scores) != max(0, n - 1):
        raise ValueError(
            f"need {max(0, n - 1)} boundary scores for {n} sentences, got {len(boundary_scores)}"
        )
    if score_mean not in ("per_block", "per_boundary"):
        raise ValueError(f"score_mean must be 'per_block' or 'per_boundary', got {score_mean!r}")
    if method not in ("auto", "exact", "fast"):
        raise ValueError(f"method must be 'auto', 'exact' or 'fast', got {method!r}")
    if variance_penalty < 0 or min_block_tokens < 0 or min_blocks < 1:
        raise ValueError("variance_penalty and min_block_tokens must be >= 0 and min_blocks >= 1")
    if n == 0:
        return []
    scores = [float(x) for x in boundary_scores]
    if any(not math.isfinite(x) for x in scores):
        raise ValueError("boundary scores must be finite numbers (fill failed scores before segmenting)")
    tokens = [int(x) for x in token_counts]
    if any(x < 0 for x in tokens):
        raise ValueError("token counts must be >= 0")

    prefix = [0]
    for x in tokens:
        prefix.append(prefix[-1] + x)
    k_feasible = _max_feasible_blocks(tokens, min_block_tokens)
    k_hi = min(k_feasible, n if max_blocks is None else max_blocks)
    k_lo = max(1, min_blocks)
    if k_feasible == 0 or k_lo > k_hi:
        warnings.warn(
            f"no segmentation of {n} sentences ({prefix[-1]} tokens) has {k_lo}..{max_blocks or n} blocks of "
            f">= {min_block_tokens} tokens; returning a single block",
            SegmentationWarning,
            stacklevel=2,
        )
        return [(0, n - 1)]

    problem = _Problem(tokens, scores, prefix, min_block_tokens, variance_penalty, score_mean, k_lo, k_hi)
    if method == "exact" or (method == "auto" and problem.exact_work() <= _EXACT_WORK_LIMIT):
        cuts = _exact(problem)
    else:
        cuts = _fast(problem)
    return _cuts_to_blocks(cuts, n)


def _max_feasible_blocks(tokens: Sequence[int], m: int) -> int:
    """Greedy: close a block as soon as it reaches m tokens; the tail joins the last block."""
    total = sum(tokens)
    if m <= 0:
        return len(tokens)
    if total < m:
        return 0
    count, acc = 0, 0
    for x in tokens:
        acc += x
        if acc >= m:
            count, acc = count + 1, 0
    return max(1, count)


def _cuts_to_blocks(cuts: Sequence[int], n: int) -> Blocks:
    starts = [0, *cuts]
    ends = [c - 1 for c in cuts] + [n - 1]
    return list(zip(starts, ends, strict=True))


class _Problem:
    def __init__(self, tokens, scores, prefix, m, lam, score_mean, k_lo, k_hi) -> None:
        self.tokens, self.scores, self.prefix = tokens, scores, prefix
        self.n = len(tokens)
        self.m, self.lam, self.score_mean = m, lam, score_mean
        self.k_lo, self.k_hi = k_lo, k_hi
        self.total = float(prefix[-1])
        # crossing score of a block starting at sentence j (boundary j-1); 0 for the first block.
        self.cross = [0.0] + scores
        # last[i]: largest j with prefix[i] - prefix[j] >= m (block j..i-1 long enough), or -1.
        last, j = [], -1
        for i in range(self.n + 1):
            while j + 1 < i and prefix[i] - prefix[j + 1] >= m:
                j += 1
            last.append(j if j >= 0 and prefix[i] - prefix[j] >= m else -1)
        self.last = last

    def j_of(self, k: int, s: float, q: float) -> float:
        return _j(k, s, self.total, q, self.lam, self.score_mean)

    def exact_work(self) -> int:
        return sum(max(0, self.last[i] + 1) for i in range(self.n + 1)) * self.k_hi

    def evaluate(self, cuts: Sequence[int]) -> float:
        p = self.prefix
        bounds = [0, *cuts, self.n]
        sizes = [p[b] - p[a] for a, b in zip(bounds, bounds[1:], strict=False)]
        s = sum(self.cross[c] for c in cuts)
        return self.j_of(len(sizes), s, float(sum(x * x for x in sizes)))

    def valid(self, cuts: Sequence[int]) -> bool:
        bounds = [0, *cuts, self.n]
        p = self.prefix
        ok = all(b > a and p[b] - p[a] >= self.m for a, b in zip(bounds, bounds[1:], strict=False))
        return ok and self.k_lo <= len(bounds) - 1 <= self.k_hi


# ----------------------------------------------------------------------------------------------
# Exact: DP over (prefix length, blocks) keeping the upper-left convex hull of (Q, S) per state.


def _hull(points: list[tuple[float, float, int, int]]) -> list[tuple[float, float, int, int]]:
    """Vertices maximising S - beta*Q for some beta >= 0. Points are (Q, S, j, idx)."""
    points.sort(key=lambda p: (p[0], -p[1]))
    front: list[tuple[float, float, int, int]] = []
    for p in points:  # Pareto: as Q grows, S must strictly grow
        if front and p[1] <= front[-1][1]:
            continue
        while len(front) >= 2:
            (q1, s1, *_), (q2, s2, *_) = front[-2], front[-1]
            # drop the middle point when it is on or below the chord (concave upper hull)
            if (s2 - s1) * (p[0] - q1) <= (p[1] - s1) * (q2 - q1):
                front.pop()
            else:
                break
        front.append(p)
    return front


def _exact(pb: _Problem) -> list[int]:
    n, p, cross, k_hi = pb.n, pb.prefix, pb.cross, pb.k_hi
    # table[k][i] = hull vertices (Q, S, j, idx) for sentences 0..i-1 in k blocks
    table: list[list[list[tuple[float, float, int, int]] | None]] = [
        [None] * (n + 1) for _ in range(k_hi + 1)
    ]
    table[0][0] = [(0.0, 0.0, -1, -1)]
    for k in range(1, k_hi + 1):
        prev_row, row = table[k - 1], table[k]
        for i in range(1, n + 1):
            jmax = pb.last[i]
            if jmax < 0:
                continue
            cands: list[tuple[float, float, int, int]] = []
            for j in range(jmax + 1):
                prev = prev_row[j]
                if not prev:
                    continue
                size = p[i] - p[j]
                sq, sc = float(size * size), cross[j]
                for idx, (q, s, _, _) in enumerate(prev):
                    cands.append((q + sq, s + sc, j, idx))
            if cands:
                row[i] = _hull(cands)
    best: tuple[float, int, int] | None = None
    for k in range(pb.k_lo, k_hi + 1):
        for idx, (q, s, _, _) in enumerate(table[k][n] or ()):
            val = pb.j_of(k, s, q)
            if best is None or val > best[0] + 1e-12:
                best = (val, k, idx)
    if best is None:  # cannot happen when k_lo..k_hi is feasible
        return []
    _, k, idx = best
    cuts, i = [], n
    while k > 0:
        _, _, j, pidx = table[k][i][idx]
        if j > 0:
            cuts.append(j)
        i, idx, k = j, pidx, k - 1
    return sorted(cuts)


# ----------------------------------------------------------------------------------------------
# Fast: Lagrangian candidates + the original DP when cheap + local search.


def _fast(pb: _Problem) -> list[int]:
    candidates: list[list[int]] = []
    if _original_work(pb) <= _ORIGINAL_WORK_LIMIT:
        orig = _original_dp(pb)
        if orig is not None and pb.valid(orig):
            candidates.append(orig)
    for k in sorted({pb.k_lo, pb.k_hi, max(pb.k_lo, min(pb.k_hi, round(pb.total / max(pb.m, 1) / 3)))}):
        c = _equal_split(pb, k)
        if c is not None and pb.valid(c):
            candidates.append(c)
    candidates += [c for c in _lagrangian_candidates(pb, _initial_multipliers(pb)) if pb.valid(c)]
    if not candidates:
        candidates = [_greedy_valid(pb)]
    best_cuts, best_val = _polish(pb, candidates, top=4)
    for _ in range(4):  # re-linearise J at the incumbent and look around it
        rows = _multipliers_around(pb, best_cuts)
        if not rows:
            break
        cands = [c for c in _lagrangian_candidates(pb, rows) if pb.valid(c)]
        cuts, val = _polish(pb, [*cands, best_cuts], top=3)
        if val <= best_val + 1e-12:
            break
        best_cuts, best_val = cuts, val
    return best_cuts


def _polish(pb: _Problem, candidates: list[list[int]], top: int) -> tuple[list[int], float]:
    uniq = {tuple(c) for c in candidates}
    ranked = sorted(uniq, key=lambda c: -pb.evaluate(c))
    best_cuts, best_val = list(ranked[0]), pb.evaluate(ranked[0])
    for c in ranked[:top]:
        cuts = _local_search(pb, list(c))
        val = pb.evaluate(cuts)
        if val > best_val + 1e-12:
            best_cuts, best_val = cuts, val
    return best_cuts, best_val


def _linearisation(pb: _Problem, k: int, s: float, q: float) -> tuple[float, float] | None:
    """(beta, gamma) such that S - beta*Q - gamma*K is tangent to J at a partition (K, S, Q)."""
    mu = pb.total / k
    sigma = math.sqrt(max(0.0, q / k - mu * mu))
    if sigma <= 1e-9 or pb.lam <= 0:
        return None
    beta = pb.lam / (2.0 * mu * sigma)
    gamma = s / k + beta * q / k if pb.score_mean == "per_block" else s / max(k - 1, 1) + beta * q / k
    return beta, gamma


def _initial_multipliers(pb: _Problem) -> list[tuple[float, float]]:
    rows = []
    ranked = sorted(pb.scores, reverse=True)
    k_targets = sorted({max(1, int(round(x))) for x in np.geomspace(max(1, pb.k_lo), pb.k_hi, num=8)})
    for kt in k_targets:
        mu = pb.total / kt
        mean_top = float(np.mean(ranked[: kt - 1])) if kt > 1 and ranked else 0.0
        for cv in (0.1, 0.25, 0.5):
            for sbar in (mean_top, 0.75 * mean_top):
                s = sbar * (kt - 1)
                q = kt * mu * mu * (1 + cv * cv)
                lin = _linearisation(pb, kt, s, q)
                if lin is not None:
                    rows.append(lin)
                else:
                    rows.append((0.0, s / kt))
    return rows


def _multipliers_around(pb: _Problem, cuts: list[int]) -> list[tuple[float, float]]:
    bounds = [0, *cuts, pb.n]
    sizes = [pb.prefix[b] - pb.prefix[a] for a, b in zip(bounds, bounds[1:], strict=False)]
    k = len(sizes)
    lin = _linearisation(pb, k, sum(pb.cross[c] for c in cuts), float(sum(x * x for x in sizes)))
    if lin is None:
        return []
    beta, gamma = lin
    return [(beta * fb, gamma * fg) for fb in (0.5, 0.7, 1.0, 1.4, 2.0) for fg in (0.9, 0.95, 1.0, 1.05, 1.1)]


def _greedy_valid(pb: _Problem) -> list[int]:
    cuts, acc = [], 0
    for i, x in enumerate(pb.tokens):
        acc += x
        if acc >= pb.m and pb.total - pb.prefix[i + 1] >= pb.m and len(cuts) + 1 < pb.k_lo:
            cuts.append(i + 1)
            acc = 0
    return cuts


def _equal_split(pb: _Problem, k: int) -> list[int] | None:
    targets = [pb.total * r / k for r in range(1, k)]
    cuts = [int(np.searchsorted(pb.prefix, t)) for t in targets]
    cuts = sorted({min(max(c, 1), pb.n - 1) for c in cuts}) if pb.n > 1 else []
    return cuts if len(cuts) == k - 1 else None


def _lagrangian_candidates(pb: _Problem, rows: list[tuple[float, float]]) -> list[list[int]]:
    """Solutions of max S - beta*Q - gamma*K for each (beta, gamma) row, all in one numpy DP."""
    n = pb.n
    if not rows:
        return []
    beta = np.asarray([r[0] for r in rows], dtype=np.float64)[:, None]
    gamma = np.asarray([r[1] for r in rows], dtype=np.float64)[:, None]
    g = len(rows)
    prefix = np.asarray(pb.prefix, dtype=np.float64)
    cross = np.asarray(pb.cross, dtype=np.float64)
    best = np.full((g, n + 1), -np.inf)
    best[:, 0] = 0.0
    back = np.zeros((g, n + 1), dtype=np.int64)
    for i in range(1, n + 1):
        jmax = pb.last[i]
        if jmax < 0:
            continue
        size = prefix[i] - prefix[: jmax + 1]
        cand = best[:, : jmax + 1] + cross[: jmax + 1] - beta * (size * size) - gamma
        arg = np.argmax(cand, axis=1)
        best[:, i] = cand[np.arange(g), arg]
        back[:, i] = arg
    out = []
    for r in range(g):
        if not np.isfinite(best[r, n]):
            continue
        cuts, i = [], n
        while i > 0:
            j = int(back[r, i])
            if j > 0:
                cuts.append(j)
            i = j
        out.append(sorted(cuts))
    return out


def _original_work(pb: _Problem) -> int:
    return sum(max(0, pb.last[i] + 1) for i in range(pb.n + 1)) * pb.k_hi


def _original_dp(pb: _Problem) -> list[int] | None:
    """The original heuristic DP (one best tuple per (prefix, k); spec §5.2), vectorised over (k, j)."""
    return original_dp_cuts(pb.tokens, pb.scores, pb.m, pb.lam, pb.k_lo, pb.k_hi, pb.score_mean)


def original_dp_cuts(
    tokens: Sequence[int],
    scores: Sequence[float],
    m: int,
    lam: float,
    k_lo: int,
    k_hi: int,
    score_mean: str = "per_block",
) -> list[int] | None:
    """Reference re-implementation of the original segmenter's DP (same recursion and tie-breaks).

    Returns the cuts (start sentence of blocks 2..K), or None when nothing is feasible.
    """
    n = len(tokens)
    p = np.concatenate([[0.0], np.cumsum(np.asarray(tokens, dtype=np.float64))])
    cross = np.concatenate([[0.0], np.asarray(scores, dtype=np.float64)])
    kk = k_hi
    obj = np.full((kk + 1, n + 1), -np.inf)
    ssum = np.zeros((kk + 1, n + 1))
    lsum = np.zeros((kk + 1, n + 1))
    qsum = np.zeros((kk + 1, n + 1))
    prev = np.full((kk + 1, n + 1), -1, dtype=np.int64)
    obj[0, 0] = 0.0
    ks = np.arange(1, kk + 1, dtype=np.float64)[:, None]
    for i in range(1, n + 1):
        js = np.arange(0, i)
        size = p[i] - p[js]
        ok_size = size >= m
        if not ok_size.any():
            continue
        reach = np.isfinite(obj[:kk, js])  # row r = k-1
        ok = reach & ok_size[None, :]
        s_new = ssum[:kk, js] + cross[js][None, :]
        l_new = lsum[:kk, js] + size[None, :]
        q_new = qsum[:kk, js] + (size * size)[None, :]
        mu = l_new / ks
        var = np.maximum(0.0, q_new / ks - mu * mu)
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = np.where(mu > 0, np.sqrt(var) / mu, 0.0)
            if score_mean == "per_block":
                ms = s_new / ks
            else:
                ms = np.where(ks > 1, s_new / np.maximum(ks - 1, 1), 0.0)
        val = np.where(ok, ms - lam * cv, -np.inf)
        arg = np.argmax(val, axis=1)  # first max = smallest j, like the original's strict '>'
        rows = np.arange(kk)
        vbest = val[rows, arg]
        good = np.isfinite(vbest)
        for r in np.nonzero(good)[0]:
            j = arg[r]
            obj[r + 1, i] = vbest[r]
            ssum[r + 1, i], lsum[r + 1, i], qsum[r + 1, i] = s_new[r, j], l_new[r, j], q_new[r, j]
            prev[r + 1, i] = j
    best_k, best_v = None, -np.inf
    for k in range(max(1, k_lo), kk + 1):
        if obj[k, n] > best_v:
            best_k, best_v = k, obj[k, n]
    if best_k is None:
        return None
    cuts, i, k = [], n, best_k
    while k > 0:
        j = int(prev[k, i])
        if j > 0:
            cuts.append(j)
        i, k = j, k - 1
    return sorted(cuts)


def _local_search(pb: _Problem, cuts: list[int], max_rounds: int = 200) -> list[int]:
    """Hill-climb on J with three moves: shift one cut, drop one cut, add one cut."""
    p, cross, m = pb.prefix, pb.cross, pb.m
    for _ in range(max_rounds):
        bounds = [0, *cuts, pb.n]
        sizes = [p[b] - p[a] for a, b in zip(bounds, bounds[1:], strict=False)]
        k = len(sizes)
        s = sum(cross[c] for c in cuts)
        q = float(sum(x * x for x in sizes))
        cur = pb.j_of(k, s, q)
        best = (cur + 1e-12, None)
        # shift cut r (between block r and r+1) to c
        for r, c0 in enumerate(cuts):
            a, b = bounds[r], bounds[r + 2]
            la, lb = sizes[r], sizes[r + 1]
            base_q = q - la * la - lb * lb
            base_s = s - cross[c0]
            for c in range(a + 1, b):
                if c == c0:
                    continue
                x, y = p[c] - p[a], p[b] - p[c]
                if x < m or y < m:
                    continue
                v = pb.j_of(k, base_s + cross[c], base_q + x * x + y * y)
                if v > best[0]:
                    best = (v, ("shift", r, c))
        if k - 1 >= pb.k_lo:  # drop cut r: merge blocks r and r+1
            for r, c0 in enumerate(cuts):
                merged = sizes[r] + sizes[r + 1]
                v = pb.j_of(k - 1, s - cross[c0], q - sizes[r] ** 2 - sizes[r + 1] ** 2 + merged * merged)
                if v > best[0]:
                    best = (v, ("drop", r, c0))
        if k + 1 <= pb.k_hi:  # add a cut c inside block r
            for r in range(k):
                a, b = bounds[r], bounds[r + 1]
                if sizes[r] < 2 * m:
                    continue
                base_q = q - sizes[r] ** 2
                for c in range(a + 1, b):
                    x, y = p[c] - p[a], p[b] - p[c]
                    if x < m or y < m:
                        continue
                    v = pb.j_of(k + 1, s + cross[c], base_q + x * x + y * y)
                    if v > best[0]:
                        best = (v, ("add", r, c))
        move = best[1]
        if move is None:
            break
        kind, r, c = move
        if kind == "shift":
            cuts[r] = c
        elif kind == "drop":
            cuts.pop(r)
        else:
            cuts.insert(r, c)
            cuts.sort()
    return cuts
