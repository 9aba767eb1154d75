"""`memento serve` under load: 64 concurrent requests (streamed, non-streamed, chat, completions,
memento and full mode, some cancelled midway) under a tight KV budget: none lost, no 5xx, the
budget never exceeded, every KV token freed afterwards; a cancelled request's KV is freed within one
engine step; greedy and seeded output through the server equal `memento generate`."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from typer.testing import CliRunner

from engine_helpers import one_thread, sharp_model  # noqa: F401 (fixture)
from memento.cli import app as cli
from memento.engine import Engine
from memento.serve import EngineWorker, ServerSettings
from serve_helpers import ForcedReasoning, chaotic_checkpoint, running_server

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:prompt .* has no")]

BUDGET = 400
BLOCKS = 5


@pytest.fixture(scope="module")
def loaded(toy_tokenizer, markers):
    model = sharp_model(toy_tokenizer, seed=5)
    hook = ForcedReasoning(toy_tokenizer, markers, blocks=BLOCKS)

    def load():
        return Engine(model, toy_tokenizer, logits_hook=hook, kv_budget_tokens=BUDGET, max_batch_size=16)

    worker = EngineWorker(load)
    with running_server(worker, ServerSettings("toy")) as url:
        yield url, worker, hook


async def _one(client: openai.AsyncOpenAI, i: int, prompt: str) -> tuple[str, object]:
    """Request i of the mix; returns (what happened, detail)."""
    memento = {"mode": "full"} if i % 3 == 0 else None
    common = dict(model="toy", temperature=1.0, seed=i, extra_body={"memento": memento} if memento else None)
    messages = [{"role": "user", "content": f"problem {i}"}]
    kind = i % 8
    if kind in (0, 1):  # streamed, then the client hangs up after a few chunks
        stream = await client.chat.completions.create(messages=messages, stream=True, **common)
        got = 0
        async for _ in stream:
            got += 1
            if got == 4 + i % 5:
                await stream.close()
                return "cancelled", got
        return "finished-before-cancel", got
    if kind == 2:  # non-streamed, abandoned by the client (it may still be waiting or running)
        try:
            await asyncio.wait_for(client.chat.completions.create(messages=messages, **common), timeout=0.05)
            return "finished-before-cancel", None
        except TimeoutError:
            return "cancelled", None
    if kind in (3, 4):
        stream = await client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **common
        )
        chunks = [c async for c in stream]
        return "ok", (chunks[-1].usage.completion_tokens, chunks[-2].choices[0].finish_reason)
    if kind == 5:
        resp = await client.completions.create(prompt=prompt, max_tokens=100, **common)
        return "ok", (resp.usage.completion_tokens, resp.choices[0].finish_reason)
    resp = await client.chat.completions.create(
        messages=messages, max_tokens=30 if kind == 6 else None, **common
    )
    return "ok", (resp.usage.completion_tokens, resp.choices[0].finish_reason)


def test_64_concurrent_requests_some_cancelled(loaded, toy_tokenizer):
    url, worker, hook = loaded
    start = httpx.get(url + "/stats").json()["latest"]["i"]
    prompt = toy_tokenizer.apply_chat_template(
        [{"role": "user", "content": "a problem"}], tokenize=False, add_generation_prompt=True
    )

    async def main():
        async with openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="x", max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(_one(client, i, prompt) for i in range(64)), return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]  # no 5xx (nor anything else) reached a client
    done = [detail for what, detail in results if what == "ok"]
    assert len(done) == 64 - 24  # kinds 0, 1, 2 are the 24 cancelled ones
    for tokens, finish in done:
        assert (tokens, finish) in ((hook.length, "stop"), (30, "length")), (tokens, finish)
    assert sum(what == "cancelled" for what, _ in results) >= 16

    for _ in range(500):  # the cancellations reach the engine asynchronously
        latest = httpx.get(url + "/stats").json()["latest"]
        if latest["kv"] == 0 and not latest["running"] and latest["waiting"] == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert latest["kv"] == 0 and not latest["running"] and latest["waiting"] == 0
    assert worker.engine.cache.total_tokens() == 0 and not worker.engine.has_work
    samples = httpx.get(url + f"/stats?since={start}").json()["samples"]
    assert len(samples) == samples[-1]["i"] - start  # the history covers the whole run
    assert max(s["kv"] for s in samples) <= BUDGET and latest["peak"] <= BUDGET
    assert max(len(s["running"]) for s in samples) >= 8  # they really ran together
    assert latest["pre"] > 0 and latest["ev"] > 0  # the budget forced preemptions; blocks were evicted
    metrics = httpx.get(url + "/metrics").text
    assert 'memento:request_success_total{finished_reason="stop"}' in metrics


def test_cancel_frees_kv_within_one_step(loaded):
    url, worker, _ = loaded
    engine = worker.engine
    seen: dict[str, int] = {}
    real_cancel, real_abort = worker.cancel, worker._abort

    def cancel(job):
        seen["asked"] = engine.num_steps
        real_cancel(job)

    def abort(job):
        real_abort(job)
        seen["freed"] = engine.num_steps
        seen["left"] = sum(c.seq.row is not None for c in job.choices)

    worker.cancel, worker._abort = cancel, abort
    try:
        body = {"messages": [{"role": "user", "content": "long"}], "stream": True, "n": 3, "max_tokens": 200}
        background = ThreadPoolExecutor(1).submit(
            httpx.post, url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60
        )  # keeps the engine stepping meanwhile
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 12:
                    break
        for _ in range(500):
            if "freed" in seen:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert seen["freed"] - seen["asked"] <= 1 and seen["left"] == 0
        assert background.result().status_code == 200
    finally:
        worker.cancel, worker._abort = real_cancel, real_abort


def test_greedy_and_seeded_output_equal_memento_generate(tmp_path, toy_tokenizer):
    model_dir = chaotic_checkpoint(tmp_path / "model", toy_tokenizer, seed=7)
    records = [{"messages": [{"role": "user", "content": f"question {i}: {'x' * i}"}]} for i in range(4)]
    records += [{"prompt": "free text prompt"}, {"prompt": "another one, longer than the first"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))

    def generate(*args: str) -> list[list[int]]:
        result = CliRunner().invoke(
            cli, ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "40",
                  "--json", *args],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return [json.loads(line)["token_ids"] for line in result.stdout.splitlines() if line.startswith("{")]

    expected = {
        "greedy": generate("--temperature", "0"),
        "seeded": generate("--temperature", "1", "--seed", "7"),
    }

    worker = EngineWorker(lambda: Engine.from_pretrained(model_dir))
    with running_server(worker, ServerSettings("m")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

        def ask(args):
            record, sampling = args
            kw = {"temperature": 0} if sampling == "greedy" else {"temperature": 1, "seed": 7}
            extra = {"return_token_ids": True}
            if "messages" in record:
                resp = client.chat.completions.create(
                    model="m", messages=record["messages"], max_tokens=40, extra_body=extra, **kw
                )
                return resp.model_extra["prompt_token_ids"] + resp.choices[0].model_extra["token_ids"]
            resp = client.completions.create(
                model="m", prompt=record["prompt"], max_tokens=40, extra_body=extra, **kw
            )
            choice = resp.choices[0].model_extra
            return choice["prompt_token_ids"] + choice["token_ids"]

        jobs = [(r, s) for s in ("greedy", "seeded") for r in records]
        with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share engine steps
            got = list(pool.map(ask, jobs))
    for (record, sampling), ids in zip(jobs, got, strict=True):
        want = expected[sampling][records.index(record)]
        assert ids == want, (record, sampling)
    assert len({tuple(ids) for ids in expected["greedy"]}) == len(records)  # not a degenerate model


def test_load_tester_reports_every_request(loaded):
    """The load tester (benchmarks/serve_bench.py runs it) against a live server: counts, token
    totals and latencies are consistent with what the server did."""
    from memento.serve.loadtest import run_load

    url, worker, hook = loaded
    before = worker.generated
    messages = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    summary = asyncio.run(
        run_load(url, "toy", messages, num_requests=10, concurrency=4, max_tokens=100, temperature=1.0)
    )
    assert summary["completed"] == 10 and summary["failed"] == 0 and not summary["errors"]
    assert summary["completion_tokens"] == 10 * hook.length == worker.generated - before
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        stats = summary[key]
        assert 0 < stats["median"] <= stats["p99"], (key, stats)
    assert summary["e2e_s"]["median"] >= summary["ttft_s"]["median"]
    assert 0 < summary["peak_kv_tokens"] <= BUDGET and summary["peak_kv_usage"] <= 1.0
    assert summary["mean_request_peak_kv"] > 0 and summary["output_token_throughput"] > 0
    bad = asyncio.run(run_load(url, "other-model", messages, num_requests=2, concurrency=2))
    assert bad["completed"] == 0 and bad["failed"] == 2 and "HTTP 404" in bad["errors"][0]
