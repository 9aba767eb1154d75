"""A load tester for any OpenAI-compatible server: N streamed requests at a given concurrency
and/or Poisson request rate; reports completed/failed, request and token throughput, TTFT, TPOT,
inter-token latency and end-to-end latency (mean, median, p99), and the peak KV the server's
/metrics reported while the load ran (memento serve: its exact peak of KV tokens since start, so
start a fresh server per run; vLLM: cache usage polled every 50 ms and, from its cache config,
tokens).

Timing: TTFT is request start to the first chunk carrying generated text; ITL is the gap between
consecutive such chunks; TPOT is (end-to-end - TTFT) / (completion tokens - 1), with the token
count from the stream's final usage chunk.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    peak_kv: int | None = None  # memento serve's usage.memento.peak_kv
    finish_reason: str | None = None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered) + 0.5) - 1))]
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p99": p99}


def _metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


def _vllm_pool_tokens(text: str) -> int | None:
    """Tokens in vLLM's KV pool, from its cache-config info metric (num_gpu_blocks * block_size)."""
    match = re.search(r"^vllm:cache_config_info{([^}]*)}", text, re.M)
    if not match:
        return None
    labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
    try:
        return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


class KVWatcher:
    """Polls the server's /metrics while the load runs and keeps the peaks."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, interval: float = 0.05) -> None:
        self.client, self.url, self.interval = client, base_url.rstrip("/") + "/metrics", interval
        self.peak_tokens: float | None = None
        self.peak_perc: float | None = None
        self.pool_tokens: int | None = None
        self.samples = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                text = (await self.client.get(self.url, timeout=5)).text
            except httpx.HTTPError:
                text = ""
            tokens = _metric(text, "memento:kv_cache_peak_tokens")  # exact, since the server started
            if tokens is None:
                tokens = _metric(text, "memento:kv_cache_tokens")
            perc = _metric(text, "memento:kv_cache_usage_perc")
            if perc is None:
                perc = _metric(text, "vllm:kv_cache_usage_perc")
                self.pool_tokens = self.pool_tokens or _vllm_pool_tokens(text)
                if perc is not None and self.pool_tokens:
                    tokens = perc * self.pool_tokens
            if tokens is not None:
                self.peak_tokens = max(self.peak_tokens or 0.0, tokens)
            if perc is not None:
                self.peak_perc = max(self.peak_perc or 0.0, perc)
            self.samples += 1
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], chat: bool
) -> RequestResult:
    """Send one streamed request and time its chunks."""
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message')}"
                    return result
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    if chat:
                        delta = choice.get("delta") or {}
                        text = (delta.get("content") or "") + (
                            delta.get("reasoning_content") or delta.get("reasoning") or ""
                        )
                    else:
                        text = choice.get("text") or ""
                    if text:
                        if result.ttft is None:
                            result.ttft = now - start
                        elif last is not None:
                            result.itl.append(now - last)
                        last = now
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.completion_tokens = usage.get("completion_tokens", 0)
                    memento = usage.get("memento") or {}
                    result.peak_kv = memento.get("peak_kv")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.ok = result.completion_tokens > 0
    if not result.ok:
        result.error = "no usage chunk (does the server support stream_options.include_usage?)"
    return result


async def run_load(
    base_url: str,
    model: str,
    prompts: list[str | list[dict]],
    *,
    num_requests: int,
    concurrency: int,
    request_rate: float = float("inf"),
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    api_key: str | None = None,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the load and summarise it. `prompts` are chat message lists (-> /v1/chat/completions)
    or strings (-> /v1/completions), cycled; request i uses sampling seed `seed + i`."""
    base_url = base_url.rstrip("/")
    chat = not isinstance(prompts[0], str)
    url = base_url + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        stop = asyncio.Event()
        watcher = KVWatcher(client, base_url)
        watch = asyncio.create_task(watcher.run(stop))

        async def send(i: int) -> RequestResult:
            async with gate:
                body: dict[str, Any] = {
                    "model": model,
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "seed": seed + i,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    **(extra_body or {}),
                }
                prompt = prompts[i % len(prompts)]
                body["messages" if chat else "prompt"] = prompt
                return await one_request(client, url, body, headers, chat)

        start = time.perf_counter()
        tasks = []
        for i in range(num_requests):
            tasks.append(asyncio.create_task(send(i)))
            if request_rate != float("inf") and i < num_requests - 1:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        stop.set()
        await watch
    return summarize(results, duration, watcher)


def summarize(
    results: list[RequestResult], duration: float, watcher: KVWatcher | None = None
) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.completion_tokens - 1) for r in done if r.ttft and r.completion_tokens > 1]
    peaks = [r.peak_kv for r in done if r.peak_kv is not None]
    summary = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_token_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
        "prompt_tokens": in_tokens,
        "completion_tokens": out_tokens,
        "ttft_s": _percentiles([r.ttft for r in done if r.ttft is not None]),
        "tpot_s": _percentiles(tpot),
        "itl_s": _percentiles([x for r in done for x in r.itl]),
        "e2e_s": _percentiles([r.e2e for r in done]),
        "mean_request_peak_kv": statistics.fmean(peaks) if peaks else None,
    }
    if watcher is not None:
        summary["peak_kv_tokens"] = watcher.peak_tokens
        summary["peak_kv_usage"] = watcher.peak_perc
        summary["kv_pool_tokens"] = watcher.pool_tokens
        summary["metrics_samples"] = watcher.samples
    return summary
