"""Kept audio: uploads saved for ``--keep-audio N`` days (for their images), bounded in
total size, swept regularly; the store forgets what the sweep deletes."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from stethoscope.atomic import pid_alive

log = logging.getLogger("stethoscope.service")
AUDIO_KEY = re.compile(r"[0-9a-f]{32}")


def spool_folder(folder: Path) -> Path:
    """Where uploads wait for their decoding: a private folder in ``/dev/shm`` (memory)
    when it is there and writable, else ``folder/tmp``. (On the disk, spool files get
    flushed along with every commit's fsync, ext4 ordering data before its journal.)"""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        for old in shm.glob("stethoscope-spool-*"):  # of servers killed with kill -9
            pid = old.name.split("-")[2]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f"stethoscope-spool-{os.getpid()}-", dir=shm))
    local = folder / "tmp"
    local.mkdir(parents=True, exist_ok=True)
    return local


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
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tmp = spool_folder(self.folder)

    @property
    def enabled(self) -> bool:
        return self.keep_days > 0

    def close(self) -> None:
        """Remove the spool folder (when it is this keeper's own, in memory)."""
        if self.tmp.name.startswith("stethoscope-spool-"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def keep(self, data: bytes) -> str | None:
        """Keep an upload's audio (written, flushed to disk, renamed into place); returns
        its key, or None when audio is not kept."""
        if not self.enabled:
            return None
        key = uuid.uuid4().hex
        final = self.path_for(key)
        partial = final.with_suffix(".partial")
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, final)
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
        strays = [*self.tmp.glob("*.wav"), *self.folder.glob("*.partial")]
        for stray in strays:  # left by a crash mid-upload
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
