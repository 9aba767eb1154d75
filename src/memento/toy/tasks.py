"""Synthetic tasks whose worked solutions are long, naturally chunked, and checkable exactly.

* `ChainTask` — the reasoning task: run the recurrence ``x <- (x + b) mod 10^d`` for ``n`` steps.
  Every step is written out column by column (digits least-significant first, a countdown label on
  every step), so each token is computable from the few tokens just before it; a block covers a few
  steps and its memento restates the whole state (countdown, x, b), so the model can continue from
  the memento alone once the block is evicted. The answer is the final x.
* `ProbeTask` — the paper's probing toy (App. A.4.2): blocks of 5 random digits, each memento holds
  the 3-digit running sum; `inject_passcode` hides a 5-digit passcode inside a chosen block.

Why these shapes: a tiny model trained for minutes on a CPU learns local rules (copy the previous
step, add two digits with a carry, decrement a label) but not long-range look-ups, so everything a
step needs is at a fixed, short distance. Train/test splits are by a hash of the start state, so
no held-out start state ever appears in training (at any length).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from memento.format import SUMMARY_END, SUMMARY_START, THINK_END, Block, MementoTrace

TRAIN, TEST = "train", "test"
SPLITS = (TRAIN, TEST)


def lsb(value: int, width: int) -> str:
    """`value` as `width` decimal digits, least-significant first (``253, 3 -> "352"``)."""
    return str(value).zfill(width)[::-1][:width]


def from_lsb(digits: str) -> int:
    """Inverse of `lsb`: ``"352" -> 253``."""
    return int(digits[::-1])


def _split_of(key: str, test_fraction: float) -> str:
    """Stable split assignment from a hash of the problem's identity (independent of the seed)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return TEST if (h % 1_000_000) < test_fraction * 1_000_000 else TRAIN


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# --- reasoning task: a countdown-labelled addition chain -------------------------------------------


@dataclass(frozen=True)
class ChainProblem:
    """Start value `x0`, increment `b`, number of steps `n`."""

    x0: int
    b: int
    n: int


@dataclass(frozen=True)
class ChainTask:
    """The addition-chain task. `digits` fixes the modulus 10^digits; a block covers `block_steps`
    steps, so longer chains (larger `n`) mean more blocks and a larger KV saving."""

    digits: int = 3
    block_steps: int = 4
    min_steps: int = 1
    max_steps: int = 16
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits must be between 1 and 6, got {self.digits}")
        if self.block_steps < 1:
            raise ValueError(f"block_steps must be >= 1, got {self.block_steps}")
        if not 1 <= self.min_steps <= self.max_steps <= 99:
            raise ValueError(
                f"need 1 <= min_steps <= max_steps <= 99, got {self.min_steps}..{self.max_steps}"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")

    @property
    def modulus(self) -> int:
        return 10**self.digits

    # -- text ----------------------------------------------------------------------------------

    def prompt(self, p: ChainProblem) -> str:
        """The user message: short (it stays in the KV cache all along), the varying part at the
        very end, next to where the first step copies it. "Digits reversed" = least significant
        first, so additions run left to right with the carry."""
        d = self.digits
        return (
            f"x = x + b mod {self.modulus}, n times; digits reversed. "
            f"n={p.n:02d} x={lsb(p.x0, d)} b={lsb(p.b, d)}"
        )

    def state(self, k: int, x: int, b: int) -> str:
        """The compact state: steps left, x and b. Both each step's header and each memento."""
        return f"{k:02d} x={lsb(x, self.digits)} b={lsb(b, self.digits)}"

    def step(self, k: int, x: int, b: int) -> tuple[str, int]:
        """One verbose step (the header, each column with its carry, the new x) and the new x."""
        xs, bs = lsb(x, self.digits), lsb(b, self.digits)
        carry, cols, out = 0, [], []
        for xd, bd in zip(xs, bs, strict=True):
            s = int(xd) + int(bd) + carry
            cols.append(f"{xd}+{bd}+{carry}={s:02d}")
            out.append(str(s % 10))
            carry = s // 10
        new = from_lsb("".join(out))
        return f"{self.state(k, x, b)} {' '.join(cols)} x={''.join(out)}", new

    def ends_block(self, k: int) -> bool:
        """Blocks end where the steps left after this one are a multiple of `block_steps`, so the
        decision depends on the step's own countdown label only (the first block may be shorter)."""
        return (k - 1) % self.block_steps == 0

    def run(self, p: ChainProblem) -> int:
        """The final value (the answer), computed directly."""
        return (p.x0 + p.n * p.b) % self.modulus

    def answer(self, p: ChainProblem) -> str:
        return f"x={lsb(self.run(p), self.digits)}"

    def trace(self, p: ChainProblem) -> MementoTrace:
        """The worked solution: blocks of (up to) `block_steps` steps, each closed by a memento
        holding the state after it (countdown of steps left, x, b)."""
        blocks, lines, x = [], [], p.x0
        for k in range(p.n, 0, -1):
            line, x = self.step(k, x, p.b)
            lines.append(line)
            if self.ends_block(k):
                blocks.append(Block("\n".join(lines), self.state(k - 1, x, p.b)))
                lines = []
        return MementoTrace(self.prompt(p), tuple(blocks), self.answer(p))

    # -- reading generations back -----------------------------------------------------------------

    def parse_state(self, text: str) -> tuple[int, int, int] | None:
        """(steps left, x, b) from a memento or step header; None if it is not one."""
        parts = text.strip().split()
        if len(parts) < 3 or not parts[0].isdigit():
            return None
        try:
            k = int(parts[0])
            x = _field(parts[1], "x=", self.digits)
            b = _field(parts[2], "b=", self.digits)
        except ValueError:
            return None
        return k, x, b

    def continue_from(self, memento: str) -> str | None:
        """Re-derive the answer from a memento alone (what a model sees after eviction)."""
        state = self.parse_state(memento)
        if state is None:
            return None
        k, x, b = state
        return f"x={lsb((x + k * b) % self.modulus, self.digits)}"

    def parse_prompt(self, text: str) -> ChainProblem | None:
        """The problem back from `prompt(p)` (None if `text` is not one of this task's prompts)."""
        parts = text.strip().split()
        if len(parts) < 3 or not parts[-3].startswith("n=") or not parts[-3][2:].isdigit():
            return None
        try:
            x0, b = _field(parts[-2], "x=", self.digits), _field(parts[-1], "b=", self.digits)
        except ValueError:
            return None
        return ChainProblem(x0, b, int(parts[-3][2:]))

    def step_spans(self, p: ChainProblem, response: str) -> list[tuple[int, int, float]]:
        """Each checkable piece of `response` as (start, end, 1.0 right / 0.0 wrong), judged
        against what the response itself wrote just before it. Per step line: the header
        (countdown label one below the previous one and >= 1, x as the previous step wrote it, the
        gold b), each column's operands (copied from the header, the carry from the column before)
        and its sum, and the new x (the sums' units digits). Per memento: the state after the
        step before it (label - 1, that step's x, b). The answer: the last memento's x, after a
        memento that says no steps are left. Why: a per-step reward for RL that puts each slip on
        the tokens that made it, where the exact answer only says that something went wrong."""
        d, spans, gold_b = self.digits, [], lsb(p.b, self.digits)
        x, label = lsb(p.x0, d), p.n  # what the next step must start from
        last_memento: tuple[int, str] | None = None
        pieces = sorted(
            [*_STEP_LINE.finditer(response), *_MEMENTO.finditer(response)], key=lambda m: m.start()
        )
        for m in pieces:
            k, xs, bs = int(m["k"]), m["x"], m["b"]
            if m.re is _MEMENTO:
                ok = (k, xs, bs) == (label, x, gold_b)
                spans.append((m.start("k"), m.end("b"), float(ok)))
                last_memento = (k, xs)
                continue
            head_ok = k == label >= 1 and xs == x and bs == gold_b
            spans.append((m.start("k"), m.end("b"), float(head_ok)))
            carry, units = 0, ""
            for j, col in enumerate(_COLUMN.finditer(m["cols"])):
                a, b, c, total = int(col["a"]), int(col["b"]), int(col["c"]), col["s"]
                copied = j < len(xs) and j < len(bs) and (a, b, c) == (int(xs[j]), int(bs[j]), carry)
                base = m.start("cols")
                spans.append((base + col.start(), base + col.start("s") - 1, float(copied)))
                spans.append((base + col.start("s") - 1, base + col.end(), float(int(total) == a + b + c)))
                carry, units = int(total[0]), units + total[1]
            spans.append((m.start("out") - 2, m.end("out"), float(m["out"] == units)))
            x, label = m["out"], k - 1
        head, sep, tail = response.rpartition(THINK_END)
        if sep and tail.strip():
            start = len(head) + len(sep) + (len(tail) - len(tail.lstrip()))
            end = len(response) - (len(tail) - len(tail.rstrip()))
            ok = last_memento is not None and last_memento[0] == 0 and tail.strip() == f"x={last_memento[1]}"
            spans.append((start, end, float(ok)))
        return spans

    def is_correct(self, p: ChainProblem, answer_text: str) -> bool:
        """Exact match of the answer (surrounding whitespace and an end-of-text token ignored)."""
        return _clean_answer(answer_text) == self.answer(p)

    # -- data ------------------------------------------------------------------------------------

    def split_of(self, p: ChainProblem) -> str:
        """Split by the start state (x0, b) only: a held-out start never appears in training."""
        return _split_of(f"chain:{self.digits}:{p.x0}:{p.b}", self.test_fraction)

    def sample(
        self,
        rng: random.Random,
        split: str = TRAIN,
        min_steps: int | None = None,
        max_steps: int | None = None,
        weights: Sequence[float] | None = None,
    ) -> ChainProblem:
        """One problem of `split`; `n` uniform in min..max steps, or drawn with `weights` (one
        relative weight per n in min..max)."""
        _check_split(split)
        lo = self.min_steps if min_steps is None else min_steps
        hi = self.max_steps if max_steps is None else max_steps
        if not 1 <= lo <= hi <= 99:
            raise ValueError(f"need 1 <= min_steps <= max_steps <= 99, got {lo}..{hi}")
        if weights is not None and (len(weights) != hi - lo + 1 or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(
                f"weights must be {hi - lo + 1} non-negative numbers (n = {lo}..{hi}), not all 0"
            )
        while True:
            x0, b = rng.randrange(self.modulus), rng.randrange(1, self.modulus)
            n = rng.randint(lo, hi) if weights is None else rng.choices(range(lo, hi + 1), weights)[0]
            p = ChainProblem(x0, b, n)
            if self.split_of(p) == split:
                return p

    def problems(
        self,
        count: int,
        *,
        split: str = TRAIN,
        seed: int = 0,
        min_steps: int | None = None,
        max_steps: int | None = None,
        weights: Sequence[float] | None = None,
    ) -> list[ChainProblem]:
        """`count` problems of one split, deterministic for a given seed (repeats allowed in train,
        not in test); `weights` as in `sample`."""
        rng = random.Random(f"chain-{split}-{seed}")
        out: list[ChainProblem] = []
        seen: set[ChainProblem] = set()
        while len(out) < count:
            p = self.sample(rng, split, min_steps, max_steps, weights)
            if split == TEST:
                if p in seen:
                    continue
                seen.add(p)
            out.append(p)
        return out

    def traces(self, problems: list[ChainProblem]) -> list[MementoTrace]:
        return [self.trace(p) for p in problems]


_STEP_LINE = re.compile(r"(?P<k>\d+) x=(?P<x>\d+) b=(?P<b>\d+)(?P<cols>(?: \d\+\d\+\d=\d\d)+) x=(?P<out>\d+)")
_MEMENTO = re.compile(
    re.escape(SUMMARY_START) + r"(?P<k>\d+) x=(?P<x>\d+) b=(?P<b>\d+)" + re.escape(SUMMARY_END)
)
_COLUMN = re.compile(r"(?P<a>\d)\+(?P<b>\d)\+(?P<c>\d)=(?P<s>\d\d)")


def _field(token: str, prefix: str, digits: int) -> int:
    if not token.startswith(prefix) or len(token) != len(prefix) + digits:
        raise ValueError(token)
    value = token[len(prefix) :]
    if not value.isdigit():
        raise ValueError(token)
    return from_lsb(value)


def _clean_answer(text: str) -> str:
    text = text.replace("<|endoftext|>", "").replace("<|im_end|>", "")
    return text.strip()


# --- probing task: running digit sums, with a passcode hook ---------------------------------------


@dataclass(frozen=True)
class ProbeProblem:
    """`digits[i]` is block i's digits; an optional passcode sits in block `passcode_block`."""

    digits: tuple[tuple[int, ...], ...]
    passcode: str | None = None
    passcode_block: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "digits", tuple(tuple(d) for d in self.digits))


@dataclass(frozen=True)
class ProbeTask:
    """App. A.4.2 of the paper: `blocks` blocks of `block_digits` random digits; each memento holds
    the running sum (3 digits). A passcode injected into one block lets a probe ask later whether
    information from an evicted block still leaks through the mementos' KV.

    `worked=True` writes the running total after every digit inside the block (``2:015 1:016 ...``),
    so each step adds one digit to the number just before it. Why: a 4-layer model trained for a
    few CPU minutes on the plain form learns the sum's hundreds and tens digits but leaves the units
    digit (the exact sum of six numbers modulo 10) at chance (measured: 99% / 95% / 12% after 1,200
    steps); worked, it reaches 100% / 100% / 84% after 500. The block is evicted either way, so what
    the text reveals after it (the running sums) is the same in both forms."""

    blocks: int = 10
    block_digits: int = 5
    sum_width: int = 3
    test_fraction: float = 0.1
    prompt_text: str = field(default="Add up all the digits, block by block.")
    worked: bool = False

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.block_digits < 1:
            raise ValueError("blocks and block_digits must be >= 1")
        if 9 * self.blocks * self.block_digits >= 10**self.sum_width:
            raise ValueError(f"sum_width={self.sum_width} is too small for the largest possible sum")

    def running_sums(self, p: ProbeProblem) -> list[int]:
        total, sums = 0, []
        for block in p.digits:
            total += sum(block)
            sums.append(total)
        return sums

    def block_text(self, p: ProbeProblem, i: int) -> str:
        if self.worked:
            total = sum(sum(b) for b in p.digits[:i])
            steps = []
            for d in p.digits[i]:
                total += d
                steps.append(f"{d}:{total:0{self.sum_width}d}")
            text = " ".join(steps)
        else:
            text = " ".join(str(d) for d in p.digits[i])
        if p.passcode is not None and p.passcode_block == i:
            text += f" passcode {p.passcode}"
        return text

    def read_block(self, text: str) -> list[int] | None:
        """The digits of a block as written (by `block_text` or a model), None if it is not in this
        task's block format (a worked total need not be right, only present)."""
        body = text.strip().split(" passcode ")
        if len(body) > 2 or (len(body) == 2 and not (len(body[1]) == 5 and body[1].isdigit())):
            return None
        digits = []
        for item in body[0].split():
            d, sep, total = item.partition(":")
            if not (len(d) == 1 and d.isdigit()) or bool(sep) != self.worked:
                return None
            if self.worked and not (len(total) == self.sum_width and total.isdigit()):
                return None
            digits.append(int(d))
        return digits if len(digits) == self.block_digits else None

    def memento(self, total: int) -> str:
        return f"sum={total:0{self.sum_width}d}"

    def answer(self, p: ProbeProblem) -> str:
        return self.memento(self.running_sums(p)[-1])

    def trace(self, p: ProbeProblem) -> MementoTrace:
        blocks = tuple(
            Block(self.block_text(p, i), self.memento(total)) for i, total in enumerate(self.running_sums(p))
        )
        return MementoTrace(self.prompt_text, blocks, self.answer(p))

    def split_of(self, p: ProbeProblem) -> str:
        key = "probe:" + "|".join("".join(map(str, b)) for b in p.digits)
        return _split_of(key, self.test_fraction)

    def sample(self, rng: random.Random, split: str = TRAIN) -> ProbeProblem:
        _check_split(split)
        while True:
            digits = tuple(
                tuple(rng.randrange(10) for _ in range(self.block_digits)) for _ in range(self.blocks)
            )
            p = ProbeProblem(digits)
            if self.split_of(p) == split:
                return p

    def problems(
        self,
        count: int,
        *,
        split: str = TRAIN,
        seed: int = 0,
        passcode_block: int | None = None,
    ) -> list[ProbeProblem]:
        """`count` problems; with `passcode_block`, each gets a random 5-digit passcode there."""
        rng = random.Random(f"probe-{split}-{seed}")
        out = []
        for _ in range(count):
            p = self.sample(rng, split)
            if passcode_block is not None:
                p = self.inject_passcode(p, passcode_block, f"{rng.randrange(100000):05d}")
            out.append(p)
        return out

    def inject_passcode(self, p: ProbeProblem, block: int, passcode: str) -> ProbeProblem:
        """The same problem with `passcode` (5 digits) written into block `block` (0-based)."""
        if not 0 <= block < len(p.digits):
            raise ValueError(f"block must be in 0..{len(p.digits) - 1}, got {block}")
        if len(passcode) != 5 or not passcode.isdigit():
            raise ValueError(f"passcode must be 5 digits, got {passcode!r}")
        return ProbeProblem(p.digits, passcode, block)

    def traces(self, problems: list[ProbeProblem]) -> list[MementoTrace]:
        return [self.trace(p) for p in problems]
