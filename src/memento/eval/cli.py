"""`memento eval`: benchmark accuracy, KV and compression for one checkpoint (several modes side
by side) or for responses generated elsewhere; writes results.jsonl, summary.json, report.md."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def eval_command(
    ctx: typer.Context,
    benchmark_file: Path | None = typer.Argument(
        None, help="Benchmark JSONL (one problem + gold answer per line); none with --row."
    ),
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
    n: int | None = typer.Option(
        None,
        "--n",
        help="Samples per problem [the paper's: 64 on competition math (AIME, HMMT, ...), else 2].",
    ),
    temperature: float = typer.Option(0.6, "--temperature"),
    top_p: float = typer.Option(0.95, "--top-p"),
    top_k: int = typer.Option(20, "--top-k"),
    max_new_tokens: int = typer.Option(32000, "--max-new-tokens"),
    keep_last_n_blocks: int | None = typer.Option(
        None, "--keep-last-n-blocks", help="Eviction: blocks kept (-1 never evicts) [0]."
    ),
    mask_delimiters: bool | None = typer.Option(
        None, "--mask-delimiters/--no-mask-delimiters", help="Eviction: also evict block delimiters [off]."
    ),
    keep_last_block_for_answer: bool | None = typer.Option(
        None, "--keep-last-block-for-answer", help="Eviction: keep the last block until the next one starts."
    ),
    max_block_tokens: int | None = typer.Option(
        None, "--max-block-tokens", help="Force <|block_end|> after N block tokens (0 = off)."
    ),
    masking_config: str | None = typer.Option(
        None, "--masking-config", help="Block-masking options as JSON or a JSON/YAML file."
    ),
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
    row: list[str] | None = typer.Option(
        None,
        "--row",
        help="Table 1 over several eval folders: LABEL=DIR[,DIR...][@MODE] (globs allowed); repeatable.",
    ),
    group: list[str] | None = typer.Option(
        None, "--group", help="Table 1 column averaging benchmarks: NAME=BENCH,BENCH [Comp. Math]."
    ),
    reference: str | None = typer.Option(
        None, "--reference", help="Table 1 row the Δs are against [Control, else the first row]."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard results already in --output-dir."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json instead of the table."),
) -> None:
    """Evaluate a checkpoint (--model) or grade existing responses (--responses) on a benchmark.

    Resumable: rerun the same command after a stop and it continues (generation) or regrades only
    what changed (responses). With --row (no benchmark file) it writes the paper's Table 1 from
    several such runs instead."""
    args = dict(locals())
    del args["ctx"]
    from memento.eval.runner import RESULTS
    from memento.user_errors import reported

    if row or group or reference:
        with reported("eval"):
            text = _table(ctx, args)
        if as_json:
            typer.echo((output_dir / "table1.json").read_text())
        else:
            typer.echo(text)
            typer.echo(f"wrote {output_dir / 'table1.md'}, table1.json", err=True)
        return

    resume = f"results so far are kept in {output_dir / RESULTS}; rerun the same command to resume"
    with reported("eval", resume=resume):
        summary = _evaluate(ctx, **args)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo((output_dir / "report.md").read_text())
        typer.echo(f"wrote {output_dir / RESULTS}, summary.json, report.md", err=True)


# flags that only shape generation: given with --responses they would be silently ignored
_GENERATION_FLAGS = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "kv_budget_tokens", "batch_size",
                     "dtype", "device", "max_block_tokens")  # fmt: skip
# flags that shape eviction (the engine's with --model, the KV replay's with --responses --tokenizer)
_MASKING_FLAGS = ("keep_last_n_blocks", "mask_delimiters", "keep_last_block_for_answer", "max_block_tokens",
                  "masking_config")  # fmt: skip


def _masking(a: dict) -> dict | None:
    """The block-masking options given (file/JSON first, flags over it), validated; None = defaults."""
    from memento.masking import BlockMaskingConfig
    from memento.train.options import parse_masking

    values = parse_masking(a["masking_config"]) if a["masking_config"] else {}
    for name in _MASKING_FLAGS[:-1]:
        if a[name] is not None:
            values[name] = a[name]
    if not values:
        return None
    config = BlockMaskingConfig.from_dict(values)
    if config.restart_mode:
        raise ValueError("restart_mode is a mode: use --mode restart instead of the masking option")
    changed = {k: v for k, v in config.to_dict().items() if v != getattr(BlockMaskingConfig(), k)}
    return changed or None


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed this option (rather than getting its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# what a Table-1 run reads: its rows, plus how to count KV bytes and where to write
_TABLE_ARGS = {"row", "group", "reference", "output_dir", "kv_preset", "model_config", "as_json", "seed"}


def _table(ctx: typer.Context, a: dict) -> str:
    """`--row ...`: Table 1 from several eval output folders (see memento.eval.table)."""
    from memento.eval.table import build_table, parse_group, parse_row, write_table
    from memento.user_errors import UsageError, check_output_dir

    if not a["row"]:
        raise UsageError("--group and --reference shape a Table 1: give its rows with --row LABEL=DIR[@MODE]")
    if a["benchmark_file"] is not None:
        raise UsageError("--row builds Table 1 from finished eval folders; drop the benchmark file")
    stray = [_flag(k) for k in a if k not in _TABLE_ARGS and _given(ctx, k)]
    if stray:
        raise UsageError(
            f"{stray[0]} does not apply to a Table 1 (--row); run `memento eval` per benchmark first"
        )
    if a["model_config"] is not None and a["kv_preset"] is not None:
        raise UsageError("give at most one of --model-config and --kv-preset")
    check_output_dir(a["output_dir"])
    rows = [parse_row(spec) for spec in a["row"]]
    groups = [parse_group(spec) for spec in a["group"]] if a["group"] else None
    shape = (
        _kv_shape(None, a["model_config"], a["kv_preset"]) if a["kv_preset"] or a["model_config"] else None
    )
    table = build_table(rows, groups=groups, reference=a["reference"], shape=shape)
    return write_table(a["output_dir"], table)


def _evaluate(ctx: typer.Context, **a) -> dict:
    """Validate every argument and input, then generate or grade, then write the report."""
    from memento.eval.benchmarks import load_benchmark
    from memento.eval.report import write_report
    from memento.eval.runner import (
        RESULTS,
        GenerationConfig,
        ResultsFile,
        check_run_config,
        generate_results,
        grade_responses,
        read_all_responses,
        write_run_config,
    )
    from memento.masking import MODES, BlockMaskingConfig
    from memento.user_errors import (
        UsageError,
        check_count,
        check_device,
        check_dtype,
        check_input_file,
        check_model_dir,
        check_output_dir,
    )

    model, responses, output_dir = a["model"], a["responses"], a["output_dir"]
    if a["benchmark_file"] is None:
        raise UsageError("missing BENCHMARK_FILE (or build a Table 1 from eval folders with --row)")
    if (model is None) == (not responses):
        raise UsageError("give exactly one of --model DIR or --responses FILE")
    if a["model_config"] is not None and a["kv_preset"] is not None:
        raise UsageError("give at most one of --model-config and --kv-preset")
    check_input_file(a["benchmark_file"], "benchmark file")
    check_output_dir(output_dir)
    check_count(a["limit"], "--limit")
    check_count(a["n"], "--n")
    masking = _masking(a)
    masking_given = [_flag(f) for f in _MASKING_FLAGS if _given(ctx, f)]
    if model is not None:
        modes = list(a["mode"] or ["memento"])
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise UsageError(f"--mode {unknown[0]!r} is not a mode; use one of {', '.join(MODES)}")
        if len(set(modes)) != len(modes):
            raise UsageError(f"--mode given twice: {modes}")
        if masking_given and set(modes) == {"full"}:
            raise UsageError(f"{masking_given[0]} has no effect with --mode full (it never evicts); "
                             "drop it or add --mode memento")  # fmt: skip
        if a["tokenizer"] is not None:
            raise UsageError("--tokenizer is for --responses (a --model run uses the model's own tokenizer)")
        check_model_dir(model)
        check_dtype(a["dtype"])
        check_device(a["device"])
        check_count(a["batch_size"], "--batch-size")
        check_count(a["kv_budget_tokens"], "--kv-budget-tokens", 2)
        config = GenerationConfig(
            model=str(Path(model).resolve()),
            n=a["n"] or 1,  # the benchmark's default is set once the file is read
            temperature=a["temperature"],
            top_p=a["top_p"],
            top_k=a["top_k"],
            max_new_tokens=a["max_new_tokens"],
            seed=a["seed"],
            prompt_template=a["prompt_template"],
            dtype=a["dtype"],
            device=a["device"],
            kv_budget_tokens=a["kv_budget_tokens"],
            batch_size=a["batch_size"],
            masking=masking,
        )
    else:
        given = [_flag(f) for f in _GENERATION_FLAGS if _given(ctx, f)]
        if given:
            raise UsageError(f"{given[0]} applies to --model runs only; --responses are graded as they are")
        if a["mode"] and (len(a["mode"]) > 1 or len(responses) > 1):
            raise UsageError(
                "--mode names the column of a single --responses file; with several files each is its own "
                "column (named after the file), or put a 'mode' field in the lines"
            )
        for path in responses:
            check_input_file(path, "--responses")
        if a["tokenizer"] is not None and not Path(a["tokenizer"]).is_dir():
            raise UsageError(f"--tokenizer {a['tokenizer']}: no such directory")
        if masking_given and a["tokenizer"] is None:
            raise UsageError(
                f"{masking_given[0]} shapes the KV replay of the responses, which needs --tokenizer"
            )
        if a["prompt_template"] is not None and "{problem}" not in a["prompt_template"]:
            raise UsageError("--prompt-template must contain {problem}")
    bench = load_benchmark(
        a["benchmark_file"],
        kind=a["kind"],
        problem_field=a["problem_field"],
        answer_field=a["answer_field"],
        id_field=a["id_field"],
        limit=a["limit"],
    )
    wanted = {p.id for p in bench.problems}
    missing = [i for i in a["plot_ids"] or [] if i not in wanted]
    if missing:
        raise UsageError(f"--plot-id {missing[0]!r} is not an id of {a['benchmark_file']} (first ids: "
                         f"{', '.join(p.id for p in bench.problems[:5])})")  # fmt: skip
    shape = _kv_shape(model, a["model_config"], a["kv_preset"])
    windows = sorted({w for w in shape.windows if w is not None}) if shape is not None else []
    results_path = output_dir / RESULTS
    if model is not None:
        if a["n"] is None:
            from dataclasses import replace

            from memento.eval.runner import default_samples, is_competition_math

            config = replace(config, n=default_samples(bench.name))
            why = "competition math" if is_competition_math(bench.name) else "not competition math"
            typer.echo(
                f"note: --n {config.n} ({bench.name}: {why}; the paper's samples per problem)", err=True
            )
        run_config = {"benchmark": bench.name, **config.fingerprint()}
        check_run_config(output_dir, run_config, a["overwrite"])
        if a["overwrite"] and results_path.exists():
            results_path.unlink()
        write_run_config(output_dir, run_config)
        results = ResultsFile(results_path)
        with _RichProgress() as progress:
            generate_results(bench, modes, config, results, progress=progress.hooks(), windows=windows)
        order = modes
    else:
        from memento.eval.retokenize import Retokenizer

        records = read_all_responses(responses, bench, a["mode"][0] if a["mode"] else None)
        retok = Retokenizer(a["tokenizer"], a["prompt_template"]) if a["tokenizer"] else None
        if retok is not None:  # ids from another vocabulary: refused before anything is written
            for r in records:
                retok.check_ids((r.prompt_ids or []) + (r.token_ids or []), r.where)
        if retok is None and any(r.token_ids is not None for r in records):
            typer.echo("note: token_ids are ignored without --tokenizer (needed for the markers)", err=True)
        if a["overwrite"] and results_path.exists():
            results_path.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        results = ResultsFile(results_path)
        with _RichProgress() as progress:
            grade_responses(
                bench,
                records,
                results,
                retokenizer=retok,
                progress=progress.hooks(),
                masking=BlockMaskingConfig.from_dict(masking) if masking else None,
                windows=windows,
            )
        order = list(dict.fromkeys(r.mode for r in records))
    kept = [r for r in results.records if str(r["id"]) in wanted and r["mode"] in order]
    return write_report(
        output_dir,
        kept,
        benchmark=bench.name,
        kind=bench.kind,
        problems=len(bench),
        order=order,
        shape=shape,
        plot_ids=a["plot_ids"] or None,
        plots=not a["no_plots"],
        seed=a["seed"],
    )


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
