"""`memento serve` through the official `openai` client: chat and completions, streaming and not,
n > 1, reproducible seeds, log-probs, the reasoning fields, stop conditions, per-request MEMENTO
options and the usage numbers. The model is a random toy whose outputs a logits hook shapes into
well-formed MEMENTO reasoning (two blocks, two mementos, an answer)."""

from __future__ import annotations

import httpx
import openai
import pytest

from engine_helpers import one_thread, sharp_model  # noqa: F401 (fixture)
from memento.engine import Engine
from memento.masking import BlockMaskingConfig
from memento.serve import EngineWorker, ServerSettings
from serve_helpers import API_KEY, ForcedReasoning, running_server

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:prompt .* has no")]

MODEL = "toy-memento"
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(toy_tokenizer, markers):
    model = sharp_model(toy_tokenizer, seed=3)
    hook = ForcedReasoning(toy_tokenizer, markers)

    def load():
        return Engine(model, toy_tokenizer, logits_hook=hook, kv_budget_tokens=400, max_batch_size=8)

    worker = EngineWorker(load)
    settings = ServerSettings(MODEL, mode="memento", masking=BlockMaskingConfig(), api_key=API_KEY)
    with running_server(worker, settings) as url:
        yield url, worker


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _stream_text(stream) -> tuple[dict[int, dict], list]:
    """Concatenate a streamed response per choice: content, reasoning, finish reason, logprobs."""
    out: dict[int, dict] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            acc = out.setdefault(
                choice.index, {"content": "", "reasoning": "", "finish": None, "logprobs": []}
            )
            delta = getattr(choice, "delta", None)
            if delta is not None:
                acc["content"] += delta.content or ""
                acc["reasoning"] += (delta.model_extra or {}).get("reasoning_content") or ""
            else:
                acc["content"] += choice.text
            if choice.logprobs is not None:
                acc["logprobs"] += getattr(choice.logprobs, "content", None) or choice.logprobs.tokens
            if choice.finish_reason:
                acc["finish"] = choice.finish_reason
    return out, chunks


def test_models_and_health(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(url + "/health").status_code == 200


def test_chat_reasoning_split_and_usage(client, toy_tokenizer):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=100)
    choice = resp.choices[0]
    extra = choice.message.model_extra
    assert choice.finish_reason == "stop"  # the forced <|im_end|>, not part of the text
    assert extra["reasoning_content"] == extra["reasoning"] and extra["reasoning_content"]
    assert choice.message.content
    assert "<think>" not in choice.message.content + extra["reasoning_content"]
    assert resp.usage.completion_tokens == ForcedReasoning.LENGTH
    memento = resp.usage.model_extra["memento"]
    assert memento["evictions"] == 2 and memento["preemptions"] == 0 and memento["mode"] == "memento"
    assert 0 < memento["peak_kv"] < resp.usage.prompt_tokens + ForcedReasoning.LENGTH

    raw = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=100,
        extra_body={"skip_special_tokens": False},
    )
    reasoning = raw.choices[0].message.model_extra["reasoning_content"]
    assert reasoning.count("<|block_start|>") == 2 and reasoning.count("<|summary_end|>") == 2
    assert "<|block_start|>" not in extra["reasoning_content"]  # stripped by default
    assert raw.choices[0].message.content == choice.message.content  # the answer has no markers


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0.9, seed=11, max_tokens=100, n=2)
    full = client.chat.completions.create(**kwargs)
    streamed, chunks = _stream_text(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    for choice in full.choices:
        got = streamed[choice.index]
        assert got["content"] == choice.message.content
        assert got["reasoning"] == choice.message.model_extra["reasoning_content"]
        assert got["finish"] == choice.finish_reason == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_and_seeds(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=1.0, max_tokens=100)
    a = client.chat.completions.create(**kwargs, seed=5, n=3)
    b = client.chat.completions.create(**kwargs, seed=5, n=3)
    texts = [c.message.model_extra["reasoning_content"] + c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.model_extra["reasoning_content"] + c.message.content for c in b.choices]
    assert len(set(texts)) == 3  # the samples differ
    # sample k draws with seed + k, so choice 1 of seed 5 is choice 0 of seed 6
    c = client.chat.completions.create(**kwargs, seed=6)
    assert c.choices[0].message.content == a.choices[1].message.content
    other = client.chat.completions.create(**kwargs, seed=99).choices[0].message
    assert other.model_extra["reasoning_content"] + other.content not in texts


def test_chat_logprobs(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=100, logprobs=True, top_logprobs=3
    )
    entries = resp.choices[0].logprobs.content
    assert len(entries) == resp.usage.completion_tokens  # one per generated token (the stop included)
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode() == e.token
    assert entries[0].token == "<think>" and entries[0].logprob == 0.0  # forced by the hook
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=100)
    assert plain.choices[0].logprobs is None


def test_completions(client, toy_tokenizer):
    prompt = toy_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    resp = client.completions.create(
        model=MODEL, prompt=[prompt, prompt + "x"], max_tokens=100, temperature=0, n=2
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text == resp.choices[1].text  # greedy
    assert "<think>" not in resp.choices[0].text and resp.choices[0].finish_reason == "stop"
    streamed, chunks = _stream_text(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=100, temperature=0, stream=True)
    )
    assert streamed[0]["content"] == resp.choices[0].text and streamed[0]["finish"] == "stop"
    short = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = short.choices[0].logprobs
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    ids = client.completions.create(
        model=MODEL, prompt=[1, 2, 3], max_tokens=3, temperature=0, extra_body={"return_token_ids": True}
    )
    assert ids.choices[0].model_extra["prompt_token_ids"] == [1, 2, 3]
    assert len(ids.choices[0].model_extra["token_ids"]) == 3


def test_stop_strings_and_stop_token_ids(client, markers):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=100)
    body = {"skip_special_tokens": False}
    resp = client.chat.completions.create(**kwargs, stop=["<|summary_end|>"], extra_body=body)
    choice = resp.choices[0]
    reasoning = choice.message.model_extra["reasoning_content"]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == "<|summary_end|>"
    assert "<|summary_start|>" in reasoning
    assert "<|summary_end|>" not in reasoning and choice.message.content == ""
    assert resp.usage.completion_tokens == 10  # <think> + 8 tokens of the first block, then the stop
    streamed, _ = _stream_text(
        client.chat.completions.create(**kwargs, stop=["<|summary_end|>"], extra_body=body, stream=True)
    )
    assert streamed[0]["reasoning"] == reasoning
    by_id = client.chat.completions.create(**kwargs, extra_body={"stop_token_ids": [markers.summary_start]})
    assert by_id.choices[0].finish_reason == "stop"
    assert by_id.choices[0].model_extra["stop_reason"] == markers.summary_start
    assert by_id.usage.completion_tokens == 8


def test_per_request_memento_options(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=100)
    default = client.chat.completions.create(**kwargs).usage.model_extra["memento"]
    full = client.chat.completions.create(
        **kwargs, extra_body={"memento": {"mode": "full"}}
    ).usage.model_extra["memento"]
    keep1 = client.chat.completions.create(**kwargs, extra_body={"memento": {"keep_last_n_blocks": 1}})
    keep1 = keep1.usage.model_extra["memento"]
    assert (default["evictions"], keep1["evictions"], full["evictions"]) == (2, 1, 0)
    assert full["mode"] == "full"
    assert default["peak_kv"] < keep1["peak_kv"] < full["peak_kv"]


def test_client_errors_through_the_sdk(server, client):
    """The SDK raises its typed errors for our error bodies (details: tests/test_serve_errors.py)."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"memento": {"keep_last": 1}}
        )
    assert err.value.body["param"] == "memento.keep_last"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3).choices


def test_continue_final_message_with_prompt_blocks(client):
    """A final assistant message that already holds a finished block: the block is evicted during
    prefill (counted in usage), and the reply continues inside the open `<think>`."""
    partial = "<think>\n<|block_start|>old work<|block_end|>\n<|summary_start|>kept<|summary_end|>\n\n"
    messages = [*MESSAGES, {"role": "assistant", "content": partial}]
    resp = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=100,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert resp.usage.model_extra["memento"]["evictions"] == 3  # 1 in the prompt + 2 generated
    assert resp.choices[0].message.model_extra["reasoning_content"]


def test_continuous_usage_stats(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    counts = [chunk.usage.completion_tokens for chunk in stream]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 6
