"""Watch a folder: score every new WAV once it is written completely, restart-safe.

>>> watcher = FolderWatcher("incoming", scorer=load_scorer("valve-model"),
...                         output="scores.jsonl")                      # doctest: +SKIP
>>> watcher.run()                                                        # doctest: +SKIP

A file is ready when its size and modification time have not changed for ``settle_s``
seconds, or at once when it was renamed into the folder (file-system events, through
``watchdog`` when it is installed; without it the folder is polled). Each ready file is
scored (by a local model, or by the monitoring service it is posted to) and its result
appended as one JSON line to the output.

Exactly once, across crashes: an embedded SQLite file beside the output remembers every
file (path, size, modification time) and its result. A line is first announced there with
the output's length before it is written; the line is written and fsynced; then the file is
marked done. After a kill -9 at any point, the next start finds an announced line either
complete in the output (marked done, not scored again), half-written (cut off, scored
again) or absent (scored again). Posting marks a file done only after the service answered
2xx; connection errors and 5xx answers are retried with backoff, without end, so no result
is lost while the service is down. A file rewritten later (new size or time) is a new
recording and is scored again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import queue
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from stethoscope.errors import AudioError, StethoscopeError

STATE_SUFFIX = ".state.sqlite"
GRACE_SETTLES = 10  # an unreadable settled file gets this many settle times to become whole
RESCAN_WITH_EVENTS_S = 30.0  # full rescans even with file-system events (events can be lost)
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class WatchError(StethoscopeError):
    """The watch cannot go on: state file in use, output unwritable, token refused."""


# ----------------------------------------------------------------------------- posting


class PostRejected(StethoscopeError):
    """The service refused a recording for what it is (a 4xx answer other than 401/403)."""


class PostStopped(Exception):
    """Retrying was interrupted because the caller asked to stop."""


class RecordingPoster:
    """Post WAV recordings to the monitoring service.

    ``POST {server}/v1/machines/{machine}/recordings?recorded_at=…&source=…`` with the WAV
    bytes as body (``Content-Type: audio/wav``, ``Authorization: Bearer <token>``); the
    service answers 201 with JSON (``recording_id``, ``score``, ``anomalous``, …).

    Parameters
    ----------
    server : base URL, e.g. ``http://127.0.0.1:8000``.
    token, machine : the bearer token and the machine's name in the service.
    timeout_s : seconds per request.
    max_attempts : tries per recording (None: retry transient failures without end).
    backoff_s, max_backoff_s : first delay between tries, doubled up to the maximum.
    """

    def __init__(self, server: str, token: str | None, machine: str, *, timeout_s: float = 30.0,
                 max_attempts: int | None = None, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, log: TextIO | None = None) -> None:
        parsed = urllib.parse.urlparse(server)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise WatchError(f"server URL {server!r} must look like http://host:port")
        if not machine:
            raise WatchError("posting needs the machine's name (--machine)")
        self.server = server.rstrip("/")
        self.token, self.machine = token, machine
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.log = log or sys.stderr

    def url(self, recorded_at: dt.datetime | None = None, source: str | None = None) -> str:
        query = {}
        if recorded_at is not None:
            query["recorded_at"] = recorded_at.isoformat()
        if source:
            query["source"] = source
        path = f"/v1/machines/{urllib.parse.quote(self.machine, safe='')}/recordings"
        return self.server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")

    def post(self, body: bytes, *, recorded_at: dt.datetime | None = None,
             source: str | None = None, key: str | None = None,
             stop: threading.Event | None = None) -> dict:
        """Post one WAV; returns the service's JSON answer.

        Raises
        ------
        WatchError
            the token is refused (401/403), or ``max_attempts`` transient failures.
        PostRejected
            another 4xx: the service refuses this recording.
        PostStopped
            ``stop`` was set while waiting to retry.
        """
        headers = {"Content-Type": "audio/wav", "Content-Length": str(len(body))}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if key:
            headers["Idempotency-Key"] = key
        url = self.url(recorded_at, source)
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._send(url, body, headers)
            except _Transient as err:
                if self.max_attempts is not None and attempt >= self.max_attempts:
                    raise WatchError(f"cannot post to {self.server} after {attempt} tries "
                                     f"({err})") from None
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                print(f"stethoscope: {self.server}: {err}; retrying in {delay:.3g} s",
                      file=self.log, flush=True)
                if stop is not None:
                    if stop.wait(delay):
                        raise PostStopped() from None
                else:
                    time.sleep(delay)

    def _send(self, url: str, body: bytes, headers: dict[str, str]) -> dict:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode("utf-8", "replace")
                status = response.status
        except urllib.error.HTTPError as err:
            detail = _error_detail(err)
            if err.code in RETRY_STATUS:
                raise _Transient(f"HTTP {err.code} {detail}".strip()) from None
            if err.code in (401, 403):
                raise WatchError(f"{self.server} refused the token (HTTP {err.code} "
                                 f"{detail}); check --token".replace(" )", ")")) from None
            raise PostRejected(f"the service rejected the recording (HTTP {err.code} "
                               f"{detail})".replace(" )", ")")) from None
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out, DNS
            reason = getattr(err, "reason", err)
            raise _Transient(f"connection failed: {reason}") from None
        try:
            answer = json.loads(text) if text else {}
        except json.JSONDecodeError:
            answer = {"body": text[:200]}
        if not isinstance(answer, dict):
            answer = {"body": answer}
        answer.setdefault("status", status)
        return answer


class _Transient(Exception):
    """A failure worth retrying: no connection, a timeout, a 5xx/429 answer."""


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read().decode("utf-8", "replace")
    except OSError:
        return ""
    try:
        detail = json.loads(text).get("detail", text)
    except (json.JSONDecodeError, AttributeError):
        detail = text
    return " ".join(str(detail).split())[:200]


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True)
class FileKey:
    """A recording as the watch knows it: its path and the size and time it was scored at."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, stat: os.stat_result) -> FileKey:
        return cls(str(path), int(stat.st_size), int(stat.st_mtime_ns))

    def token(self) -> str:
        """A stable id of this version of the file (the Idempotency-Key of its post)."""
        return hashlib.sha256(f"{self.path}\0{self.size}\0{self.mtime_ns}".encode()).hexdigest()


class WatchState:
    """Which files are done, in an SQLite file; one watcher at a time (a lock file)."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS files (
            path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
            status TEXT NOT NULL, out_offset INTEGER, result TEXT, updated_at TEXT NOT NULL,
            PRIMARY KEY (path, size, mtime_ns))
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _exclusive_lock(self.path.with_name(self.path.name + ".lock"))
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(self.SCHEMA)
        except sqlite3.DatabaseError as err:
            raise WatchError(f"cannot use the state file ({err})", self.path) from None

    def done(self) -> dict[str, tuple[int, int]]:
        """Path → (size, mtime_ns) of every version of a file that is done (the latest
        written wins where a path was scored more than once)."""
        rows = self.db.execute("SELECT path, size, mtime_ns FROM files WHERE status = 'done' "
                               "ORDER BY updated_at")
        return {path: (size, mtime) for path, size, mtime in rows}

    def is_done(self, key: FileKey) -> bool:
        row = self.db.execute("SELECT 1 FROM files WHERE path=? AND size=? AND mtime_ns=? AND "
                              "status='done'", (key.path, key.size, key.mtime_ns)).fetchone()
        return row is not None

    def announce(self, key: FileKey, offset: int) -> None:
        """Record that the line for ``key`` is about to be written at ``offset``."""
        self._upsert(key, "writing", offset, None)

    def finish(self, key: FileKey, result: dict) -> None:
        self._upsert(key, "done", None, json.dumps(result))

    def forget(self, key: FileKey) -> None:
        self.db.execute("DELETE FROM files WHERE path=? AND size=? AND mtime_ns=?",
                        (key.path, key.size, key.mtime_ns))

    def announced(self) -> list[tuple[FileKey, int]]:
        rows = self.db.execute("SELECT path, size, mtime_ns, out_offset FROM files "
                               "WHERE status='writing' ORDER BY out_offset")
        return [(FileKey(p, s, m), int(o)) for p, s, m, o in rows]

    def _upsert(self, key: FileKey, status: str, offset: int | None, result: str | None) -> None:
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        self.db.execute(
            "INSERT INTO files (path, size, mtime_ns, status, out_offset, result, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path, size, mtime_ns) DO UPDATE SET "
            "status=excluded.status, out_offset=excluded.out_offset, result=excluded.result, "
            "updated_at=excluded.updated_at",
            (key.path, key.size, key.mtime_ns, status, offset, result, now))

    def close(self) -> None:
        self.db.close()
        self._lock.close()


def _exclusive_lock(path: Path):
    """An open lock file held with ``flock`` (Linux/macOS); another holder is an error."""
    handle = open(path, "a+")  # noqa: SIM115 - held for the watcher's lifetime
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; one watcher per state file is on the user
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise WatchError("another `stethoscope watch` is using this state file",
                         path.with_suffix("")) from None
    return handle


# ----------------------------------------------------------------------------- output


class JsonlOutput:
    """An append-only JSON-lines file written one fsynced line at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise WatchError("is a folder; give a file name for the JSON-lines output",
                             self.path)
        if not _is_watch_output(self.path):
            raise WatchError("exists and is not a JSON-lines file of `stethoscope watch`; "
                             "refusing to append to it", self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as err:
            raise WatchError(f"cannot open the output ({err.strerror})", self.path) from None

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def append(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        os.fsync(self.fd)

    def recover(self, key: FileKey, offset: int) -> dict | None:
        """The line announced for ``key`` at ``offset`` if it is there whole; a partial last
        line (a crash mid-write) is cut off. None: the line must be written again."""
        size = self.size()
        if size <= offset:
            return None
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            line = handle.readline()
        if line.endswith(b"\n"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and _record_key(record) == key:
                return record
            return None
        if offset + len(line) == size:  # a half-written line of ours at the very end
            os.truncate(self.path, offset)
        return None

    def close(self) -> None:
        os.close(self.fd)


def _is_watch_output(path: Path) -> bool:
    """Absent, empty, or starting with a result line of this watcher."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(1 << 20)
    except FileNotFoundError:
        return True
    except OSError as err:
        raise WatchError(f"cannot read the output ({err.strerror})", path) from None
    if not first:
        return True
    try:
        return _record_key(json.loads(first)) is not None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _record_key(record: dict) -> FileKey | None:
    try:
        return FileKey(record["path"], int(record["size"]), int(record["mtime_ns"]))
    except (KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- watching


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float  # monotonic time the size and time were first seen as they are now
    moved: bool = False  # renamed into place: complete at once


def _utc(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc)


class FolderWatcher:
    """Score (or post) every new WAV of ``folder`` exactly once; see the module docstring.

    Parameters
    ----------
    folder : the folder to watch.
    scorer : a :class:`stethoscope.edge.Scorer` (``load_scorer(model)``), or None when the
        service scores (``poster``).
    output : JSON-lines file the results are appended to (None: with a poster only).
    poster : a :class:`RecordingPoster` to post each file to.
    state : the SQLite state file (default: ``<output>.state.sqlite``).
    settle_s : seconds a file's size and time must stay the same before it is scored.
    interval_s : seconds between polls (without file-system events).
    recursive : watch subfolders too.
    events : use watchdog's file-system events (None: when watchdog is installed).
    emit : where result lines are printed as well (default ``"stdout"``, the process's
        stdout when the watcher is made; None: nowhere).
    """

    def __init__(self, folder: str | Path, *, scorer=None, output: str | Path | None = None,
                 poster: RecordingPoster | None = None, state: str | Path | None = None,
                 settle_s: float = 2.0, interval_s: float = 1.0, recursive: bool = False,
                 events: bool | None = None, emit: TextIO | None | str = "stdout",
                 log: TextIO | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise WatchError("no such folder to watch", self.folder)
        if scorer is None and poster is None:
            raise WatchError("nothing scores the files: give a model (--model) or a "
                             "service to post them to (--server)")
        if output is None and state is None:
            raise WatchError("give an output (--out scores.jsonl) or, when only posting, a "
                             "state file (--state) that remembers which files are done")
        if settle_s < 0 or interval_s <= 0:
            raise WatchError(f"settle time ({settle_s}) must be >= 0 and the poll interval "
                             f"({interval_s}) > 0")
        self.folder = self.folder.resolve()
        self.scorer, self.poster = scorer, poster
        self.settle_s, self.interval_s, self.recursive = settle_s, interval_s, recursive
        self.events = _watchdog_available() if events is None else events
        self.emit = sys.stdout if emit == "stdout" else emit
        self.log = log or sys.stderr
        state_path = Path(state) if state is not None else Path(str(output) + STATE_SUFFIX)
        self.state = WatchState(state_path)
        try:
            self.output = JsonlOutput(output) if output is not None else None
        except BaseException:
            self.state.close()
            raise
        self._done = self.state.done()
        self._candidates: dict[Path, _Candidate] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.scored = 0

    # -------------------------------------------------------------- lifecycle
    def run(self, stop: threading.Event | None = None, *, once: bool = False) -> int:
        """Watch until ``stop`` is set (or, with ``once``, until every file present at the
        start is done); returns how many files were scored in this run."""
        stop = stop or threading.Event()
        self._recover()
        observer = self._start_events() if self.events and not once else None
        self._say(f"watching {self.folder} ({'file-system events' if observer else 'polling'}"
                  f", settle {self.settle_s:g} s)")
        try:
            next_scan = 0.0
            tick = max(0.02, min(self.interval_s, self.settle_s / 4 or self.interval_s))
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_scan:
                    self._scan()
                    next_scan = now + (RESCAN_WITH_EVENTS_S if observer else self.interval_s)
                self._drain_events()
                self._process_ready(stop)
                if once and not self._candidates:
                    break
                stop.wait(tick)
        except PostStopped:
            pass
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
        return self.scored

    def close(self) -> None:
        if self.output is not None:
            self.output.close()
        self.state.close()

    def __enter__(self) -> FolderWatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- finding files
    def _start_events(self):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        push = self._queue.put

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.is_directory:
                    return
                if event.event_type == "moved":
                    push((event.dest_path, True))
                elif event.event_type in ("created", "modified", "closed"):
                    push((event.src_path, False))

        observer = Observer()
        observer.schedule(Handler(), str(self.folder), recursive=self.recursive)
        observer.daemon = True
        observer.start()
        return observer

    def _drain_events(self) -> None:
        while True:
            try:
                path, moved = self._queue.get_nowait()
            except queue.Empty:
                return
            self._note(Path(path), moved)

    def _scan(self) -> None:
        pattern = "**/*" if self.recursive else "*"
        for path in self.folder.glob(pattern):
            self._note(path, False)

    def _note(self, path: Path, moved: bool) -> None:
        if not _is_recording(path, self.folder):
            return
        try:
            stat = path.stat()
        except OSError:
            return
        if not os.path.isfile(path):
            return
        key = FileKey.of(path, stat)
        if self._done.get(key.path) == (key.size, key.mtime_ns):
            return
        known = self._candidates.get(path)
        if known is None or (known.size, known.mtime_ns) != (key.size, key.mtime_ns):
            self._candidates[path] = _Candidate(key.size, key.mtime_ns, time.monotonic(), moved)
        elif moved:
            known.moved = True

    # -------------------------------------------------------------- scoring
    def _process_ready(self, stop: threading.Event) -> None:
        for path in sorted(self._candidates):
            if stop.is_set():
                return
            candidate = self._candidates[path]
            try:
                stat = path.stat()
            except OSError:  # gone before it settled
                del self._candidates[path]
                continue
            key = FileKey.of(path, stat)
            now = time.monotonic()
            if (key.size, key.mtime_ns) != (candidate.size, candidate.mtime_ns):
                self._candidates[path] = _Candidate(key.size, key.mtime_ns, now)
                continue
            settled = now - candidate.since
            if not candidate.moved and settled < self.settle_s:
                continue
            if not self._looks_whole(path) and settled < GRACE_SETTLES * max(self.settle_s,
                                                                             0.1):
                continue  # header says more audio than is there yet: give the writer time
            self._handle(key, stop)
            del self._candidates[path]

    @staticmethod
    def _looks_whole(path: Path) -> bool:
        from stethoscope.audio import audio_info

        try:
            audio_info(path)
        except AudioError:
            return False
        return True

    def _handle(self, key: FileKey, stop: threading.Event) -> None:
        path = Path(key.path)
        record: dict = {"path": key.path, "size": key.size, "mtime_ns": key.mtime_ns,
                        "recorded_at": _utc(key.mtime_ns).isoformat()}
        start = time.perf_counter()
        if self.scorer is not None:
            record.update(self.scorer.score_file(path))
            record["compute_ms"] = round((time.perf_counter() - start) * 1e3, 3)
        if self.poster is not None:
            record.update(self._post(path, key, record, stop))
        record["path"] = key.path
        record["scored_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        self._record(key, record)
        self.scored += 1
        if self.emit is not None:
            print(json.dumps(record), file=self.emit, flush=True)
        verdict = ("error: " + record["error"]) if record.get("error") else (
            "ANOMALY" if record.get("anomalous") else "normal")
        self._say(f"{path.name}: {verdict}")

    def _post(self, path: Path, key: FileKey, record: dict, stop: threading.Event) -> dict:
        """What posting adds to the record: the service's answer under ``server`` and, when
        nothing scored locally, its verdict as the result (a refusal as the error)."""
        local = self.scorer is not None
        try:
            answer = self.poster.post(path.read_bytes(), recorded_at=_utc(key.mtime_ns),
                                      source=path.name, key=key.token(), stop=stop)
        except OSError as err:
            problem = f"{path}: cannot be read ({err.strerror})"
            return {"server_error": problem} if local else {"error": problem}
        except PostRejected as err:
            return {"server_error": str(err)} if local else {"error": str(err)}
        if local:
            return {"server": answer}
        return {"score": answer.get("score"), "anomalous": answer.get("anomalous"),
                "windows": answer.get("windows", []), "error": answer.get("error"),
                "server": answer}

    def _record(self, key: FileKey, record: dict) -> None:
        if self.output is not None:
            self.state.announce(key, self.output.size())
            self.output.append(record)
        self.state.finish(key, record)
        self._done[key.path] = (key.size, key.mtime_ns)

    def _recover(self) -> None:
        """Settle the lines a crash left announced but not marked done."""
        for key, offset in self.state.announced():
            record = self.output.recover(key, offset) if self.output is not None else None
            if record is not None:
                self.state.finish(key, record)
                self._done[key.path] = (key.size, key.mtime_ns)
            else:
                self.state.forget(key)

    def _say(self, text: str) -> None:
        """A status line on stderr (none under --quiet or STETHOSCOPE_PROGRESS=0)."""
        from stethoscope.progress import progress_enabled

        if progress_enabled():
            print(f"stethoscope watch: {text}", file=self.log, flush=True)


def _is_recording(path: Path, folder: Path) -> bool:
    if path.suffix.lower() != ".wav":
        return False
    try:
        relative = path.relative_to(folder)
    except ValueError:
        return False
    return not any(part.startswith(".") for part in relative.parts)


def _watchdog_available() -> bool:
    try:
        import watchdog.observers  # noqa: F401
    except ImportError:
        return False
    return True


def watch_folder(folder: str | Path, *, model: str | Path | None = None,
                 output: str | Path | None = None, server: str | None = None,
                 token: str | None = None, machine: str | None = None,
                 state: str | Path | None = None, settle_s: float = 2.0,
                 interval_s: float = 1.0, recursive: bool = False, events: bool | None = None,
                 once: bool = False, stop: threading.Event | None = None,
                 on_start: Callable[[FolderWatcher], None] | None = None) -> int:
    """Build a :class:`FolderWatcher` from plain settings (what the CLI passes) and run it.

    Returns the number of files scored."""
    from stethoscope.edge import load_scorer

    scorer = load_scorer(model) if model is not None else None
    poster = RecordingPoster(server, token, machine or "") if server else None
    with FolderWatcher(folder, scorer=scorer, output=output, poster=poster, state=state,
                       settle_s=settle_s, interval_s=interval_s, recursive=recursive,
                       events=events) as watcher:
        if on_start is not None:
            on_start(watcher)
        return watcher.run(stop, once=once)
