"""The `openai` backend end to end against a local fake OpenAI-compatible server (127.0.0.1 only):
500s, timeouts, malformed JSON, out-of-range answers, judge failures, and a full run."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from memento.annotate.llm import EndpointUnreachable, LLMCallFailed, LLMClient, LLMConfig, parse_json_object
from memento.annotate.mementos import (
    COMPRESS_SYSTEM,
    COMPRESS_TRACE_SYSTEM,
    JUDGE_SYSTEM,
    MementoConfig,
    llm_memento,
    llm_mementos,
)
from memento.annotate.runner import AnnotateConfig, run
from memento.annotate.scoring import SCORING_SYSTEM, ScoringConfig, llm_scores, validate_scores
from memento.annotate.sentences import RegexTokenCounter
from memento.format import MementoTrace

TRACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces" / "sky-t1-aime24.jsonl"


class FakeOpenAI:
    """A tiny chat-completions server. `plan(role, user_text, n)` may return an action per request:
    None (answer well), "500", "sleep", "malformed", "range", or a literal content string."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.plan = lambda role, user, n: None
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body: dict | str) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):  # noqa: N802
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                system = body["messages"][0]["content"]
                user = body["messages"][-1]["content"]
                roles = {
                    SCORING_SYSTEM: "score",
                    COMPRESS_SYSTEM: "compress",
                    COMPRESS_TRACE_SYSTEM: "compress_trace",
                    JUDGE_SYSTEM: "judge",
                }
                role = roles.get(system, "?")
                if role == "compress" and "A reviewer found" in user:
                    role = "refine"
                with fake.lock:
                    n = len(fake.requests)
                    fake.requests.append((role, user))
                action = fake.plan(role, user, n)
                if action == "500":
                    return self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
                if action == "sleep":
                    time.sleep(5)
                content = (
                    action
                    if isinstance(action, str) and action not in ("sleep", "malformed", "range")
                    else None
                )
                if content is None:
                    content = fake.answer(role, user, action)
                self._send(
                    200,
                    {
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, role: str, user: str, action: str | None) -> str:
        if action == "malformed":
            return '{"scores": [1, 2,'  # truncated JSON
        if role == "score":
            count = int(re.search(r"Rate these (\d+) boundaries", user).group(1))
            value = 7 if action == "range" else 2
            return "```json\n" + json.dumps({"scores": [value] * count}) + "\n```"
        if role == "compress":
            return json.dumps({"memento": "x = 1; method: substitution"})
        if role == "compress_trace":
            count = len(re.findall(r"^=== Block \d+ ===$", user, re.MULTILINE))
            return json.dumps({"mementos": [f"x = {i}; method: substitution" for i in range(count)]})
        if role == "refine":
            return json.dumps({"memento": "refined: x = 1, y = 2; method: substitution"})
        if role == "judge":
            memento = user.split("Memento to grade:", 1)[1]
            score = 9 if "refined" in memento else 5
            return json.dumps({"score": score, "missing": ["value of y"], "feedback": ["add y = 2"]})
        return "?"

    def roles(self) -> list[str]:
        return [r for r, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


def _client(fake: FakeOpenAI, **kw) -> LLMClient:
    cfg = dict(
        model="fake",
        base_url=fake.url,
        api_key="none",
        timeout_s=2.0,  # generous: a loaded CI machine must not time out ordinary requests
        max_attempts=3,
        backoff_s=0.01,
        concurrency=4,
    )
    cfg.update(kw)
    return LLMClient(LLMConfig(**cfg))


def _run(coro):
    return asyncio.run(coro)


SENTENCES = [f"Sentence number {i} says something. " for i in range(30)]


def test_scoring_two_pass_windows_and_fenced_json(fake):
    async def go():
        client = _client(fake)
        try:
            return await llm_scores(client, "Find x.", SENTENCES, ScoringConfig(two_pass=True))
        finally:
            await client.close()

    res = _run(go())
    assert res.scores == [2.0] * 29 and not res.failures
    assert fake.roles().count("score") == 2 + 3  # ceil(29/16) + ceil(29/11)
    assert not any("Find x." in u for r, u in fake.requests)  # as the original: no problem statement


def test_scoring_sends_the_problem_only_when_asked(fake):
    async def go():
        client = _client(fake)
        try:
            cfg = ScoringConfig(two_pass=False, include_problem=True)
            return await llm_scores(client, "Find x.", SENTENCES[:5], cfg)
        finally:
            await client.close()

    assert _run(go()).scores == [2.0] * 4
    assert [u.startswith("Problem being solved:\nFind x.") for _, u in fake.requests] == [True]


def test_scoring_retries_500_timeout_malformed_then_succeeds(fake):
    actions = {0: "500", 1: "sleep", 2: "malformed"}
    fake.plan = lambda role, user, n: actions.get(n)

    async def go():
        client = _client(fake, max_attempts=4)
        try:
            return await llm_scores(client, "p", SENTENCES[:10], ScoringConfig(two_pass=False)), client
        finally:
            await client.close()

    res, client = _run(go())
    assert res.scores == [2.0] * 9 and not res.failures
    assert client.failed_attempts == 3


def test_failed_window_is_recorded_not_zero(fake):
    # The window holding boundary B0 always answers out of range; the others are fine.
    fake.plan = lambda role, user, n: "range" if "[[B0]]" in user else None

    async def go():
        client = _client(fake)
        try:
            return await llm_scores(client, "p", SENTENCES[:25], ScoringConfig(two_pass=False))
        finally:
            await client.close()

    res = _run(go())
    assert res.scores[:16] == [None] * 16 and res.scores[16:] == [2.0] * 8
    assert len(res.failures) == 1 and "outside 0..3" in res.failures[0].error


def test_validate_scores_rejects_bad_answers():
    with pytest.raises(ValueError):
        validate_scores('{"scores": [1, 2]}', 3)
    with pytest.raises(ValueError):
        validate_scores('{"scores": [1, -1]}', 2)
    with pytest.raises(ValueError):
        validate_scores('{"scores": [1, true]}', 2)
    assert validate_scores('Sure! {"scores": [0, 3]}', 2) == [0.0, 3.0]
    with pytest.raises(ValueError):
        parse_json_object("no json here")


def test_memento_loop_keeps_best_and_refines_with_feedback(fake):
    async def go():
        client = _client(fake)
        try:
            return await llm_memento(
                client, "Find x.", "We solve x + 1 = 2, so x = 1.", MementoConfig(max_iterations=2)
            )
        finally:
            await client.close()

    res = _run(go())
    assert fake.roles() == ["compress", "judge", "refine", "judge"]
    assert res.memento.startswith("refined") and res.score == 9.0
    refine_prompt = fake.requests[2][1]
    assert "add y = 2" in refine_prompt and "value of y" in refine_prompt


def test_trace_compressor_writes_every_memento_in_one_call(fake):
    blocks = ["We set x + 1 = 2.", "So x = 1; check: 1 + 1 = 2.", "The answer is 1."]

    async def go(cfg):
        client = _client(fake)
        try:
            return await llm_mementos(client, "Find x.", blocks, cfg)
        finally:
            await client.close()

    results = _run(go(MementoConfig(max_iterations=1)))
    assert fake.roles().count("compress_trace") == 1 and "compress" not in fake.roles()
    trace_prompt = next(u for r, u in fake.requests if r == "compress_trace")
    assert all(b in trace_prompt for b in blocks) and "Find x." in trace_prompt
    assert [r.memento for r in results] == [f"x = {i}; method: substitution" for i in range(3)]
    assert fake.roles().count("judge") == 3 and all(r.compress == "trace" for r in results)
    assert [r.first_score for r in results] == [5.0] * 3

    fake.requests.clear()  # one call per block when asked
    results = _run(go(MementoConfig(max_iterations=1, compress="block")))
    assert fake.roles().count("compress") == 3 and "compress_trace" not in fake.roles()


def test_trace_compressor_with_the_wrong_count_fails_every_block(fake):
    fake.plan = lambda role, user, n: (
        json.dumps({"mementos": ["only one"]}) if role == "compress_trace" else None
    )

    async def go():
        client = _client(fake, max_attempts=2)
        try:
            return await llm_mementos(client, "p", ["block a", "block b"], MementoConfig())
        finally:
            await client.close()

    results = _run(go())
    assert fake.roles() == ["compress_trace", "compress_trace"]  # retried, then given up
    assert all(r.memento is None and "expected 2 mementos" in r.failures[0] for r in results)


def test_best_memento_kept_when_refinement_is_worse(fake):
    fake.answer_orig = fake.answer

    def answer(role, user, action):
        if role == "judge":
            memento = user.split("Memento to grade:", 1)[1]
            return json.dumps({"score": 3 if "refined" in memento else 6, "feedback": ["more"]})
        return fake.answer_orig(role, user, action)

    fake.answer = answer

    async def go():
        client = _client(fake)
        try:
            return await llm_memento(client, "p", "block text", MementoConfig(max_iterations=2))
        finally:
            await client.close()

    res = _run(go())
    assert res.score == 6.0 and not res.memento.startswith("refined")


def test_judge_failure_is_never_fed_to_the_refiner(fake):
    fake.plan = lambda role, user, n: "500" if role == "judge" else None

    async def go():
        client = _client(fake, max_attempts=2)
        try:
            return await llm_memento(client, "p", "block text", MementoConfig(max_iterations=3))
        finally:
            await client.close()

    res = _run(go())
    assert "refine" not in fake.roles()
    assert res.memento == "x = 1; method: substitution" and res.score is None
    assert res.failures and "judge failed" in res.failures[0]


def test_compressor_failure_raises_after_retries(fake):
    fake.plan = lambda role, user, n: "500"

    async def go():
        client = _client(fake, max_attempts=2)
        try:
            with pytest.raises(LLMCallFailed):
                await client.call("x", [{"role": "user", "content": "hi"}], lambda c: c)
        finally:
            await client.close()

    _run(go())


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    async def go():
        client = LLMClient(LLMConfig(base_url="http://127.0.0.1:9/v1", api_key="none", timeout_s=2))
        try:
            await client.check_reachable()
        finally:
            await client.close()

    with pytest.raises(EndpointUnreachable, match="--base-url"):
        _run(go())


def _real_input(tmp_path: Path, n: int) -> Path:
    if not TRACES.exists():
        pytest.skip(f"shared real traces not found at {TRACES}")
    rows = [json.loads(line) for line in TRACES.read_text(encoding="utf-8").splitlines()]
    short = sorted((r for r in rows if "<|end_of_thought|>" in r["cot"]), key=lambda r: len(r["cot"]))[:n]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in short), encoding="utf-8")
    return path


def test_full_run_with_openai_backend(fake, tmp_path):
    # Every 7th request fails once with a 500: retries absorb it.
    fake.plan = lambda role, user, n: "500" if n % 7 == 3 else None
    inp = _real_input(tmp_path, 2)
    cfg = AnnotateConfig(
        backend="openai",
        progress=False,
        workers=2,
        llm=LLMConfig(model="fake", base_url=fake.url, api_key="none", timeout_s=5, backoff_s=0.01),
    )
    summary = run(inp, tmp_path / "out", cfg, counter=RegexTokenCounter())
    assert summary.processed == 2 and summary.failed == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    for rec in records:
        assert rec["backend"]["name"] == "openai" and rec["backend"]["model"] == "fake"
        assert all(s == 2.0 for s in rec["boundary_scores"])
        assert all(s == 9.0 for s in rec["judge_scores"])
        assert len(rec["mementos"]) == len(rec["blocks"])
    traces = [
        MementoTrace.from_dict(json.loads(x))
        for x in (tmp_path / "out" / "traces.jsonl").read_text().splitlines()
    ]
    assert len(traces) == 2 and all(b.memento.startswith("refined") for t in traces for b in t.blocks)
    assert summary.stats["judge_pass_rate"] == 1.0
    # the compressor's own mementos all scored 5 (< 8): 0% first pass, 100% after one refinement
    assert summary.stats["judge_first_pass_rate"] == 0.0
    # one answered compressor call per trace (a request that drew the 500 was retried: the order of
    # requests from two workers varies, so which role draws it does too)
    answered = [role for n, (role, _) in enumerate(fake.requests) if n % 7 != 3]
    assert answered.count("compress_trace") == 2
