"""Rewards for `memento rl`: an answer check against the gold answer, plus an optional bonus for
a well-formed Memento response.

Built-in answer checks: `exact` (the text after the last `</think>`, stripped, equals the gold
answer), `math` (Math-Verify through `memento.eval.grading`), `choice` (a letter A-D). Any other
check plugs in as `MODULE:FUNCTION`, a function `(response: str, answer: str) -> float`; a
response counts as correct when its answer reward is positive.

An optional step reward `MODULE:FUNCTION`, `(response: str, problem: str) -> [(start, end,
credit), ...]`, judges pieces of the response (character spans, credit in [0, 1]); the trainer
turns it into per-token advantages (`rollouts.step_advantages`). It never changes what counts as
correct.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from memento.eval.grading import grade
from memento.format import THINK_END, parse

BUILTIN = ("exact", "math", "choice")

AnswerReward = Callable[[str, str], float]
StepReward = Callable[[str, str], list[tuple[int, int, float]]]


@dataclass(frozen=True)
class Verdict:
    """How one response scored: `reward` = answer reward + format bonus."""

    reward: float
    correct: bool
    well_formed: bool


def final_answer(response: str) -> str:
    """The text after the last `</think>` (empty when the response never closed its thinking)."""
    head, sep, tail = response.rpartition(THINK_END)
    return tail.strip() if sep else ""


def exact_reward(response: str, answer: str) -> float:
    return float(final_answer(response) == answer.strip())


def math_reward(response: str, answer: str) -> float:
    return float(grade(response, answer, "math").correct)


def choice_reward(response: str, answer: str) -> float:
    return float(grade(response, answer, "choice").correct)


def well_formed(response: str, finished: bool) -> bool:
    """Stopped on its own, `<think>` [blocks with mementos] `</think>` with at least one block,
    no format problem, and a non-empty answer."""
    if not finished:
        return False
    trace, problems = parse(response)
    return not problems and len(trace.blocks) > 0 and bool(final_answer(response))


def load_answer_reward(spec: str) -> AnswerReward:
    """`exact`, `math`, `choice`, or `MODULE:FUNCTION` (imported; must be callable)."""
    if spec in BUILTIN:
        return {"exact": exact_reward, "math": math_reward, "choice": choice_reward}[spec]
    return load_function(spec, "--reward", f"one of {', '.join(BUILTIN)} or MODULE:FUNCTION")


def load_function(spec: str, flag: str, expected: str = "MODULE:FUNCTION") -> Callable:
    """Import `MODULE:FUNCTION`; a bad spec is a ValueError naming `flag`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{flag} must be {expected}, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{flag} {spec}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{flag} {spec}: {module_name} has no function {attr!r}")
    return fn


def _number(value, what: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float):
        raise ValueError(f"the {what} returned {value!r}; it must return a number")
    return float(value)


@dataclass
class RewardModel:
    """Scores responses: the answer reward plus `format_weight` for a well-formed one."""

    answer_reward: AnswerReward
    format_weight: float = 0.0

    def __call__(self, response: str, answer: str, finished: bool) -> Verdict:
        value = _number(self.answer_reward(response, answer), "answer reward")
        ok = well_formed(response, finished)
        return Verdict(value + (self.format_weight if ok else 0.0), value > 0, ok)


def judge_steps(fn: StepReward, response: str, problem: str) -> list[tuple[int, int, float]]:
    """`fn`'s spans, checked: integer bounds inside the response, start < end, credit in [0, 1]."""
    spans = fn(response, problem)
    out = []
    for span in spans:
        try:
            start, end, credit = span
        except (TypeError, ValueError):
            raise ValueError(
                f"the step reward returned {span!r}; spans must be (start, end, credit)"
            ) from None
        credit = _number(credit, "step reward")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(response)):
            raise ValueError(
                f"the step reward returned span {span!r} outside the response (length {len(response)})"
            )
        if not 0.0 <= credit <= 1.0:
            raise ValueError(f"the step reward returned credit {credit!r}; it must be in [0, 1]")
        out.append((start, end, credit))
    return out
