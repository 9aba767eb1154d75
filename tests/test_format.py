"""Memento trace format: render/parse round trip, named format problems, real MEMENTO outputs."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memento.format import (
    BLOCK_END,
    BLOCK_START,
    SUMMARY_END,
    SUMMARY_START,
    Block,
    MementoTrace,
    load_segments,
    parse,
    read_traces,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "memento-outputs"

text = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(text, text), max_size=6), text, text)
def test_parse_inverts_render(pairs, problem, answer):
    trace = MementoTrace(problem, tuple(Block(r, m) for r, m in pairs), answer)
    parsed, problems = parse(trace.render(), problem)
    assert problems == []
    assert parsed == trace


def test_render_layout():
    trace = MementoTrace("P", (Block("r1", "m1"), Block("r2", "m2")), "A")
    assert trace.render() == (
        f"<think>\n{BLOCK_START}r1{BLOCK_END}\n{SUMMARY_START}m1{SUMMARY_END}\n\n"
        f"{BLOCK_START}r2{BLOCK_END}\n{SUMMARY_START}m2{SUMMARY_END}\n\n</think>\n\nA"
    )
    assert BLOCK_START not in trace.render_control() and "r1\n\nr2" in trace.render_control()


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        (f"<think>{BLOCK_START}a", {"unclosed_block", "missing_think_end"}),
        (f"<think>{SUMMARY_START}s{SUMMARY_END}</think>", {"summary_without_block"}),
        (f"<think>{BLOCK_START}a{BLOCK_END}</think>x", {"block_without_summary"}),
        (
            f"<think>hello{BLOCK_START}a{BLOCK_END}{SUMMARY_START}s{SUMMARY_END}</think>",
            {"text_outside_blocks"},
        ),
        (f"{BLOCK_START}a{BLOCK_END}{SUMMARY_START}s{SUMMARY_END}</think>", {"missing_think_start"}),
        (f"<think>{BLOCK_START}a{BLOCK_END}{SUMMARY_START}s", {"unclosed_summary", "missing_think_end"}),
        (
            f"<think>{BLOCK_END}{SUMMARY_END}</think>",
            {"block_end_without_start", "summary_end_without_start"},
        ),
        (
            f"<think>{BLOCK_START}a{BLOCK_START}b{BLOCK_END}{SUMMARY_START}s{SUMMARY_END}</think>",
            {"nested_block"},
        ),
        (f"<think></think>{BLOCK_START}", {"marker_after_think"}),
    ],
)
def test_named_problems(text, kinds):
    _, problems = parse(text)
    assert kinds <= {p.kind for p in problems}


def test_tolerant_parse_keeps_content():
    trace, _ = parse(f"<think>{BLOCK_START}a{BLOCK_END}{SUMMARY_START}s")
    assert trace.blocks == (Block("a", "s"),)


@pytest.mark.parametrize("name", ["aime25-p5-qwen3", "gpqa-science", "lcb-code"])
def test_real_memento_outputs(name):
    path = SHARED / f"{name}.json"
    if not path.exists():
        pytest.skip(f"shared data not present at {path} (clone ../shared beside the repo)")
    trace = load_segments(path)
    assert len(trace.blocks) >= 4 and all(b.reasoning and b.memento for b in trace.blocks)
    assert trace.answer and trace.problem
    parsed, problems = parse(trace.render(), trace.problem)
    assert problems == [] and parsed == trace


def test_read_traces_names_file_and_line(tmp_path):
    good = MementoTrace("p", (Block("r", "m"),), "a").to_dict()
    path = tmp_path / "t.jsonl"
    path.write_text(f'{__import__("json").dumps(good)}\n{{"problem": "p"}}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: missing field 'blocks'"):
        read_traces(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:1"):
        read_traces(path)
