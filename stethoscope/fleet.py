"""A fleet of machines: one model per machine of a MIMII or DCASE tree, trained and scored in
parallel on a local process pool or a Dask cluster.

>>> fleet = find_machines("data/")                                   # doctest: +SKIP
>>> results = train_fleet(fleet, "models/", engine="dask", workers=4)  # doctest: +SKIP
>>> rows, failures = score_fleet(fleet, "models/", "scores.parquet")   # doctest: +SKIP

A machine is one ``<type>/id_XX`` (MIMII, DCASE 2020) or ``<type>/section_XX`` (DCASE
2021-2024), named ``<type>_id_XX`` or ``<type>_section_XX``. Its model is written to
``MODELS/<machine>/``, the layout ``stethoscope serve --models`` reads.

How the work is divided
-----------------------
* The **driver** (the calling process) finds the machines, hands out one job per machine
  and writes what comes back: model folders, and the score table.
* A **worker** gets a job as plain data: recording paths and Detector settings; for scoring,
  also the model folder's files as bytes. It reads and decodes the WAVs, extracts features,
  trains or scores with :class:`stethoscope.Detector`, and returns plain data: numbers,
  strings, and a model as its ``config.json`` + ``model.safetensors`` bytes. A live Detector
  or torch module is never pickled.
* Every job pins torch, OpenMP and the BLAS libraries (also those loaded later) to
  ``threads`` threads (default 1), so N workers on N cores do not fight over them.
* A job that fails (bad audio, too few clips, a worker process that died) becomes that
  machine's error; the other machines go on.

Engines: ``local`` is ``concurrent.futures.ProcessPoolExecutor`` (spawned processes).
``dask`` is ``dask.distributed``: a ``LocalCluster`` of worker processes, or the scheduler at
``address`` for a real cluster, whose workers must have stethoscope installed and see the
recordings under the same paths. Dask is the distributed engine; docs/scale.md gives the
measured reasons, and the choice against Ray.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stethoscope.datasets import Clip, find_clips
from stethoscope.errors import DataError, ModelFileError, StethoscopeError

ENGINES = ("local", "dask")
TABLE_COLUMNS = ("machine", "path", "score", "threshold", "anomalous", "label", "error")
TABLE_SUFFIXES = (".csv", ".parquet")
MODEL_FILES = ("config.json", "model.safetensors")


# ----------------------------------------------------------------------------- machines


@dataclass(frozen=True)
class Machine:
    """One machine of a fleet: its recordings for training and for scoring.

    ``test_labels`` holds 0 (normal), 1 (anomalous) or None (unknown) per test recording.
    """

    name: str
    folder: Path
    train: tuple[Path, ...]
    test: tuple[Path, ...] = ()
    test_labels: tuple[int | None, ...] = ()

    @property
    def held_out_normal(self) -> tuple[Path, ...]:
        """Test recordings known to be normal: the false-alarm rate is measured on them."""
        return tuple(p for p, label in zip(self.test, self.test_labels, strict=True)
                     if label == 0)


@dataclass(frozen=True)
class Fleet:
    """The machines found under ``root``, and the recordings that name no machine."""

    root: Path
    machines: tuple[Machine, ...]
    ignored: tuple[Path, ...] = ()

    def names(self) -> list[str]:
        return [m.name for m in self.machines]


def machine_name(clip: Clip) -> str | None:
    """``<type>_section_XX`` (DCASE 2021-2024) or ``<type>_id_XX`` (MIMII, DCASE 2020), or
    None when the path names no machine."""
    if not clip.machine:
        return None
    if clip.section is not None:
        return f"{clip.machine}_section_{clip.section}"
    if clip.machine_id is not None:
        return f"{clip.machine}_{clip.machine_id}"
    return None


def _machine_folder(clip: Clip) -> Path:
    """MIMII: ``<type>/id_XX``; DCASE: ``<type>`` (the folder above train/ and test/)."""
    return clip.path.parent.parent


def find_machines(root: str | Path) -> Fleet:
    """Every machine under ``root`` with its training and test recordings.

    * DCASE layouts: ``train/`` recordings train, ``test/`` (also ``source_test/``,
      ``target_test/``) are scored; ``supplemental/`` is ignored.
    * MIMII: the last ``min(#abnormal, #normal // 2)`` normal clips and every abnormal clip
      are the test set, the other normal clips train (as ``benchmarks/quality.py`` splits).

    Raises
    ------
    DataError
        when ``root`` holds no recording of either layout, or when two folders hold the
        same machine (say, MIMII's ``-6dB_fan`` and ``6dB_fan``: point ``root`` at one).
    """
    root = Path(root)
    groups: dict[str, list[Clip]] = {}
    folders: dict[str, Path] = {}
    ignored: list[Path] = []
    for clip in find_clips(root):
        name = machine_name(clip)
        is_dcase = clip.section is not None or clip.split is not None
        if name is None or (is_dcase and clip.split not in ("train", "test")):
            ignored.append(clip.path)
            continue
        folder = folders.setdefault(name, _machine_folder(clip))
        if folder != _machine_folder(clip):
            raise DataError(f"two folders hold machine {name}: {folder} and "
                            f"{_machine_folder(clip)}; point the fleet at one of them", root)
        groups.setdefault(name, []).append(clip)
    if not groups:
        raise DataError("no machine recordings found: expected the MIMII layout "
                        "<type>/id_XX/{normal,abnormal}/*.wav or the DCASE layout "
                        "<type>/{train,test}/section_XX_*.wav", root)
    machines = tuple(_split(name, folders[name], clips) for name, clips in sorted(groups.items()))
    return Fleet(root, machines, tuple(ignored))


def _split(name: str, folder: Path, clips: list[Clip]) -> Machine:
    if any(c.split is not None for c in clips):  # DCASE: the folders say it
        train = [c for c in clips if c.split == "train"]
        test = [c for c in clips if c.split == "test"]
    else:  # MIMII: the held-out normal clips of benchmarks/quality.py
        normal = [c for c in clips if c.label == 0]
        abnormal = [c for c in clips if c.label == 1]
        n_test = min(len(abnormal), len(normal) // 2)
        train = normal[:len(normal) - n_test]
        test = normal[len(normal) - n_test:] + abnormal
    return Machine(name, folder, tuple(c.path for c in train), tuple(c.path for c in test),
                   tuple(c.label for c in test))


def _as_fleet(fleet: Fleet | str | Path) -> Fleet:
    return fleet if isinstance(fleet, Fleet) else find_machines(fleet)


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class TrainJob:
    """What a worker needs to train one machine's model: paths and settings, no objects."""

    machine: str
    train: tuple[str, ...]
    held_out: tuple[str, ...] = ()  # normal recordings not trained on: the false-alarm rate
    settings: dict = field(default_factory=dict)  # Detector keyword arguments
    threads: int = 1
    out: str | None = None  # the worker writes the model folder here (storage it shares)


@dataclass(frozen=True)
class TrainResult:
    """One machine's training: its summary, its model files, or the error that stopped it."""

    machine: str
    clips: int = 0
    fit_seconds: float | None = None
    threshold: float | None = None
    held_out: int = 0  # held-out normal recordings scored
    false_alarms: int | None = None  # of them, flagged anomalous
    model_files: dict[str, bytes] = field(default_factory=dict, repr=False)  # unless written
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def false_alarm_rate(self) -> float | None:
        """Share of held-out normal recordings flagged anomalous (None without any)."""
        if self.false_alarms is None or not self.held_out:
            return None
        return self.false_alarms / self.held_out

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (without the model bytes)."""
        data = asdict(self)
        data.pop("model_files")
        data["false_alarm_rate"] = self.false_alarm_rate
        return data


@dataclass(frozen=True)
class ScoreJob:
    """What a worker needs to score one machine's recordings: the model as file bytes, or
    the model folder's path on storage the worker shares."""

    machine: str
    model_files: dict[str, bytes] = field(repr=False)
    recordings: tuple[str, ...]
    labels: tuple[int | None, ...]
    device: str = "auto"
    threads: int = 1
    model_folder: str | None = None  # read here instead of model_files


@dataclass(frozen=True)
class ScoreResult:
    """One machine's table rows (one per recording), or the error that kept it unscored."""

    machine: str
    rows: tuple[dict, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> dict[str, Any]:
        """JSON-ready per-machine counts (the rows themselves are in the table)."""
        return {"machine": self.machine, "recordings": len(self.rows),
                "anomalous": sum(bool(row["anomalous"]) for row in self.rows),
                "not_scored": sum(row["error"] is not None for row in self.rows),
                "threshold": self.rows[0]["threshold"] if self.rows else None,
                "error": self.error}


def train_machine(job: TrainJob) -> TrainResult:
    """Train one machine's detector where its data is (runs in a worker).

    Fits ``Detector(**job.settings)`` on ``job.train``, scores ``job.held_out`` for the
    false-alarm rate, and writes the model folder ``job.out`` (atomically) or, without one,
    returns the model as file bytes. Any failure is returned as this machine's error, never
    raised: one machine's bad data must not stop the fleet.
    """
    pin_threads(job.threads)
    from stethoscope.detector import Detector

    try:
        detector = Detector(**{"progress": False, **job.settings})
        start = time.perf_counter()
        detector.fit(list(job.train))
        fit_seconds = time.perf_counter() - start
        held_out = false_alarms = None
        if job.held_out:
            scored = [r for r in detector.score_recordings(list(job.held_out)) if r.ok]
            held_out, false_alarms = len(scored), sum(bool(r.anomalous) for r in scored)
        summary = dict(clips=len(job.train), fit_seconds=fit_seconds,
                       threshold=float(detector.threshold_.value_), held_out=held_out or 0,
                       false_alarms=false_alarms if held_out else None)
    except Exception as error:  # noqa: BLE001 -- any failure is this machine's alone
        return TrainResult(job.machine, error=_one_line(error))
    if job.out is None:
        return TrainResult(job.machine, **summary, model_files=model_files(detector))
    try:
        detector.save(job.out)
    except (OSError, StethoscopeError) as error:
        return TrainResult(job.machine, error=f"cannot write its model ({_one_line(error)})")
    return TrainResult(job.machine, **summary)


def score_machine(job: ScoreJob) -> ScoreResult:
    """Score one machine's recordings with its model (runs in a worker).

    The model is read from ``job.model_folder`` or, without one, arrives as its files' bytes
    and is loaded from a temporary folder (never unpickled). Returns one row per recording;
    a recording that cannot be scored gets its error in the row, a model that cannot be
    used makes this machine's error.
    """
    pin_threads(job.threads)
    from stethoscope.detector import Detector

    try:
        if job.model_folder is not None:
            detector = Detector.load(job.model_folder, device=job.device, progress=False)
        else:
            with tempfile.TemporaryDirectory(prefix="stethoscope-fleet-") as tmp:
                folder = Path(tmp) / job.machine
                write_model_files(folder, job.model_files)
                detector = Detector.load(folder, device=job.device, progress=False)
        threshold = float(detector.threshold_.value_)
        results = detector.score_recordings(list(job.recordings), on_error="collect")
    except Exception as error:  # noqa: BLE001 -- any failure is this machine's alone
        return ScoreResult(job.machine, error=_one_line(error))
    rows = tuple({"machine": job.machine, "path": path, "score": r.score,
                  "threshold": threshold, "anomalous": r.anomalous, "label": label,
                  "error": r.error}
                 for path, label, r in zip(job.recordings, job.labels, results, strict=True))
    return ScoreResult(job.machine, rows)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "no message"
    return text if isinstance(error, StethoscopeError) else f"{type(error).__name__}: {text}"


_pinned: int | None = None


# The variables that OpenMP and the BLAS libraries read when they are loaded.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def pin_threads(threads: int) -> None:
    """Use ``threads`` threads in this worker process: torch's (which also sets the log-mel
    worker threads), and those of OpenMP and the BLAS libraries, both the ones loaded now
    (``threadpoolctl``) and the ones loaded later (their environment variables, which a
    library reads when it loads: scikit-learn's and SciPy's own OpenMP and OpenBLAS load at
    the first mixture fit, after this call). Without it N worker processes on N cores each
    start one thread per core and fight over them: measured 3x slower training with 2
    workers than with 1 on 2 cores (benchmarks/fleet.py, 140 clips a machine). Meant for
    worker processes: it sets this process's environment."""
    global _pinned
    if _pinned == threads:
        return
    import torch
    from threadpoolctl import threadpool_limits

    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    _pinned = threads


def model_files(detector) -> dict[str, bytes]:
    """A fitted detector as the bytes of its model files (``config.json``,
    ``model.safetensors``): what travels between driver and workers."""
    with tempfile.TemporaryDirectory(prefix="stethoscope-fleet-") as tmp:
        return read_model_files(detector.save(Path(tmp) / "model"))


def read_model_files(folder: str | Path) -> dict[str, bytes]:
    """A model folder's ``config.json`` and ``model.safetensors`` as bytes; ModelFileError
    naming what is missing."""
    folder = check_model_folder(folder)
    return {name: (folder / name).read_bytes() for name in MODEL_FILES}


def check_model_folder(folder: str | Path) -> Path:
    """``folder`` when it holds a model's files; ModelFileError naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError("no model for this machine (run `stethoscope fleet train` "
                             "first)", folder)
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelFileError(f"missing {', '.join(missing)}; not a complete model folder",
                             folder)
    return folder


def write_model_files(folder: str | Path, files: dict[str, bytes]) -> Path:
    """Write a model folder from its files' bytes through ``storage.save_model`` (one
    rename; an existing model is replaced only once the new one is complete). The weights
    are parsed by safetensors and the config as JSON: nothing is unpickled."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load as load_weights

    from stethoscope.storage import save_model

    try:
        config = json.loads(files["config.json"])
        state = load_weights(files["model.safetensors"])
    except (KeyError, ValueError, SafetensorError) as error:
        raise ModelFileError(f"the model files that came back are not usable ({error})",
                             folder) from None
    return save_model(folder, config, state)


# ----------------------------------------------------------------------------- engines


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


class LocalEngine:
    """Jobs on a pool of ``workers`` spawned processes on this computer."""

    name = "local"
    shares_files = True  # workers read and write the driver's folders themselves

    def __init__(self, workers: int, threads: int = 1) -> None:
        self.workers, self.threads = workers, threads
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalEngine:
        self._pool = self._new_pool()
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        # spawn, not fork: forking a process that has started torch's threads can deadlock.
        # Each job pins its threads itself (pin_threads), as on a Dask worker.
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def run(self, fn: Callable, jobs: Sequence) -> Iterator[tuple[Any, Any]]:
        """``(job, fn(job))`` as jobs finish, or ``(job, exception)`` for a job that killed
        its worker process (out of memory, a crash in native code).

        A dead worker breaks the whole pool, and every unfinished job with it. Those jobs
        are run again one at a time in a fresh pool, so that a death then is the job's
        own and the others still finish."""
        broken = []
        futures = {self._pool.submit(fn, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except BrokenProcessPool:
                broken.append(futures[future])
                continue
            yield futures[future], outcome
        for job in broken:
            self._restart()
            try:
                outcome = self._pool.submit(fn, job).result()
            except BrokenProcessPool as error:
                outcome = error
            yield job, outcome

    def _restart(self) -> None:
        """A fresh pool when the current one is broken (a worker died)."""
        if getattr(self._pool, "_broken", False):  # no public flag; submit() would raise
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = self._new_pool()


# Dask settings for the LocalCluster stethoscope starts (a cluster at an address keeps its
# own). Its defaults wake every process many times a second to watch event loops, memory
# and system load, and sample a profile every 10 ms: on a machine whose cores all run jobs
# that takes CPU from them. Measured on 2 cores (benchmarks/fleet.py, docs/scale.md): the
# sampling profiler cost 10-25 % of a training pass; the rest below cut an idle 2-worker
# cluster's CPU from 9 % of a core to 1.4 % and the driver's CPU per training pass by a
# third. Jobs here run for 0.1-10 s and report their own timings, so nothing is lost.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",     # event-loop health check (20 ms)
    "distributed.admin.tick.limit": "30s",       # warn of a blocked loop after (3 s)
    "distributed.admin.system-monitor.interval": "5s",   # for the dashboard (500 ms)
    "distributed.worker.memory.monitor-interval": "1s",  # spill/pause/kill checks (100 ms)
    "distributed.scheduler.active-memory-manager.start": False,  # results are small
    # one job at a time per one-thread worker, none waiting on it: a worker that finishes
    # takes the next job, as in a process pool, instead of one worker finishing its queued
    # job while the other idles (3-10 % shorter training passes, measured)
    "distributed.scheduler.worker-saturation": 1.0,
}


class DaskEngine:
    """Jobs on a Dask cluster: a new ``LocalCluster`` of ``workers`` processes (one thread
    each), or the scheduler at ``address``.

    ``shared_files``: whether the workers see the driver's folders (the recordings are read
    where they are in any case). True for a LocalCluster; for a cluster at ``address`` only
    when said (a shared filesystem), else models travel between driver and workers as file
    bytes and the driver writes them."""

    name = "dask"

    def __init__(self, workers: int, threads: int = 1, address: str | None = None,
                 shared_files: bool | None = None) -> None:
        self.workers, self.threads, self.address = workers, threads, address
        self.shares_files = address is None if shared_files is None else bool(shared_files)
        self._stack = contextlib.ExitStack()
        self.client = None

    def __enter__(self) -> DaskEngine:
        try:
            import dask
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise StethoscopeError("the dask engine needs dask.distributed: "
                                   "pip install 'stethoscope[fleet]'") from None
        with self._stack:
            if self.address:
                try:
                    self.client = self._stack.enter_context(Client(self.address, timeout=30))
                except (OSError, TimeoutError) as error:
                    raise StethoscopeError(f"cannot reach the Dask scheduler at "
                                           f"{self.address} ({_one_line(error)})") from None
            else:
                environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
                # Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which turns off stethoscope's
                # keep-freed-memory setting (measured 1.5-1.8x faster training,
                # stethoscope/runtime.py); the thread variables it sets stay.
                environ.pop("MALLOC_TRIM_THRESHOLD_", None)
                with dask.config.set({"distributed.nanny.pre-spawn-environ": environ,
                                      **LOCAL_CLUSTER_CONFIG}):
                    cluster = self._stack.enter_context(LocalCluster(
                        n_workers=self.workers, threads_per_worker=1, processes=True,
                        host="127.0.0.1", dashboard_address=None, silence_logs=40))
                self.client = self._stack.enter_context(Client(cluster))
            self._stack = self._stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def run(self, fn: Callable, jobs: Sequence) -> Iterator[tuple[Any, Any]]:
        """``(job, fn(job))`` as jobs finish; ``(job, exception)`` when Dask gave up on a
        job (e.g. its workers kept dying)."""
        from dask.distributed import as_completed as dask_completed

        jobs, batch = list(jobs), uuid.uuid4().hex[:8]
        # One graph for all jobs, and results fetched in one request per batch of finished
        # jobs: submitting and fetching job by job cost the driver CPU that, on a machine
        # whose cores all run jobs, is taken from them.
        futures = self.client.map(fn, jobs, pure=False,
                                  key=[f"{fn.__name__}-{job.machine}-{batch}" for job in jobs])
        job_of = {future.key: job for future, job in zip(futures, jobs, strict=True)}
        for finished in dask_completed(futures).batches():
            for future, outcome in zip(finished, self._outcomes(finished), strict=True):
                future.release()
                yield job_of[future.key], outcome

    def _outcomes(self, futures: list) -> list:
        """Each finished future's result, or its exception (a job whose workers kept dying,
        KilledWorker; a lost connection); one request for the lot when all succeeded."""
        if all(future.status == "finished" for future in futures):
            with contextlib.suppress(Exception):  # e.g. a worker lost after it finished
                return self.client.gather(futures)
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except Exception as error:  # noqa: BLE001 -- becomes this machine's error
                outcomes.append(error)
        return outcomes


def open_engine(engine: str = "local", workers: int | None = None, *, jobs: int | None = None,
                address: str | None = None, threads: int = 1,
                shared_files: bool | None = None) -> LocalEngine | DaskEngine:
    """The engine ``engine`` with ``workers`` workers (default: one per usable core, at most
    one per job). Use it as a context manager. ``shared_files``: see :class:`DaskEngine`."""
    if engine not in ENGINES:
        raise StethoscopeError(f"unknown engine {engine!r}; use {' or '.join(ENGINES)}")
    if address and engine != "dask":
        raise StethoscopeError("--address names a Dask scheduler; use it with --engine dask")
    if workers is not None and workers < 1:
        raise StethoscopeError(f"--workers must be at least 1, got {workers}")
    if threads < 1:
        raise StethoscopeError(f"threads per worker must be at least 1, got {threads}")
    workers = workers or max(1, min(usable_cores(), jobs or usable_cores()))
    if engine == "dask":
        return DaskEngine(workers, threads, address, shared_files)
    return LocalEngine(workers, threads)


Engine = LocalEngine | DaskEngine


def _engine_context(engine: str | Engine, workers: int | None, jobs: int,
                    address: str | None, threads: int, shared_files: bool | None = None):
    """An engine to open for this call, or the caller's open engine, left open."""
    if isinstance(engine, LocalEngine | DaskEngine):
        return contextlib.nullcontext(engine)
    return open_engine(engine, workers, jobs=jobs, address=address, threads=threads,
                       shared_files=shared_files)


# ----------------------------------------------------------------------------- driver


def _run_all(fn: Callable, jobs: list, engine, failed: Callable[[Any, str], Any],
             progress: bool | None, description: str,
             on_result: Callable[[Any], None] | None = None) -> list:
    from stethoscope.progress import progress_bar

    results = []
    with progress_bar(len(jobs), description, enabled=progress) as bar:
        for job, outcome in engine.run(fn, jobs):
            if isinstance(outcome, BaseException):
                outcome = failed(job, f"its worker was lost ({_one_line(outcome)})")
            if on_result is not None:
                outcome = on_result(outcome) or outcome
            results.append(outcome)
            bar.advance(status=job.machine)
    return sorted(results, key=lambda r: r.machine)


def train_fleet(fleet: Fleet | str | Path, out: str | Path, *, settings: dict | None = None,
                engine: str | Engine = "local", workers: int | None = None,
                address: str | None = None, threads: int = 1, force: bool = False,
                progress: bool | None = None, shared_files: bool | None = None
                ) -> list[TrainResult]:
    """Train one detector per machine and write ``out/<machine>/`` for each one that trained.

    Parameters
    ----------
    fleet : a :class:`Fleet` or the root folder to search (:func:`find_machines`).
    out : folder of model folders; a machine's folder is replaced only by a complete new one,
        and left as it was when that machine fails.
    force : replace machine folders that already hold a model (never anything else). Without
        it an existing model is an error before any work starts.
    settings : :class:`stethoscope.Detector` keyword arguments (model, epochs, seed, ...),
        the same for every machine.
    engine, workers, address, threads, shared_files : see :func:`open_engine`; ``engine``
        may also be an engine already open (``with open_engine(...) as engine``), kept open
        for the caller. Workers that share this computer's storage write their machine's
        model folder themselves; others send it back as file bytes for the driver to write.

    Returns
    -------
    One :class:`TrainResult` per machine, sorted by name; failed machines carry ``error``.
    """
    fleet = _as_fleet(fleet)
    settings = dict(settings or {})
    _check_settings(settings)
    out = Path(out)
    check_model_folders(out, fleet.names(), force=force)

    def save(result: TrainResult) -> TrainResult | None:
        if not result.ok or not result.model_files:  # failed, or its worker wrote it
            return None
        try:
            write_model_files(out / result.machine, result.model_files)
        except (OSError, StethoscopeError) as error:
            return TrainResult(result.machine, error=f"cannot write its model ({error})")
        return None

    with _engine_context(engine, workers, len(fleet.machines), address, threads,
                         shared_files) as eng:
        # Where the workers share this computer's storage each writes its model folder
        # itself: the driver then does no per-machine work (measured: 21 ms a machine).
        jobs = [TrainJob(m.name, tuple(map(str, m.train)), tuple(map(str, m.held_out_normal)),
                         settings, threads,
                         str((out / m.name).absolute()) if eng.shares_files else None)
                for m in fleet.machines]
        return _run_all(train_machine, jobs, eng, lambda job, why: TrainResult(job.machine,
                        error=why), progress, "fleet train", on_result=save)


def check_model_folders(out: str | Path, names: Sequence[str], *, force: bool = False) -> None:
    """Raise DataError, before any training, when ``out/<name>`` for some machine cannot be
    written: ``out`` is a file, or a machine folder holds something other than a model, or
    holds a model and ``force`` is not set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError("is not a folder; give a folder for the machines' models", out)
    taken = []
    for name in names:
        folder = out / name
        if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
            continue
        if not folder.is_dir() or any(not (folder / f).is_file() for f in MODEL_FILES):
            raise DataError("exists and is not a stethoscope model folder; refusing to "
                            "replace it", folder)
        taken.append(folder)
    if taken and not force:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise DataError(f"already holds a model{more}; pass --force to replace them",
                        taken[0])


def _check_settings(settings: dict) -> None:
    """Fail before starting any worker on settings every machine would fail on: an unknown
    setting, model name or threshold rule, or CUDA asked for but absent."""
    from stethoscope.detector import Detector
    from stethoscope.models import registry
    from stethoscope.scoring import parse_threshold
    from stethoscope.training import resolve_device

    Detector(**settings)  # TypeError for a keyword the Detector does not take
    if settings.get("model") is not None:
        registry.info(settings["model"])
    if isinstance(settings.get("threshold"), str):
        parse_threshold(settings["threshold"])
    resolve_device(settings.get("device") or "auto")


def score_fleet(fleet: Fleet | str | Path, models: str | Path, out: str | Path | None = None,
                *, engine: str | Engine = "local", workers: int | None = None,
                address: str | None = None, threads: int = 1, device: str = "auto",
                force: bool = False, progress: bool | None = None,
                shared_files: bool | None = None) -> tuple[list[dict], list[ScoreResult]]:
    """Score every machine's test recordings with its model from ``models/<machine>/``.

    Parameters
    ----------
    fleet : a :class:`Fleet` or the root folder to search.
    models : folder of model folders written by :func:`train_fleet`.
    out : table to write, ``.csv`` or ``.parquet`` (None: write nothing); written whole or
        not at all.
    engine, workers, address, threads, shared_files : as for :func:`train_fleet`; workers
        that share this computer's storage read the model folders themselves.
    device : where the workers score (``Detector.load(device=...)``).
    force : replace an existing score table (one this module wrote; never another file).

    Returns
    -------
    rows : one dict per recording with :data:`TABLE_COLUMNS`, by machine then path order;
        recordings of a machine that could not be scored carry its error.
    results : one :class:`ScoreResult` per machine scored or failed.
    """
    fleet = _as_fleet(fleet)
    if out is not None:
        check_table_path(out, force=force)
    machines = [m for m in fleet.machines if m.test]
    if not machines:
        raise DataError("no machine has recordings to score (test/ recordings, or MIMII "
                        "abnormal clips and held-out normal ones)", fleet.root)
    results: list[ScoreResult] = []
    ready = []  # (machine, its model folder): checked before any engine starts
    for m in machines:
        try:
            ready.append((m, check_model_folder(Path(models) / m.name)))
        except StethoscopeError as error:
            results.append(ScoreResult(m.name, error=str(error)))
    if ready:
        with _engine_context(engine, workers, len(ready), address, threads,
                             shared_files) as eng:
            # shared storage: the worker reads the folder; else the files' bytes travel
            jobs = [ScoreJob(m.name, {} if eng.shares_files else read_model_files(folder),
                             tuple(map(str, m.test)), m.test_labels, device, threads,
                             str(folder.absolute()) if eng.shares_files else None)
                    for m, folder in ready]
            results += _run_all(score_machine, jobs, eng,
                                lambda job, why: ScoreResult(job.machine, error=why),
                                progress, "fleet score")
    results.sort(key=lambda r: r.machine)
    by_name = {r.machine: r for r in results}
    rows = []
    for m in machines:
        result = by_name[m.name]
        rows += list(result.rows) if result.ok else _failed_rows(m, result.error)
    if out is not None:
        write_table(rows, out, force=force)
    return rows, results


def _failed_rows(machine: Machine, error: str) -> list[dict]:
    return [{"machine": machine.name, "path": str(p), "score": None, "threshold": None,
             "anomalous": None, "label": label, "error": error}
            for p, label in zip(machine.test, machine.test_labels, strict=True)]


# ----------------------------------------------------------------------------- table


def check_table_path(path: str | Path, *, force: bool = False) -> Path:
    """``path`` if a score table can be written there, else DataError: it must end in .csv
    or .parquet (pyarrow installed), and an existing file must be a score table and
    ``force`` set."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"the score table must end in {' or '.join(TABLE_SUFFIXES)}", path)
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise DataError("writing Parquet needs pyarrow: pip install 'stethoscope[fleet]'",
                            path) from None
    if path.is_dir():
        raise DataError("is a folder; give a file name for the score table", path)
    if path.exists():
        if not _is_score_table(path):
            raise DataError("exists and is not a stethoscope score table; refusing to "
                            "replace it", path)
        if not force:
            raise DataError("already exists; pass --force to replace this score table", path)
    return path


def _is_score_table(path: Path) -> bool:
    """Whether ``path`` starts like a table :func:`write_table` wrote (Parquet's magic
    number, or the CSV header)."""
    magic = b"PAR1" if path.suffix.lower() == ".parquet" else _CSV_HEADER
    with path.open("rb") as handle:
        return handle.read(len(magic)) == magic


_CSV_HEADER = (",".join(TABLE_COLUMNS) + "\n").encode()


def write_table(rows: Iterable[dict], path: str | Path, *, force: bool = False) -> Path:
    """Write the score rows as CSV or Parquet (by suffix), atomically."""
    from stethoscope.storage import atomic_write_bytes

    path = check_table_path(path, force=force)
    rows = list(rows)
    data = _parquet_bytes(rows) if path.suffix.lower() == ".parquet" else _csv_bytes(rows)
    return atomic_write_bytes(path, data)


def _csv_bytes(rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row[k]) for k in TABLE_COLUMNS})
    return text.getvalue().encode("utf-8")


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    return value


def _parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("machine", pa.string()), ("path", pa.string()),
                        ("score", pa.float64()), ("threshold", pa.float64()),
                        ("anomalous", pa.bool_()), ("label", pa.int8()),
                        ("error", pa.string())])
    table = pa.Table.from_pylist([{k: row[k] for k in TABLE_COLUMNS} for row in rows],
                                 schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_table(path: str | Path) -> list[dict]:
    """Read a score table written by :func:`write_table` back as rows (for tests and
    scripts; CSV cells come back typed)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with path.open(newline="", encoding="utf-8") as handle:
        return [_typed_row(row) for row in csv.DictReader(handle)]


def _typed_row(row: dict) -> dict:
    def number(text: str, kind):
        return kind(text) if text != "" else None

    return {"machine": row["machine"], "path": row["path"],
            "score": number(row["score"], float), "threshold": number(row["threshold"], float),
            "anomalous": {"True": True, "False": False}.get(row["anomalous"]),
            "label": number(row["label"], int), "error": row["error"] or None}


# ----------------------------------------------------------------------------- text


def format_train_table(results: Sequence[TrainResult]) -> str:
    """The fleet training summary as an aligned text table."""
    header = ("machine", "clips", "fit s", "threshold", "held-out false alarms", "status")
    lines = [header]
    for r in results:
        if r.ok:
            rate = r.false_alarm_rate
            alarms = (f"{rate:.3f} ({r.false_alarms}/{r.held_out})" if rate is not None
                      else "n/a (no held-out normal clips)")
            lines.append((r.machine, str(r.clips), f"{r.fit_seconds:.2f}",
                          f"{r.threshold:.6g}", alarms, "ok"))
        else:
            lines.append((r.machine, "", "", "", "", "FAILED"))
    return _aligned(lines)


def format_score_table(results: Sequence[ScoreResult]) -> str:
    """Per-machine summary of a fleet scoring run as an aligned text table."""
    header = ("machine", "recordings", "anomalous", "not scored", "threshold", "status")
    lines = [header]
    for r in results:
        if r.ok:
            threshold = r.rows[0]["threshold"] if r.rows else None
            lines.append((r.machine, str(len(r.rows)),
                          str(sum(bool(row["anomalous"]) for row in r.rows)),
                          str(sum(row["error"] is not None for row in r.rows)),
                          "" if threshold is None else f"{threshold:.6g}", "ok"))
        else:
            lines.append((r.machine, "", "", "", "", "FAILED"))
    return _aligned(lines)


def _aligned(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in lines)
