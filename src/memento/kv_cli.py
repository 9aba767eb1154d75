"""`memento kv`: how much KV would MEMENTO save on these generations?"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from memento.format import MementoTrace, parse, segments_to_trace
from memento.jsonl import read_jsonl


@dataclass(frozen=True)
class Generation:
    """One generated text with the prompt it answered (messages, or raw prompt text)."""

    name: str
    text: str
    messages: tuple[dict, ...] = ()
    raw_prompt: str | None = None


def _record_to_generation(record: object, name: str) -> Generation:
    if not isinstance(record, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(record).__name__}")
    if "segments" in record:
        trace = segments_to_trace(record, source=name)
        return Generation(name, trace.render(), ({"role": "user", "content": trace.problem},))
    if "blocks" in record and "problem" in record:
        trace = MementoTrace.from_dict(record)
        return Generation(name, trace.render(), ({"role": "user", "content": trace.problem},))
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError(f"{name}: 'messages' must end with the assistant's generation")
        return Generation(name, str(messages[-1].get("content", "")), tuple(messages[:-1]))
    if isinstance(record.get("text"), str):
        if isinstance(record.get("prompt"), str):
            return Generation(name, record["text"], raw_prompt=record["prompt"])
        problem = record.get("problem", "")
        return Generation(name, record["text"], ({"role": "user", "content": str(problem)},))
    raise ValueError(
        f"{name}: no generation found; expected a 'text' field, chat 'messages', a Memento trace "
        "('problem' + 'blocks'), or 'segments'"
    )


def load_generations(path: Path) -> list[Generation]:
    """Read JSONL (one generation per line) or a JSON file (one record or a list of records)."""
    if path.suffix == ".json":
        try:
            raw = path.read_text()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc}") from exc
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        records = data if isinstance(data, list) else [data]
        return [
            _record_to_generation(r, f"{path}[{i}]" if len(records) > 1 else str(path))
            for i, r in enumerate(records)
        ]
    out = []
    for where, record in read_jsonl(path):
        name = str(record.get("id", Path(where).name)) if isinstance(record, dict) else where
        try:
            out.append(_record_to_generation(record, name))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    if not out:
        raise ValueError(f"{path}: no records found")
    return out


def _prompt_text(tokenizer, gen: Generation) -> str:
    if gen.raw_prompt is not None:
        return gen.raw_prompt
    return tokenizer.apply_chat_template(list(gen.messages), add_generation_prompt=True, tokenize=False)


def _plot(path: Path, name: str, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    steps = range(1, len(result.full_trace) + 1)
    ax.plot(steps, result.full_trace, label=f"full attention (peak {result.full_peak})", color="tab:gray")
    ax.plot(steps, result.memento_trace, label=f"MEMENTO (peak {result.memento_peak})", color="tab:blue")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("cached KV tokens")
    ax.set_title(f"KV cache over generation: {name}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kv(
    input_file: Path = typer.Argument(
        ..., help="JSONL of generations (text / messages / traces) or a segments JSON."
    ),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="HF tokenizer directory (default: the built-in toy tokenizer; counts approximate).",
    ),
    model_config: Path | None = typer.Option(
        None, "--model-config", help="config.json giving the KV shape (layers by type, heads, dtype)."
    ),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="Named model shape for bytes: qwen3-8b, qwen3-32b, phi-4-reasoning, olmo-3-7b.",
    ),
    keep_last_n_blocks: int = typer.Option(0, "--keep-last-n-blocks"),
    mask_delimiters: bool = typer.Option(False, "--mask-delimiters/--no-mask-delimiters"),
    keep_last_block_for_answer: bool = typer.Option(False, "--keep-last-block-for-answer"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    plot: Path | None = typer.Option(None, "--plot", help="Write the full vs MEMENTO KV curve (PNG)."),
    plot_index: int = typer.Option(0, "--plot-index", help="Which generation to plot (0-based)."),
) -> None:
    """Offline KV accounting: full-attention vs MEMENTO peak and AUC KV, compression, bytes."""
    from rich.console import Console
    from rich.table import Table

    from memento.kv import analyse, kv_shape, summarize_traces
    from memento.masking import BlockMaskingConfig
    from memento.tokens import MarkerIds

    err = Console(stderr=True)
    try:
        config = BlockMaskingConfig(
            keep_last_n_blocks=keep_last_n_blocks,
            mask_delimiters=mask_delimiters,
            keep_last_block_for_answer=keep_last_block_for_answer,
        )
        shape = kv_shape(model_config, None) if model_config else kv_shape(None, preset) if preset else None
        generations = load_generations(input_file)
        if plot is not None and not 0 <= plot_index < len(generations):
            raise ValueError(
                f"--plot-index {plot_index} is out of range: the file has {len(generations)} generations"
            )
        tok = _load_tokenizer(tokenizer)
        markers = MarkerIds.from_tokenizer(tok)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if tokenizer is None:
        err.print(
            "[yellow]note:[/yellow] using the built-in toy tokenizer: token counts are approximate; pass --tokenizer DIR"
        )

    results = []
    for gen in generations:
        _, problems = parse(gen.text)
        for problem in problems:
            err.print(
                f"[yellow]warning:[/yellow] {gen.name}: format problem {problem.kind} at character {problem.offset}"
            )
        prompt_ids = tok.encode(_prompt_text(tok, gen), add_special_tokens=False)
        output_ids = tok.encode(gen.text, add_special_tokens=False)
        if not prompt_ids or not output_ids:
            err.print(f"[yellow]warning:[/yellow] {gen.name}: empty prompt or generation, skipped")
            continue
        results.append((gen, analyse(prompt_ids + output_ids, len(prompt_ids), markers, config, shape)))
    if not results:
        err.print("[red]error:[/red] nothing to account for")
        raise typer.Exit(2)

    totals = summarize_traces([r for _, r in results], shape)
    if plot is not None:
        gen, result = results[min(plot_index, len(results) - 1)]
        _plot(plot, gen.name, result)
    if as_json:
        per_trace = [{"name": gen.name, **r.summary()} for gen, r in results]
        typer.echo(json.dumps({"config": config.to_dict(), "traces": per_trace, "total": totals}, indent=2))
        return

    table = Table(
        title=f"KV accounting ({len(results)} generations, keep_last_n_blocks={keep_last_n_blocks})"
    )
    for col in ("trace", "gen tok", "blocks", "full peak", "memento peak", "peak ×", "AUC ×", "compression"):
        table.add_column(col, justify="right" if col != "trace" else "left")
    for gen, r in results:
        s = r.summary()
        table.add_row(
            gen.name[:40],
            str(r.generated_tokens),
            str(r.blocks),
            str(r.full_peak),
            str(r.memento_peak),
            f"{1 / s['peak_ratio']:.2f}" if s["peak_ratio"] else "-",
            f"{1 / s['auc_ratio']:.2f}" if s["auc_ratio"] else "-",
            f"{r.compression:.1%}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"total: peak KV {totals['full_peak_kv']} → {totals['memento_peak_kv']} tokens "
        f"({totals['peak_reduction']:.2f}× lower), AUC {totals['auc_reduction']:.2f}× lower, "
        f"compression {totals['compression']:.1%}"
    )
    if shape is not None:
        console.print(
            f"bytes ({shape.name}: {shape.describe()}, {shape.bytes_per_layer_token // 1024} KiB per token "
            f"per layer): peak {totals['full_peak_bytes'] / 2**30:.3f} GiB full attention vs "
            f"{totals['memento_peak_bytes'] / 2**30:.3f} GiB MEMENTO = {totals['peak_bytes_ratio']:.2f}× "
            "(largest single generation; sliding-window layers count at most their window)"
        )


def _load_tokenizer(path: str | None):
    if path is None:
        from memento.toy import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path}: {exc}") from exc
    from memento.tokens import ensure_chat_template

    ensure_chat_template(tok)
    if tok.chat_template is None:
        raise ValueError(f"tokenizer {path} has no chat template and no ChatML tokens to build one")
    return tok


def register(app: typer.Typer) -> None:
    app.command(name="kv")(kv)
