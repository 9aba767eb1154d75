"""User mistakes at the command line: one line naming what is wrong, exit 2, never a traceback.

Every command checks its arguments and inputs *before* it loads a model or writes anything, so a
typo costs a second and leaves nothing behind that could block the corrected rerun. The checks
shared by several commands live here (model directories, devices, dtypes, counts, output
folders); `reported()` turns a `UsageError` (or any ValueError/OSError a config or reader raises)
into the one line, and Ctrl-C into a short line that says how to resume, exit 130.

Commands join by wrapping their body: ``with reported("eval", resume="rerun the same command"):``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

DTYPES = ("float32", "bfloat16", "float16")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class UsageError(ValueError):
    """A mistake the user can fix; the message names the flag, file:line or key and the fix."""


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr (one line) and exit 2."""
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


@contextmanager
def reported(command: str, *, resume: str | None = None) -> Iterator[None]:
    """Run a command body: user errors become `error: ...` + exit 2, Ctrl-C becomes
    `memento COMMAND: interrupted; RESUME` + exit 130 (both on stderr, no traceback)."""
    try:
        yield
    except KeyboardInterrupt:
        hint = f"; {resume}" if resume else ""
        typer.echo(f"\nmemento {command}: interrupted{hint}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (ValueError, OSError) as exc:  # UsageError, config validation, unreadable paths
        fail(str(exc) or type(exc).__name__)


# --- checks shared by several commands ------------------------------------------------------


def check_count(value: int | None, flag: str, minimum: int = 1) -> None:
    """`flag` must be an integer >= minimum (None = not given, fine)."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")


def check_dtype(dtype: str, flag: str = "--dtype") -> str:
    if dtype not in DTYPES:
        raise UsageError(f"{flag} {dtype!r} is not a dtype; use one of {', '.join(DTYPES)}")
    return dtype


def check_device(device: str, flag: str = "--device") -> str:
    """cpu, cuda, cuda:N (or mps), and only if this machine has it."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"{flag} {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{flag} {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"{flag} {device!r}: unsupported device type; use cpu, cuda or cuda:N")
    return device


def check_model_dir(path: str | Path, flag: str = "--model") -> Path:
    """A local Hugging Face model folder (config.json + tokenizer files). Nothing is downloaded:
    a hub id gets told so at once instead of retrying the network."""
    p = Path(path)
    if not p.exists():
        hub_like = not p.is_absolute() and str(path).count("/") == 1 and not str(path).startswith(".")
        hint = (
            f"memento loads models from local directories only and downloads nothing; fetch it first "
            f"(e.g. `hf download {path} --local-dir DIR`) and pass DIR"
            if hub_like
            else "pass the directory that holds config.json and the tokenizer files"
        )
        raise UsageError(f"{flag} {path}: no such directory; {hint}")
    if not p.is_dir():
        raise UsageError(
            f"{flag} {path}: is a file; pass the directory that holds config.json and the tokenizer"
        )
    config = p / "config.json"
    if not config.is_file():
        raise UsageError(f"{flag} {path}: not a model directory (no config.json)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{config}: not a readable JSON model config ({exc})") from None
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise UsageError(f"{flag} {path}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    return p


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> Path:
    """Where a command writes: a folder, or a path that does not exist yet (not a file)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a directory")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
    return p


def check_input_file(path: str | Path, flag: str) -> Path:
    """An existing, readable, non-empty regular file."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, expected a file")
    try:
        with p.open("rb") as fh:
            empty = not fh.read(1)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read ({exc.strerror})") from None
    if empty:
        raise UsageError(f"{flag} {path}: the file is empty")
    return p
