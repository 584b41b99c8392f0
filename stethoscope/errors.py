"""Exceptions with one-line messages that name the file and the problem.

The CLI prints ``str(error)`` of any :class:`StethoscopeError` as a single line and exits 2.
"""

from __future__ import annotations

from pathlib import Path


class StethoscopeError(Exception):
    """Base class: a problem the user can fix (bad input, wrong model file, missing data)."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        message = problem if path is None else f"{path}: {problem}"
        super().__init__(" ".join(message.split()))


class AudioError(StethoscopeError):
    """A WAV file cannot be used: unreadable, truncated, silent, NaN, wrong sample rate."""


class DataError(StethoscopeError):
    """A data set or array cannot be used: empty folder, wrong shape, mismatched features."""


class ModelFileError(StethoscopeError):
    """A saved model cannot be loaded: missing files, another format version, bad weights."""


class DownloadError(StethoscopeError):
    """A download failed: offline, bad checksum, server error."""


class ConfigError(StethoscopeError):
    """A setting cannot be used: unknown device or precision, CUDA absent, bad option value."""
