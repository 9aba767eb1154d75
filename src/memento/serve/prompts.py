"""Turn a validated request into engine work: prompt token ids, sampling parameters, and one
`ChoiceOutput` per choice. Runs on the engine thread, which owns the tokenizer (fast tokenizers
must not be used from two threads at once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from memento.engine import Engine, SamplingParams
from memento.engine.sequence import Sequence
from memento.format import THINK_END, THINK_START
from memento.masking import BlockMaskingConfig
from memento.serve.output import ChoiceOutput
from memento.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    memento_options,
)
from memento.tokens import resolve_token_id


@dataclass
class Choice:
    """One choice of a request (one sample of one prompt) and its progress."""

    index: int
    prompt_index: int
    sample: int
    prompt_ids: list[int]
    params: SamplingParams
    output: ChoiceOutput
    seq: Sequence | None = None
    seen: int = 0  # output tokens already fed to `output`
    last_token_at: float | None = None
    stats: dict = field(default_factory=dict)


def model_max_len(engine: Engine) -> int | None:
    config = engine.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def think_ids(tokenizer) -> tuple[int, int] | None:
    """(`<think>`, `</think>`) ids when both are single tokens, else None (no reasoning split)."""
    start, end = resolve_token_id(tokenizer, THINK_START), resolve_token_id(tokenizer, THINK_END)
    if start is None or end is None or start == end:
        return None
    return start, end


def _chat_prompt(engine: Engine, request: ChatCompletionRequest) -> list[int]:
    tokenizer = engine.tokenizer
    messages = []
    for m in request.messages:
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": m.text()})
    if request.continue_final_message:
        if request.add_generation_prompt:
            raise bad_request(
                "continue_final_message needs add_generation_prompt=false", "continue_final_message"
            )
        if messages[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs a final assistant message", "messages")
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
        )
    except Exception as exc:  # jinja errors, templates that refuse a role order, ...
        raise bad_request(f"the chat template could not render these messages: {exc}", "messages") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def _completion_prompts(engine: Engine, request: CompletionRequest) -> list[list[int]]:
    prompt = request.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    vocab = len(engine.tokenizer)
    out = []
    for item in prompt:
        ids = list(engine.tokenizer.encode(item, add_special_tokens=False)) if isinstance(item, str) else item
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt"
            )
        out.append(ids)
    return out


def prepare(
    engine: Engine,
    request: ChatCompletionRequest | CompletionRequest,
    *,
    default_masking: BlockMaskingConfig,
    max_model_len: int | None,
) -> tuple[list[Choice], str | None, BlockMaskingConfig | None]:
    """The choices to run (prompt-major, `n` per prompt), and the request's mode/masking overrides.
    Raises `APIError` (400) for anything wrong with the request."""
    mode, masking = memento_options(request.memento, default_masking)
    tokenizer = engine.tokenizer
    chat = isinstance(request, ChatCompletionRequest)
    prompts = [_chat_prompt(engine, request)] if chat else _completion_prompts(engine, request)
    stops = request.stop_strings()
    vocab = len(tokenizer)
    user_stop_ids = set(request.stop_token_ids or [])
    for t in user_stop_ids:
        if not 0 <= t < vocab:
            raise bad_request(
                f"stop_token_ids: {t} is outside the vocabulary (0..{vocab - 1})", "stop_token_ids"
            )
    if chat:
        max_tokens = request.max_completion_tokens or request.max_tokens
        want_logprobs, top = request.logprobs, request.top_logprobs or 0
        if top and not want_logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    else:
        max_tokens = request.max_tokens
        want_logprobs, top = request.logprobs is not None, request.logprobs or 0
    think = think_ids(tokenizer) if chat else None
    choices: list[Choice] = []
    for p, ids in enumerate(prompts):
        where = "messages" if chat else "prompt"
        if not ids:
            raise bad_request("the prompt is empty", where)
        budget = max_tokens
        if max_model_len is not None:
            room = max_model_len - len(ids)
            if budget is None:
                budget = room
            if room < 1 or budget > room:
                raise APIError(
                    400,
                    f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                    f"{len(ids) + (budget or 0)} tokens ({len(ids)} in the {where}, {budget or 0} in the "
                    "completion). Please reduce the length of the prompt or the completion.",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
        try:
            params = SamplingParams(
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=max(0, request.top_k or 0),
                min_p=request.min_p or 0.0,
                max_new_tokens=budget or 2**31,
                seed=request.seed,
                stop_token_ids=tuple(sorted(user_stop_ids)),
                logprobs=want_logprobs,
                top_logprobs=top,
            )
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        in_reasoning = False
        if think is not None:
            tags = [t for t in ids if t in think]
            in_reasoning = bool(tags) and tags[-1] == think[0]
        for k in range(request.n):
            output = ChoiceOutput(
                len(choices),
                tokenizer,
                skip_special_tokens=request.skip_special_tokens,
                stop=stops,
                stop_ids=engine.stop_ids,
                user_stop_ids=user_stop_ids,
                think=think,
                in_reasoning=in_reasoning,
                logprobs=want_logprobs,
            )
            choices.append(Choice(len(choices), p, k, ids, params, output))
    return choices, mode, masking
