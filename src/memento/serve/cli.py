"""`memento serve MODEL`: the OpenAI-compatible server over the evicting engine."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

import typer

from memento.user_errors import UsageError, check_count, check_device, check_dtype, check_model_dir, fail

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _masking(text: str, mode: str):
    from memento.masking import MODES, BlockMaskingConfig

    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--memento-config: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--memento-config: expected a JSON object, got {type(values).__name__}")
    try:
        masking = BlockMaskingConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--memento-config: {exc}") from None
    if mode == "memento" and masking.restart_mode:
        raise UsageError("--memento-config: restart_mode=true needs --mode restart")
    return masking


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so a busy port is a clear error before the model loads."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        fail(f"--host {host} --port {port}: cannot listen there ({reason})")
    sock.set_inheritable(True)
    return sock


def serve(
    model: Path = typer.Argument(..., help="Directory with an HF causal LM and its tokenizer."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (local only by default)."),
    port: int = typer.Option(8000, "--port", help="Port (0 picks a free one)."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="MEMENTO_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*."
    ),
    kv_budget_tokens: int | None = typer.Option(
        None, "--kv-budget-tokens", help="Cap on cached tokens over all running requests (default: none)."
    ),
    max_batch_size: int = typer.Option(16, "--max-batch-size", help="Most sequences decoded per step."),
    mode: str = typer.Option(
        "memento", "--mode", help="full | memento | restart (per request: memento.mode)."
    ),
    memento_config: str = typer.Option(
        "{}",
        "--memento-config",
        help='Default block-masking options as JSON, e.g. \'{"keep_last_n_blocks": 0}\' (per request: "memento").',
    ),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="Model name clients use (default: MODEL as given)."
    ),
    max_model_len: int | None = typer.Option(
        None, "--max-model-len", help="Longest prompt + completion (default: the model's max positions)."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models) with a live
    KV dashboard at /, /health and Prometheus /metrics."""
    try:
        check_dtype(dtype)
        check_count(kv_budget_tokens, "--kv-budget-tokens", 2)
        check_count(max_batch_size, "--max-batch-size")
        check_count(max_model_len, "--max-model-len", 2)
        check_count(threads, "--threads")
        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {port}")
        if log_level.lower() not in LOG_LEVELS:
            raise UsageError(f"--log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key must not be empty")
        check_model_dir(model, "MODEL")
        masking = _masking(memento_config, mode)
        check_device(device)
    except UsageError as exc:
        fail(str(exc))
    sock = _bind(host, port)

    import uvicorn

    from memento.engine import Engine
    from memento.serve.app import ServerSettings, create_app
    from memento.serve.worker import EngineWorker

    def load() -> Engine:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        return Engine.from_pretrained(
            model,
            mode=mode,
            masking=masking,
            dtype=dtype,
            device=device,
            kv_budget_tokens=kv_budget_tokens,
            max_batch_size=max_batch_size,
        )

    server: uvicorn.Server | None = None
    failure: list[str] = []

    def on_dead(message: str) -> None:
        if worker.engine is None:  # nothing to serve: stop; a later engine failure keeps /health at 503
            failure.append(message)
            if server is not None:
                server.should_exit = True

    worker = EngineWorker(load, on_dead=on_dead)
    name = served_model_name or str(model)
    settings = ServerSettings(
        model_name=name, mode=mode, masking=masking, api_key=api_key, max_model_len=max_model_len
    )
    app = create_app(worker, settings)
    bound_host, bound_port = sock.getsockname()[:2]
    typer.echo(
        f"memento serve: http://{bound_host}:{bound_port} (dashboard at /), model {name!r}, mode {mode}, "
        f"KV budget {kv_budget_tokens or 'none'}, max batch {max_batch_size}; loading the model...",
        err=True,
    )
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after a graceful shutdown
        typer.echo("memento serve: stopped", err=True)
        raise typer.Exit(130) from None
    if failure:
        typer.echo(f"error: {failure[0]}", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command(name="serve")(serve)
