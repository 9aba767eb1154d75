"""The HTTP front end: OpenAI-compatible routes over one `EngineWorker`, the dashboard, health,
Prometheus metrics and the stats the dashboard polls.

Request handlers only parse, validate and wait: all engine and tokenizer work happens on the
worker's thread. A client that goes away (closed connection, cancelled stream) has its job
cancelled at once, so its KV is freed before the next engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from memento.masking import BlockMaskingConfig
from memento.serve.output import MIN_LOGPROB, ChoiceOutput, Delta, LogprobEntry
from memento.serve.prompts import Choice, model_max_len, prepare
from memento.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from memento.serve.worker import EngineWorker, Job


@dataclass
class ServerSettings:
    """What `memento serve` was started with (beyond the engine itself)."""

    model_name: str
    mode: str = "memento"
    masking: BlockMaskingConfig = field(default_factory=BlockMaskingConfig)
    api_key: str | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _chat_logprobs(entries: list[LogprobEntry]) -> dict:
    def item(text: str, lp: float) -> dict:
        return {"token": text, "logprob": _logprob(lp), "bytes": list(text.encode("utf-8"))}

    content = [{**item(text, lp), "top_logprobs": [item(t, v) for t, v in top]} for text, lp, top in entries]
    return {"content": content, "refusal": None}


def _completion_logprobs(entries: list[LogprobEntry], offset: int = 0) -> dict:
    offsets = []
    for text, _, _ in entries:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": [text for text, _, _ in entries],
        "token_logprobs": [_logprob(lp) for _, lp, _ in entries],
        "top_logprobs": [{t: _logprob(v) for t, v in top} for _, _, top in entries],
        "text_offset": offsets,
    }


class _Call:
    """One accepted request: its job, and everything its responses share."""

    def __init__(self, app_state: _State, request: Request, body: ChatCompletionRequest | CompletionRequest):
        self.state = app_state
        self.request = request
        self.body = body
        self.chat = isinstance(body, ChatCompletionRequest)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        settings = app_state.settings

        def prepare_on_engine(engine):
            max_len = settings.max_model_len or model_max_len(engine)
            return prepare(engine, body, default_masking=settings.masking, max_model_len=max_len)

        self.job = Job(prepare_on_engine, stream=body.stream)
        self.finished = False
        self.watcher: asyncio.Future | None = None
        self.text_offsets: dict[int, int] = {}  # streamed completions: logprobs text_offset per choice
        self.streamed = 0  # tokens sent in stream chunks so far
        self.mode = body.memento.get("mode", settings.mode) if body.memento else settings.mode

    def start(self) -> None:
        """Hand the job to the engine thread and watch the client: if it goes away, the job is
        cancelled at once (its KV is freed before the next engine step)."""
        self.state.worker.submit(self.job)
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        await _disconnected(self.request)
        self._cancel_job()

    async def next_message(self) -> tuple[str, Any] | None:
        """The job's next message, or None once the client has disconnected."""
        if self.watcher.done():
            return None
        getter = asyncio.ensure_future(self.job.queue.get())
        done, _ = await asyncio.wait({getter, self.watcher}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            return None
        kind, payload = getter.result()
        if kind in ("done", "error"):
            self.finished = True
        return kind, payload

    def _cancel_job(self) -> None:
        if not self.finished:
            self.finished = True
            self.state.worker.cancel(self.job)

    def close(self) -> None:
        """Stop watching; cancel the job unless it finished."""
        if not self.watcher.done():
            self.watcher.cancel()
        self._cancel_job()

    # --- response bodies --------------------------------------------------------------------

    def _usage(self, stats: list[dict] | None) -> dict:
        """Token counts: final (with the MEMENTO numbers) once `stats` are in, else what was
        streamed so far."""
        choices = self.job.choices
        prompt_tokens = sum(len(ids) for ids in {c.prompt_index: c.prompt_ids for c in choices}.values())
        completion = sum(c.seen for c in choices) if stats is not None else self.streamed
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        if stats is not None:
            usage["memento"] = {
                "mode": self.mode,
                "peak_kv": max((s["peak_kv"] for s in stats), default=0),
                "evictions": sum(s["evictions"] for s in stats),
                "preemptions": sum(s["preemptions"] for s in stats),
                "choices": [{"index": c.index, **s} for c, s in zip(choices, stats, strict=True)],
            }
        return usage

    def _token_ids(self, c: Choice) -> dict:
        if not self.body.return_token_ids:
            return {}
        return {"token_ids": list(c.output.token_ids)} | (
            {} if self.chat else {"prompt_token_ids": c.prompt_ids}
        )

    def full_response(self, stats: list[dict]) -> dict:
        choices = []
        for c in self.job.choices:
            out: ChoiceOutput = c.output
            item: dict[str, Any] = {"index": c.index}
            if self.chat:
                reasoning = out.reasoning
                item["message"] = {
                    "role": "assistant",
                    "content": out.content,
                    "reasoning_content": reasoning,
                    "reasoning": reasoning,
                }
                item["logprobs"] = _chat_logprobs(out.logprobs) if out.want_logprobs else None
            else:
                item["text"] = out.content
                item["logprobs"] = _completion_logprobs(out.logprobs) if out.want_logprobs else None
            item["finish_reason"] = out.finish_reason
            item["stop_reason"] = out.stop_reason
            choices.append(item | self._token_ids(c))
        body = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.state.settings.model_name,
            "choices": choices,
            "usage": self._usage(stats),
        }
        if self.chat and self.body.return_token_ids:
            body["prompt_token_ids"] = self.job.choices[0].prompt_ids
        return body

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.state.settings.model_name,
            "choices": choices,
        }
        options = self.body.stream_options
        if options is not None and options.include_usage:
            chunk["usage"] = usage
        return chunk

    def _choice_chunk(self, c: Choice, delta: Delta) -> dict | None:
        has_text = bool(delta.content or delta.reasoning)
        if not (has_text or delta.finish_reason or c.output.want_logprobs or self.body.return_token_ids):
            return None
        item: dict[str, Any] = {"index": c.index}
        if self.chat:
            d: dict[str, Any] = {}
            if delta.reasoning:
                d["reasoning_content"] = d["reasoning"] = delta.reasoning
            if delta.content:
                d["content"] = delta.content
            item["delta"] = d
            item["logprobs"] = _chat_logprobs(delta.logprobs) if c.output.want_logprobs else None
        else:
            item["text"] = delta.content
            item["logprobs"] = None
            if c.output.want_logprobs:
                offset = self.text_offsets.get(c.index, 0)
                item["logprobs"] = _completion_logprobs(delta.logprobs, offset)
                self.text_offsets[c.index] = offset + sum(len(text) for text, _, _ in delta.logprobs)
        item["finish_reason"] = delta.finish_reason
        if delta.finish_reason is not None:
            item["stop_reason"] = delta.stop_reason
        if self.body.return_token_ids:
            item["token_ids"] = delta.token_ids
        return item

    async def stream(self) -> AsyncIterator[str]:
        try:
            options = self.body.stream_options
            continuous = options is not None and options.include_usage and options.continuous_usage_stats
            if self.chat:
                first = [
                    {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
                    for c in self.job.choices
                ]  # fmt: skip
                yield _sse(self._chunk(first, self._usage(None) if continuous else None))
            while (message := await self.next_message()) is not None:
                kind, payload = message
                if kind == "deltas":
                    self.streamed += sum(len(d.token_ids) for _, d in payload)
                    choices = [self._choice_chunk(self.job.choices[i], d) for i, d in payload]
                    choices = [c for c in choices if c is not None]
                    if choices:
                        yield _sse(self._chunk(choices, self._usage(None) if continuous else None))
                    continue
                if kind == "done" and options is not None and options.include_usage:
                    yield _sse(self._chunk([], self._usage(payload)))
                elif kind == "error":  # mid-stream: OpenAI's error object as one more event
                    yield _sse(payload.body())
                yield "data: [DONE]\n\n"
                return
        finally:
            self.close()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body was read already, so the next ASGI
    message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@dataclass
class _State:
    worker: EngineWorker
    settings: ServerSettings


def create_app(worker: EngineWorker, settings: ServerSettings) -> FastAPI:
    """The ASGI app; starts the worker's thread on startup and stops it on shutdown."""
    state = _State(worker, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="memento serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.memento = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}", 405: "method not allowed"}
        return _error_response(APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error_response(APIError(400, str(exc)))

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise APIError(
                401,
                "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    def check_ready() -> None:
        if worker.state == "loading":
            raise APIError(
                503, "the model is still loading; retry shortly", kind="server_error", code="model_loading"
            )
        if worker.state != "ready":
            raise APIError(
                503, f"the engine is not running: {worker.error}", kind="server_error", code="engine_dead"
            )

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{settings.model_name}`.",
                param="model",
                code="model_not_found",
            )

    async def generate(request: Request, model: type[ChatCompletionRequest | CompletionRequest]):
        check_auth(request)
        body = parse_body(await request.body(), model)
        check_model(body.model)
        check_ready()
        call = _Call(state, request, body)
        call.start()
        streaming = False
        try:
            message = await call.next_message()
            while message is not None:
                kind, payload = message
                if kind == "error":
                    raise payload
                if kind == "accepted" and body.stream:
                    streaming = True  # the stream owns the call from here on
                    return StreamingResponse(
                        call.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
                    )
                if kind == "done":
                    return JSONResponse(call.full_response(payload))
                message = await call.next_message()
            return Response(status_code=499)  # the client went away; its job was cancelled
        finally:
            if not streaming:
                call.close()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest)

    def model_card() -> dict:
        max_len = settings.max_model_len or (model_max_len(worker.engine) if worker.engine else None)
        return {
            "id": settings.model_name,
            "object": "model",
            "created": int(worker.started_at),
            "owned_by": "memento",
            "max_model_len": max_len,
            "memento": {"mode": settings.mode, "kv_budget_tokens": _budget(worker)},
        }

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        check_auth(request)
        check_model(name)
        return model_card()

    @app.get("/health")
    async def health():
        if worker.state == "ready":
            return Response(status_code=200)
        return JSONResponse({"status": worker.state, "error": worker.error}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats(since: int = 0):
        return {
            "state": worker.state,
            "model": settings.model_name,
            "mode": settings.mode,
            "budget": _budget(worker),
            "max_batch_size": worker.engine.max_batch_size if worker.engine else None,
            "latest": worker.snapshot(),
            "samples": worker.samples_since(since),
        }

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(resources.files("memento.serve").joinpath("dashboard.html").read_text())

    return app


def _budget(worker: EngineWorker) -> int | None:
    return worker.engine.kv_budget_tokens if worker.engine else None
