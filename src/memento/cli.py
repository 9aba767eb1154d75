"""The `memento` command. Each subcommand lives next to the code it drives and registers itself
here; heavy imports (torch, transformers) happen inside the commands so `--help` stays fast."""

from __future__ import annotations

import typer

from memento import __version__
from memento.console import plain_help_when_piped
from memento.cpu_numerics import pin_cpu_numerics
from memento.user_errors import fail

app = typer.Typer(
    name="memento",
    help="MEMENTO block reasoning: annotate, train, generate with KV eviction, evaluate, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


plain_help_when_piped(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memento {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """MEMENTO block reasoning toolkit."""
    try:  # before any command loads torch; a no-op unless MEMENTO_CPU_NUMERICS=avx2
        pin_cpu_numerics()
    except ValueError as exc:
        fail(str(exc))


def _register_commands() -> None:
    from memento import kv_cli
    from memento.annotate import cli as annotate_cli
    from memento.engine import cli as engine_cli
    from memento.eval import cli as eval_cli
    from memento.integrations.vllm import cli as vllm_cli
    from memento.probe import cli as probe_cli
    from memento.serve import cli as serve_cli
    from memento.toy import cli as toy_cli
    from memento.train import cli as train_cli
    from memento.train.rl import cli as rl_cli

    for module in (
        kv_cli,
        eval_cli,
        train_cli,
        rl_cli,
        annotate_cli,
        toy_cli,
        engine_cli,
        vllm_cli,
        serve_cli,
        probe_cli,
    ):
        module.register(app)


_register_commands()
