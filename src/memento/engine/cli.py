"""`memento generate` (evicting generation) and `memento bench --replay` (teacher-forced KV and
speed measurements on block-structured token streams)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer

from memento.jsonl import read_jsonl

MODE_HELP = "full (vanilla attention, blocks only tracked) | memento (evict blocks) | restart (ablation)"


def _masking(
    keep_last_n_blocks: int,
    mask_delimiters: bool,
    keep_last_block_for_answer: bool,
    max_block_tokens: int,
    no_require_assistant_section: bool,
):
    from memento.masking import BlockMaskingConfig

    return BlockMaskingConfig(
        keep_last_n_blocks=keep_last_n_blocks,
        mask_delimiters=mask_delimiters,
        keep_last_block_for_answer=keep_last_block_for_answer,
        max_block_tokens=max_block_tokens,
        require_assistant_section=not no_require_assistant_section,
    )


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file, or exit with a message naming the file and line."""
    records = []
    try:
        for where, record in read_jsonl(path):
            if not isinstance(record, dict):
                _fail(f"{where}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    except ValueError as exc:
        _fail(f"{exc}; expected one JSON object per line")
    if not records:
        _fail(f"{path} holds no records")
    return records


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
    if (prompt is None) == (prompts is None):
        _fail("give exactly one of --prompt TEXT or --prompts FILE")
    if logprobs and not as_json:
        _fail("--logprobs adds fields to the --json records; pass --json too")
    from memento.engine import Engine, SamplingParams

    try:
        masking = _masking(
            keep_last_n_blocks,
            mask_delimiters,
            keep_last_block_for_answer,
            max_block_tokens,
            no_require_assistant_section,
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
        engine = Engine.from_pretrained(
            model,
            mode=mode,
            masking=masking,
            dtype=dtype,
            device=device,
            kv_budget_tokens=kv_budget_tokens,
            max_batch_size=max_batch_size,
        )
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(str(exc))
    texts: list[str] = []
    if prompt is not None:
        texts.append(prompt if raw else engine.chat_prompt([{"role": "user", "content": prompt}]))
    else:
        for i, record in enumerate(_read_jsonl(prompts)):
            if isinstance(record.get("messages"), list):
                texts.append(engine.chat_prompt(record["messages"]))
            elif isinstance(record.get("prompt"), str):
                texts.append(record["prompt"])
            else:
                _fail(f'{prompts} line {i + 1}: expected {{"messages": [...]}} or {{"prompt": "..."}}')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outputs = engine.generate(texts, params)
        except RuntimeError as exc:
            _fail(str(exc))
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


def load_replay(path: Path, engine) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, outputs) token streams from JSONL: {"token_ids": [...], "prompt_len": k?},
    {"text": ..., "prompt"?/"problem"?}, or Memento traces {"problem", "blocks", "answer"}."""
    from memento.format import MementoTrace
    from memento.tokens import IM_END

    tok = engine.tokenizer
    markers = engine.markers
    prompts, outputs = [], []
    for i, record in enumerate(_read_jsonl(path)):
        where = f"{path} line {i + 1}"
        if isinstance(record.get("token_ids"), list):
            ids = [int(t) for t in record["token_ids"]]
            cut = record.get("prompt_len")
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
                _fail(f"{where}: prompt_len {cut} leaves no prompt or no output")
            prompts.append(ids[:cut])
            outputs.append(ids[cut:])
            continue
        if tok is None:
            _fail(f"{where}: text records need a tokenizer")
        if "blocks" in record and "problem" in record:
            try:
                trace = MementoTrace.from_dict(record)
            except ValueError as exc:
                _fail(f"{where}: {exc}")
            prompt = engine.chat_prompt([{"role": "user", "content": trace.problem}])
            text = trace.render() + IM_END
        elif isinstance(record.get("text"), str):
            if isinstance(record.get("prompt"), str):
                prompt = record["prompt"]
            else:
                prompt = engine.chat_prompt([{"role": "user", "content": str(record.get("problem", ""))}])
            text = record["text"]
        else:
            _fail(f'{where}: expected "token_ids", "text", or a Memento trace ("problem" + "blocks")')
        prompts.append(tok.encode(prompt, add_special_tokens=False))
        out = tok.encode(text, add_special_tokens=False)
        if not out:
            _fail(f"{where}: empty generation")
        outputs.append(out)
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
    from memento.engine import Engine
    from memento.masking import BlockMaskingConfig

    if toy == (model is not None):
        _fail("give exactly one of --model DIR or --toy")
    masking = BlockMaskingConfig(keep_last_n_blocks=keep_last_n_blocks, mask_delimiters=mask_delimiters)
    if toy:
        import torch

        from memento.toy import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer()
        loaded = (build_tiny_model(tokenizer).to(getattr(torch, dtype)).to(device), tokenizer)
    results = []
    for mode in [m.strip() for m in modes.split(",") if m.strip()]:
        try:
            if toy:
                engine = Engine(
                    loaded[0], loaded[1], mode=mode, masking=masking, kv_budget_tokens=kv_budget_tokens,
                    max_batch_size=max_batch_size,
                )  # fmt: skip
            else:
                engine = Engine.from_pretrained(
                    model, mode=mode, masking=masking, dtype=dtype, device=device,
                    kv_budget_tokens=kv_budget_tokens, max_batch_size=max_batch_size,
                )  # fmt: skip
        except (ValueError, FileNotFoundError, OSError) as exc:
            _fail(str(exc))
        prompts, outputs = load_replay(replay, engine)
        prompts, outputs = prompts * repeat, outputs * repeat
        try:
            outs = engine.replay(prompts, outputs)
        except RuntimeError as exc:
            _fail(str(exc))
        run = engine.last_run
        row = {
            "mode": mode,
            "requests": len(outs),
            "seconds": round(run["seconds"], 3),
            "generated_tokens": run["generated_tokens"],
            "tokens_per_s": round(run["generated_tokens"] / run["seconds"], 1),
            "mean_peak_kv": round(sum(o.peak_kv for o in outs) / len(outs), 1),
            "mean_auc_kv": round(sum(o.auc_kv for o in outs) / len(outs), 1),
            "peak_total_kv": run["peak_total_kv"],
            "preemptions": run["preemptions"],
            "steps": run["steps"],
        }
        results.append(row)
        if as_json:
            typer.echo(json.dumps(row))
    if not as_json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"replay of {replay} (budget {kv_budget_tokens or 'none'})")
        for key in results[0]:
            table.add_column(key)
        for row in results:
            table.add_row(*(str(v) for v in row.values()))
        Console(file=sys.stdout).print(table)


def register(app: typer.Typer) -> None:
    app.command(name="generate")(generate)
    app.command(name="bench")(bench)
