"""Use, not only presence: move one problem's memento KV into another and watch what changes.

Pairs (A, B) differ only in the digits of block `t`, which are replaced by another string with the
same total, so every memento's *text* is the same in A and B; only what the KV of block t's memento
absorbed from its block differs. Three runs of B, all under the Stage-2 mask:

* `clean`: B as is.
* `patched`: tokens after block t's memento read A's KV for block t's kept tokens (`<|block_end|>`,
  the gap, the memento), computed while A's block was visible.
* `ablated`: they read that KV recomputed without any block (the fair restart, for block t only).

What changes: the next-token distributions after the memento (KL to `clean`, overall and where the
next token is a digit of a later running sum), the teacher-forced running sums, and what a probe
trained on clean features reads from B's later mementos: A's digits or B's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memento.masking import BlockMaskingConfig, BlockTracker, virtual_sequence
from memento.probe.baseline import digit_sum_counts
from memento.probe.features import Entries, memento_kv, memento_spans, run_entries
from memento.tokens import MarkerIds
from memento.toy.tasks import ProbeProblem


def same_total_twin(problem: ProbeProblem, block: int, rng: random.Random) -> ProbeProblem:
    """`problem` with block `block`'s digits replaced by a different, uniformly drawn string with
    the same total (the passcode is kept), so all mementos read the same."""
    digits = problem.digits[block]
    total, n = sum(digits), len(digits)
    if digit_sum_counts(n)[total] < 2:
        raise ValueError(f"no other {n}-digit string has total {total}")
    while True:
        new = _uniform_with_total(n, total, rng)
        if new != digits:
            break
    blocks = list(problem.digits)
    blocks[block] = new
    return ProbeProblem(tuple(blocks), problem.passcode, problem.passcode_block)


def _uniform_with_total(n: int, total: int, rng: random.Random) -> tuple[int, ...]:
    """A uniformly random string of `n` digits with digit total `total` (sequential sampling with
    exact counts)."""
    out = []
    for i in range(n, 0, -1):
        rest = digit_sum_counts(i - 1)
        weights = [rest[total - d] if 0 <= total - d < len(rest) else 0 for d in range(10)]
        d = rng.choices(range(10), weights=weights)[0]
        out.append(d)
        total -= d
    return tuple(out)


@dataclass(frozen=True)
class BlockMarks:
    bs: int
    be: int
    ss: int
    se: int


def block_marks(token_ids: Sequence[int], markers: MarkerIds, block: int) -> BlockMarks:
    tracker = BlockTracker(markers, BlockMaskingConfig.full())
    tracker.feed_all(token_ids)
    b = tracker.blocks[block]
    return BlockMarks(b.bs, b.be, b.ss, b.se)


def spliced_entries(
    ids_b: Sequence[int], markers: MarkerIds, block: int, donor: Sequence[int] | None
) -> Entries:
    """B under the Stage-2 mask, except that tokens after block `block`'s memento read other KV for
    that block's kept tokens `[be, se)`: the donor's (computed with the donor's block visible), or,
    with `donor=None`, B's own recomputed with no block visible. Extra entries go at the end."""
    ids_b = [int(t) for t in ids_b]
    marks = block_marks(ids_b, markers, block)
    base = virtual_sequence(ids_b, markers, BlockMaskingConfig())
    n = len(ids_b)
    if donor is not None:
        donor = [int(t) for t in donor]
        if len(donor) != n or donor[: marks.bs + 1] != ids_b[: marks.bs + 1]:
            raise ValueError("donor and recipient must share everything up to the block and its length")
        if block_marks(donor, markers, block) != marks:
            raise ValueError("donor's block and memento must sit at the recipient's positions")
        extra_positions = list(range(marks.bs + 1, marks.se))  # the donor's block, then its kept tokens
        source = donor
    else:
        extra_positions = list(range(marks.be, marks.se))  # recomputed without the block
        source = ids_b
    m = n + len(extra_positions)
    visible = torch.zeros(m, m, dtype=torch.bool)
    visible[:n, :n] = base.visible
    extra_of = {p: n + i for i, p in enumerate(extra_positions)}
    for i, p in enumerate(extra_positions):
        e = n + i
        visible[e, : marks.bs + 1] = base.visible[p, : marks.bs + 1]  # the shared prefix, as B sees it
        for q in extra_positions[: i + 1]:
            visible[e, extra_of[q]] = True
    kept = list(range(marks.be, marks.se))
    after = torch.arange(marks.se, n)
    for p in kept:
        visible[after, extra_of[p]] = visible[after, p]
        visible[after, p] = False
    tokens = ids_b + [source[p] for p in extra_positions]
    return Entries(tokens, list(range(n)) + extra_positions, visible)


@dataclass
class PairResult:
    kl_all: float  # mean KL(clean || run) over the positions after block t's memento
    kl_sums: float  # ... over the positions whose next token is a digit of a later running sum
    changed_sums: float  # fraction of those greedy next tokens that differ from clean
    correct_sums: float  # fraction of those that are right (teacher forced)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p = torch.log_softmax(p_logits, -1)
    q = torch.log_softmax(q_logits, -1)
    return (p.exp() * (p - q)).sum(-1)


def compare(
    clean: torch.Tensor, run: torch.Tensor, ids: Sequence[int], start: int, targets: list[int]
) -> PairResult:
    """Logits `[n, V]` of B's own entries in two runs; `targets`: positions p (>= start) whose next
    token (at p + 1) is a digit of a running sum (what the task computes, unlike the random digits)."""
    kl = _kl(clean[start:-1], run[start:-1])
    idx = torch.tensor(targets)
    want = torch.tensor([ids[p + 1] for p in targets])
    return PairResult(
        float(kl.mean()),
        float(_kl(clean[idx], run[idx]).mean()),
        float((clean[idx].argmax(-1) != run[idx].argmax(-1)).float().mean()),
        float((run[idx].argmax(-1) == want).float().mean()),
    )


def sum_digit_targets(
    ids: Sequence[int], markers: MarkerIds, after_block: int, width: int, colon: int | None = None
) -> list[int]:
    """Positions p whose next token is a digit of a running sum after block `after_block`: the last
    `width` tokens of every later memento and, in the worked format (`colon` = the id of `:`), the
    `width` digits after each `:` inside later blocks."""
    tracker = BlockTracker(markers, BlockMaskingConfig.full())
    tracker.feed_all(ids)
    out = []
    for b in tracker.blocks[after_block + 1 :]:
        if not b.complete:
            continue
        if colon is not None:
            for p in range(b.bs + 1, b.be):
                if ids[p] == colon:
                    out += [q - 1 for q in range(p + 1, p + 1 + width)]
        out += [q - 1 for q in range(b.se - width, b.se)]
    return out


@torch.no_grad()
def run_pairs(
    model,
    pairs: list[tuple[list[int], list[int]]],
    markers: MarkerIds,
    block: int,
    *,
    digits_width: int = 3,
    colon: int | None = None,
    batch_size: int = 16,
) -> dict:
    """For (donor A, recipient B) token-id pairs: per-pair changes of B's continuation when patched
    and when ablated, and B's memento KV in all three runs (`[pairs, mementos, layers, tokens, F]`, as `extract`)."""
    out: dict = {"patched": [], "ablated": [], "features": {"clean": [], "patched": [], "ablated": []}}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = {
            "clean": [Entries.of(b, virtual_sequence(b, markers, BlockMaskingConfig())) for _, b in chunk],
            "patched": [spliced_entries(b, markers, block, a) for a, b in chunk],
            "ablated": [spliced_entries(b, markers, block, None) for _, b in chunk],
        }
        results = {name: run_entries(model, r, logits=True) for name, r in rows.items()}
        for i, (_, b) in enumerate(chunk):
            n = len(b)
            se = block_marks(b, markers, block).se
            targets = sum_digit_targets(b, markers, block, digits_width, colon)
            spans = memento_spans(b, markers)
            identity = list(range(n))
            clean = results["clean"].logits[i, :n]
            for name in ("patched", "ablated"):
                out[name].append(compare(clean, results[name].logits[i, :n], b, se, targets))
            for name, res in results.items():
                out["features"][name].append(memento_kv(res, i, spans, identity))
    out["features"] = {k: torch.stack(v) for k, v in out["features"].items()}
    return out
