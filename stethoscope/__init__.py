"""stethoscope: listen to machines and say when one sounds wrong."""

from __future__ import annotations

__version__ = "0.1.0"

from stethoscope.errors import (  # noqa: E402
    AudioError,
    DataError,
    DownloadError,
    ModelFileError,
    StethoscopeError,
)

__all__ = [
    "__version__",
    "Detector",
    "StethoscopeError",
    "AudioError",
    "DataError",
    "ModelFileError",
    "DownloadError",
]


def __getattr__(name: str):
    # Lazy so that `import stethoscope` stays fast and light for the CLI's --help.
    if name == "Detector":
        from stethoscope.detector import Detector

        return Detector
    raise AttributeError(f"module 'stethoscope' has no attribute {name!r}")
