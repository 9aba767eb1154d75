"""Benchmarks from local JSONL files: one problem per line, a gold answer, an id.

No hub access: a benchmark is whatever file the user points at. Field names differ between
releases (``problem`` vs ``question``, ``answer`` vs ``gold``, ``id`` vs ``unique_id``), so they
are auto-detected and can be overridden; the answer kind (``math`` or ``choice``) decides how
responses are graded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from memento.jsonl import read_jsonl

KINDS = ("math", "choice")
PROBLEM_FIELDS = ("problem", "question", "prompt", "input")
ANSWER_FIELDS = ("answer", "gold", "final_answer", "target", "label")
ID_FIELDS = ("id", "unique_id", "problem_id", "idx", "uid")
CHOICE_FIELDS = ("choices", "options")
CHOICE_LETTERS = ("A", "B", "C", "D")
_LETTER_RE = re.compile(r"^\(?([A-D])\)?$")


@dataclass(frozen=True)
class Problem:
    """One benchmark item; `id` is always a string so ids from any file compare the same way."""

    id: str
    problem: str
    answer: str
    index: int


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str
    problems: tuple[Problem, ...]

    def __len__(self) -> int:
        return len(self.problems)

    def by_id(self) -> dict[str, Problem]:
        return {p.id: p for p in self.problems}


def _pick(record: dict, explicit: str | None, candidates: tuple[str, ...], what: str, flag: str, where: str):
    if explicit is not None:
        if explicit not in record:
            raise ValueError(f"{where}: no field {explicit!r} (fields: {sorted(record)}); fix {flag}")
        return explicit
    for name in candidates:
        if name in record:
            return name
    if what == "id":
        return None
    raise ValueError(f"{where}: cannot find the {what} field among {sorted(record)}; pass {flag} NAME")


def _answer_text(value, where: str) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: gold answer must be a string or a number, got {value!r}")
    if isinstance(value, int | float | str):
        return str(value).strip()
    if isinstance(value, list) and value and all(isinstance(v, int | float | str) for v in value):
        return ", ".join(str(v) for v in value)
    raise ValueError(f"{where}: gold answer must be a string or a number, got {type(value).__name__}")


def _with_choices(problem: str, choices) -> str:
    """Append GPQA-style options (a list, lettered A, B, ...) to the problem text."""
    if not isinstance(choices, list) or not choices:
        return problem
    lines = [f"{chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)]
    return problem.rstrip() + "\n\n" + "\n".join(lines)


def detect_kind(answers: list[str]) -> str:
    """`choice` when every gold answer is a single letter A–D, else `math`."""
    if answers and all(_LETTER_RE.match(a.strip()) for a in answers):
        return "choice"
    return "math"


def load_benchmark(
    path: str | Path,
    *,
    kind: str | None = None,
    problem_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
) -> Benchmark:
    """Read a benchmark JSONL file; a bad line or missing field raises ValueError naming it."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r}; use one of {', '.join(KINDS)}")
    problems: list[Problem] = []
    seen: set[str] = set()
    for where, record in read_jsonl(path, "benchmark file"):
        if limit is not None and len(problems) >= limit:
            break
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object per line")
        pf = _pick(record, problem_field, PROBLEM_FIELDS, "problem", "--problem-field", where)
        af = _pick(record, answer_field, ANSWER_FIELDS, "answer", "--answer-field", where)
        idf = _pick(record, id_field, ID_FIELDS, "id", "--id-field", where)
        text = record[pf]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: field {pf!r} must be a non-empty string")
        choices = next((record[c] for c in CHOICE_FIELDS if c in record), None)
        index = len(problems)
        pid = str(record[idf]) if idf is not None else str(index)
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r}; pick a unique field with --id-field")
        seen.add(pid)
        problems.append(Problem(pid, _with_choices(text, choices), _answer_text(record[af], where), index))
    if not problems:
        raise ValueError(f"{path}: no problems found")
    kind = kind or detect_kind([p.answer for p in problems])
    if kind == "choice":
        bad = [p.id for p in problems if not _LETTER_RE.match(p.answer)]
        if bad:
            raise ValueError(f"{path}: choice benchmark needs gold letters A-D; ids {bad[:5]} are not")
    return Benchmark(path.stem, kind, tuple(problems))
