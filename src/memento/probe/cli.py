"""`memento probe`: the dual-information-stream study on the probing toy (see docs/dual-stream.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer


def probe_command(
    out: Path = typer.Option(
        Path("memento-probe"), "--out", help="Directory for data, models, features, results and the report."
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Seconds-long run of every stage at toy sizes (checks shapes and the split by passcode).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for data, model initialisation, training and probes."),
    threads: int = typer.Option(
        1, "--threads", help="torch CPU threads (one is fastest for these tiny models on a busy machine)."
    ),
    demo_run: Path | None = typer.Option(
        None,
        "--demo-run",
        help="A finished `memento demo` directory: also run the restart ablation on its model.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print report.json instead of the summary lines."),
) -> None:
    """Train the probing toy (stage 1 -> stage 2), probe the mementos' KV for an evicted passcode
    (direct / masked / causal control, with controls and baselines), patch memento KV between
    problems, and run the fair restart ablation. Re-running with the same --out resumes."""
    from rich.console import Console

    from memento.user_errors import check_count, check_output_dir, reported

    with reported("probe", resume="rerun the same command to resume after the last finished stage"):
        check_count(threads, "--threads")
        check_output_dir(out, "--out")
        from memento.probe.study import StudyConfig, Ui, run_study

        cfg = StudyConfig(
            out=out, profile="quick" if quick else "default", seed=seed, threads=threads, demo_run=demo_run
        )
        console = Console(file=sys.stderr if as_json else sys.stdout)
        report = run_study(cfg, Ui(console=console))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        console.print(f"report: {out / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("probe")(probe_command)
