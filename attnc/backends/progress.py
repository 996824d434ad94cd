"""What a person sees while attnc works: a one-line status for a compile that takes long, and a progress bar
for `attnc compile`. Both are drawn only on an interactive stderr; in a pipe, a log file or a test they print
nothing, so output meant for programs stays clean. rich is imported only when something is drawn."""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from rich.console import Console

STATUS_DELAY_S = 1.0  # a compile shorter than this shows nothing: a status that flashes is noise

# progress(done, total, label): `done` of `total` kernels are built; `label` names the one being built next.
Progress = Callable[[int, int, str], None]


def stderr_console() -> Console | None:
    """A rich console on stderr when stderr is an interactive terminal, else None."""
    isatty = getattr(sys.stderr, "isatty", None)
    if isatty is None or not isatty():
        return None
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    return console if console.is_terminal else None


@contextmanager
def status(message: str, delay: float | None = None) -> Iterator[None]:
    """A one-line status with a spinner while the block runs, shown once it has run `delay` seconds
    (STATUS_DELAY_S) and cleared when it ends; nothing without a terminal."""
    console = stderr_console()
    if console is None:
        yield
        return
    spinner = console.status(message, spinner="dots")
    timer = threading.Timer(STATUS_DELAY_S if delay is None else delay, spinner.start)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a start already under way finishes before the stop
        spinner.stop()


@contextmanager
def kernel_bar(what: str) -> Iterator[Progress | None]:
    """A progress bar over the kernels of a build, with the kernel being built, the count and an ETA, as a
    `Progress` callback for the builder; None (report nothing) without a terminal."""
    console = stderr_console()
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, SpinnerColumn, TextColumn, \
        TimeElapsedColumn, TimeRemainingColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Bar(*columns, console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)

        def report(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{what}: {label}")

        yield report
