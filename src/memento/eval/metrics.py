"""Accuracy metrics over n samples per problem: pass@1 ± s.e., unbiased pass@k, maj@k, coverage.

Pure functions over plain lists so they can be checked by hand: a run is a mapping
problem id -> list of per-sample correctness (and, for maj@k, per-sample answer classes).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations

MAJ_EXACT_LIMIT = 5000  # enumerate all k-subsets up to this many, else sample
MAJ_DRAWS = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021) unbiased estimator: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples (n={n})")
    if n - c < k:
        return 1.0
    # product form avoids huge binomials: prod_{i=n-c+1}^{n} (1 - k / i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(count)); s.e. is 0 for fewer than 2 values."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def pass1(correct: Mapping[str, Sequence[bool]]) -> tuple[float, float]:
    """pass@1 averaged over the n samples of each problem, then over problems; with its s.e.
    across problems (the spread that matters when comparing two runs on the same benchmark)."""
    per_problem = [sum(map(bool, c)) / len(c) for c in correct.values() if len(c)]
    return mean_and_se(per_problem)


def mean_pass_at_k(correct: Mapping[str, Sequence[bool]], k: int) -> float:
    """Unbiased pass@k averaged over problems (each problem needs at least k samples)."""
    values = [pass_at_k(len(c), sum(map(bool, c)), k) for c in correct.values()]
    return sum(values) / len(values) if values else 0.0


def _majority_correct(classes: Sequence, class_correct: Mapping) -> float:
    """Probability that a vote over `classes` picks a correct class, ties broken uniformly."""
    votes = Counter(c for c in classes if c is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winners = [c for c, v in votes.items() if v == top]
    return sum(bool(class_correct.get(c, False)) for c in winners) / len(winners)


def maj_at_k(
    classes: Sequence, correct: Sequence[bool], k: int, *, seed: int = 0, exact_limit: int = MAJ_EXACT_LIMIT
) -> float:
    """Expected majority-vote accuracy over k of the n samples of one problem.

    `classes[i]` is the answer class of sample i (None = no answer, does not vote); a class is
    correct when its samples are. Ties count fractionally (uniform tie-breaking, in expectation).
    With k < n the expectation runs over all k-subsets, or a seeded sample of them when there
    are more than `exact_limit`.
    """
    n = len(classes)
    if len(correct) != n:
        raise ValueError("classes and correct must have one entry per sample")
    if not 1 <= k <= n:
        raise ValueError(f"maj@{k} needs 1 <= k <= n samples (n={n})")
    class_correct: dict = {}
    for cls, ok in zip(classes, correct, strict=True):
        if cls is not None:
            class_correct[cls] = class_correct.get(cls, False) or bool(ok)
    if k == n:
        return _majority_correct(classes, class_correct)
    if math.comb(n, k) <= exact_limit:
        subsets = list(combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [rng.sample(range(n), k) for _ in range(MAJ_DRAWS)]
    total = sum(_majority_correct([classes[i] for i in s], class_correct) for s in subsets)
    return total / len(subsets)


def mean_maj_at_k(
    classes: Mapping[str, Sequence], correct: Mapping[str, Sequence[bool]], k: int, *, seed: int = 0
) -> float:
    values = [maj_at_k(classes[pid], correct[pid], k, seed=seed) for pid in correct]
    return sum(values) / len(values) if values else 0.0


def ks_for(n: int) -> list[int]:
    """The k values worth reporting for n samples: powers of two up to n, and n itself."""
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    if ks[-1] != n and n >= 1:
        ks.append(n)
    return ks


def solved_set(correct: Mapping[str, Sequence[bool]]) -> set[str]:
    """Problems solved by at least one sample."""
    return {pid for pid, c in correct.items() if any(c)}


def coverage(correct: Mapping[str, Sequence[bool]]) -> float:
    """Fraction of problems solved by at least one sample (pass@n)."""
    return len(solved_set(correct)) / len(correct) if correct else 0.0


def compare_runs(a: Mapping[str, Sequence[bool]], b: Mapping[str, Sequence[bool]]) -> dict:
    """Table-2-style overlap of two runs on their shared problems: coverage of each, of the
    union, and the Jaccard index of the solved sets (1.0 = they solve exactly the same problems)."""
    shared = sorted(set(a) & set(b))
    sa = solved_set({p: a[p] for p in shared})
    sb = solved_set({p: b[p] for p in shared})
    union = sa | sb
    total = len(shared) or 1
    return {
        "problems": len(shared),
        "coverage_a": len(sa) / total,
        "coverage_b": len(sb) / total,
        "coverage_union": len(union) / total,
        "both": len(sa & sb),
        "only_a": len(sa - sb),
        "only_b": len(sb - sa),
        "jaccard": len(sa & sb) / len(union) if union else 1.0,
    }
