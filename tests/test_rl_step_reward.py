"""`--step-reward`: spans judged by a task become per-token advantages, checked and offset right."""

from __future__ import annotations

import pytest

from memento.toy.kit import build_tokenizer
from memento.toy.rl_demo import chain_step_spans
from memento.toy.tasks import ChainProblem, ChainTask
from memento.train.rl.rewards import judge_steps
from memento.train.rl.rollouts import Rollout, step_advantages, token_offsets


def rollout(text: str, ids: list[int], advantage: float = 0.0) -> Rollout:
    return Rollout(0, 0, [], ids, [], [False] * len(ids), [], "stop", text, 0, 0, advantage=advantage)


class CharTokenizer:
    """One token per character; `glue` makes per-token decoding differ from decoding the whole."""

    def __init__(self, glue: bool = False):
        self.glue = glue

    def decode(self, ids, skip_special_tokens=False):
        text = "".join(chr(i) for i in ids)
        return text.replace("ab", "X") if self.glue else text


@pytest.mark.parametrize("glue", [False, True])
def test_token_offsets_cover_the_text(glue):
    tok = CharTokenizer(glue)
    ids = [ord(c) for c in "zabz"] + [0]  # a trailing stop token outside the text
    text = tok.decode(ids[:-1])
    spans = token_offsets(tok, ids, text)
    assert "".join(text[a:b] for a, b in spans) == text
    assert spans[-1] == (len(text), len(text))


def test_token_offsets_with_a_real_tokenizer():
    tok = build_tokenizer()
    text = "<think>\n<|block_start|>12 x=92 b=52 9+5+0=14<|block_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = token_offsets(tok, ids, text)
    assert [text[a:b] for a, b in spans] == [tok.decode([i], skip_special_tokens=False) for i in ids]


def test_step_advantages_push_down_the_slip_against_the_same_step_in_the_group():
    tok = CharTokenizer()
    a, b = "xx11", "xx10"  # credit: the first two chars are not judged, then one span per digit
    ids_a, ids_b = [ord(c) for c in a], [ord(c) for c in b]
    ra, rb = rollout(a, ids_a, advantage=0.5), rollout(b, ids_b, advantage=-0.5)
    ra.steps = [(2, 3, 1.0), (3, 4, 1.0)]
    rb.steps = [(2, 3, 1.0), (3, 4, 0.0)]
    step_advantages([ra, rb], group_size=2, weight=2.0, tokenizer=tok)
    # span 0 is right in both (baseline 1: no push), span 1 in one of two (baseline 0.5)
    assert ra.token_advantages == [0.5, 0.5, 0.5, 0.5 + 2 * 0.5]
    assert rb.token_advantages == [-0.5, -0.5, -0.5, -0.5 - 2 * 0.5]
    assert ra.steps_right == 1.0 and rb.steps_right == 0.5
    # a response whose sequence advantage is zero still has a gradient through its steps
    rc, rd = rollout(a, ids_a), rollout(b, ids_b)
    rc.steps, rd.steps = ra.steps, rb.steps
    step_advantages([rc, rd], 2, 1.0, tok)
    assert rc.has_gradient and rd.has_gradient and not rollout(a, ids_a).has_gradient


def test_judge_steps_checks_what_a_step_reward_returns():
    assert judge_steps(lambda r, p: [(0, 2, 1), (2, 3, 0.0)], "abc", "") == [(0, 2, 1.0), (2, 3, 0.0)]
    for bad in ([(0, 9, 1.0)], [(2, 2, 1.0)], [(0, 1, 1.5)], [(0, 1)], [(0.0, 1, 1.0)]):
        with pytest.raises(ValueError, match="step reward"):
            judge_steps(lambda r, p, bad=bad: bad, "abc", "")


def test_chain_step_spans_reads_the_problem_from_the_prompt():
    task = ChainTask(digits=2, block_steps=2)
    p = ChainProblem(29, 25, 12)
    text = task.trace(p).render()
    assert chain_step_spans(text, task.prompt(p)) == task.step_spans(p, text)
    assert chain_step_spans(text, "What is 2 + 2?") == []
    wrong_modulus = task.prompt(p).replace("mod 100", "mod 1000")  # 3-digit fields expected: none parse
    assert chain_step_spans(text, wrong_modulus) == []
