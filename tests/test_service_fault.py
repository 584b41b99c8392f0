"""kill -9 under load: a real server process on loopback takes uploads from a few
concurrent clients, is killed mid-load and restarted on the same store; every result it
acknowledged (2xx) must be in the store exactly once, on SQLite and on PostgreSQL."""
# ruff: noqa: F811 - the shared fixtures are imported by name, then used as arguments

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
from sqlalchemy import create_engine, func, select
from test_service_support import (  # noqa: F401 - fixtures
    MACHINES,
    pg_url,
    service_clips,
    service_models,
)

from stethoscope.service.auth import TokenAuthority
from stethoscope.service.process import ServerProcess
from stethoscope.service.store import Store, machine_state, normalise_url, recordings

CLIENTS = 4
BEFORE_KILL_S = 1.5
AFTER_RESTART_S = 1.0


class Uploader(threading.Thread):
    """Posts clips with unique Idempotency-Keys until told to stop; an upload that got no
    answer (server killed) is retried with the same key once the server is back."""

    def __init__(self, index: int, token: str, clips: list[bytes], stop: threading.Event):
        super().__init__(daemon=True)
        self.index, self.token, self.clips, self.stop = index, token, clips, stop
        self.acked: dict[str, tuple[int, float]] = {}
        self.unanswered = 0
        self.port: int | None = None
        self.deadline = time.monotonic() + 120

    def post(self, conn, key: str, body: bytes) -> tuple[int, dict]:
        machine = MACHINES[self.index % len(MACHINES)]
        conn.request("POST", f"/v1/machines/{machine}/recordings", body, {
            "Authorization": f"Bearer {self.token}", "Content-Type": "audio/wav",
            "Idempotency-Key": key})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())

    def run(self) -> None:
        n, conn = 0, None
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            key, body = f"u{self.index}-{n}", self.clips[(self.index + n) % len(self.clips)]
            while time.monotonic() < self.deadline:
                try:
                    conn = conn or http.client.HTTPConnection("127.0.0.1", self.port,
                                                              timeout=20)
                    status, data = self.post(conn, key, body)
                except (OSError, http.client.HTTPException):
                    self.unanswered += 1
                    conn = None
                    time.sleep(0.05)
                    continue
                assert status in (200, 201), (status, data)
                self.acked[key] = (data["recording_id"], data["score"])
                break
            n += 1


def stored_rows(url: str) -> list[tuple[int, str, float]]:
    engine = create_engine(normalise_url(url))
    with engine.connect() as conn:
        rows = conn.execute(select(recordings.c.id, recordings.c.idempotency_key,
                                   recordings.c.score)).all()
        counted = conn.execute(select(func.sum(machine_state.c.recordings))).scalar_one()
    engine.dispose()
    assert counted == len(rows)  # the per-machine counts moved with the rows, atomically
    return [tuple(r) for r in rows]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_acknowledged_result_survives_kill_9_exactly_once(
        backend, request, tmp_path, service_models, service_clips):
    url = (f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg_url"))
    store = Store(url)
    tokens = [TokenAuthority(store).create(f"uploader {i}", ["score"])[0]
              for i in range(CLIENTS)]
    store.close()
    clips = [service_clips.normal_bytes(i) for i in range(6)]
    args = ["--db", url, "--data", str(tmp_path / "data"), "--rate-limit", "1000"]
    log = tmp_path / "server.log"
    stop = threading.Event()
    uploaders = [Uploader(i, tokens[i], clips, stop) for i in range(CLIENTS)]

    first = ServerProcess(service_models, *args, log=log).start()
    for u in uploaders:
        u.port = int(first.url.rsplit(":", 1)[1])
        u.start()
    time.sleep(BEFORE_KILL_S)
    acked_before_kill = sum(len(u.acked) for u in uploaders)
    first.kill()  # SIGKILL mid-load: requests in flight get no answer
    assert first.process.returncode == -9

    second = ServerProcess(service_models, *args, log=log).start()
    for u in uploaders:
        u.port = int(second.url.rsplit(":", 1)[1])
    time.sleep(AFTER_RESTART_S)
    stop.set()
    for u in uploaders:
        u.join(timeout=60)
        assert not u.is_alive()
    second.stop()

    acked = {key: value for u in uploaders for key, value in u.acked.items()}
    assert acked_before_kill >= CLIENTS, "the load never got going before the kill"
    assert sum(u.unanswered for u in uploaders) >= 1, "the kill interrupted no upload"
    rows = stored_rows(url)
    by_key: dict[str, list[tuple[int, float]]] = {}
    for rid, key, score in rows:
        by_key.setdefault(key, []).append((rid, score))
    for key, (rid, score) in acked.items():
        assert key in by_key, f"acknowledged result {key} (id {rid}) was lost"
        assert len(by_key[key]) == 1, f"{key} stored {len(by_key[key])} times"
        assert by_key[key][0] == (rid, pytest.approx(score)), key
    # every upload was retried until answered, so nothing is stored that was not acknowledged
    assert set(by_key) == set(acked) and len(rows) == len(acked)
