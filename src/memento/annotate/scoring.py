"""Boundary scoring: how good a place is the gap after sentence i to end a block? 0 (never) .. 3 (ideal).

Two backends. `heuristic` (offline default) reads the text: paragraph breaks and discourse markers
("Wait", "Alternatively", "Now", "Let me", "So the answer") raise the score; anything that looks like
the middle of a derivation (a sentence ending in `=` or `:`, a continuation word, one math line
following another) forces 0. `openai` asks an LLM in windows of W boundaries; with two passes
(W = 16 and 11, coprime, so window edges rarely coincide) the two scores are averaged. A window that
still fails after the client's retries is recorded as failed: its boundaries get ``None`` (never a
silent 0) and the caller decides what to do with them.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from memento.annotate.llm import InvalidAnswer, LLMCallFailed, LLMClient, parse_json_object

# ----------------------------------------------------------------------------------------------
# Heuristic backend

_STRONG = re.compile(
    r"(?:wait\b|alternatively\b|another (?:approach|way|idea|method)\b|let me (?:verify|check|double[- ]check|"
    r"recheck|reconsider|try|think|look)\b|let'?s (?:verify|check|double[- ]check|try|consider|look)\b|"
    r"so (?:the|my) (?:final )?answer\b|therefore,? the (?:final )?answer\b|to (?:verify|double[- ]check|confirm)\b|"
    r"but wait\b|hold on\b|hmm\b|on second thought\b|okay,? so\b|now,? (?:let|we|i)\b)",
    re.IGNORECASE,
)
_WEAK = re.compile(
    r"(?:now\b|next\b|first\b|second\b|then,? (?:let|we|i)\b|finally\b|let me\b|let'?s\b|also\b|"
    r"similarly\b|moreover\b|in (?:this|that) case\b|case \d|step \d|okay\b|alright\b|actually\b|"
    r"so,? (?:i|we) (?:have|need|get|can)\b)",
    re.IGNORECASE,
)
_CONTINUES = re.compile(
    r"(?:therefore|thus|hence|so|then|which|where|because|since|giving|substituting|plugging|and|or|"
    r"that (?:gives|means))\b",
    re.IGNORECASE,
)
_SETUP_START = re.compile(r"(?:suppose|assume|let'?s say|consider|let\s+\S+\s+(?:be|=))\b", re.IGNORECASE)
_OPEN_END = re.compile(r"(?:[=:,(+\-*/]|\\cdot|\\times|⇒|→|\\Rightarrow|\\implies|\\\\)$")
_MATHY = re.compile(r"(?:\\\[|\\\(|\$|=|\\frac|\^|_\{)")


def _words(s: str) -> int:
    return len(s.split())


def _is_math_line(s: str) -> bool:
    """Mostly an equation: math delimiters or '=' and few ordinary words."""
    letters = re.sub(r"\\[A-Za-z]+|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]", " ", s, flags=re.DOTALL)
    return bool(_MATHY.search(s)) and len(re.findall(r"[A-Za-z]{3,}", letters)) <= 3


def heuristic_scores(sentences: Sequence[str]) -> list[float]:
    """Offline boundary scores from text cues; runs anywhere, no model needed."""
    out: list[float] = []
    for prev, nxt in zip(sentences, sentences[1:], strict=False):
        p, q = prev.strip(), nxt.strip()
        para = bool(re.search(r"\n[ \t]*\r?\n\s*$", prev))
        if not p or not q:
            out.append(0.0)
            continue
        # Hard zeros: the derivation or the thought is not finished.
        if _OPEN_END.search(p) or q[0] in "=+-*/)]}" or (q[0].isalpha() and q[0].islower()):
            out.append(0.0)
            continue
        if _is_math_line(p) and _is_math_line(q):
            out.append(0.0)  # one math line continuing another
            continue
        if _CONTINUES.match(q) and not _STRONG.match(q) and _MATHY.search(p) and _MATHY.search(q):
            out.append(0.0)
            continue
        if _SETUP_START.match(p) or (_words(p) < 8 and not para):
            out.append(0.0)  # an assumption or a short set-up belongs with what follows
            continue
        score = 1.0 if p[-1] in ".!?" or para else 0.0
        if para:
            score += 1.0
        if _STRONG.match(q):
            score += 1.0 if para else 0.5
        elif _WEAK.match(q) and para:
            score += 0.5
        out.append(float(min(3.0, max(0.0, score))))
    return out


# ----------------------------------------------------------------------------------------------
# LLM backend

SCORING_SYSTEM = """You rate places where a long chain of reasoning could be cut into self-contained blocks.
After each block the reader keeps only a short summary, so a cut is good only if everything before it
forms a finished unit of work and the text after it starts something new.

Rate every marked boundary with an integer from 0 to 3:
3 = an excellent cut: a sub-problem, case, attempt or verification has clearly finished and the next
    sentence opens a different phase (a new approach, a check, a new case, the final answer).
2 = a good cut: a coherent step is complete and the focus shifts.
1 = a poor cut: a small shift, but the two sides still depend on each other closely.
0 = never cut here: the thought is unfinished.

Always give 0 when:
- the sentence before the boundary ends with ':' or '=' or announces a computation that comes next;
- a calculation or derivation is in progress on both sides (the same equation is being manipulated);
- the next sentence begins with a word that draws a conclusion from what came just before
  ("so", "therefore", "thus", "hence", "then") and continues that derivation;
- the sentence before sets up an assumption ("suppose", "assume", "consider", "let x be") whose
  consequence or refutation comes after;
- a step-by-step simulation of code or an algorithm is running (state updates, "step N", "i = 3");
- the sentence before is a short lead-in (under about ten words) whose substance comes after.

Judge each boundary only by the sentences around it. Reply with JSON only:
{"scores": [s_1, ..., s_k]} listing the scores in the order of the boundaries."""

SCORING_USER = """Reasoning excerpt (boundaries are marked with [[B<number>]] on their own line):
{text}

Rate these {count} boundaries: {labels}.
Return exactly {count} integers between 0 and 3 as {{"scores": [...]}}."""

# Only with ScoringConfig(include_problem=True): the original scorer never sees the problem.
SCORING_PROBLEM = """Problem being solved:
{problem}

"""


@dataclass(frozen=True)
class ScoringConfig:
    """Window sizes of the LLM scorer; two passes average coprime windows (16, 11).

    `include_problem`: also send the problem statement with every window. The original pipeline
    does not; it costs the problem's tokens once per window and its benefit is unmeasured (see
    docs/annotate.md), so it is off by default."""

    two_pass: bool = True
    window: int = 16
    second_window: int = 11
    include_problem: bool = False

    def __post_init__(self) -> None:
        if self.window < 1 or self.second_window < 1:
            raise ValueError("scoring windows must be >= 1")


@dataclass(frozen=True)
class WindowFailure:
    """A scoring window that failed after all retries (its boundaries have no score from this pass)."""

    pass_index: int
    first_boundary: int
    last_boundary: int  # inclusive
    error: str


def windows(n_boundaries: int, size: int) -> list[tuple[int, int]]:
    """Half-open boundary ranges [a, b) of one pass."""
    return [(a, min(a + size, n_boundaries)) for a in range(0, n_boundaries, size)]


def build_window_prompt(
    problem: str | None, sentences: Sequence[str], a: int, b: int
) -> list[dict[str, str]]:
    """Messages scoring boundaries a..b-1 (shows sentences a..b; neighbouring windows share one);
    `problem` None = the window alone, as the original scorer sends it."""
    parts: list[str] = []
    for i in range(a, b + 1):
        parts.append(sentences[i].strip())
        if i < b:
            parts.append(f"[[B{i}]]")
    labels = ", ".join(f"B{i}" for i in range(a, b))
    user = SCORING_USER.format(text="\n".join(parts), count=b - a, labels=labels)
    if problem is not None:
        user = SCORING_PROBLEM.format(problem=problem.strip() or "(not given)") + user
    return [{"role": "system", "content": SCORING_SYSTEM}, {"role": "user", "content": user}]


def validate_scores(content: str, count: int) -> list[float]:
    """The `scores` list of a reply: exactly `count` numbers in [0, 3], else InvalidAnswer."""
    obj = parse_json_object(content)
    scores = obj.get("scores")
    if not isinstance(scores, list):
        raise InvalidAnswer("reply has no 'scores' list")
    if len(scores) != count:
        raise InvalidAnswer(f"expected {count} scores, got {len(scores)}")
    out = []
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
            raise InvalidAnswer(f"score {s!r} is not a number")
        if not 0 <= s <= 3:
            raise InvalidAnswer(f"score {s} outside 0..3")
        out.append(float(s))
    return out


@dataclass
class ScoringResult:
    scores: list[float | None]  # final per-boundary score; None where every pass failed
    passes: list[list[float | None]]
    failures: list[WindowFailure]

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "passes": self.passes, "failures": [asdict(f) for f in self.failures]}


async def llm_scores(
    client: LLMClient, problem: str, sentences: Sequence[str], config: ScoringConfig
) -> ScoringResult:
    """Score all boundaries with the LLM; windows run concurrently (bounded by the client)."""
    nb = max(0, len(sentences) - 1)
    sizes = [config.window, config.second_window] if config.two_pass else [config.window]
    passes: list[list[float | None]] = [[None] * nb for _ in sizes]
    failures: list[WindowFailure] = []

    async def one(pi: int, a: int, b: int) -> None:
        msgs = build_window_prompt(problem if config.include_problem else None, sentences, a, b)
        try:
            got = await client.call(
                f"scoring window {a}..{b - 1}", msgs, lambda c: validate_scores(c, b - a), json_answer=True
            )
        except LLMCallFailed as e:
            failures.append(WindowFailure(pi, a, b - 1, str(e)))
            return
        passes[pi][a:b] = got

    await asyncio.gather(*(one(pi, a, b) for pi, size in enumerate(sizes) for a, b in windows(nb, size)))
    final: list[float | None] = []
    for i in range(nb):
        vals = [p[i] for p in passes if p[i] is not None]
        final.append(sum(vals) / len(vals) if vals else None)
    failures.sort(key=lambda f: (f.pass_index, f.first_boundary))
    return ScoringResult(final, passes, failures)


def fill_missing(scores: Sequence[float | None], fallback: Sequence[float]) -> tuple[list[float], list[int]]:
    """Scores usable by the segmenter: failed boundaries take the heuristic score (and are listed)."""
    filled, missing = [], []
    for i, s in enumerate(scores):
        if s is None or (isinstance(s, float) and math.isnan(s)):
            filled.append(float(fallback[i]))
            missing.append(i)
        else:
            filled.append(float(s))
    return filled, missing
