"""CLI output helpers: one-line errors with an exit code, and progress bars only on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def one_line(message: str) -> str:
    """`message` on one line: the lines of a multi-line message joined with '; '."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def error_line(message: str) -> str:
    return f"expertmesh: error: {one_line(message)}"


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print `expertmesh: error: MESSAGE` (one line) on stderr and exit with `code` (2: bad input)."""
    typer.echo(error_line(message), err=True)
    raise typer.Exit(code)


class StreamedText:
    """Text printed on stdout as it arrives (flushed piece by piece), when `enabled` (else `write` does nothing).
    Used as a context: leaving it closes the line, if anything was printed, before an error message or Ctrl-C's
    goes out."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.wrote = False
        self._open = False

    def write(self, text: str) -> None:
        if text and self.enabled:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.wrote = self._open = True

    def __enter__(self) -> StreamedText:
        return self

    def __exit__(self, *exc) -> None:
        if self._open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._open = False


@contextmanager
def progress_reporter(enabled: bool) -> Iterator:
    """Yields progress(label, done, total) that draws on stderr when it is a terminal and `enabled`, else no-op."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def report(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        yield report
