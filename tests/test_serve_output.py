"""Building a choice's text token by token: the deltas add up to the decoded text, multi-byte
characters split across tokens are held back until complete, stop strings that span tokens are
cut exactly and never half-emitted, and `<think>` ... `</think>` splits reasoning from content."""

from __future__ import annotations

import pytest

from memento.serve.output import ChoiceOutput, Detokenizer


def _run(out: ChoiceOutput, ids: list[int], finish: str = "length"):
    deltas = [out.feed(t, None, None, finish if i == len(ids) - 1 else None) for i, t in enumerate(ids)]
    return deltas


def _think(tokenizer) -> tuple[int, int]:
    return tokenizer.convert_tokens_to_ids("<think>"), tokenizer.convert_tokens_to_ids("</think>")


@pytest.mark.parametrize("text", ["plain words 123", "naïve café — ünïcödé ✓ 数学", "a\n\nb  c"])
def test_detokenizer_deltas_add_up(toy_tokenizer, text):
    ids = toy_tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(toy_tokenizer, skip_special_tokens=True)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == toy_tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # partial UTF-8 never leaks out


def test_stop_string_across_tokens_is_cut_and_never_half_emitted(toy_tokenizer):
    ids = toy_tokenizer.encode("The answer is 42. Done here.", add_special_tokens=False)
    out = ChoiceOutput(0, toy_tokenizer, stop=["42. Do"])
    deltas = _run(out, ids)
    emitted = "".join(d.content for d in deltas)
    assert emitted == out.content == "The answer is "
    stopped = [d for d in deltas if d.finish_reason]
    assert len(stopped) == 1 and stopped[0].stop_reason == "42. Do" and stopped[0].stop_now
    assert out.finish_reason == "stop"
    assert all(not d.content for d in deltas[deltas.index(stopped[0]) + 1 :])


def test_no_stop_means_everything_is_emitted_at_once(toy_tokenizer):
    ids = toy_tokenizer.encode("one two three", add_special_tokens=False)
    out = ChoiceOutput(0, toy_tokenizer, stop=["zzz"])
    deltas = _run(out, ids)
    assert "".join(d.content for d in deltas) == "one two three"
    assert deltas[-1].finish_reason == "length"


def test_reasoning_split(toy_tokenizer, markers):
    think = _think(toy_tokenizer)
    enc = lambda s: toy_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    ids = [think[0]] + enc("\nstep one ") + [markers.block_start] + enc("x") + [think[1]] + enc("\n\nfinal 7")
    for skip in (True, False):
        out = ChoiceOutput(0, toy_tokenizer, think=think, skip_special_tokens=skip)
        deltas = _run(out, ids)
        marker = "" if skip else "<|block_start|>"
        assert out.reasoning == "step one " + marker + "x" == "".join(d.reasoning for d in deltas)
        assert out.content == "final 7" == "".join(d.content for d in deltas)
    # a prompt that leaves <think> open starts inside the reasoning; no think tags: all content
    out = ChoiceOutput(0, toy_tokenizer, think=think, in_reasoning=True)
    _run(out, enc("a b") + [think[1]] + enc("c"))
    assert (out.reasoning, out.content) == ("a b", "c")
    out = ChoiceOutput(0, toy_tokenizer, think=think)
    _run(out, enc("\njust an answer"))
    assert (out.reasoning, out.content) == (None, "\njust an answer")


def test_stop_token_is_not_text_but_is_counted(toy_tokenizer):
    im_end = toy_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = toy_tokenizer.encode("hi", add_special_tokens=False) + [im_end]
    out = ChoiceOutput(0, toy_tokenizer, stop_ids={im_end}, skip_special_tokens=False, logprobs=True)
    deltas = [out.feed(t, -0.5, [(t, -0.5)], "stop" if t == im_end else None) for t in ids]
    assert out.content == "hi" and out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids == ids and len(out.logprobs) == len(ids)  # the stop token has an entry
    assert deltas[-1].finish_reason == "stop"
    user = ChoiceOutput(0, toy_tokenizer, user_stop_ids={5})
    user.feed(5, None, None, "stop")
    assert user.stop_reason == 5
