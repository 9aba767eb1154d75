"""Mementos: a dense summary per block, written so the block itself can be forgotten.

`extractive` (offline default) keeps the sentences that carry state — equations, numbers,
conclusions — and drops narration, within a budget of ~20% of the block's tokens. `openai` runs the
paper's loop: compress → judge (0–10 rubric) → refine with the judge's feedback, at most
`max_iterations` judge rounds, stopping at `score_threshold`, and keeps the *best-scoring* memento
(not merely the last). As in the paper, the compressor sees the whole trace in one call and writes
every block's memento at once (`compress="trace"`), so memento i records what block i adds to the
earlier ones; `compress="block"` makes one call per block instead (for models whose context cannot
hold a whole trace). Judge and refine work on one block at a time. A judge failure is recorded and
ends that block's loop; it is never passed to the refiner as if it were feedback.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from memento.annotate.llm import InvalidAnswer, LLMCallFailed, LLMClient, parse_json_object
from memento.annotate.sentences import TokenCounter, split_sentences

# ----------------------------------------------------------------------------------------------
# Extractive backend

_FILLER = re.compile(
    r"^(?:(?:okay|ok|alright|hmm+|well|so|now|wait|first|then|next|also|actually|let me see|let's see|"
    r"i think|i guess|let me think|let me|let's)[,.!]?\s+)+",
    re.IGNORECASE,
)
_CONCLUDE = re.compile(
    r"\b(?:therefore|thus|hence|so|answer|result|equals?|gives?|get|got|found|means|conclude|must be|"
    r"is correct|is wrong|contradiction|verified|checks out|doesn't work|does not work)\b",
    re.IGNORECASE,
)
_EQUATION = re.compile(r"=|\\frac|\\sqrt|\\boxed|\^|\\le|\\ge|<|>")
_NUMBER = re.compile(r"\d")


@dataclass(frozen=True)
class ExtractiveConfig:
    """Budget of the offline summariser as a fraction of the block's tokens (paper: ~15-25%)."""

    target_ratio: float = 0.2
    max_ratio: float = 0.25
    min_tokens: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.target_ratio <= self.max_ratio <= 1:
            raise ValueError("need 0 < target_ratio <= max_ratio <= 1")


def _informativeness(sentence: str, position: float) -> float:
    score = 0.0
    if _EQUATION.search(sentence):
        score += 2.0
    score += min(2.0, 0.5 * len(_NUMBER.findall(sentence)) ** 0.5)
    if _CONCLUDE.search(sentence):
        score += 1.5
    if "boxed" in sentence or re.search(r"\banswer\b", sentence, re.IGNORECASE):
        score += 2.0
    score += 1.0 * position  # later sentences hold the block's outcome
    return score


def _compact(sentence: str) -> str:
    s = re.sub(r"\s+", " ", sentence).strip()
    return _FILLER.sub("", s).strip()


def extractive_memento(block_text: str, counter: TokenCounter, config: ExtractiveConfig | None = None) -> str:
    """Keep the most informative sentences (in order) within ~target_ratio of the block's tokens."""
    cfg = config or ExtractiveConfig()
    block_tokens = counter.count(block_text)
    if block_tokens == 0:
        return ""
    budget = max(cfg.min_tokens, int(round(cfg.target_ratio * block_tokens)))
    hard = max(budget, int(math.floor(cfg.max_ratio * block_tokens)))
    sents = [s for s in (_compact(x) for x in split_sentences(block_text, counter)) if s]
    # Split long units further at sentence ends inside them so the budget can be met.
    pieces: list[str] = []
    for s in sents:
        pieces += [p.strip() for p in re.split(r"(?<=[.!?])\s+(?=[A-Z\\$])", s) if p.strip()]
    if not pieces:
        return ""
    n = len(pieces)
    ranked = sorted(range(n), key=lambda i: -_informativeness(pieces[i], i / max(1, n - 1)))
    chosen: list[int] = []
    used = 0
    for i in ranked:
        t = counter.count(pieces[i]) + 1
        if used + t <= budget or not chosen:
            chosen.append(i)
            used += t
    text = " ".join(pieces[i] for i in sorted(chosen))
    if counter.count(text) > hard:  # one huge sentence: cut it at a word boundary
        words = text.split(" ")
        lo, hi = 1, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if counter.count(" ".join(words[:mid])) <= hard:
                lo = mid
            else:
                hi = mid - 1
        text = " ".join(words[:lo]) + " ..."
    return text


# ----------------------------------------------------------------------------------------------
# LLM backend: prompts (ours, written from the rubric)

COMPRESS_SYSTEM = """You turn one block of a long reasoning trace into a memento: a compact state record that
replaces the block. Later reasoning will see only the problem and the mementos of earlier blocks, so
the memento must let a reader continue the work without the block.

Keep, as exact symbols and values: definitions of variables, functions and data structures; equations,
inequalities and closed forms that were derived; intermediate and final numbers; the method or
algorithm used, by name; case splits and constraints; checks that were run and their outcome;
approaches that were tried and abandoned, marked as such; the final answer if the block reaches one.
Record only what the block establishes: do not add steps, repair mistakes or solve further. Mark
results the block itself doubts as tentative.

Style: lead with the result, then how it was obtained. Terse clauses separated by semicolons,
name = value pairs, formulas in plain ASCII (x_1, x^2, sqrt(...), >=, !=). No narration such as
"I tried" or "the block", no Markdown. Aim for about one fifth of the block's length or less;
completeness matters more than brevity.

Reply with JSON only: {"memento": "<text>"}"""

COMPRESS_USER = """Problem (context only, do not restate it):
{problem}

Block to compress:
{block}"""

REFINE_USER = """Problem (context only, do not restate it):
{problem}

Block to compress:
{block}

Your previous memento for this block:
{memento}

A reviewer found these problems with it:
{feedback}

Write an improved memento that fixes every point while staying compact. Reply with JSON only:
{{"memento": "<text>"}}"""

COMPRESS_TRACE_SYSTEM = """You turn a long reasoning trace, cut into numbered blocks, into mementos: one compact
state record per block, which replaces that block. Later reasoning will see only the problem and the
mementos of earlier blocks, so memento i must let a reader continue the work from mementos 1..i alone.

For each block keep, as exact symbols and values: definitions of variables, functions and data
structures; equations, inequalities and closed forms that were derived; intermediate and final
numbers; the method or algorithm used, by name; case splits and constraints; checks that were run and
their outcome; approaches that were tried and abandoned, marked as such; the final answer if the block
reaches one. Memento i uses only blocks 1..i, never later ones, and records what block i adds: do not
repeat what an earlier memento already holds. Record only what the blocks establish: do not add
steps, repair mistakes or solve further. Mark results a block itself doubts as tentative.

Style: lead with the result, then how it was obtained. Terse clauses separated by semicolons,
name = value pairs, formulas in plain ASCII (x_1, x^2, sqrt(...), >=, !=). No narration such as
"I tried" or "the block", no Markdown. Aim for about one fifth of each block's length or less;
completeness matters more than brevity.

Reply with JSON only: {"mementos": ["<memento of block 1>", "<memento of block 2>", ...]}, exactly one
string per block, in block order."""

COMPRESS_TRACE_USER = """Problem (context only, do not restate it):
{problem}

The trace, in {count} blocks:

{blocks}

Write exactly {count} mementos, one per block, as {{"mementos": [...]}}."""

JUDGE_SYSTEM = """You grade a memento: a short record meant to replace one block of a reasoning trace.
Compare it with the block and score it from 0 to 10 by adding:
- formulas (0-3): the block's key equations and expressions are present, exact, with full notation;
- values (0-2): the important intermediate and final numbers are present and correct;
- methods (0-2): the technique or algorithm the block used is named explicitly;
- validation (0-1): checks the block performed, and their outcome, are kept (full credit if none);
- correctness (0-1): only what the block established; superseded or wrong steps are not presented as facts;
- structure (0-1): the result comes first, followed by how it was obtained.
Then subtract: 1 for any claim not supported by the block; 1 for narrating the process instead of
recording information; 1 for writing formulas in words where symbols exist or using non-ASCII math
symbols; 2 if a formula or value that later work needs is missing. Clamp the total to 0..10.

Give 3 to 5 feedback items, most important first (missing formulas and values, then methods, then
style), each specific enough to act on. Reply with JSON only:
{"score": <number 0-10>, "missing": ["..."], "feedback": ["...", "..."]}"""

JUDGE_USER = """Problem:
{problem}

Block:
{block}

Memento to grade:
{memento}"""


COMPRESS_MODES = ("trace", "block")


@dataclass(frozen=True)
class MementoConfig:
    """The judge loop of the paper: T judge rounds (default 2) with threshold 8/10; the first
    mementos come from one compressor call per trace (`compress="trace"`, the paper's) or per block."""

    max_iterations: int = 2
    score_threshold: float = 8.0
    compress: str = "trace"

    def __post_init__(self) -> None:
        if self.compress not in COMPRESS_MODES:
            raise ValueError(f"--compress must be one of {COMPRESS_MODES}, got {self.compress!r}")
        if self.max_iterations < 1:
            raise ValueError(
                f"--max-iterations must be >= 1 (each round judges one memento), got {self.max_iterations}"
            )
        if not 0 <= self.score_threshold <= 10:
            raise ValueError(f"--score-threshold must be within 0..10, got {self.score_threshold}")


@dataclass
class JudgeVerdict:
    score: float
    feedback: list[str]
    missing: list[str]


def validate_memento(content: str) -> str:
    try:
        obj = parse_json_object(content)
        text = obj.get("memento")
    except InvalidAnswer:
        # Some servers ignore the JSON request; a plain, non-empty answer is still a memento.
        if content.lstrip().startswith("{"):
            raise
        text = content
    if not isinstance(text, str) or not text.strip():
        raise InvalidAnswer("reply has no non-empty 'memento' string")
    return text.strip()


def validate_mementos(content: str, count: int) -> list[str]:
    """The `mementos` list of a whole-trace reply: exactly `count` non-empty strings."""
    obj = parse_json_object(content)
    items = obj.get("mementos")
    if not isinstance(items, list):
        raise InvalidAnswer("reply has no 'mementos' list")
    if len(items) != count:
        raise InvalidAnswer(f"expected {count} mementos (one per block), got {len(items)}")
    if not all(isinstance(x, str) and x.strip() for x in items):
        raise InvalidAnswer("every memento must be a non-empty string")
    return [x.strip() for x in items]


def trace_prompt(problem: str, blocks: Sequence[str]) -> list[dict[str, str]]:
    """The one compressor request of a trace: every block, numbered, in order."""
    body = "\n\n".join(f"=== Block {i + 1} ===\n{b}" for i, b in enumerate(blocks))
    user = COMPRESS_TRACE_USER.format(
        problem=problem.strip() or "(not given)", count=len(blocks), blocks=body
    )
    return [{"role": "system", "content": COMPRESS_TRACE_SYSTEM}, {"role": "user", "content": user}]


def validate_verdict(content: str) -> JudgeVerdict:
    obj = parse_json_object(content)
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise InvalidAnswer(f"judge score {score!r} is not a number")
    if not 0 <= score <= 10:
        raise InvalidAnswer(f"judge score {score} outside 0..10")
    fb = obj.get("feedback", [])
    if isinstance(fb, str):
        fb = [fb]
    if not isinstance(fb, list) or not all(isinstance(x, str) for x in fb):
        raise InvalidAnswer("judge 'feedback' must be a list of strings")
    missing = obj.get("missing", [])
    if not isinstance(missing, list):
        missing = [str(missing)]
    return JudgeVerdict(float(score), [x for x in fb if x.strip()], [str(x) for x in missing])


@dataclass
class MementoResult:
    """The memento kept for one block and how it was obtained. `first_score` is the judge's score
    of the compressor's own memento (before any refinement: the paper's single-pass pass rate)."""

    memento: str | None
    score: float | None  # judge score of the kept memento (None: never judged)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    source: str = "extractive"
    compress: str | None = None  # "trace" or "block": how the first memento was written

    @property
    def first_score(self) -> float | None:
        return self.iterations[0].get("score") if self.iterations else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "memento": self.memento,
            "score": self.score,
            "iterations": self.iterations,
            "failures": self.failures,
            "source": self.source,
            "compress": self.compress,
        }


async def llm_mementos(
    client: LLMClient, problem: str, blocks: Sequence[str], config: MementoConfig
) -> list[MementoResult]:
    """Mementos for every block of a trace: the first ones from one compressor call over the whole
    trace (or one per block), then the judge → refine loop per block, concurrently."""
    if config.compress == "block":
        return list(await asyncio.gather(*(llm_memento(client, problem, b, config) for b in blocks)))
    prob = problem.strip() or "(not given)"
    try:
        first = await client.call(
            f"compress ({len(blocks)} blocks)",
            trace_prompt(prob, blocks),
            lambda c: validate_mementos(c, len(blocks)),
            json_answer=True,
            max_tokens=client.config.trace_max_tokens,
        )
    except LLMCallFailed as e:
        return [
            MementoResult(None, None, failures=[str(e)], source="openai", compress="trace") for _ in blocks
        ]
    return list(
        await asyncio.gather(
            *(
                _judge_and_refine(client, prob, b, m, config, "trace")
                for b, m in zip(blocks, first, strict=True)
            )
        )
    )


async def llm_memento(client: LLMClient, problem: str, block: str, config: MementoConfig) -> MementoResult:
    """Compress → judge → refine loop for one block on its own; keeps the best-scoring memento."""
    prob = problem.strip() or "(not given)"
    try:
        memento = await client.call(
            "compress",
            [
                {"role": "system", "content": COMPRESS_SYSTEM},
                {"role": "user", "content": COMPRESS_USER.format(problem=prob, block=block)},
            ],
            validate_memento,
            json_answer=True,
        )
    except LLMCallFailed as e:
        return MementoResult(memento=None, score=None, failures=[str(e)], source="openai", compress="block")
    return await _judge_and_refine(client, prob, block, memento, config, "block")


async def _judge_and_refine(
    client: LLMClient, prob: str, block: str, memento: str, config: MementoConfig, compress: str
) -> MementoResult:
    """Judge a block's memento, refine it with the feedback, up to `max_iterations` rounds."""
    result = MementoResult(memento=memento, score=None, source="openai", compress=compress)
    best: tuple[float, str] | None = None
    for it in range(config.max_iterations):
        try:
            verdict = await client.call(
                "judge",
                [
                    {"role": "system", "content": JUDGE_SYSTEM},
                    {
                        "role": "user",
                        "content": JUDGE_USER.format(problem=prob, block=block, memento=memento),
                    },
                ],
                validate_verdict,
                json_answer=True,
            )
        except LLMCallFailed as e:
            result.failures.append(str(e))
            result.iterations.append(
                {"iteration": it, "memento": memento, "score": None, "judge_failed": True}
            )
            break  # no verdict → nothing to refine with
        result.iterations.append(
            {
                "iteration": it,
                "memento": memento,
                "score": verdict.score,
                "feedback": verdict.feedback,
                "missing": verdict.missing,
            }
        )
        if best is None or verdict.score > best[0]:
            best = (verdict.score, memento)
        if verdict.score >= config.score_threshold or it == config.max_iterations - 1:
            break
        feedback = (
            "\n".join(f"{i + 1}. {x}" for i, x in enumerate(verdict.missing + verdict.feedback)) or "(none)"
        )
        try:
            memento = await client.call(
                "refine",
                [
                    {"role": "system", "content": COMPRESS_SYSTEM},
                    {
                        "role": "user",
                        "content": REFINE_USER.format(
                            problem=prob, block=block, memento=memento, feedback=feedback
                        ),
                    },
                ],
                validate_memento,
                json_answer=True,
            )
        except LLMCallFailed as e:
            result.failures.append(str(e))
            break
    if best is not None:
        result.score, result.memento = best
    return result


def compression_ratio(memento_tokens: int, block_tokens: int) -> float | None:
    return memento_tokens / block_tokens if block_tokens else None


def block_text(sentences: Sequence[str], start: int, end: int) -> str:
    """A block's reasoning: the exact concatenation of its sentences, outer whitespace stripped."""
    return "".join(sentences[start : end + 1]).strip()
