"""LLM access for annotation: an async OpenAI-compatible client with the robustness the original lacked.

Every call goes through :meth:`LLMClient.call`, which bounds concurrency with a semaphore, applies a
per-request timeout, retries failed requests *and* answers that do not validate with exponential
backoff, and raises :class:`LLMCallFailed` when all attempts are spent — callers record the failure
instead of inventing a value. Works with any server speaking the chat-completions API (vLLM, SGLang,
llama.cpp, OpenAI); the offline backends (heuristic scoring, extractive mementos) need none of this.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")


class LLMCallFailed(RuntimeError):
    """All attempts of one logical call failed; `attempts` holds one error string per attempt."""

    def __init__(self, what: str, attempts: list[str]) -> None:
        super().__init__(
            f"{what} failed after {len(attempts)} attempt(s): {attempts[-1] if attempts else '?'}"
        )
        self.what = what
        self.attempts = attempts


class InvalidAnswer(ValueError):
    """The model answered, but not in the shape we asked for (retried like a transport error)."""


class EndpointUnreachable(RuntimeError):
    """The endpoint could not be reached at all (wrong URL, server down)."""


@dataclass(frozen=True)
class LLMConfig:
    """How to reach the model. One model serves the scorer, compressor and judge roles."""

    model: str = "gpt-4o"
    base_url: str | None = None
    api_key: str | None = None
    concurrency: int = 16
    timeout_s: float = 120.0
    max_attempts: int = 4
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    temperature: float | None = 0.0
    max_tokens: int = 4096
    trace_max_tokens: int = 16000  # the one call that writes every memento of a trace (as the original)
    json_mode: bool = False

    def __post_init__(self) -> None:
        for flag, bad in (
            ("--concurrency must be >= 1", self.concurrency < 1),
            ("--max-attempts must be >= 1", self.max_attempts < 1),
            ("--timeout must be > 0 seconds", not self.timeout_s > 0),
            ("backoff_s must be >= 0", self.backoff_s < 0),
        ):
            if bad:
                raise ValueError(f"{flag} (LLM settings: model {self.model!r})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LLM config keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def resolved_key(self) -> str:
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ValueError(
                "no API key: pass --api-key (any string such as 'none' works for local servers) "
                "or set OPENAI_API_KEY"
            )
        return key

    def resolved_base_url(self) -> str | None:
        return self.base_url or os.environ.get("OPENAI_BASE_URL")


def _strip_fences(text: str) -> str:
    m = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    return m.group(1) if m else text


def parse_json_object(text: str) -> dict[str, Any]:
    """The JSON object in a reply, tolerating code fences and prose around it."""
    body = _strip_fences(text.strip()).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        start, end = body.find("{"), body.rfind("}")
        if start < 0 or end <= start:
            raise InvalidAnswer(f"no JSON object in reply: {text[:120]!r}") from None
        try:
            obj = json.loads(body[start : end + 1])
        except json.JSONDecodeError as e:
            raise InvalidAnswer(f"malformed JSON in reply: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidAnswer(f"expected a JSON object, got {type(obj).__name__}")
    return obj


class LLMClient:
    """Async chat client with bounded concurrency, timeouts, retries and answer validation."""

    def __init__(self, config: LLMConfig) -> None:
        from openai import AsyncOpenAI

        self.config = config
        self._client = AsyncOpenAI(
            api_key=config.resolved_key(),
            base_url=config.resolved_base_url(),
            timeout=config.timeout_s,
            max_retries=0,  # retries are ours: they also cover answers that fail validation
        )
        self._sem = asyncio.Semaphore(config.concurrency)
        self.calls = 0
        self.failed_attempts = 0

    @property
    def endpoint(self) -> str:
        return str(self._client.base_url)

    async def close(self) -> None:
        await self._client.close()

    async def check_reachable(self) -> None:
        """Fail fast with a clear message when nothing answers at the base URL."""
        import openai

        try:
            await self._client.with_options(timeout=min(self.config.timeout_s, 15.0)).models.list()
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise EndpointUnreachable(
                f"cannot reach the OpenAI-compatible endpoint at {self.endpoint} ({type(e).__name__}: {e}); "
                "check --base-url (e.g. http://127.0.0.1:8000/v1) and that the server is running"
            ) from e
        except openai.AuthenticationError as e:
            raise EndpointUnreachable(
                f"the endpoint at {self.endpoint} rejected the API key: {e}; check --api-key"
            ) from e
        except openai.APIStatusError:
            pass  # reachable; many servers do not implement /models

    async def call(
        self,
        what: str,
        messages: list[dict[str, str]],
        validate: Callable[[str], T],
        *,
        json_answer: bool = False,
        max_tokens: int | None = None,
    ) -> T:
        """One logical request: retried until `validate(content)` returns, or LLMCallFailed.
        `max_tokens` overrides the configured reply cap for this request."""
        cfg = self.config
        errors: list[str] = []
        for attempt in range(cfg.max_attempts):
            if attempt:
                await asyncio.sleep(min(cfg.backoff_max_s, cfg.backoff_s * 2 ** (attempt - 1)))
            try:
                content = await self._request(messages, json_answer, max_tokens)
                return validate(content)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure is recorded and retried
                self.failed_attempts += 1
                errors.append(f"{type(e).__name__}: {str(e)[:300]}")
        raise LLMCallFailed(what, errors)

    async def _request(
        self, messages: list[dict[str, str]], json_answer: bool, max_tokens: int | None = None
    ) -> str:
        cfg = self.config
        kwargs: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "max_tokens": max_tokens or cfg.max_tokens,
        }
        if cfg.temperature is not None:
            kwargs["temperature"] = cfg.temperature
        if json_answer and cfg.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        async with self._sem:
            self.calls += 1
            resp = await asyncio.wait_for(
                self._client.chat.completions.create(**kwargs), timeout=cfg.timeout_s + 5.0
            )
        if not resp.choices:
            raise InvalidAnswer("reply has no choices")
        content = resp.choices[0].message.content
        if not content or not content.strip():
            raise InvalidAnswer("empty reply")
        return content

    def metadata(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.config.model, "endpoint": self.endpoint}
