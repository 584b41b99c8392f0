"""Settings of one service instance, checked once, shared by the app, the store and the CLI."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from stethoscope.service.errors import ServiceError

DEFAULT_DATA_DIR = Path("stethoscope-service")
MAX_KEEP_AUDIO_DAYS = 365.0
MAX_UPLOAD_MB = 512.0


def default_db_url(data_dir: str | Path) -> str:
    """The embedded store: a SQLite file in the data folder."""
    return f"sqlite:///{Path(data_dir) / 'store.db'}"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses no other machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServiceSettings:
    """Everything ``stethoscope serve`` is told.

    Parameters
    ----------
    models_dir : folder with one model folder per machine, ``DIR/<machine>/config.json``.
    db_url : SQLAlchemy URL of the store; default a SQLite file in ``data_dir``.
    data_dir : folder for the default store and the kept audio.
    host, port : where to listen (port 0: a free port, printed at start).
    keep_audio_days : keep each upload's audio this many days (0: keep none), for the
        spectrogram and deviation images; at most 365.
    audio_max_mb : bound on the kept audio; the oldest files go first beyond it.
    max_upload_mb : largest accepted upload.
    rate_limit, rate_burst : requests per second per token, and the burst allowed.
    silent_after_s : a machine with no recording for this long is "silent".
    commit_batch : most results committed in one transaction (each still before its reply).
    access_log : log every request to stderr (never with its token).
    scoring_processes : 0 scores on one thread of the server process; N > 0 in N worker
        processes, each with its own copy of the models.
    """

    models_dir: Path
    db_url: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    host: str = "127.0.0.1"
    port: int = 8080
    keep_audio_days: float = 0.0
    audio_max_mb: float = 2048.0
    max_upload_mb: float = 32.0
    rate_limit: float = 50.0
    rate_burst: int = 100
    silent_after_s: float = 900.0
    commit_batch: int = 256
    access_log: bool = False
    scoring_processes: int = 0

    def __post_init__(self) -> None:
        self.models_dir = Path(self.models_dir)
        self.data_dir = Path(self.data_dir)
        if self.db_url is None:
            self.db_url = default_db_url(self.data_dir)
        _check_range("--keep-audio", self.keep_audio_days, 0.0, MAX_KEEP_AUDIO_DAYS, "days")
        _check_range("--max-upload-mb", self.max_upload_mb, 0.001, MAX_UPLOAD_MB, "MB")
        _check_range("--audio-max-mb", self.audio_max_mb, 1.0, 10_000_000.0, "MB")
        _check_range("--rate-limit", self.rate_limit, 0.01, 1_000_000.0, "requests/s")
        _check_range("--rate-burst", self.rate_burst, 1, 1_000_000, "requests")
        _check_range("--silent-after", self.silent_after_s, 1.0, 365 * 86400.0, "s")
        _check_range("--port", self.port, 0, 65535, "")
        _check_range("commit batch", self.commit_batch, 1, 10_000, "results")
        _check_range("--scoring-processes", self.scoring_processes, 0, 64, "")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def audio_dir(self) -> Path:
        return self.data_dir / "audio"


def _check_range(name: str, value: float, low: float, high: float, unit: str) -> None:
    if not low <= value <= high:
        raise ServiceError(f"{name} must be between {low:g} and {high:g} {unit}, not "
                           f"{value:g}".rstrip())
