"""Rewards for `memento rl`: an answer check against the gold answer, plus an optional bonus for
a well-formed Memento response.

Built-in answer checks: `exact` (the text after the last `</think>`, stripped, equals the gold
answer), `math` (Math-Verify through `memento.eval.grading`), `choice` (a letter A-D). Any other
check plugs in as `MODULE:FUNCTION`, a function `(response: str, answer: str) -> float`; a
response counts as correct when its answer reward is positive.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from memento.eval.grading import grade
from memento.format import THINK_END, parse

BUILTIN = ("exact", "math", "choice")

AnswerReward = Callable[[str, str], float]


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
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward must be one of {', '.join(BUILTIN)} or MODULE:FUNCTION, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--reward {spec}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {module_name} has no function {attr!r}")
    return fn


@dataclass
class RewardModel:
    """Scores responses: the answer reward plus `format_weight` for a well-formed one."""

    answer_reward: AnswerReward
    format_weight: float = 0.0

    def __call__(self, response: str, answer: str, finished: bool) -> Verdict:
        value = self.answer_reward(response, answer)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float):
            raise ValueError(f"the answer reward returned {value!r}; it must return a number")
        ok = well_formed(response, finished)
        return Verdict(float(value) + (self.format_weight if ok else 0.0), value > 0, ok)
