"""Rich consoles for command output that is never cut when piped or redirected.

On a terminal rich lays tables and text out to the terminal's width. Anywhere else (a pipe, a
file, CI logs) rich would assume 80 columns and shorten cells with "…" — numbers included — so
there the console is as wide as the content instead.
"""

from __future__ import annotations

import sys

_UNBOUNDED = 10_000  # columns: wider than any table we print, so nothing is ever shortened


def console(stderr: bool = False):
    """A rich Console on stdout (or stderr): terminal width on a TTY, unbounded otherwise."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(file=stream)
    return Console(file=stream, width=_UNBOUNDED, soft_wrap=True)


def plain_help_when_piped(app) -> None:
    """When stdout is not a terminal (a pipe, a file, a test runner), make a Typer app print plain
    click help and usage errors laid out 200 columns wide, instead of rich boxes that cut flag
    names and descriptions to 80 columns."""
    if not sys.stdout.isatty():
        app.rich_markup_mode = None
        app.info.context_settings = {**(app.info.context_settings or {}), "terminal_width": 200,
                                     "max_content_width": 200}  # fmt: skip
