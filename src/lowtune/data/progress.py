"""A progress bar for long reads: shown only for large files, so that small runs and tests print nothing extra."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

LARGE_FILE_BYTES = 64 << 20  # files from this size get a bar (at ~80,000 records/s, a few seconds of reading)


@contextmanager
def read_progress(path: Path, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """Yields `update(done)`; draws a bar on stderr while a file of LARGE_FILE_BYTES or more is read.

    Args:
        path: the file (its size decides whether a bar is drawn).
        total: what `done` counts up to: the file's bytes, or its rows.
        unit: "bytes" or "rows", shown beside the count.
    """
    if path.stat().st_size < LARGE_FILE_BYTES:
        yield lambda done: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit))
    with Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"reading {path.name}", total=total)
        yield lambda done: progress.update(task, completed=done)
