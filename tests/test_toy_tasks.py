"""The toy tasks: deterministic, split without overlap, mementos that carry the state, round-trips."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from memento.format import parse
from memento.toy.tasks import (
    TEST,
    TRAIN,
    ChainProblem,
    ChainTask,
    ProbeTask,
    from_lsb,
    lsb,
)


def test_lsb_round_trip():
    assert lsb(253, 3) == "352"
    assert lsb(7, 3) == "700"
    assert all(from_lsb(lsb(v, 4)) == v for v in range(0, 10_000, 37))


@pytest.mark.parametrize("split", [TRAIN, TEST])
def test_chain_problems_are_deterministic_by_seed(split):
    task = ChainTask()
    assert task.problems(50, split=split, seed=3) == task.problems(50, split=split, seed=3)
    assert task.problems(50, split=split, seed=3) != task.problems(50, split=split, seed=4)


def test_chain_splits_do_not_overlap():
    task = ChainTask()
    train = task.problems(3000, split=TRAIN, seed=0)
    test = task.problems(300, split=TEST, seed=0)
    train_starts = {(p.x0, p.b) for p in train}
    assert not train_starts & {(p.x0, p.b) for p in test}
    assert all(task.split_of(p) == TRAIN for p in train)
    assert all(task.split_of(p) == TEST for p in test)
    assert len(set(test)) == len(test)


def test_chain_trace_structure_and_answer():
    task = ChainTask(block_steps=4)
    p = ChainProblem(x0=253, b=47, n=10)
    trace = task.trace(p)
    assert trace.answer == "x=" + lsb((253 + 10 * 47) % 1000, 3) == task.answer(p)
    # blocks end where the steps left are a multiple of 4: 10 9 | 8 7 6 5 | 4 3 2 1
    assert [len(b.reasoning.splitlines()) for b in trace.blocks] == [2, 4, 4]
    assert [b.memento[:2] for b in trace.blocks] == ["08", "04", "00"]
    assert trace.blocks[-1].memento.startswith("00 ")
    # the prompt ends with the start state, where the first step copies it from
    assert trace.problem.endswith("n=10 x=352 b=740")
    assert trace.blocks[0].reasoning.startswith("10 x=352 b=740 3+7+0=10 5+4+1=10 2+0+1=03 x=003")


@pytest.mark.parametrize("seed", range(5))
def test_every_memento_carries_the_state(seed):
    """Re-deriving the answer from any memento alone (steps left, x, b) gives the answer."""
    task = ChainTask(block_steps=3, max_steps=20)
    for p in task.problems(20, seed=seed):
        trace = task.trace(p)
        for block in trace.blocks:
            assert task.continue_from(block.memento) == trace.answer
        # and each step's header is the state the previous step produced
        lines = [line for b in trace.blocks for line in b.reasoning.splitlines()]
        for before, after in zip(lines, lines[1:], strict=False):
            assert before.split()[-1] == after.split()[1]


def test_chain_is_correct_tolerates_whitespace_and_eos():
    task = ChainTask()
    p = ChainProblem(1, 2, 3)
    assert task.is_correct(p, "\n" + task.answer(p) + "<|endoftext|>")
    assert not task.is_correct(p, "x=000")
    assert task.continue_from("garbage") is None


def test_chain_control_has_same_reasoning_without_markers():
    task = ChainTask()
    trace = task.trace(ChainProblem(999, 999, 9))
    control = trace.render_control()
    assert "<|block_start|>" not in control and "<|summary_start|>" not in control
    for block in trace.blocks:
        assert block.reasoning in control
    assert control.endswith(trace.answer)


def test_chain_traces_parse_back():
    task = ChainTask(block_steps=2)
    for p in task.problems(30, seed=1):
        trace = task.trace(p)
        parsed, problems = parse(trace.render(), trace.problem)
        assert problems == []
        assert parsed == trace


def test_chain_config_is_validated():
    with pytest.raises(ValueError):
        ChainTask(block_steps=0)
    with pytest.raises(ValueError):
        ChainTask(min_steps=5, max_steps=2)
    with pytest.raises(ValueError):
        ChainTask().problems(1, split="dev")


def test_chain_length_range_is_respected():
    task = ChainTask(max_steps=16)
    ns = {p.n for p in task.problems(300, seed=0, min_steps=12)}
    assert ns <= set(range(12, 17)) and len(ns) > 1


def test_chain_length_weights():
    task = ChainTask(digits=2, block_steps=2, max_steps=6)
    only_long = task.problems(200, seed=0, min_steps=1, max_steps=6, weights=[0, 0, 0, 0, 1, 3])
    counts = Counter(p.n for p in only_long)
    assert set(counts) == {5, 6} and counts[6] > 2 * counts[5]
    assert task.problems(50, seed=3, weights=[1] * 6) == task.problems(50, seed=3, weights=[1] * 6)
    for bad in ([1, 1], [0] * 6, [1, 1, 1, 1, 1, -1]):
        with pytest.raises(ValueError, match="weights"):
            task.problems(5, seed=0, weights=bad)


def test_probe_trace_running_sums():
    task = ProbeTask()
    p = task.problems(1, seed=0)[0]
    trace = task.trace(p)
    assert len(trace.blocks) == 10
    total = 0
    for digits, block in zip(p.digits, trace.blocks, strict=True):
        assert len(digits) == 5
        assert block.reasoning == " ".join(map(str, digits))
        total += sum(digits)
        assert block.memento == f"sum={total:03d}"
    assert trace.answer == f"sum={total:03d}"
    parsed, problems = parse(trace.render(), trace.problem)
    assert problems == [] and parsed == trace


@pytest.mark.parametrize("block", [0, 4, 9])
def test_passcode_lands_in_the_chosen_block(block):
    task = ProbeTask()
    p = task.problems(1, seed=2)[0]
    q = task.inject_passcode(p, block, "12345")
    trace = task.trace(q)
    holders = [i for i, b in enumerate(trace.blocks) if "12345" in b.reasoning]
    assert holders == [block]
    assert all("12345" not in b.memento for b in trace.blocks)
    assert trace.answer == task.trace(p).answer  # the passcode does not change the sums


def test_probe_generation_with_passcodes_is_deterministic_and_split():
    task = ProbeTask()
    a = task.problems(20, split=TEST, seed=5, passcode_block=3)
    assert a == task.problems(20, split=TEST, seed=5, passcode_block=3)
    assert all(p.passcode_block == 3 and len(p.passcode) == 5 for p in a)
    assert all(task.split_of(p) == TEST for p in a)
    train = task.problems(200, seed=0)
    assert not {p.digits for p in train} & {p.digits for p in a}
    with pytest.raises(ValueError):
        task.inject_passcode(a[0], 10, "12345")
    with pytest.raises(ValueError):
        task.inject_passcode(a[0], 0, "1234")


def test_samples_do_not_touch_global_rng():
    state = random.getstate()
    ChainTask().problems(10, seed=0)
    ProbeTask().problems(3, seed=0)
    assert random.getstate() == state


def test_worked_probe_blocks_show_the_running_total_and_read_back():
    plain, worked = ProbeTask(), ProbeTask(worked=True)
    p = plain.inject_passcode(plain.problems(1, seed=4)[0], 1, "00042")
    a, b = plain.trace(p), worked.trace(p)
    assert [x.memento for x in a.blocks] == [x.memento for x in b.blocks] and a.answer == b.answer
    first = b.blocks[0].reasoning.split()
    total = 0
    for item, d in zip(first, p.digits[0], strict=True):
        total += d
        assert item == f"{d}:{total:03d}"
    assert b.blocks[1].reasoning.endswith(" passcode 00042")
    for task, trace in ((plain, a), (worked, b)):
        assert [task.read_block(x.reasoning) for x in trace.blocks] == [list(d) for d in p.digits]
    assert worked.read_block("1 2 3 4 5") is None and plain.read_block(first[0]) is None
    assert plain.read_block("1 2 3 4") is None and plain.read_block("1 2 3 4 5 passcode 12") is None


def test_chain_prompt_parses_back():
    task = ChainTask(digits=2)
    p = ChainProblem(29, 25, 12)
    assert task.parse_prompt(task.prompt(p)) == p
    assert task.parse_prompt("what is 2+2?") is None
    assert task.parse_prompt("n=12 x=9 b=52") is None  # x with the wrong number of digits


def test_chain_step_spans_put_each_slip_where_it_was_made():
    task = ChainTask(digits=2, block_steps=2)
    p = ChainProblem(29, 25, 12)
    text = task.trace(p).render()
    spans = task.step_spans(p, text)
    # per step: header, 2 x (operands, sum), new x; then a memento per block and the answer
    assert len(spans) == 12 * 6 + 6 + 1
    assert all(credit == 1.0 for _, _, credit in spans)
    assert text[spans[-1][0] : spans[-1][1]] == "x=92"

    def wrong(t: str) -> list[str]:
        return [t[a:b] for a, b, credit in task.step_spans(p, t) if credit == 0.0]

    # a wrong sum: that sum and the new x it feeds are wrong; the next step copies the x as written
    assert wrong(text.replace("2+2+1=05", "2+2+1=06", 1)) == ["=06", "x=45"]
    # a header that does not copy the previous step's x is wrong (and the column that then does not
    # copy that header), and so is a wrong b
    assert wrong(text.replace("11 x=45 b=52", "11 x=46 b=52", 1)) == ["11 x=46 b=52", "5+2+0"]
    assert wrong(text.replace("b=52", "b=53"))[0] == "12 x=92 b=53"
    # a memento that says no steps are left after the first block; the answer after it copies it
    early = text.replace("<|summary_start|>10 x=97", "<|summary_start|>00 x=97", 1)
    assert wrong(early) == ["00 x=97 b=52"]
    stopped = early[: early.index("<|summary_end|>") + len("<|summary_end|>")] + "\n\n</think>\n\nx=97"
    assert wrong(stopped) == ["00 x=97 b=52"]
    # an answer that is not the last memento's x
    assert wrong(text[: -len("x=92")] + "x=93") == ["x=93"]
    assert task.step_spans(p, "no steps here") == []
