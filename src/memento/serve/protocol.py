"""The HTTP request bodies `memento serve` accepts (OpenAI's fields plus vLLM's and ours), validated
strictly, and the OpenAI-shaped error every bad request turns into.

Unknown fields are errors (as OpenAI's own API does), so a typo never silently changes sampling.
OpenAI fields that mean nothing here are accepted only at their neutral value (a penalty of 0, an
empty `logit_bias`, no tools) and refused otherwise, with the field named.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from memento.masking import MODES, BlockMaskingConfig

MAX_N = 64  # samples per prompt
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default cap)
MAX_SEED = 2**63 - MAX_N - 1  # sample k draws with seed + k


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or self.TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str) or len(part) != 2:
                    raise ValueError(
                        f'only {{"type": "text", "text": "..."}} content parts are supported, got {part}'
                    )
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, lt=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    memento: dict[str, Any] | None = None
    # accepted for compatibility; only their neutral values are allowed (checked in `unsupported`)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for s in stops:
            if not s:
                raise bad_request("stop strings must not be empty", "stop")
        return stops

    def unsupported(self) -> list[tuple[str, bool]]:
        """(field, set to something this server cannot honour)."""
        return [
            ("frequency_penalty", bool(self.frequency_penalty)),
            ("presence_penalty", bool(self.presence_penalty)),
            ("logit_bias", bool(self.logit_bias)),
        ]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [
            ("tools", bool(self.tools)),
            ("tool_choice", self.tool_choice not in (None, "none", "auto")),
            ("response_format", self.response_format not in (None, {"type": "text"})),
            ("modalities", self.modalities not in (None, ["text"])),
        ]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [
            ("echo", self.echo),
            ("suffix", bool(self.suffix)),
            ("best_of", self.best_of not in (None, self.n)),
        ]


def _is_union_tag(part: str | int) -> bool:
    """pydantic names the union member that failed inside `loc` ('str', 'list[str]', ...)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))


def parse_body(raw: bytes, model: type[_Sampling]) -> _Sampling:
    """Parse and validate a JSON body; every problem becomes a 400 naming the field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or None
        if err["type"] == "extra_forbidden":
            raise bad_request(f"Unrecognized request argument supplied: {param}", param) from None
        raise bad_request(f"{param}: {err['msg']}" if param else err["msg"], param) from None
    for name, bad in request.unsupported():
        if bad:
            raise bad_request(f"{name} is not supported by memento serve", name)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    return request


MEMENTO_KEYS = ("mode", *(f.name for f in dataclasses.fields(BlockMaskingConfig)))


def memento_options(
    options: dict[str, Any] | None, default: BlockMaskingConfig
) -> tuple[str | None, BlockMaskingConfig | None]:
    """A request's `memento` object -> (mode override, masking override); unknown keys and bad
    values are 400s that name the key."""
    if not options:
        return None, None
    unknown = sorted(set(options) - set(MEMENTO_KEYS))
    if unknown:
        raise bad_request(
            f"unknown MEMENTO option {unknown[0]!r}; known: {', '.join(MEMENTO_KEYS)}",
            f"memento.{unknown[0]}",
        )
    values = dict(options)
    mode = values.pop("mode", None)
    if mode is not None and mode not in MODES:
        raise bad_request(f"memento.mode must be one of {', '.join(MODES)}, got {mode!r}", "memento.mode")
    masking = None
    if values:
        try:
            masking = BlockMaskingConfig.from_dict({**dataclasses.asdict(default), **values})
        except (TypeError, ValueError) as exc:
            raise bad_request(f"memento: {exc}", "memento") from None
    return mode, masking
