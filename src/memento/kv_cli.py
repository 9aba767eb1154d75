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
    """One generation from a record; errors say what is wrong (the caller adds where)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "segments" in record:
        trace = segments_to_trace(record, source="record")
        return Generation(name, trace.render(), ({"role": "user", "content": trace.problem},))
    if "blocks" in record and "problem" in record:
        trace = MementoTrace.from_dict(record)
        return Generation(name, trace.render(), ({"role": "user", "content": trace.problem},))
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("'messages' must end with the assistant's generation")
        return Generation(name, messages[-1]["content"], tuple(messages[:-1]))
    if isinstance(record.get("text"), str):
        for field in ("prompt", "problem"):
            if field in record and not isinstance(record[field], str):
                raise ValueError(f"{field!r} must be a string, got {type(record[field]).__name__}")
        if isinstance(record.get("prompt"), str):
            return Generation(name, record["text"], raw_prompt=record["prompt"])
        problem = record.get("problem", "")
        return Generation(name, record["text"], ({"role": "user", "content": problem},))
    raise ValueError(
        "no generation found; expected a 'text' string, chat 'messages', a Memento trace "
        "('problem' + 'blocks'), or 'segments'"
    )


def load_generations(path: Path) -> list[Generation]:
    """Read JSONL (one generation per line) or a JSON file (one record or a list of records)."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); expected JSON") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        records = data if isinstance(data, list) else [data]
        if not records:
            raise ValueError(f"{path}: an empty list; nothing to account for")
        out = []
        for i, r in enumerate(records):
            where = f"{path}[{i}]" if len(records) > 1 else str(path)
            try:
                out.append(_record_to_generation(r, where))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return out
    out = []
    for where, record in read_jsonl(path):
        name = str(record.get("id", Path(where).name)) if isinstance(record, dict) else where
        try:
            out.append(_record_to_generation(record, name))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
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
    ctx: typer.Context,
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
    from rich.table import Table

    from memento.console import console
    from memento.kv import analyse, kv_shape, summarize_traces
    from memento.masking import BlockMaskingConfig
    from memento.tokens import MarkerIds
    from memento.user_errors import UsageError, check_input_file, reported

    with reported("kv"):
        if model_config is not None and preset is not None:
            raise UsageError("give at most one of --model-config and --preset")
        source = ctx.get_parameter_source("plot_index")
        if plot is None and source is not None and source.name == "COMMANDLINE":
            raise UsageError("--plot-index picks the generation drawn by --plot; pass --plot FILE.png too")
        if plot is not None:
            _check_plot_path(plot)
        if tokenizer is not None and not Path(tokenizer).is_dir():
            raise UsageError(f"--tokenizer {tokenizer}: no such directory")
        check_input_file(input_file, "input")
        config = BlockMaskingConfig(
            keep_last_n_blocks=keep_last_n_blocks,
            mask_delimiters=mask_delimiters,
            keep_last_block_for_answer=keep_last_block_for_answer,
        )
        shape = kv_shape(model_config, None) if model_config else kv_shape(None, preset) if preset else None
        generations = load_generations(input_file)
        if plot is not None and not 0 <= plot_index < len(generations):
            raise UsageError(
                f"--plot-index {plot_index} is out of range: the file has {len(generations)} generations"
            )
        tok = _load_tokenizer(tokenizer)
        markers = MarkerIds.from_tokenizer(tok)
        if tokenizer is None:
            typer.echo(
                "note: using the built-in toy tokenizer: token counts are approximate; pass --tokenizer DIR",
                err=True,
            )

        results = []
        for gen in generations:
            _, problems = parse(gen.text)
            for problem in problems:
                typer.echo(
                    f"warning: {gen.name}: format problem {problem.kind} at character {problem.offset}",
                    err=True,
                )
            prompt_ids = tok.encode(_prompt_text(tok, gen), add_special_tokens=False)
            output_ids = tok.encode(gen.text, add_special_tokens=False)
            if not prompt_ids or not output_ids:
                typer.echo(f"warning: {gen.name}: empty prompt or generation, skipped", err=True)
                continue
            results.append((gen, analyse(prompt_ids + output_ids, len(prompt_ids), markers, config, shape)))
        if not results:
            raise UsageError(f"{input_file}: nothing to account for (every generation was empty)")

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
        if col == "trace":  # a long name wraps on a narrow terminal; it is never cut
            table.add_column(col, justify="left", overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for gen, r in results:
        s = r.summary()
        table.add_row(
            gen.name,
            str(r.generated_tokens),
            str(r.blocks),
            str(r.full_peak),
            str(r.memento_peak),
            f"{1 / s['peak_ratio']:.2f}" if s["peak_ratio"] else "-",
            f"{1 / s['auc_ratio']:.2f}" if s["auc_ratio"] else "-",
            f"{r.compression:.1%}",
        )
    out = console()
    out.print(table)
    out.print(
        f"total: peak KV {totals['full_peak_kv']} → {totals['memento_peak_kv']} tokens "
        f"({totals['peak_reduction']:.2f}× lower), AUC {totals['auc_reduction']:.2f}× lower, "
        f"compression {totals['compression']:.1%}"
    )
    if shape is not None:
        out.print(
            f"bytes ({shape.name}: {shape.describe()}, {shape.bytes_per_layer_token // 1024} KiB per token "
            f"per layer): peak {totals['full_peak_bytes'] / 2**30:.3f} GiB full attention vs "
            f"{totals['memento_peak_bytes'] / 2**30:.3f} GiB MEMENTO = {totals['peak_bytes_ratio']:.2f}× "
            "(largest single generation; sliding-window layers count at most their window)"
        )


_PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _check_plot_path(plot: Path) -> None:
    """--plot must name a new or existing image file in an existing folder (checked before work)."""
    from memento.user_errors import UsageError

    if plot.is_dir():
        raise UsageError(f"--plot {plot}: is a directory; give a file name such as {plot / 'kv.png'}")
    if not plot.parent.is_dir():
        raise UsageError(f"--plot {plot}: the folder {plot.parent} does not exist")
    if plot.suffix.lower() not in _PLOT_FORMATS:
        raise UsageError(
            f"--plot {plot}: unknown image format; end the name with one of {', '.join(_PLOT_FORMATS)}"
        )


def _load_tokenizer(path: str | None):
    if path is None:
        from memento.toy import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer ({exc})") from None
    from memento.tokens import ensure_chat_template

    ensure_chat_template(tok)
    if tok.chat_template is None:
        raise ValueError(f"tokenizer {path} has no chat template and no ChatML tokens to build one")
    return tok


def register(app: typer.Typer) -> None:
    app.command(name="kv")(kv)
