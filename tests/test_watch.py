"""Watched folders: every new WAV scored exactly once, across kill -9 and restarts; posting
to a real HTTP server on 127.0.0.1 with retries; no output that is not ours touched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stethoscope.cli import main
from stethoscope.detector import Detector
from stethoscope.edge import EdgeScorer
from stethoscope.watch import (
    FileKey,
    FolderWatcher,
    JsonlOutput,
    RecordingPoster,
    WatchError,
    WatchState,
)
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, list[Path]]:
    """Real DCASE 2023 valve clips (8 to fit on, 10 to drop into the folder), or simulated
    valve clips when the shared data is absent."""
    real = SHARED_DATA / "dcase2023_valve"
    if real.is_dir():
        return {"train": sorted((real / "train").glob("*.wav"))[:8],
                "drop": sorted((real / "test").glob("*.wav"))[::14][:10]}
    from stethoscope.simulate import simulate_dataset

    root = Path(simulate_dataset("valve", 14, 4, tmp_path_factory.mktemp("sim"), seed=0))
    normal = sorted(root.rglob("normal/*.wav"))
    return {"train": normal[:8], "drop": normal[8:] + sorted(root.rglob("abnormal/*.wav"))}


@pytest.fixture(scope="module")
def model(clips, tmp_path_factory) -> dict:
    """The default model fitted on the clips, its folder, and its ONNX export."""
    from stethoscope.export import export_onnx

    base = tmp_path_factory.mktemp("model")
    Detector(device="cpu", progress=False).fit(clips["train"]).save(base / "model")
    det = Detector.load(base / "model", device="cpu", progress=False)
    return {"det": det, "folder": base / "model",
            "onnx": export_onnx(base / "model", base / "model.onnx")}


class RecordingService:
    """A tiny real HTTP server on 127.0.0.1 that records every POST and answers each with
    the next status of ``plan`` (then 201), the way the monitoring service answers."""

    def __init__(self, plan: list[int] | None = None, port: int = 0) -> None:
        self.plan = list(plan or [])
        self.received: list[dict] = []
        self.lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                url = urllib.parse.urlparse(self.path)
                with service.lock:
                    status = service.plan.pop(0) if service.plan else 201
                    record = {"path": url.path, "query": dict(urllib.parse.parse_qsl(url.query)),
                              "headers": dict(self.headers), "body": body, "status": status}
                    service.received.append(record)
                    answer = {"recording_id": len(service.received), "score": 1.25,
                              "anomalous": False} if status == 201 else {"detail": "no"}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def accepted(self) -> list[dict]:
        with self.lock:
            return [r for r in self.received if r["status"] == 201]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drop_by_rename(source: Path, folder: Path) -> Path:
    """Write a copy under a hidden temporary name, then rename it into place."""
    temporary, target = folder / f".{source.name}.part", folder / source.name
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    return target


def drop_slowly(source: Path, folder: Path, pieces: int = 5, pause: float = 0.05) -> Path:
    """Write a copy in place a piece at a time (a recorder still writing)."""
    data = source.read_bytes()
    target = folder / source.name
    step = -(-len(data) // pieces)
    with open(target, "wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start:start + step])
            handle.flush()
            time.sleep(pause)
    return target


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- tests
def test_kill_and_restart_scores_each_file_exactly_once(model, clips, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "scores.jsonl"
    inbox.mkdir()
    command = [sys.executable, "-m", "stethoscope", "watch", str(inbox), "--model",
               str(model["folder"]), "--out", str(out), "--settle", "0.5", "--interval", "0.1"]
    env = {**os.environ, "STETHOSCOPE_PROGRESS": "0"}
    log = open(tmp_path / "watch.log", "w")  # noqa: SIM115 - closed at the end
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT, env=env)
    sources = clips["drop"]
    try:
        for source in sources[:3]:
            drop_by_rename(source, inbox)
        for source in sources[3:5]:
            drop_slowly(source, inbox)  # in place, while it is being written
        wait_for(lambda: len(read_lines(out)) >= 2, 120, "the first results")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        for source in sources[5:8]:  # arrive while no watcher runs
            drop_by_rename(source, inbox)
        drop_slowly(sources[8], inbox)
        second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
                                  env=env)
        try:
            drop_by_rename(sources[9], inbox)  # arrives after the restart
            wait_for(lambda: len({r["path"] for r in read_lines(out)}) >= len(sources), 120,
                     "every file scored")
            time.sleep(1.0)  # a duplicate would show up now
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
    finally:
        if first.poll() is None:
            first.kill()
        log.close()

    lines = read_lines(out)
    counts = Counter(r["path"] for r in lines)
    expected = {str((inbox / s.name).resolve()) for s in sources}
    assert set(counts) == expected, (tmp_path / "watch.log").read_text()
    assert all(n == 1 for n in counts.values()), counts
    # each scored whole (not while being written): the scores of the complete files
    det = model["det"]
    truth = {str(Path(r.path).resolve()): r.score
             for r in det.score_recordings([inbox / s.name for s in sources])}
    for record in lines:
        assert record["error"] is None
        assert record["score"] == pytest.approx(truth[record["path"]], rel=1e-6)
    state = WatchState(Path(str(out) + ".state.sqlite"))
    try:
        assert set(state.done()) == expected
        assert state.announced() == []
    finally:
        state.close()


def test_crash_between_writing_and_marking_is_recovered(model, clips, tmp_path):
    """The three states a kill -9 can leave a line in: written whole but not marked, half
    written, or only announced. Each file ends up in the output exactly once."""
    inbox, out = tmp_path / "inbox", tmp_path / "scores.jsonl"
    inbox.mkdir()
    files = [drop_by_rename(s, inbox) for s in clips["drop"][:3]]
    keys = [FileKey.of(p.resolve(), p.stat()) for p in files]
    state, output = WatchState(str(out) + ".state.sqlite"), JsonlOutput(out)
    whole = {"path": keys[0].path, "size": keys[0].size, "mtime_ns": keys[0].mtime_ns,
             "score": 123.0, "anomalous": True, "error": None, "windows": []}
    state.announce(keys[0], output.size())
    output.append(whole)  # crash here: written, not marked done
    state.announce(keys[1], output.size())
    with open(out, "ab") as handle:  # crash here: half a line
        handle.write(json.dumps({"path": keys[1].path, "size": keys[1].size})[:30].encode())
    state.announce(keys[2], output.size() + 1000)  # crash here: announced only
    output.close()
    state.close()

    scorer = EdgeScorer(model["onnx"])
    with FolderWatcher(inbox, scorer=scorer, output=out, settle_s=0.0, interval_s=0.05,
                       events=False, emit=None) as watcher:
        assert watcher.run(once=True) == 2  # the half-written and the announced one
    lines = read_lines(out)  # parses: the half line was cut off
    assert Counter(r["path"] for r in lines) == {k.path: 1 for k in keys}
    assert lines[0] == whole  # kept, not scored again
    for record in lines[1:]:
        assert record["score"] == pytest.approx(scorer.score_file(record["path"])["score"])


def test_polling_skips_what_is_not_a_new_recording(model, clips, tmp_path, capsys):
    inbox, out = tmp_path / "inbox", tmp_path / "scores.jsonl"
    inbox.mkdir()
    good = [drop_by_rename(s, inbox) for s in clips["drop"][:2]]
    (inbox / "notes.txt").write_text("not audio")
    shutil.copyfile(clips["drop"][2], inbox / ".hidden.wav")
    data = clips["drop"][3].read_bytes()
    (inbox / "cut.wav").write_bytes(data[: len(data) // 2])  # header announces more
    (inbox / "sub").mkdir()
    shutil.copyfile(clips["drop"][4], inbox / "sub" / "deeper.wav")
    args = ["watch", str(inbox), "--model", str(model["onnx"]), "--out", str(out),
            "--settle", "0.05", "--interval", "0.05", "--poll", "--once"]
    assert main(args) == 0
    lines = read_lines(out)
    by_name = {Path(r["path"]).name: r for r in lines}
    assert set(by_name) == {p.name for p in good} | {"cut.wav"}
    assert "truncated" in by_name["cut.wav"]["error"]
    assert all(by_name[p.name]["error"] is None for p in good)
    assert capsys.readouterr().out.count("\n") == 3  # the same lines on stdout
    assert main(args) == 0  # a second run finds nothing new
    assert read_lines(out) == lines
    assert main([*args, "--recursive"]) == 0
    assert [Path(r["path"]).name for r in read_lines(out)[3:]] == ["deeper.wav"]


def test_posting_retries_until_the_service_answers(clips, tmp_path):
    """Connection refused, then a 503, then 201: each file reaches the service once with a
    2xx answer, and only then is it done."""
    inbox, state_file = tmp_path / "inbox", tmp_path / "posted.sqlite"
    inbox.mkdir()
    files = [drop_by_rename(s, inbox) for s in clips["drop"][:3]]
    port = free_port()
    poster = RecordingPoster(f"http://127.0.0.1:{port}", "secret-token", "pump 7",
                             backoff_s=0.05, max_backoff_s=0.2)
    watcher = FolderWatcher(inbox, poster=poster, state=state_file, settle_s=0.0,
                            interval_s=0.05, events=False, emit=None)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(0.5)  # the watcher meets a refused connection and retries
    service = RecordingService(plan=[503], port=port)
    try:
        wait_for(lambda: len(service.accepted()) == len(files), 30, "every file posted")
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(timeout=10)
        watcher.close()
        service.close()
    accepted = service.accepted()
    assert sorted(r["query"]["source"] for r in accepted) == sorted(p.name for p in files)
    assert len(service.received) == len(files) + 1  # the 503 was retried, nothing else
    for record in accepted:
        path = inbox / record["query"]["source"]
        assert record["body"] == path.read_bytes()
        assert record["path"] == "/v1/machines/pump%207/recordings"
        assert record["headers"]["Content-Type"] == "audio/wav"
        assert record["headers"]["Authorization"] == "Bearer secret-token"
        assert "T" in record["query"]["recorded_at"]  # ISO 8601
    state = WatchState(state_file)
    try:
        assert set(state.done()) == {str(p.resolve()) for p in files}
    finally:
        state.close()


def test_refused_token_stops_and_rejected_recordings_are_reported(clips, tmp_path):
    inbox, state_file = tmp_path / "inbox", tmp_path / "posted.sqlite"
    inbox.mkdir()
    first = drop_by_rename(clips["drop"][0], inbox)
    service = RecordingService(plan=[401])
    try:
        poster = RecordingPoster(service.url, "wrong", "m1", backoff_s=0.01)
        with FolderWatcher(inbox, poster=poster, state=state_file, settle_s=0.0,
                           interval_s=0.05, events=False, emit=None) as watcher:
            with pytest.raises(WatchError, match="refused the token"):
                watcher.run(once=True)
        service.plan = [422]  # the token is fixed; the service finds the recording unusable
        out = tmp_path / "posted.jsonl"
        with FolderWatcher(inbox, poster=poster, output=out, state=state_file, settle_s=0.0,
                           interval_s=0.05, events=False, emit=None) as watcher:
            assert watcher.run(once=True) == 1  # not marked done by the refused attempt
        (line,) = read_lines(out)
        assert line["path"] == str(first.resolve())
        assert "rejected the recording (HTTP 422" in line["error"]
    finally:
        service.close()


def test_refuses_an_output_that_is_not_its_own_and_a_second_watcher(model, tmp_path, capsys):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    precious = tmp_path / "thesis.txt"
    precious.write_text("chapter one\n")
    code = main(["watch", str(inbox), "--model", str(model["onnx"]), "--out", str(precious),
                 "--once"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a JSON-lines file of `stethoscope watch`" in err
    assert precious.read_text() == "chapter one\n"

    out = tmp_path / "scores.jsonl"
    scorer = EdgeScorer(model["onnx"])
    with FolderWatcher(inbox, scorer=scorer, output=out, events=False, emit=None):
        with pytest.raises(WatchError, match="another `stethoscope watch`"):
            FolderWatcher(inbox, scorer=scorer, output=out, events=False, emit=None)
