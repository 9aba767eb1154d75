"""What a probe could get from the visible *text* alone: exact Bayes-optimal accuracies.

The probing toy writes the running sum after every block, so once block t is evicted its five digits
are no longer visible, but `sum_t - sum_{t-1}` (both still in the text) is their total. A probe that
only read the text could therefore beat chance: given the total S, the best guess for one digit is
the most likely value under the uniform distribution over the 10^5 digit strings with that total.
These numbers are the bar the masked probe must clear before its accuracy says anything about an
implicit channel in the KV states (rather than about the text it could also have read).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@cache
def digit_sum_counts(n: int, base: int = 10) -> tuple[int, ...]:
    """`counts[s]` = how many strings of `n` digits (0..base-1) have digit total `s` (exact ints)."""
    counts = [1]
    for _ in range(n):
        nxt = [0] * (len(counts) + base - 1)
        for s, c in enumerate(counts):
            for d in range(base):
                nxt[s + d] += c
        counts = nxt
    return tuple(counts)


@dataclass(frozen=True)
class TextBaseline:
    """Bayes-optimal accuracies of a reader that knows only what the text reveals about the target."""

    per_digit: float  # expected accuracy of the best single-digit guess (each of the n digits alike)
    exact: float  # expected accuracy of the best guess of the whole n-digit string
    reveals: str  # what the text reveals: "nothing", "total", "everything"


def given_total(n: int = 5, base: int = 10) -> TextBaseline:
    """The text reveals the digit total S of `n` uniform digits (and nothing else about them).

    P(d_1 = x | S) = N_{n-1}(S - x) / N_n(S); the best guess takes the max over x. Averaged over S
    with P(S) = N_n(S) / base^n, the N_n(S) cancels: accuracy = sum_S max_x N_{n-1}(S - x) / base^n.
    The whole string: every string with total S is equally likely, so the best guess is right with
    probability 1 / N_n(S), and sum_S P(S) / N_n(S) = (number of possible totals) / base^n."""
    total = base**n
    rest = digit_sum_counts(n - 1, base)
    full = digit_sum_counts(n, base)
    best = 0
    for s in range(len(full)):
        best += max(rest[s - x] if 0 <= s - x < len(rest) else 0 for x in range(base))
    return TextBaseline(best / total, len(full) / total, "total")


def nothing(n: int = 5, base: int = 10) -> TextBaseline:
    """The text reveals nothing about the target: chance."""
    return TextBaseline(1 / base, 1 / base**n, "nothing")


def everything() -> TextBaseline:
    """The target's tokens are visible to the probed position (e.g. the block's own memento)."""
    return TextBaseline(1.0, 1.0, "everything")
