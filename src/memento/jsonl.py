"""Reading JSON Lines with errors that name the file and line, so a user can fix the input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[str, object]]:
    """Yield `(where, record)` for each non-blank line, `where` being `"path:line"`.

    An unreadable file, a line that is not UTF-8 text (e.g. a binary file) or not JSON raises
    ValueError naming it (`what` says which kind of file it was, e.g. "benchmark file"). Records
    are not checked: callers validate them.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{path}: is a directory, expected a {what} (JSON Lines)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{where}: not UTF-8 text (byte {exc.start}); expected a {what} in JSON Lines"
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON: {exc}") from None
        yield where, record
