"""`memento annotate`: raw chain-of-thought traces → Memento training data (see docs/annotate.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from memento.annotate.sources import DEFAULT_MAX_CHARS


def _parse_shard(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def register(app: typer.Typer) -> None:
    @app.command("annotate")
    def annotate(
        input_path: Path = typer.Argument(
            ..., help="Traces: .jsonl, .json, .parquet or a save_to_disk folder."
        ),
        output_dir: Path = typer.Option(
            ..., "--output-dir", "-o", help="Where records/traces/stats go (resumable)."
        ),
        backend: str = typer.Option(
            "heuristic", help="heuristic (offline) or openai (any OpenAI-compatible API)."
        ),
        model: str = typer.Option("gpt-4o", help="Model name for scoring, compressing and judging."),
        base_url: str | None = typer.Option(
            None, help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL)."
        ),
        api_key: str | None = typer.Option(
            None, help="API key (default: $OPENAI_API_KEY; any string for local servers)."
        ),
        concurrency: int = typer.Option(16, help="Concurrent LLM requests."),
        timeout: float = typer.Option(120.0, help="Seconds per LLM request."),
        max_attempts: int = typer.Option(4, help="Attempts per LLM request (exponential backoff between)."),
        json_mode: bool = typer.Option(False, help="Ask the server for JSON output (response_format)."),
        min_block_tokens: int = typer.Option(200, help="Smallest block, in tokens of --tokenizer."),
        variance_penalty: float = typer.Option(
            0.5, help="lambda: weight of the block-size CV in the objective."
        ),
        max_iterations: int = typer.Option(2, help="Judge rounds per memento (T)."),
        compress: str = typer.Option(
            "trace",
            help="trace: one compressor call writes every memento of a trace (the paper's); block: one per block.",
        ),
        score_threshold: float = typer.Option(8.0, help="Judge score (0-10) that ends refinement."),
        two_pass: bool = typer.Option(
            True, "--two-pass/--single-pass", help="Average 16- and 11-boundary windows."
        ),
        scoring_problem: bool = typer.Option(
            False,
            "--scoring-problem/--no-scoring-problem",
            help="Send the problem with every scoring window (the original does not).",
        ),
        limit: int | None = typer.Option(None, help="Only the first N accepted traces (of this shard)."),
        shard: str = typer.Option("0/1", help="i/n: this machine takes rows with index % n == i (0-based)."),
        workers: int = typer.Option(
            1, help="Traces processed concurrently (processes for the offline backend)."
        ),
        tokenizer: str | None = typer.Option(
            None, help="HF tokenizer folder for token counts (default: built-in)."
        ),
        problem_field: str | None = typer.Option(
            None, help="Field with the problem (default: problem, prompt, conversations)."
        ),
        cot_field: str | None = typer.Option(
            None, help="Field with the reasoning (default: cot, full_cot, conversations)."
        ),
        id_field: str | None = typer.Option(
            None, help="Field with a unique id (default: id, task_id, row number)."
        ),
        min_chars: int = typer.Option(0, help="Reject traces whose thinking is shorter (characters)."),
        max_chars: int = typer.Option(
            DEFAULT_MAX_CHARS,
            help="Size guard: reject traces whose thinking is longer (characters; 0 = no limit).",
        ),
        allow_incomplete: bool = typer.Option(False, help="Keep traces without a closing think tag."),
        max_consecutive_failures: int = typer.Option(20, help="Stop after this many failed traces in a row."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
        json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
    ) -> None:
        """Raw chain-of-thought traces → Memento traces (blocks + mementos), with stats.

        Resumable: rerun the same command after a stop (Ctrl-C, a kill) and it continues where it was."""
        from memento.annotate.llm import EndpointUnreachable, LLMConfig
        from memento.annotate.mementos import MementoConfig
        from memento.annotate.runner import AnnotateConfig, RunAborted, run
        from memento.annotate.scoring import ScoringConfig
        from memento.annotate.sources import SourceConfig
        from memento.user_errors import check_output_dir, reported

        resume = f"finished traces are kept in {output_dir}; rerun the same command to resume"
        with reported("annotate", resume=resume):
            try:
                shard_i, shard_n = _parse_shard(shard)
                check_output_dir(output_dir)
                if tokenizer not in (None, "", "default", "regex") and not Path(tokenizer).is_dir():
                    raise ValueError(f"--tokenizer {tokenizer}: no such directory (or use 'regex')")
                cfg = AnnotateConfig(
                    backend=backend,
                    min_block_tokens=min_block_tokens,
                    variance_penalty=variance_penalty,
                    limit=limit,
                    shard_index=shard_i,
                    shard_count=shard_n,
                    workers=workers,
                    tokenizer=tokenizer,
                    max_consecutive_failures=max_consecutive_failures,
                    progress=progress,
                    scoring=ScoringConfig(two_pass=two_pass, include_problem=scoring_problem),
                    mementos=MementoConfig(
                        max_iterations=max_iterations, score_threshold=score_threshold, compress=compress
                    ),
                    source=SourceConfig(
                        problem_field=problem_field,
                        cot_field=cot_field,
                        id_field=id_field,
                        require_closing_tag=not allow_incomplete,
                        min_chars=min_chars,
                        max_chars=max_chars or None,
                    ),
                    llm=LLMConfig(
                        model=model,
                        base_url=base_url,
                        api_key=api_key,
                        concurrency=concurrency,
                        timeout_s=timeout,
                        max_attempts=max_attempts,
                        json_mode=json_mode,
                    ),
                )
                if backend == "openai":
                    cfg.llm.resolved_key()
                summary = run(input_path, output_dir, cfg)
            except (EndpointUnreachable, RunAborted) as e:
                raise ValueError(str(e)) from None
        for where, chars in summary.source.too_long[:3]:
            typer.echo(
                f"note: {where}: thinking is {chars:,} characters, over --max-chars {max_chars:,}: skipped "
                "(raise --max-chars to annotate it)",
                err=True,
            )
        result = {
            "output_dir": str(summary.output_dir),
            "processed": summary.processed,
            "already_done": summary.skipped_done,
            "failed": summary.failed,
            "input": summary.source.to_dict(),
            "blocks_per_trace": summary.stats["blocks_per_trace"]["mean"],
            "compression_ratio_median": summary.stats["compression_ratio"]["median"],
        }
        if json_out:
            typer.echo(json.dumps(result))
        else:
            typer.echo(
                f"annotated {summary.processed} trace(s) ({summary.skipped_done} already done, {summary.failed} failed) "
                f"→ {summary.output_dir}/traces.jsonl; report: {summary.output_dir}/stats.md"
            )
        if summary.failed:
            raise typer.Exit(1)
