"""Reading raw chain-of-thought traces: JSONL, JSON, parquet or a `datasets.save_to_disk` folder.

Each row yields a :class:`RawTrace` (id, problem, thinking text, answer) or a rejection reason. The
seed filters of the original (a complete closing think tag, no CJK ideographs) plus an optional
length window decide what goes on; every rejection is counted by reason for the stats report.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from memento.jsonl import read_jsonl

THINK_TAGS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
)
_SOLUTION = re.compile(r"^\s*<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>\s*)?$", re.DOTALL)
_CJK = re.compile(r"[\u4e00-\u9fff]")

# Rejection reasons (stable strings: they are keys of stats.json).
NO_COT = "missing_cot"
NO_CLOSING_TAG = "incomplete_thinking"
CJK = "cjk_characters"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
EMPTY_THINKING = "empty_thinking"

# Size guard: a trace's thinking longer than this is rejected as too_long unless the limit is
# raised. 1M characters is ~300K tokens, ten times any reasoning model's context, and takes
# minutes to segment; such a row is far more often a broken join than a real trace.
DEFAULT_MAX_CHARS = 1_000_000


class SourceError(ValueError):
    """The input cannot be read as traces; the message names the input and the fix."""


@dataclass(frozen=True)
class SourceConfig:
    """Where the fields are and which traces to keep. Field names None = try the usual ones."""

    problem_field: str | None = None
    cot_field: str | None = None
    id_field: str | None = None
    require_closing_tag: bool = True
    reject_cjk: bool = True
    min_chars: int = 0
    max_chars: int | None = DEFAULT_MAX_CHARS

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise ValueError(f"--min-chars must be >= 0, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < max(1, self.min_chars):
            raise ValueError(f"--max-chars must be >= --min-chars and >= 1, got {self.max_chars}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown source config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class RawTrace:
    id: str
    problem: str
    thinking: str  # text between the think tags: what gets split into blocks
    answer: str  # text after the closing tag (Sky-T1 solution wrappers removed)
    index: int  # row number in the input
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceReport:
    total: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    fields: list[str] = field(default_factory=list)  # of the first row, for hints
    too_long: list[tuple[str, int]] = field(default_factory=list)  # (where, characters)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "accepted": self.accepted,
            "rejected": dict(sorted(self.rejected.items())),
        }


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(where, row)` for each row of a JSONL / JSON / parquet file or a save_to_disk directory;
    `where` names the row for messages (`file:line` for JSONL)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(
            f"input {p} does not exist; pass a .jsonl, .json or .parquet file or a dataset folder"
        )
    if p.is_dir():
        try:
            from datasets import load_from_disk

            ds = load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001
            raise SourceError(
                f"input folder {p} is not a datasets.save_to_disk folder ({e}); pass a file instead"
            ) from e
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
            raise SourceError(f"{p} holds several splits ({list(ds.keys())}); point at one split's folder")
        for i, row in enumerate(ds):
            yield f"{p} row {i}", row
        return
    suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"cannot read parquet file {p}: {e}") from e
        for i, row in enumerate(table.to_pylist()):
            yield f"{p} row {i}", row
        return
    if suffix == ".json":
        try:
            data = json.loads(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SourceError(f"{p}: not UTF-8 text (byte {e.start}); expected JSON") from None
        except json.JSONDecodeError as e:
            raise SourceError(f"{p} is not valid JSON ({e}); for one object per line name it .jsonl") from e
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise SourceError(
                    f"{p}: expected a JSON list of objects (or an object holding exactly one list)"
                )
            data = lists[0]
        if not isinstance(data, list):
            raise SourceError(f"{p}: expected a JSON list of objects")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise SourceError(f"{p}: item {i} is not an object")
            yield f"{p} item {i}", row
        return
    try:
        for where, row in read_jsonl(p, "traces file"):
            if not isinstance(row, dict):
                raise SourceError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            yield where, row
    except SourceError:
        raise
    except ValueError as e:  # not UTF-8 / not JSON: the message names file:line
        raise SourceError(f"{e}; fix or remove that line") from None


def _turn(row: dict[str, Any], who: set[str], where: str) -> str | None:
    conv = row.get("conversations") or row.get("messages")
    if conv is None:
        return None
    if not isinstance(conv, list):
        raise SourceError(f"{where}: 'conversations'/'messages' is {type(conv).__name__}, expected a list")
    found = None
    for turn in conv:
        if isinstance(turn, dict):
            role = turn.get("from", turn.get("role"))
            if role in who:
                found = turn.get("value", turn.get("content"))
    return found if isinstance(found, str) else None


def _field(row: dict[str, Any], name: str, what: str, where: str) -> str:
    if name not in row:
        raise SourceError(
            f"{where}: no field {name!r} (fields: {sorted(row)}); pass --{what}-field with the right name"
        )
    value = row[name]
    if not isinstance(value, str):
        raise SourceError(f"{where}: field {name!r} is {type(value).__name__}, expected a string")
    return value


def _first_string(row: dict[str, Any], names: tuple[str, ...], where: str) -> str | None:
    """The first of `names` present with a value; a value that is not a string is an error (it
    would otherwise be dropped or written to training data as text it never was)."""
    for name in names:
        value = row.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise SourceError(f"{where}: field {name!r} is {type(value).__name__}, expected a string")
        if value:
            return value
    return None


def split_thinking(cot: str) -> tuple[str, str, bool]:
    """(thinking, answer, complete).

    An opening tag without its closing tag is a generation cut off mid-thought (the paper's seed
    filter drops those). A text with no think tag at all is a plain reasoning field: the whole text
    is the reasoning, complete as given, with no separate answer."""
    for open_tag, close_tag in THINK_TAGS:
        start = cot.find(open_tag)
        if start < 0:
            continue
        body_start = start + len(open_tag)
        end = cot.find(close_tag, body_start)
        if end < 0:
            return cot[body_start:], "", False
        answer = cot[end + len(close_tag) :].strip()
        m = _SOLUTION.match(answer)
        if m:
            answer = m.group(1).strip()
        return cot[body_start:end], answer, True
    for _, close_tag in THINK_TAGS:  # a closing tag with no opening one (template put it in the prompt)
        end = cot.find(close_tag)
        if end >= 0:
            return cot[:end], cot[end + len(close_tag) :].strip(), True
    return cot, "", True


def iter_traces(path: str | Path, config: SourceConfig, report: SourceReport) -> Iterator[RawTrace]:
    """Accepted traces in input order; rejections are counted in `report`."""
    seen: dict[str, str] = {}
    for index, (where, row) in enumerate(read_rows(path)):
        report.total += 1
        if not report.fields:
            report.fields = sorted(str(k) for k in row)
        if config.id_field:
            tid = _field_any(row, config.id_field, "id", where)
        else:
            tid = row.get("id", row.get("task_id"))
            tid = f"trace-{index:06d}" if tid is None else tid
        if isinstance(tid, bool) or not isinstance(tid, str | int):
            raise SourceError(f"{where}: id {tid!r} is {type(tid).__name__}, expected a string or an integer")
        tid = str(tid)
        if tid in seen:
            raise SourceError(
                f"{where}: duplicate id {tid!r} (also {seen[tid]}); ids must be unique, pass --id-field"
            )
        seen[tid] = where
        if config.problem_field:
            problem = _field(row, config.problem_field, "problem", where)
        else:
            problem = (
                _first_string(row, ("problem", "prompt"), where) or _turn(row, {"human", "user"}, where) or ""
            )
        if config.cot_field:
            cot = _field(row, config.cot_field, "cot", where)
        else:
            cot = _first_string(row, ("cot", "full_cot", "response"), where)
            cot = cot or _turn(row, {"gpt", "assistant"}, where)
        if not cot:
            report.rejected[NO_COT] += 1
            continue
        thinking, answer, closed = split_thinking(cot)
        reason = None
        if config.require_closing_tag and not closed:
            reason = NO_CLOSING_TAG
        elif config.reject_cjk and _CJK.search(cot):
            reason = CJK
        elif not thinking.strip():
            reason = EMPTY_THINKING
        elif len(thinking) < config.min_chars:
            reason = TOO_SHORT
        elif config.max_chars is not None and len(thinking) > config.max_chars:
            reason = TOO_LONG
        if reason:
            report.rejected[reason] += 1
            if reason == TOO_LONG:
                report.too_long.append((where, len(thinking)))
            continue
        report.accepted += 1
        keep = {
            k: v for k, v in row.items() if k in ("source", "domain", "difficulty", "gold", "answer_gold")
        }
        yield RawTrace(tid, problem, thinking, answer, index, keep)


def no_usable_traces(path: str | Path, report: SourceReport) -> SourceError:
    """The error for an input none of whose rows can be annotated, with the likely fix."""
    if not report.total:
        return SourceError(f"{path}: no rows (the input is empty)")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.rejected.items()))
    hint = ""
    if report.rejected.get(NO_COT) == report.total:
        hint = (
            f"; no reasoning found in the fields {report.fields}: pass --cot-field "
            "(default: cot, full_cot, response or the assistant turn of conversations)"
        )
    elif report.rejected.get(NO_CLOSING_TAG):
        hint = "; --allow-incomplete keeps traces without a closing think tag"
    elif report.rejected.get(TOO_LONG):
        hint = "; raise --max-chars to annotate longer traces"
    return SourceError(f"{path}: none of the {report.total} row(s) is usable ({reasons}){hint}")


def _field_any(row: dict[str, Any], name: str, what: str, where: str) -> Any:
    if name not in row:
        raise SourceError(
            f"{where}: no field {name!r} (fields: {sorted(row)}); pass --{what}-field with the right name"
        )
    return row[name]
