"""Where uploads are decoded and scored: one thread of the server process (default), or
a pool of worker processes, each with its own copy of the models (``--scoring-processes``).

Worker processes score in parallel without sharing the server's GIL; the upload's bytes
travel to them through a pipe (about 0.1 ms for a 10 s clip) and the result comes back.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from stethoscope.errors import StethoscopeError
from stethoscope.service.machines import MachineModel


class UploadRejected(Exception):
    """An upload the service will not score: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class Scored:
    """What scoring an upload gave, before it is stored."""

    score: float
    anomalous: bool
    windows: list[dict]
    duration_s: float
    seconds: float


def score_file(machine: MachineModel, path: Path, label: str) -> Scored:
    """Decode and score one spooled upload with the machine's model; errors become
    :class:`UploadRejected` with the detector's one-line message, naming the upload rather
    than the spool file."""
    from stethoscope.audio import read_wav

    det = machine.detector
    cfg = det.feature_config_
    start = time.perf_counter()
    try:
        with machine.lock:
            wave, rate = read_wav(path, channels="all", sample_rate=cfg.sample_rate,
                                  resample=cfg.resample)
            result = det.score_waveform(wave, rate, source=label)
    except StethoscopeError as err:
        message = f"{label}: {err.problem}" if err.path == path else str(err)
        raise UploadRejected(422, message) from None
    if not result.ok or result.score is None or not math.isfinite(result.score):
        raise UploadRejected(422, f"{label}: {result.error or 'its score is not finite'}")
    windows = [w.to_dict() for w in result.windows]
    return Scored(float(result.score), bool(result.anomalous), windows,
                  float(wave.shape[-1] / rate), time.perf_counter() - start)


def score_bytes(machine: MachineModel, data: bytes, label: str, spool: Path) -> Scored:
    """:func:`score_file` on bytes: spooled to a file of their own in ``spool`` (the WAV
    reader checks files), deleted afterwards."""
    path = spool / f"{uuid.uuid4().hex}.wav"
    try:
        with open(path, "wb") as handle:
            handle.write(data)
        return score_file(machine, path, label)
    finally:
        path.unlink(missing_ok=True)


class ThreadScorer:
    """One scoring thread in the server process: the log-mel front end already spreads one
    clip over the cores and serialises its calls, so more threads only queue (measured)."""

    def __init__(self, fleet: dict[str, MachineModel], spool: Path) -> None:
        self.fleet = fleet
        self.spool = spool
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="stethoscope-score")

    async def start(self) -> None:
        return None

    async def score(self, machine: str, data: bytes, label: str) -> Scored:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, score_bytes, self.fleet[machine],
                                          data, label, self.spool)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


# ------------------------------------------------------------------ worker processes
_WORKER: dict = {}


def _start_worker(models_dir: str) -> None:
    import multiprocessing.util

    import torch

    from stethoscope.service.machines import load_fleet

    torch.set_num_threads(1)  # one core each: the processes are the parallelism
    _exit_with_parent()
    _WORKER["fleet"] = load_fleet(models_dir)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    spool = Path(tempfile.mkdtemp(prefix=f"stethoscope-spool-{os.getpid()}-", dir=base))
    _WORKER["spool"] = spool
    multiprocessing.util.Finalize(None, shutil.rmtree, args=(spool, True), exitpriority=10)


def _exit_with_parent() -> None:
    """End this worker when the server dies, even by ``kill -9`` (the pool's pipes do not
    tell the workers: they hold both ends)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="stethoscope-parent-watch", daemon=True).start()


def _score_in_worker(machine: str, data: bytes, label: str) -> tuple:
    try:
        return ("ok", score_bytes(_WORKER["fleet"][machine], data, label, _WORKER["spool"]))
    except UploadRejected as err:
        return ("rejected", err.status, err.message)


def _ready() -> int:
    return os.getpid()


class ProcessScorer:
    """``processes`` worker processes (spawned: no fork of a process holding threads),
    each loading every model of ``models_dir`` once."""

    def __init__(self, models_dir: Path, processes: int) -> None:
        import multiprocessing

        self.processes = processes
        self.executor = ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(str(models_dir),))

    async def start(self) -> None:
        """Start every worker and wait until each has loaded the models."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.executor, _ready)
                               for _ in range(self.processes * 2)))

    async def score(self, machine: str, data: bytes, label: str) -> Scored:
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(self.executor, _score_in_worker, machine, data,
                                             label)
        if outcome[0] == "rejected":
            raise UploadRejected(outcome[1], outcome[2])
        return outcome[1]

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
