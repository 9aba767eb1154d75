"""Reading JSON Lines with errors that name the file and line, so a user can fix the input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[str, object]]:
    """Yield `(where, record)` for each non-blank line, `where` being `"path:line"`.

    An unreadable file or a line that is not JSON raises ValueError naming it (`what` says which
    kind of file it was, e.g. "benchmark file"). Records are not checked: callers validate them.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what}: {exc}") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON: {exc}") from exc
        yield where, record
