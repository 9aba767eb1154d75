"""`memento generate` (evicting generation) and `memento bench --replay` (teacher-forced KV and
speed measurements on block-structured token streams)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer

from memento.jsonl import read_jsonl

MODE_HELP = "full (vanilla attention, blocks only tracked) | memento (evict blocks) | restart (ablation)"


# flags that shape eviction: --mode full never evicts, so giving them there is a contradiction
_EVICTION_FLAGS = ("keep_last_n_blocks", "mask_delimiters", "keep_last_block_for_answer")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed this option (rather than getting its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _check_mode(mode: str, flag: str = "--mode") -> str:
    from memento.masking import MODES
    from memento.user_errors import UsageError

    if mode not in MODES:
        raise UsageError(f"{flag} {mode!r} is not a mode; use one of {', '.join(MODES)}")
    return mode


def _check_engine_args(dtype: str, device: str, max_batch_size: int, kv_budget_tokens: int | None) -> None:
    from memento.user_errors import check_count, check_device, check_dtype

    check_dtype(dtype)
    check_device(device)
    check_count(max_batch_size, "--max-batch-size")
    check_count(kv_budget_tokens, "--kv-budget-tokens", 2)  # a request needs room for two tokens


def _load_engine(model: Path, **kwargs):
    """Engine.from_pretrained with any loading failure reported against the model directory."""
    from memento.engine import Engine

    try:
        return Engine.from_pretrained(model, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise ValueError(f"--model {model}: cannot load the model ({type(exc).__name__}: {exc})") from None


def _read_jsonl(path: Path, flag: str) -> list[tuple[str, dict]]:
    """`(file:line, record)` of a JSONL file of objects; errors name the file and line."""
    from memento.user_errors import UsageError, check_input_file

    check_input_file(path, flag)
    records = []
    for where, record in read_jsonl(path, f"{flag} file"):
        if not isinstance(record, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append((where, record))
    if not records:
        raise UsageError(f"{flag} {path}: holds no records (only blank lines)")
    return records


def _check_messages(messages, where: str) -> list[dict]:
    from memento.user_errors import UsageError

    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise UsageError(f"{where}: messages[{i}] needs a 'role' string (system, user or assistant)")
        if not isinstance(m.get("content"), str):
            raise UsageError(f"{where}: messages[{i}] needs a 'content' string")
    return messages


def _prompt_specs(prompts: Path) -> list[tuple[str, str, object]]:
    """`(where, kind, value)` per line of a --prompts file, validated before any model is loaded:
    kind "messages" (rendered with the chat template) or "prompt" (raw text)."""
    from memento.user_errors import UsageError

    specs = []
    for where, record in _read_jsonl(prompts, "--prompts"):
        if "messages" in record:
            specs.append((where, "messages", _check_messages(record["messages"], where)))
        elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
            specs.append((where, "prompt", record["prompt"]))
        else:
            raise UsageError(f'{where}: expected {{"messages": [...]}} or a non-empty {{"prompt": "..."}}')
    return specs


def _position_warnings(engine, prompt_ids: list[list[int]], max_new_tokens: int, names: list[str]) -> None:
    """Warn when a prompt (plus what may be generated) runs past the model's trained positions."""
    config = engine.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    over = [
        (name, len(ids))
        for name, ids in zip(names, prompt_ids, strict=True)
        if len(ids) + max_new_tokens > limit
    ]
    for name, length in over[:3]:
        typer.echo(
            f"warning: {name} has {length} tokens; with {max_new_tokens} more it can reach position "
            f"{length + max_new_tokens}, past the model's max_position_embeddings {limit}",
            err=True,
        )
    if len(over) > 3:
        typer.echo(f"warning: ... and {len(over) - 3} more prompts past that limit", err=True)


def _output_record(out, markers) -> dict:
    record = {
        "prompt_index": out.prompt_index,
        "sample": out.sample,
        "token_ids": out.token_ids,
        "prompt_len": len(out.prompt_ids),
        "text": out.text,
        "finish_reason": out.finish_reason,
        "evictions": [{"trigger": e.trigger, "start": e.start, "end": e.end} for e in out.evictions],
        "kv_trace": out.kv_trace,
        "peak_kv": out.peak_kv,
        "auc_kv": out.auc_kv,
        "num_preemptions": out.num_preemptions,
        "seconds": round(out.seconds, 4),
        "tokens_per_s": round(out.tokens_per_s, 2),
        "seed": out.seed,
    }
    if out.logprobs is not None:
        record["logprobs"] = out.logprobs
    if out.forced is not None:
        record["forced"] = out.forced
    return record


def generate(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", help="Directory with an HF causal LM and its tokenizer."),
    prompt: str | None = typer.Option(
        None, "--prompt", help="One user message (rendered with the chat template)."
    ),
    prompts: Path | None = typer.Option(
        None, "--prompts", help='JSONL: {"messages": [...]} (chat template) or {"prompt": "..."} (raw text).'
    ),
    raw: bool = typer.Option(False, "--raw", help="Use --prompt as raw text instead of a user message."),
    mode: str = typer.Option("memento", "--mode", help=MODE_HELP),
    keep_last_n_blocks: int = typer.Option(
        0, "--keep-last-n-blocks", help="-1 never evicts; N keeps the last N."
    ),
    mask_delimiters: bool = typer.Option(
        False,
        "--mask-delimiters/--no-mask-delimiters",
        help="Also evict block delimiters (must match training).",
    ),
    keep_last_block_for_answer: bool = typer.Option(False, "--keep-last-block-for-answer"),
    max_block_tokens: int = typer.Option(
        0, "--max-block-tokens", help="Force <|block_end|> after N tokens (0 = off)."
    ),
    no_require_assistant_section: bool = typer.Option(
        False,
        "--no-require-assistant-section",
        help="Track markers everywhere, not only after the assistant header.",
    ),
    temperature: float = typer.Option(1.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    seed: int | None = typer.Option(None, "--seed"),
    n: int = typer.Option(1, "--n", help="Samples per prompt."),
    kv_budget_tokens: int | None = typer.Option(
        None, "--kv-budget-tokens", help="Cap on cached tokens over all requests."
    ),
    max_batch_size: int = typer.Option(16, "--max-batch-size"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per request."),
    logprobs: bool = typer.Option(
        False,
        "--logprobs",
        help="With --json: add `logprobs` (per output token, under the sampling distribution used) "
        "and `forced` (tokens the engine imposed, e.g. a capped <|block_end|>).",
    ),
) -> None:
    """Generate with block eviction; prints the text with markers visible."""
    from memento.user_errors import reported

    with reported("generate"):
        if (prompt is None) == (prompts is None):
            raise ValueError("give exactly one of --prompt TEXT or --prompts FILE")
        if logprobs and not as_json:
            raise ValueError("--logprobs adds fields to the --json records; pass --json too")
        if raw and prompts is not None:
            raise ValueError(
                '--raw applies to --prompt; in a --prompts file write {"prompt": "..."} for raw text'
            )
        if prompt is not None and not prompt.strip():
            raise ValueError("--prompt is empty")
        _check_mode(mode)
        if mode == "full":
            given = [f for f in _EVICTION_FLAGS if _given(ctx, f)]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise ValueError(
                    f"{flag} has no effect with --mode full (it never evicts); drop it or use --mode memento"
                )
        from memento.engine import SamplingParams
        from memento.masking import BlockMaskingConfig
        from memento.user_errors import check_model_dir

        masking = BlockMaskingConfig(
            keep_last_n_blocks=keep_last_n_blocks,
            mask_delimiters=mask_delimiters,
            keep_last_block_for_answer=keep_last_block_for_answer,
            max_block_tokens=max_block_tokens,
            require_assistant_section=not no_require_assistant_section,
        )
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            n=n,
            logprobs=logprobs,
        )
        check_model_dir(model)
        _check_engine_args(dtype, device, max_batch_size, kv_budget_tokens)
        specs = _prompt_specs(prompts) if prompts is not None else [("--prompt", "prompt", prompt)]
        engine = _load_engine(
            model,
            mode=mode,
            masking=masking,
            dtype=dtype,
            device=device,
            kv_budget_tokens=kv_budget_tokens,
            max_batch_size=max_batch_size,
        )
        texts = []
        for where, kind, value in specs:
            if kind == "prompt" and (prompts is not None or raw):
                texts.append(value)
            elif kind == "prompt":
                texts.append(engine.chat_prompt([{"role": "user", "content": value}]))
            else:
                try:
                    texts.append(engine.chat_prompt(value))
                except Exception as exc:  # noqa: BLE001 - a chat template rejects what it cannot render
                    raise ValueError(
                        f"{where}: the chat template cannot render these messages ({exc})"
                    ) from None
        prompt_ids = [engine.encode(t) for t in texts]
        _position_warnings(engine, prompt_ids, max_new_tokens, [f"prompt {i}" for i in range(len(texts))])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outputs = engine.generate(prompt_ids, params)
            except RuntimeError as exc:
                raise ValueError(str(exc)) from None
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    for out in outputs:
        if as_json:
            typer.echo(json.dumps(_output_record(out, engine.markers)))
        else:
            if len(outputs) > 1:
                typer.echo(f"--- prompt {out.prompt_index} sample {out.sample} ---")
            typer.echo(out.text)
            typer.echo(
                f"[{len(out.output_ids)} tokens, {out.finish_reason}, {len(out.evictions)} evictions, "
                f"peak KV {out.peak_kv}, {out.tokens_per_s:.1f} tok/s]",
                err=True,
            )


def _token_ids(value, name: str, where: str) -> list[int]:
    from memento.user_errors import UsageError

    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        raise UsageError(f"{where}: {name!r} must be a non-empty list of non-negative integers (token ids)")
    return value


def _replay_specs(path: Path) -> list[tuple[str, str, object]]:
    """`(where, kind, value)` per line of a --replay file, validated before any model is loaded:
    kind "ids" (token_ids, prompt_len), "trace" (a MementoTrace) or "text" (prompt?, problem?, text)."""
    from memento.format import MementoTrace
    from memento.user_errors import UsageError

    specs = []
    for where, record in _read_jsonl(path, "--replay"):
        if "token_ids" in record:
            ids = _token_ids(record["token_ids"], "token_ids", where)
            cut = record.get("prompt_len")
            if cut is not None and (
                isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut < len(ids)
            ):
                raise UsageError(f"{where}: prompt_len {cut!r} must be an integer in 1..{len(ids) - 1}")
            specs.append((where, "ids", (ids, cut)))
        elif "blocks" in record and "problem" in record:
            try:
                specs.append((where, "trace", MementoTrace.from_dict(record)))
            except ValueError as exc:
                raise UsageError(f"{where}: {exc}") from None
        elif "text" in record:
            text, prompt, problem = record["text"], record.get("prompt"), record.get("problem", "")
            if not isinstance(text, str) or not text:
                raise UsageError(f"{where}: 'text' must be a non-empty string")
            for name, value in (("prompt", prompt), ("problem", problem)):
                if value is not None and not isinstance(value, str):
                    raise UsageError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
            specs.append((where, "text", (prompt, problem, text)))
        else:
            raise UsageError(
                f'{where}: expected "token_ids", "text", or a Memento trace ("problem" + "blocks")'
            )
    return specs


def load_replay(path: Path, engine) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, outputs) token streams from JSONL: {"token_ids": [...], "prompt_len": k?},
    {"text": ..., "prompt"?/"problem"?}, or Memento traces {"problem", "blocks", "answer"}."""
    return tokenize_replay(_replay_specs(path), engine)


def tokenize_replay(specs, engine) -> tuple[list[list[int]], list[list[int]]]:
    """Token streams of validated replay lines; ids must exist in the model's vocabulary."""
    from memento.tokens import IM_END
    from memento.user_errors import UsageError

    tok = engine.tokenizer
    markers = engine.markers
    vocab = engine.model.get_input_embeddings().num_embeddings
    prompts, outputs = [], []
    for where, kind, value in specs:
        if kind == "ids":
            ids, cut = value
            if max(ids) >= vocab:
                raise UsageError(
                    f"{where}: token id {max(ids)} is outside the model's vocabulary ({vocab} ids)"
                )
            if cut is None:  # after the first `<|im_start|>assistant` header (its newline included)
                cut = next(
                    (
                        j + 2
                        for j in range(len(ids) - 1)
                        if (ids[j], ids[j + 1]) == (markers.im_start, markers.assistant)
                    ),
                    1,
                )
                if cut < len(ids) and tok is not None and tok.decode([ids[cut]]) == "\n":
                    cut += 1
            if not 1 <= cut < len(ids):
                raise UsageError(f"{where}: no output after the prompt (give prompt_len)")
            prompts.append(ids[:cut])
            outputs.append(ids[cut:])
            continue
        if tok is None:
            raise UsageError(f"{where}: text records need a tokenizer")
        if kind == "trace":
            prompt = engine.chat_prompt([{"role": "user", "content": value.problem}])
            text = value.render() + IM_END
        else:
            raw_prompt, problem, text = value
            prompt = (
                raw_prompt
                if raw_prompt is not None
                else engine.chat_prompt([{"role": "user", "content": problem}])
            )
        prompts.append(tok.encode(prompt, add_special_tokens=False))
        outputs.append(tok.encode(text, add_special_tokens=False))
    return prompts, outputs


def bench(
    replay: Path = typer.Option(
        ..., "--replay", help="JSONL of token streams / texts / Memento traces to replay."
    ),
    model: Path | None = typer.Option(None, "--model", help="Directory with an HF causal LM and tokenizer."),
    toy: bool = typer.Option(False, "--toy", help="Use a freshly built tiny toy model instead of --model."),
    modes: str = typer.Option("full,memento", "--modes", help="Comma-separated modes to compare."),
    keep_last_n_blocks: int = typer.Option(0, "--keep-last-n-blocks"),
    mask_delimiters: bool = typer.Option(False, "--mask-delimiters/--no-mask-delimiters"),
    kv_budget_tokens: int | None = typer.Option(None, "--kv-budget-tokens"),
    max_batch_size: int = typer.Option(16, "--max-batch-size"),
    repeat: int = typer.Option(1, "--repeat", help="Replay every stream this many times (more load)."),
    dtype: str = typer.Option("float32", "--dtype"),
    device: str = typer.Option("cpu", "--device"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per mode."),
) -> None:
    """Replay block-structured token streams through the real model (teacher forcing) in each mode
    under the same scheduler and KV budget: completion time, throughput, peak KV."""
    from memento.user_errors import reported

    with reported("bench"):
        results = _bench(replay, model, toy, modes, keep_last_n_blocks, mask_delimiters, kv_budget_tokens,
                         max_batch_size, repeat, dtype, device, as_json)  # fmt: skip
    if not as_json:
        from rich.table import Table

        from memento.console import console

        table = Table(title=f"replay of {replay} (budget {kv_budget_tokens or 'none'})")
        for key in results[0]:
            table.add_column(key, justify="left" if key == "mode" else "right", no_wrap=True)
        for row in results:
            table.add_row(*(str(v) for v in row.values()))
        console().print(table)


def _bench(replay, model, toy, modes, keep_last_n_blocks, mask_delimiters, kv_budget_tokens, max_batch_size,
           repeat, dtype, device, as_json) -> list[dict]:  # fmt: skip
    from memento.engine import Engine
    from memento.masking import BlockMaskingConfig
    from memento.user_errors import UsageError, check_count, check_model_dir

    if toy == (model is not None):
        raise UsageError("give exactly one of --model DIR or --toy")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if not mode_list:
        raise UsageError("--modes is empty; give e.g. full,memento")
    for m in mode_list:
        _check_mode(m, "--modes")
    if len(set(mode_list)) != len(mode_list):
        raise UsageError(f"--modes {modes!r} names a mode twice")
    check_count(repeat, "--repeat")
    _check_engine_args(dtype, device, max_batch_size, kv_budget_tokens)
    masking = BlockMaskingConfig(keep_last_n_blocks=keep_last_n_blocks, mask_delimiters=mask_delimiters)
    if model is not None:
        check_model_dir(model)
    specs = _replay_specs(replay)
    if toy:
        import torch

        from memento.toy import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer()
        loaded = (build_tiny_model(tokenizer).to(getattr(torch, dtype)).to(device), tokenizer)
    results = []
    for mode in mode_list:
        if toy:
            engine = Engine(
                loaded[0], loaded[1], mode=mode, masking=masking, kv_budget_tokens=kv_budget_tokens,
                max_batch_size=max_batch_size,
            )  # fmt: skip
        else:
            engine = _load_engine(
                model, mode=mode, masking=masking, dtype=dtype, device=device,
                kv_budget_tokens=kv_budget_tokens, max_batch_size=max_batch_size,
            )  # fmt: skip
        prompts, outputs = tokenize_replay(specs, engine)
        if mode == mode_list[0]:
            names = [where for where, _, _ in specs]
            lengths = [p + o for p, o in zip(prompts, outputs, strict=True)]
            _position_warnings(engine, lengths, 0, names)
        prompts, outputs = prompts * repeat, outputs * repeat
        try:
            outs = engine.replay(prompts, outputs)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
        run = engine.last_run
        seconds = max(run["seconds"], 1e-9)
        row = {
            "mode": mode,
            "requests": len(outs),
            "seconds": round(run["seconds"], 3),
            "generated_tokens": run["generated_tokens"],
            "tokens_per_s": round(run["generated_tokens"] / seconds, 1),
            "mean_peak_kv": round(sum(o.peak_kv for o in outs) / len(outs), 1),
            "mean_auc_kv": round(sum(o.auc_kv for o in outs) / len(outs), 1),
            "peak_total_kv": run["peak_total_kv"],
            "preemptions": run["preemptions"],
            "steps": run["steps"],
        }
        results.append(row)
        if as_json:
            typer.echo(json.dumps(row))
    return results


def register(app: typer.Typer) -> None:
    app.command(name="generate")(generate)
    app.command(name="bench")(bench)
