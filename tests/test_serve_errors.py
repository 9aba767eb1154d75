"""Every error a client can cause gets OpenAI's error shape and a 4xx (never a 500), and the
server keeps serving; /health says 503 while the model loads and after the engine died, and a
stream that fails midway ends with an error event."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from engine_helpers import one_thread, sharp_model  # noqa: F401 (fixture)
from memento.engine import Engine
from memento.serve import EngineWorker, ServerSettings
from serve_helpers import API_KEY, running_server

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:prompt .* has no")]

MODEL = "toy"
BUDGET = 120
MSG = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model(toy_tokenizer):
    return sharp_model(toy_tokenizer, seed=1)


@pytest.fixture(scope="module")
def url(model, toy_tokenizer):
    worker = EngineWorker(lambda: Engine(model, toy_tokenizer, kv_budget_tokens=BUDGET, max_batch_size=4))
    with running_server(worker, ServerSettings(MODEL, api_key=API_KEY, max_model_len=400)) as base:
        yield base


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
LONG = "word " * 100  # > BUDGET tokens, < max_model_len

# (name, path, body (dict, or raw bytes), status, param or None, message fragment)
CASES = [
    ("invalid JSON", CHAT, b"{not json", 400, None, "not valid JSON"),
    ("JSON array body", CHAT, b"[1, 2]", 400, None, "must be a JSON object"),
    ("unknown field", CHAT, {"messages": MSG, "temprature": 0.5}, 400, "temprature", "Unrecognized"),
    ("no messages", CHAT, {"model": MODEL}, 400, "messages", "Field required"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages", "at least 1"),
    ("bad role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", ""),
    (
        "image part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages.0.content",
        "",
    ),
    ("temperature type", CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature", ""),
    (
        "temperature range",
        CHAT,
        {"messages": MSG, "temperature": 3},
        400,
        "temperature",
        "less than or equal",
    ),
    ("top_p zero", CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p", ""),
    ("min_p one", CHAT, {"messages": MSG, "min_p": 1.0}, 400, "min_p", ""),
    ("n zero", CHAT, {"messages": MSG, "n": 0}, 400, "n", ""),
    ("n huge", CHAT, {"messages": MSG, "n": 1000}, 400, "n", ""),
    ("max_tokens zero", CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens", ""),
    ("max_tokens bool", CHAT, {"messages": MSG, "max_tokens": True}, 400, "max_tokens", ""),
    ("negative seed", CHAT, {"messages": MSG, "seed": -1}, 400, "seed", ""),
    ("top_logprobs alone", CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", "logprobs=true"),
    (
        "top_logprobs too many",
        CHAT,
        {"messages": MSG, "logprobs": True, "top_logprobs": 50},
        400,
        "top_logprobs",
        "",
    ),
    ("empty stop", CHAT, {"messages": MSG, "stop": [""]}, 400, "stop", "empty"),
    (
        "stop_token_ids outside vocab",
        CHAT,
        {"messages": MSG, "stop_token_ids": [10**6]},
        400,
        "stop_token_ids",
        "",
    ),
    (
        "stream_options without stream",
        CHAT,
        {"messages": MSG, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "",
    ),
    ("tools", CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("penalty", CHAT, {"messages": MSG, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("memento not an object", CHAT, {"messages": MSG, "memento": 3}, 400, "memento", ""),
    (
        "memento unknown key",
        CHAT,
        {"messages": MSG, "memento": {"keep_last": 1}},
        400,
        "memento.keep_last",
        "keep_last",
    ),
    (
        "memento bad value",
        CHAT,
        {"messages": MSG, "memento": {"keep_last_n_blocks": -5}},
        400,
        "memento",
        "keep_last_n_blocks",
    ),
    (
        "memento bad type",
        CHAT,
        {"messages": MSG, "memento": {"mask_delimiters": "yes"}},
        400,
        "memento",
        "true or false",
    ),
    ("memento bad mode", CHAT, {"messages": MSG, "memento": {"mode": "fast"}}, 400, "memento.mode", "fast"),
    (
        "memento restart without mode",
        CHAT,
        {"messages": MSG, "memento": {"restart_mode": True}},
        400,
        "memento",
        "restart",
    ),
    (
        "continue without assistant",
        CHAT,
        {"messages": MSG, "continue_final_message": True, "add_generation_prompt": False},
        400,
        "messages",
        "final assistant",
    ),
    (
        "prompt over the KV budget",
        CHAT,
        {"messages": [{"role": "user", "content": LONG}], "max_tokens": 5},
        400,
        "messages",
        "KV budget",
    ),
    (
        "over the context length",
        CHAT,
        {"messages": MSG, "max_tokens": 500},
        400,
        "max_tokens",
        "maximum context length",
    ),
    ("completion: no prompt", COMP, {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("completion: empty prompt list", COMP, {"prompt": []}, 400, "prompt", "empty"),
    ("completion: empty text", COMP, {"prompt": ""}, 400, "prompt", "empty"),
    ("completion: token outside vocab", COMP, {"prompt": [1, 99999]}, 400, "prompt", "vocabulary"),
    ("completion: negative token", COMP, {"prompt": [-1]}, 400, "prompt", "vocabulary"),
    ("completion: logprobs too many", COMP, {"prompt": "a", "logprobs": 21}, 400, "logprobs", ""),
    ("completion: echo", COMP, {"prompt": "a", "echo": True}, 400, "echo", "not supported"),
    ("completion: best_of", COMP, {"prompt": "a", "best_of": 3}, 400, "best_of", "not supported"),
    ("completion: over the budget", COMP, {"prompt": LONG, "max_tokens": 1}, 400, "prompt", "KV budget"),
    ("unknown model", CHAT, {"model": "gpt-4o", "messages": MSG}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("name,path,body,status,param,fragment", CASES, ids=[c[0] for c in CASES])
def test_client_errors(url, name, path, body, status, param, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    for stream in (False, True):
        if stream and not isinstance(body, dict):
            continue
        sent = content if not stream else json.dumps({**body, "stream": True}).encode()
        if stream and name == "stream_options without stream":
            continue
        r = httpx.post(
            url + path, content=sent, headers=AUTH | {"Content-Type": "application/json"}, timeout=30
        )
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
        assert error["param"] == param and fragment in error["message"]


def test_auth_and_routes(url):
    r = httpx.post(url + CHAT, json={"messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(url + "/v1/models", headers={"Authorization": API_KEY})  # no "Bearer"
    assert r.status_code == 401
    assert httpx.get(url + "/v1/models/" + MODEL, headers=AUTH).json()["id"] == MODEL
    assert httpx.get(url + "/v1/models/other", headers=AUTH).status_code == 404
    r = httpx.get(url + "/v1/nothing-here", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(url + CHAT, headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()
    # open routes: no key needed
    for path in ("/health", "/metrics", "/stats", "/"):
        assert httpx.get(url + path).status_code == 200, path


def test_still_serving_after_every_error(url):
    for _, path, body, *_ in CASES:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert httpx.post(url + path, content=content, headers=AUTH).status_code < 500
    r = httpx.post(
        url + CHAT, json={"messages": MSG, "max_tokens": 4, "temperature": 0}, headers=AUTH, timeout=30
    )
    assert r.status_code == 200 and 1 <= r.json()["usage"]["completion_tokens"] <= 4  # EOS may come first
    stats = httpx.get(url + "/stats").json()["latest"]
    assert stats["kv"] == 0 and stats["running"] == {} and stats["waiting"] == 0


def test_health_while_loading_then_ready(model, toy_tokenizer):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return Engine(model, toy_tokenizer)

    worker = EngineWorker(slow_load)
    with running_server(worker, ServerSettings(MODEL), wait_ready=False) as base:
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(base + CHAT, json={"messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        for _ in range(500):
            if worker.state == "ready":
                break
            threading.Event().wait(0.02)
        assert httpx.get(base + "/health").status_code == 200


def test_load_failure_and_dead_engine(model, toy_tokenizer):
    def broken():
        raise OSError("no such checkpoint")

    worker = EngineWorker(broken)
    with running_server(worker, ServerSettings(MODEL), wait_ready=False) as base:
        for _ in range(500):
            if worker.state == "dead":
                break
            threading.Event().wait(0.02)
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and "no such checkpoint" in r.json()["error"]

    engine = Engine(model, toy_tokenizer)
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated device failure")
        return real_step()

    engine.step = failing_step
    worker = EngineWorker(lambda: engine)
    with running_server(worker, ServerSettings(MODEL)) as base:
        # greedy: a sampled token of this random model can end the turn within the 3 good steps (flaky)
        body = {"messages": MSG, "max_tokens": 50, "stream": True, "temperature": 0}
        with httpx.stream("POST", base + CHAT, json=body) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "simulated device failure" in error["message"]
        assert httpx.get(base + "/health").status_code == 503
        r = httpx.post(base + CHAT, json={"messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
