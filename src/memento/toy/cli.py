"""`memento demo`: the end-to-end toy run (data -> stage 1 -> stage 2 -> eval -> report)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def demo_command(
    out: Path = typer.Option(
        Path("memento-demo"), "--out", help="Directory for data, models, report and plots."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="The task with one-digit numbers and shorter training (about 5 CPU minutes)."
    ),
    scale: float = typer.Option(
        1.0, "--scale", help="Multiply every training run's optimizer steps (2 = train twice as long)."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed for the data, the model initialisation and the training order."
    ),
    threads: int = typer.Option(
        1, "--threads", help="torch CPU threads; one is fastest for this tiny model on a busy machine."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print report.json instead of the table."),
    smoke: bool = typer.Option(False, "--smoke", hidden=True, help="Seconds-long plumbing check (tests)."),
) -> None:
    """Train a tiny MEMENTO model from scratch on the CPU and show the KV sawtooth.

    Training budgets are optimizer steps: the same --seed and --threads give the same report
    numbers on any machine (only the timings differ). Re-running with the same --out resumes after
    the last finished stage."""
    from memento.console import console as make_console
    from memento.toy.demo import DemoConfig, Ui, run_demo
    from memento.user_errors import check_output_dir, reported

    profile = "smoke" if smoke else "quick" if quick else "default"
    with reported("demo", resume=f"rerun the same command to resume after the last finished stage in {out}"):
        check_output_dir(out, "--out")
        cfg = DemoConfig(out=out, profile=profile, scale=scale, seed=seed, threads=threads)
        # Bound to the real stream (the demo silences library prints by redirecting sys.stdout);
        # as wide as its content when piped, so the report table is never cut.
        console = make_console(stderr=as_json)
        report = run_demo(cfg, Ui(console=console))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        console.print(
            f"report: {out / 'report.md'} · models: {out / 'model-memento'}, {out / 'model-control'}"
        )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
