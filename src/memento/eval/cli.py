"""`memento eval`: benchmark accuracy, KV and compression for one checkpoint (several modes side
by side) or for responses generated elsewhere; writes results.jsonl, summary.json, report.md."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def eval_command(
    benchmark_file: Path = typer.Argument(..., help="Benchmark JSONL (one problem + gold answer per line)."),
    model: str | None = typer.Option(None, "--model", help="Checkpoint directory to generate with."),
    responses: list[Path] | None = typer.Option(
        None, "--responses", help="JSONL of id + response (optional sample, mode, token_ids); repeatable."
    ),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where results and the report go."),
    mode: list[str] | None = typer.Option(
        None, "--mode", help="full | memento | restart; repeat for a side-by-side table (default memento)."
    ),
    kind: str | None = typer.Option(
        None, "--kind", help="math | choice (default: detected from gold answers)."
    ),
    problem_field: str | None = typer.Option(None, "--problem-field", help="Default: problem / question."),
    answer_field: str | None = typer.Option(None, "--answer-field", help="Default: answer / gold."),
    id_field: str | None = typer.Option(None, "--id-field", help="Default: id / unique_id / line index."),
    n: int = typer.Option(1, "--n", help="Samples per problem."),
    temperature: float = typer.Option(0.6, "--temperature"),
    top_p: float = typer.Option(0.95, "--top-p"),
    top_k: int = typer.Option(20, "--top-k"),
    max_new_tokens: int = typer.Option(32768, "--max-new-tokens"),
    kv_budget_tokens: int | None = typer.Option(
        None, "--kv-budget-tokens", help="Engine KV budget (tokens)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Engine max batch size."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N problems."),
    seed: int = typer.Option(0, "--seed", help="Base seed; every sample gets its own derived seed."),
    prompt_template: str | None = typer.Option(
        None, "--prompt-template", help="User message template containing {problem} (default: the problem)."
    ),
    dtype: str = typer.Option("float32", "--dtype"),
    device: str = typer.Option("cpu", "--device"),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="With --responses: tokenizer to replay KV and count tokens."
    ),
    model_config: Path | None = typer.Option(
        None, "--model-config", help="config.json for KV bytes per token."
    ),
    kv_preset: str | None = typer.Option(
        None, "--kv-preset", help="Named model shape for KV bytes, e.g. qwen3-8b."
    ),
    plot_ids: list[str] | None = typer.Option(
        None, "--plot-id", help="Problem id for the KV curve plot; repeatable."
    ),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard results already in --output-dir."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json instead of the table."),
) -> None:
    """Evaluate a checkpoint (--model) or grade existing responses (--responses) on a benchmark."""
    from rich.console import Console

    from memento.eval.benchmarks import load_benchmark
    from memento.eval.report import write_report
    from memento.eval.runner import (
        RESULTS,
        GenerationConfig,
        ResultsFile,
        check_run_config,
        generate_results,
        grade_responses,
        read_responses,
    )

    err = Console(stderr=True)

    def fail(message: str) -> typer.Exit:
        err.print(f"[red]error:[/red] {message}")
        return typer.Exit(2)

    if (model is None) == (not responses):
        raise fail("give exactly one of --model DIR or --responses FILE")
    if model_config is not None and kv_preset is not None:
        raise fail("give at most one of --model-config and --kv-preset")
    modes = list(mode or ["memento"])
    try:
        bench = load_benchmark(
            benchmark_file,
            kind=kind,
            problem_field=problem_field,
            answer_field=answer_field,
            id_field=id_field,
            limit=limit,
        )
        shape = _kv_shape(model, model_config, kv_preset)
        bytes_per_token = shape.bytes_per_token if shape else None
        if shape is not None and shape.sliding:
            err.print(
                f"[yellow]note:[/yellow] {shape.name} has sliding-window layers ({shape.describe()}); "
                "the GB rows count every layer as full attention; `memento kv` counts bytes per layer type"
            )
        results_path = output_dir / RESULTS
        if overwrite and results_path.exists():
            results_path.unlink()
        if model is not None:
            config = GenerationConfig(
                model=str(Path(model).resolve()) if Path(model).exists() else model,
                n=n,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                seed=seed,
                prompt_template=prompt_template,
                dtype=dtype,
                device=device,
                kv_budget_tokens=kv_budget_tokens,
                batch_size=batch_size,
            )
            check_run_config(output_dir, {"benchmark": bench.name, **config.fingerprint()}, overwrite)
            results = ResultsFile(results_path)
            with _RichProgress() as progress:
                generate_results(bench, modes, config, results, progress=progress.hooks())
            order = modes
        else:
            from memento.eval.retokenize import Retokenizer

            retok = Retokenizer(tokenizer, prompt_template) if tokenizer else None
            explicit_mode = mode[0] if mode and len(responses) == 1 else None
            records = [r for path in responses for r in read_responses(path, bench, explicit_mode)]
            if retok is None and any(r.token_ids is not None for r in records):
                err.print(
                    "[yellow]note:[/yellow] token_ids are ignored without --tokenizer (needed for the markers)"
                )
            output_dir.mkdir(parents=True, exist_ok=True)
            results = ResultsFile(results_path)
            with _RichProgress() as progress:
                grade_responses(bench, records, results, retokenizer=retok, progress=progress.hooks())
            order = list(dict.fromkeys(r.mode for r in records))
        wanted = {p.id for p in bench.problems}
        kept = [r for r in results.records if str(r["id"]) in wanted and r["mode"] in order]
        summary = write_report(
            output_dir,
            kept,
            benchmark=bench.name,
            kind=bench.kind,
            problems=len(bench),
            order=order,
            bytes_per_token=bytes_per_token,
            plot_ids=plot_ids or None,
            plots=not no_plots,
            seed=seed,
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc

    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo((output_dir / "report.md").read_text())
        err.print(f"wrote {output_dir / RESULTS}, summary.json, report.md")


def _kv_shape(model: str | None, model_config: Path | None, kv_preset: str | None):
    """The model's KV shape for the GB rows: a preset, a config.json, or the model directory's."""
    from memento.kv import kv_shape

    if kv_preset:
        return kv_shape(None, kv_preset)
    if model_config:
        return kv_shape(model_config, None)
    if model and (Path(model) / "config.json").exists():
        try:
            return kv_shape(Path(model) / "config.json", None)
        except ValueError:
            return None
    return None


class _RichProgress:
    """A rich progress bar driven by the runner's start/advance/stop hooks (stderr, transient)."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._bar.__enter__()
        self._task = None
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def hooks(self):
        from memento.eval.runner import Progress

        def start(label: str, total: int) -> None:
            self._task = self._bar.add_task(label, total=total)

        def advance() -> None:
            if self._task is not None:
                self._bar.advance(self._task)

        return Progress(start=start, advance=advance, stop=lambda: None)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
