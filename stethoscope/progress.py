"""The one progress bar: rich, on stderr, with one documented switch.

Progress is shown unless ``STETHOSCOPE_PROGRESS`` is ``0``, ``false``, ``no`` or ``off``
(any case), the process asked for quiet (:func:`set_quiet`, the CLI's ``--quiet``), or the
caller passes ``enabled=False``. Bars always go to stderr, so stdout carries results only.

>>> with progress_bar(3, "counting", enabled=False) as bar:
...     for _ in range(3):
...         bar.advance()
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

SWITCH = "STETHOSCOPE_PROGRESS"
_OFF_VALUES = {"0", "false", "no", "off"}
_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Turn every progress bar of this process off (``--quiet``), or back on."""
    global _quiet
    _quiet = bool(quiet)


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether a bar shows: the caller's choice (None: yes), unless quiet or switched off."""
    if _quiet or enabled is False:
        return False
    return os.environ.get(SWITCH, "1").strip().lower() not in _OFF_VALUES


class _Bar:
    """``advance(n, status)`` on a rich task, or nothing when the bar is off."""

    def __init__(self, bar=None, task=None) -> None:
        self._bar, self._task = bar, task

    def advance(self, n: float = 1, status: str | None = None) -> None:
        if self._bar is not None:
            fields = {} if status is None else {"status": status}
            self._bar.update(self._task, advance=n, **fields)


@contextmanager
def progress_bar(total: float | None, description: str, *, enabled: bool | None = None,
                 unit: str = "items", done: float = 0) -> Iterator[_Bar]:
    """A progress bar over ``total`` steps (``unit="bytes"``: sizes and speed) on stderr.

    Parameters
    ----------
    total : number of steps, or None when unknown.
    description : the label in front of the bar.
    enabled : False turns it off; None follows :func:`progress_enabled`.
    unit : ``"items"`` (count, status text, ETA) or ``"bytes"`` (sizes, speed, ETA).
    done : steps already done (a resumed download).
    """
    if not progress_enabled(enabled):
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if unit == "bytes":
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn())
    else:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                   TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, completed=done, status="")
        yield _Bar(bar, task)
