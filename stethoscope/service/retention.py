"""Kept audio: uploads saved for ``--keep-audio N`` days (for their images), bounded in
total size, swept regularly; the store forgets what the sweep deletes."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path

log = logging.getLogger("stethoscope.service")
AUDIO_KEY = re.compile(r"[0-9a-f]{32}")


class AudioKeeper:
    """Upload files in one folder, named by a random key (never by anything a client sent).

    Parameters
    ----------
    folder : where kept audio and in-flight uploads live (``tmp/`` inside).
    keep_days : how long to keep each upload; 0 keeps none.
    max_bytes : bound on the kept audio; the oldest go first beyond it.
    """

    def __init__(self, folder: Path, keep_days: float, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.keep_days = float(keep_days)
        self.max_bytes = int(max_bytes)
        self.tmp = self.folder / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.keep_days > 0

    def spool(self, data: bytes) -> Path:
        """Write an upload to a temporary file of its own (the caller deletes or keeps it)."""
        path = self.tmp / f"{uuid.uuid4().hex}.wav"
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def keep(self, spooled: Path) -> str | None:
        """Keep a spooled upload (moved into place, flushed to disk); returns its key, or
        None (and deletes it) when audio is not kept."""
        if not self.enabled:
            spooled.unlink(missing_ok=True)
            return None
        key = spooled.stem
        with open(spooled, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(spooled, self.path_for(key))
        return key

    def path_for(self, key: str) -> Path:
        if not AUDIO_KEY.fullmatch(key):
            raise ValueError("not an audio key")
        return self.folder / f"{key}.wav"

    def sweep(self, store, now: float | None = None) -> int:
        """Delete kept audio older than ``keep_days`` or beyond ``max_bytes`` (oldest
        first), and stray temporary files; the store forgets deleted keys. Returns how
        many files were deleted."""
        now = time.time() if now is None else now
        for stray in self.tmp.glob("*.wav"):  # left by a crash mid-upload
            if now - stray.stat().st_mtime > 3600:
                stray.unlink(missing_ok=True)
        files = sorted(((p.stat().st_mtime, p.stat().st_size, p)
                        for p in self.folder.glob("*.wav")), key=lambda f: f[0])
        cutoff = now - self.keep_days * 86400
        total = sum(size for _, size, _ in files)
        doomed = []
        for mtime, size, path in files:
            if mtime < cutoff or total > self.max_bytes:
                doomed.append(path)
                total -= size
        for path in doomed:
            path.unlink(missing_ok=True)
        expired = store.audio_keys_before(int(cutoff * 1000))
        store.forget_audio(sorted({p.stem for p in doomed} | set(expired)))
        if doomed:
            log.info("kept audio: deleted %d file(s)", len(doomed))
        return len(doomed)
