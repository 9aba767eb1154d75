"""The Memento trace: a problem, reasoning blocks each followed by a memento, and an answer.

`render()` writes the assistant text the model is trained on and emits; `parse()` reads such
text back, tolerantly, and names every format problem it meets instead of guessing silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memento.jsonl import read_jsonl

THINK_START = "<think>"
THINK_END = "</think>"
BLOCK_START = "<|block_start|>"
BLOCK_END = "<|block_end|>"
SUMMARY_START = "<|summary_start|>"
SUMMARY_END = "<|summary_end|>"
MARKERS = (BLOCK_START, BLOCK_END, SUMMARY_START, SUMMARY_END)

# Layout between the markers (ours; the paper does not fix whitespace): a newline after <think>,
# the memento on the line after its block, a blank line between pairs, a blank line after </think>.
_AFTER_THINK = "\n"
_BETWEEN_BLOCK_AND_SUMMARY = "\n"
_AFTER_SUMMARY = "\n\n"
_AFTER_THINK_END = "\n\n"


@dataclass(frozen=True)
class Block:
    """One reasoning block and the memento that summarises it."""

    reasoning: str
    memento: str


@dataclass(frozen=True)
class MementoTrace:
    """A worked solution split into blocks: what `memento train` reads and models generate."""

    problem: str
    blocks: tuple[Block, ...] = field(default_factory=tuple)
    answer: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))

    def render(self) -> str:
        """The assistant text: `<think>` + [block, memento]* + `</think>` + answer."""
        parts = [THINK_START, _AFTER_THINK]
        for block in self.blocks:
            parts += [BLOCK_START, block.reasoning, BLOCK_END, _BETWEEN_BLOCK_AND_SUMMARY]
            parts += [SUMMARY_START, block.memento, SUMMARY_END, _AFTER_SUMMARY]
        parts += [THINK_END, _AFTER_THINK_END, self.answer]
        return "".join(parts)

    def render_control(self) -> str:
        """The same reasoning without block markers or mementos (the paper's Control format)."""
        body = "\n\n".join(block.reasoning for block in self.blocks)
        return f"{THINK_START}{_AFTER_THINK}{body}\n{THINK_END}{_AFTER_THINK_END}{self.answer}"

    def to_dict(self) -> dict:
        return {"problem": self.problem, "blocks": [asdict(b) for b in self.blocks], "answer": self.answer}

    @classmethod
    def from_dict(cls, record: dict) -> MementoTrace:
        """Build from a JSON record; raises ValueError naming the field that is wrong."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        for name in ("problem", "blocks"):
            if name not in record:
                raise ValueError(f"missing field {name!r}")
        if not isinstance(record["problem"], str):
            raise ValueError("field 'problem' must be a string")
        if not isinstance(record["blocks"], list):
            raise ValueError("field 'blocks' must be a list of {reasoning, memento}")
        blocks = []
        for i, b in enumerate(record["blocks"]):
            if (
                not isinstance(b, dict)
                or not isinstance(b.get("reasoning"), str)
                or not isinstance(b.get("memento"), str)
            ):
                raise ValueError(f"blocks[{i}] must be an object with string 'reasoning' and 'memento'")
            blocks.append(Block(b["reasoning"], b["memento"]))
        answer = record.get("answer", "")
        if not isinstance(answer, str):
            raise ValueError("field 'answer' must be a string")
        return cls(record["problem"], tuple(blocks), answer)


@dataclass(frozen=True)
class FormatProblem:
    """A named deviation from the Memento format, with the character offset where it was seen."""

    kind: str
    offset: int
    detail: str = ""


# Problem kinds parse() can report.
UNCLOSED_BLOCK = "unclosed_block"
NESTED_BLOCK = "nested_block"
BLOCK_END_WITHOUT_START = "block_end_without_start"
SUMMARY_WITHOUT_BLOCK = "summary_without_block"
UNCLOSED_SUMMARY = "unclosed_summary"
SUMMARY_END_WITHOUT_START = "summary_end_without_start"
BLOCK_WITHOUT_SUMMARY = "block_without_summary"
TEXT_OUTSIDE_BLOCKS = "text_outside_blocks"
MISSING_THINK_START = "missing_think_start"
MISSING_THINK_END = "missing_think_end"
MARKER_AFTER_THINK = "marker_after_think"

_TOKEN_RE = re.compile("|".join(re.escape(m) for m in (*MARKERS, THINK_START, THINK_END)))


def parse(text: str, problem: str = "") -> tuple[MementoTrace, list[FormatProblem]]:
    """Read assistant text back into a trace, tolerating (and reporting) malformed structure.

    A block left without a memento gets an empty one; text between pairs is reported and dropped;
    markers after `</think>` are reported and kept in the answer as written.
    """
    problems: list[FormatProblem] = []
    start = text.find(THINK_START)
    if start < 0:
        problems.append(FormatProblem(MISSING_THINK_START, 0))
        body_start = 0
    else:
        if text[:start].strip():
            problems.append(FormatProblem(TEXT_OUTSIDE_BLOCKS, 0, text[:start].strip()[:80]))
        body_start = start + len(THINK_START)
    end = text.find(THINK_END, body_start)
    if end < 0:
        problems.append(FormatProblem(MISSING_THINK_END, len(text)))
        body, answer = text[body_start:], ""
    else:
        body, answer = text[body_start:end], text[end + len(THINK_END) :]
        if any(m in answer for m in MARKERS):
            problems.append(FormatProblem(MARKER_AFTER_THINK, end))
        answer = answer.removeprefix(_AFTER_THINK_END)

    blocks: list[Block] = []
    reasoning: str | None = None  # a closed block waiting for its memento
    state = "outside"  # outside | block | summary
    cursor = 0
    pieces: list[str] = []

    def flush_text(upto: int) -> str:
        return body[cursor:upto]

    for m in _TOKEN_RE.finditer(body):
        tok, pos = m.group(0), body_base(body_start, m.start())
        chunk = flush_text(m.start())
        if state == "block":
            pieces.append(chunk)
        elif state == "summary":
            pieces.append(chunk)
        elif chunk.strip():
            problems.append(
                FormatProblem(TEXT_OUTSIDE_BLOCKS, body_base(body_start, cursor), chunk.strip()[:80])
            )
        cursor = m.end()

        if tok == BLOCK_START:
            if state == "block":
                problems.append(FormatProblem(NESTED_BLOCK, pos))
                pieces.append(tok)
                continue
            if state == "summary":
                problems.append(FormatProblem(UNCLOSED_SUMMARY, pos))
                blocks.append(Block(reasoning or "", "".join(pieces)))
                reasoning = None
            if reasoning is not None:
                problems.append(FormatProblem(BLOCK_WITHOUT_SUMMARY, pos))
                blocks.append(Block(reasoning, ""))
                reasoning = None
            state, pieces = "block", []
        elif tok == BLOCK_END:
            if state != "block":
                problems.append(FormatProblem(BLOCK_END_WITHOUT_START, pos))
                continue
            reasoning, state, pieces = "".join(pieces), "outside", []
        elif tok == SUMMARY_START:
            if state == "block":
                problems.append(FormatProblem(UNCLOSED_BLOCK, pos))
                reasoning, pieces = "".join(pieces), []
            elif state == "summary":
                problems.append(FormatProblem(UNCLOSED_SUMMARY, pos))
                blocks.append(Block(reasoning or "", "".join(pieces)))
                reasoning, pieces = None, []
            if reasoning is None:
                problems.append(FormatProblem(SUMMARY_WITHOUT_BLOCK, pos))
            state, pieces = "summary", []
        elif tok == SUMMARY_END:
            if state != "summary":
                problems.append(FormatProblem(SUMMARY_END_WITHOUT_START, pos))
                continue
            if reasoning is not None:
                blocks.append(Block(reasoning, "".join(pieces)))
            reasoning, state, pieces = None, "outside", []
        else:  # a stray <think> or </think> inside the body
            problems.append(FormatProblem(TEXT_OUTSIDE_BLOCKS, pos, tok))

    tail = body[cursor:]
    if state == "block":
        problems.append(FormatProblem(UNCLOSED_BLOCK, len(text)))
        blocks.append(Block("".join(pieces) + tail, ""))
    elif state == "summary":
        problems.append(FormatProblem(UNCLOSED_SUMMARY, len(text)))
        if reasoning is not None:
            blocks.append(Block(reasoning, "".join(pieces) + tail))
    else:
        if reasoning is not None:
            problems.append(FormatProblem(BLOCK_WITHOUT_SUMMARY, len(text)))
            blocks.append(Block(reasoning, ""))
        if tail.strip():
            problems.append(
                FormatProblem(TEXT_OUTSIDE_BLOCKS, body_base(body_start, cursor), tail.strip()[:80])
            )
    return MementoTrace(problem, tuple(blocks), answer), problems


def body_base(body_start: int, offset: int) -> int:
    """Offset inside the body -> offset inside the full text."""
    return body_start + offset


def load_segments(path: str | Path) -> MementoTrace:
    """Load a generation saved as `segments` of type block / summary / answer (the MEMENTO release's
    blog-post example format) as a trace. Raises ValueError naming the file and the problem."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read JSON: {exc}") from exc
    return segments_to_trace(record, source=str(path))


def segments_to_trace(record: dict, source: str = "<record>") -> MementoTrace:
    segments = record.get("segments") if isinstance(record, dict) else None
    if not isinstance(segments, list):
        raise ValueError(f"{source}: expected an object with a 'segments' list")
    blocks: list[Block] = []
    pending: str | None = None
    answer = ""
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise ValueError(f"{source}: segment {i} is {type(seg).__name__}, expected an object")
        kind, content = seg.get("type"), seg.get("text", seg.get("content", ""))
        if not isinstance(content, str):
            raise ValueError(f"{source}: segment {i} text is {type(content).__name__}, expected a string")
        if kind == "block":
            if pending is not None:
                blocks.append(Block(pending, ""))
            pending = content
        elif kind == "summary":
            if pending is None:
                raise ValueError(f"{source}: segment {i} is a summary without a block before it")
            blocks.append(Block(pending, content))
            pending = None
        elif kind == "answer":
            answer += content
        else:
            raise ValueError(f"{source}: segment {i} has unknown type {kind!r}")
    if pending is not None:
        blocks.append(Block(pending, ""))
    problem = record.get("problem", "")
    if not isinstance(problem, str):
        raise ValueError(f"{source}: 'problem' must be a string, got {type(problem).__name__}")
    return MementoTrace(problem, tuple(blocks), answer)


def read_traces(path: str | Path) -> list[MementoTrace]:
    """Read a JSONL file of traces; a bad line raises ValueError with file, line and reason."""
    traces = []
    for where, record in read_jsonl(path, "traces file"):
        try:
            traces.append(MementoTrace.from_dict(record))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return traces


def write_traces(path: str | Path, traces) -> None:
    with Path(path).open("w") as fh:
        for t in traces:
            fh.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")
