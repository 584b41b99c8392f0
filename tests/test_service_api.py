"""The service's REST API as clients meet it: FastAPI's test client for the behaviour, a
real uvicorn server on loopback for the wire (HTTP, server-sent events), and the store on
SQLite and on the real PostgreSQL."""
# ruff: noqa: F811 - the shared fixtures are imported by name, then used as arguments

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest
from test_service_support import (  # noqa: F401 - fixtures
    MACHINES,
    LiveServer,
    fleet,
    make_tokens,
    open_api,
    pg_url,
    service_clips,
    service_models,
    settings_for,
    wav_bytes,
)

from stethoscope.service import create_app
from stethoscope.service.store import NewRecording, Store

V1, V2 = MACHINES


@pytest.fixture
def api(tmp_path, service_models, fleet):
    with open_api(tmp_path, service_models, fleet, keep_audio_days=1) as session:
        yield session


def test_wav_body_is_scored_with_the_detector_and_committed(api, service_clips, fleet):
    body = service_clips.normal_bytes(0)
    reply = api.post_wav(V1, body, source="mic-3", recorded_at="2025-03-01T10:00:00+01:00")
    assert reply.status_code == 201, reply.text
    data = reply.json()
    expected = fleet[V1].detector.score_recordings([service_clips.normal[0]])[0]
    assert data["score"] == pytest.approx(expected.score, rel=1e-5)
    assert data["anomalous"] is expected.anomalous
    assert data["threshold"] == pytest.approx(fleet[V1].threshold)
    assert data["model_version"] == fleet[V1].version and len(data["model_version"]) == 16
    assert data["windows"] and data["windows"][-1]["end_s"] == pytest.approx(10.0, abs=0.1)
    assert data["recorded_at"] == "2025-03-01T09:00:00.000Z" and data["source"] == "mic-3"
    assert data["alert_id"] is None and data["audio_kept"] is True
    # committed: a fresh store object (another connection) sees the row
    other = Store(api.service.settings.db_url)
    assert other.recording(data["recording_id"])["score"] == pytest.approx(data["score"])
    other.close()
    again = api.client.get(f"/v1/recordings/{data['recording_id']}", headers=api.headers("read"))
    assert again.json() == data


def test_multipart_field_file_works_like_a_wav_body(api, service_clips):
    body = service_clips.normal_bytes(1)
    multipart = api.client.post(f"/v1/machines/{V2}/recordings",
                                files={"file": ("clip.wav", body, "audio/wav")},
                                headers=api.headers("score"))
    raw = api.post_wav(V2, body)
    assert multipart.status_code == raw.status_code == 201
    assert multipart.json()["score"] == pytest.approx(raw.json()["score"])
    missing = api.client.post(f"/v1/machines/{V2}/recordings", files={"other": ("x", b"1")},
                              headers=api.headers("score"))
    assert missing.status_code == 422 and "'file'" in missing.json()["error"]


def test_anomalies_open_one_alert_until_acknowledged(api, service_clips):
    first = api.post_wav(V1, service_clips.anomalous_bytes(0)).json()
    second = api.post_wav(V1, service_clips.anomalous_bytes(1)).json()
    assert first["anomalous"] and second["anomalous"]
    assert first["alert_id"] is not None and second["alert_id"] == first["alert_id"]
    alerts = api.client.get("/v1/alerts", headers=api.headers("read")).json()["items"]
    assert [a["alert_id"] for a in alerts] == [first["alert_id"]]
    assert alerts[0]["count"] == 2 and alerts[0]["first_recording_id"] == first["recording_id"]
    assert alerts[0]["last_recording_id"] == second["recording_id"]

    acked = api.client.post(f"/v1/alerts/{first['alert_id']}/ack", headers=api.headers("admin"))
    assert acked.status_code == 200 and acked.json()["acknowledged"] is True
    assert acked.json()["acknowledged_by"] == "test admin"
    assert api.client.get("/v1/alerts", headers=api.headers("read")).json()["items"] == []
    everything = api.client.get("/v1/alerts?state=all", headers=api.headers("read")).json()
    assert len(everything["items"]) == 1
    third = api.post_wav(V1, service_clips.anomalous_bytes(2)).json()
    assert third["alert_id"] not in (None, first["alert_id"])  # a new episode
    missing = api.client.post("/v1/alerts/999999/ack", headers=api.headers("admin"))
    assert missing.status_code == 404


def test_machine_status_normal_anomalous_and_silent(tmp_path, service_models, fleet,
                                                    service_clips):
    with open_api(tmp_path, service_models, fleet, silent_after_s=1.0) as api:
        def status() -> dict[str, str]:
            listing = api.client.get("/v1/machines", headers=api.headers("read")).json()
            return {m["machine"]: m["status"] for m in listing["machines"]}

        assert status() == {V1: "silent", V2: "silent"}  # never heard
        normal = api.post_wav(V1, service_clips.normal_bytes(2)).json()
        assert not normal["anomalous"]
        assert status()[V1] == "normal"
        bad = api.post_wav(V2, service_clips.anomalous_bytes(0)).json()
        assert status()[V2] == "anomalous"
        one = api.client.get(f"/v1/machines/{V2}", headers=api.headers("read")).json()
        assert one["open_alerts"] == 1 and one["last_score"] == pytest.approx(bad["score"])
        assert one["model"] == fleet[V2].detector.model and one["recordings"] == 1
        time.sleep(1.2)
        assert status()[V1] == "silent"
        api.client.post(f"/v1/alerts/{bad['alert_id']}/ack", headers=api.headers("admin"))
        api.post_wav(V2, service_clips.normal_bytes(3))
        assert status()[V2] == "normal"


def test_history_is_paginated_newest_first_and_filtered_by_time(api, service_clips):
    ids = [api.post_wav(V1, service_clips.normal_bytes(i)).json()["recording_id"]
           for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api.client.get(f"/v1/machines/{V1}/scores", params=params,
                              headers=api.headers("read")).json()
        seen += [r["recording_id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    future = datetime.now(UTC).replace(year=datetime.now(UTC).year + 1).isoformat()
    empty = api.client.get(f"/v1/machines/{V1}/scores", params={"since": future},
                           headers=api.headers("read")).json()
    assert empty["items"] == []
    until = api.client.get(f"/v1/machines/{V1}/scores", params={"until": future},
                           headers=api.headers("read")).json()
    assert len(until["items"]) == 5
    bad = api.client.get(f"/v1/machines/{V1}/scores", params={"since": "yesterday"},
                         headers=api.headers("read"))
    assert bad.status_code == 422 and "ISO 8601" in bad.json()["error"]


def _one_line_error(reply, status: int) -> str:
    assert reply.status_code == status, reply.text
    message = reply.json()["error"]
    assert "\n" not in message and "Traceback" not in reply.text
    return message


def test_bad_audio_gets_the_detectors_one_line_error(api, service_clips):
    good = service_clips.normal_bytes(0)
    cases = {
        "not a WAV": b"this is not audio at all" * 10,
        "truncated": good[: len(good) // 3],
        "silent": wav_bytes(np.zeros(16000 * 10, np.float32)),
        "8 kHz": wav_bytes(np.random.default_rng(0).normal(0, .1, 80000).astype(np.float32),
                           8000),
    }
    words = {"not a WAV": "not a WAV", "truncated": "truncated", "silent": "silent",
             "8 kHz": "8000 Hz"}
    for name, body in cases.items():
        message = _one_line_error(api.post_wav(V1, body, source=name), 422)
        assert message.startswith(f"upload to {V1} ({name}): "), message
        assert words[name] in message, message
        assert "/tmp" not in message and "data/audio" not in message  # no server paths
    assert api.service.store.history(V1) == []  # nothing half-stored
    assert list(api.service.keeper.tmp.iterdir()) == []  # no spool file left


def test_request_errors_are_json(tmp_path, service_models, fleet, service_clips):
    with open_api(tmp_path, service_models, fleet, max_upload_mb=0.1) as api:
        body = service_clips.normal_bytes(0)  # 320 kB > 0.1 MB
        assert "limit" in _one_line_error(api.post_wav(V1, body), 413)
        chunked = api.client.post(f"/v1/machines/{V1}/recordings", content=iter([body]),
                                  headers=api.headers("score", **{"Content-Type": "audio/wav"}))
        assert chunked.status_code == 413
        assert "empty" in _one_line_error(api.post_wav(V1, b""), 400)
        text = api.client.post(f"/v1/machines/{V1}/recordings", content=b"x",
                               headers=api.headers("score", **{"Content-Type": "text/plain"}))
        assert "audio/wav" in _one_line_error(text, 415)
        assert "no machine" in _one_line_error(api.post_wav("pump-9", b"RIFF"), 404)
        assert "recorded_at" in _one_line_error(api.post_wav(V1, b"RIFF",
                                                             recorded_at="noon"), 422)
        unknown = api.client.get("/v2/anything", headers=api.headers("read"))
        assert "no such endpoint" in _one_line_error(unknown, 404)
        wrong = api.client.put("/v1/machines", headers=api.headers("read"))
        _one_line_error(wrong, 405)
        limit = api.client.get(f"/v1/machines/{V1}/scores?limit=0", headers=api.headers("read"))
        assert "limit" in _one_line_error(limit, 422)


def test_same_idempotency_key_is_stored_once(api, service_clips):
    body = service_clips.normal_bytes(4)
    headers = api.headers("score", **{"Content-Type": "audio/wav", "Idempotency-Key": "k-1"})
    first = api.client.post(f"/v1/machines/{V1}/recordings", content=body, headers=headers)
    again = api.client.post(f"/v1/machines/{V1}/recordings", content=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["recording_id"] == first.json()["recording_id"]
    other = api.client.post(f"/v1/machines/{V2}/recordings", content=body, headers=headers)
    assert other.status_code == 201  # keys are per machine
    assert len(api.service.store.history(V1)) == 1


def test_images_of_kept_audio_and_their_cleanup(api, service_clips):
    rec = api.post_wav(V1, service_clips.anomalous_bytes(0)).json()
    for kind in ("spectrogram", "deviation"):
        image = api.client.get(f"/v1/recordings/{rec['recording_id']}/{kind}.png",
                               headers=api.headers("read"))
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content[:8] == b"\x89PNG\r\n\x1a\n" and len(image.content) > 5000
    svc = api.service
    assert len(list(svc.settings.audio_dir.glob("*.wav"))) == 1
    deleted = svc.keeper.sweep(svc.store, now=time.time() + 2 * 86400)  # two days later
    assert deleted == 1 and list(svc.settings.audio_dir.glob("*.wav")) == []
    svc.render_png.cache_clear()
    gone = api.client.get(f"/v1/recordings/{rec['recording_id']}/spectrogram.png",
                          headers=api.headers("read"))
    assert gone.status_code == 404 and "kept audio" in gone.json()["error"]
    assert api.client.get(f"/v1/recordings/{rec['recording_id']}",
                          headers=api.headers("read")).json()["audio_kept"] is False


def test_audio_is_not_kept_by_default_and_kept_audio_is_bounded(tmp_path, service_models,
                                                                fleet, service_clips):
    with open_api(tmp_path / "a", service_models, fleet) as api:
        rec = api.post_wav(V1, service_clips.normal_bytes(0)).json()
        assert rec["audio_kept"] is False
        assert list(api.service.settings.audio_dir.glob("*.wav")) == []
        png = api.client.get(f"/v1/recordings/{rec['recording_id']}/deviation.png",
                             headers=api.headers("read"))
        assert png.status_code == 404
    with open_api(tmp_path / "b", service_models, fleet, keep_audio_days=30,
                  audio_max_mb=1) as api:  # 1 MB holds three 10 s clips
        for i in range(5):
            api.post_wav(V1, service_clips.normal_bytes(i))
            time.sleep(0.01)
        api.service.keeper.sweep(api.service.store)
        kept = list(api.service.settings.audio_dir.glob("*.wav"))
        assert len(kept) == 3
        rows = api.service.store.history(V1)
        assert [r["audio_key"] is not None for r in rows] == [True, True, True, False, False]


def test_metrics_in_prometheus_text_format(api, service_clips):
    from prometheus_client.parser import text_string_to_metric_families

    for i in range(3):
        api.post_wav(V1, service_clips.normal_bytes(i))
    api.post_wav(V2, service_clips.anomalous_bytes(0))
    reply = api.client.get("/metrics", headers=api.headers("read"))
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("stethoscope_recordings_total",
                    (("machine", V1), ("verdict", "normal")))] == 3
    assert samples[("stethoscope_recordings_total",
                    (("machine", V2), ("verdict", "anomalous")))] == 1
    posts = (("method", "POST"), ("route", "/v1/machines/{machine}/recordings"),
             ("status", "201"))
    assert samples[("stethoscope_http_requests_total", posts)] == 4
    assert samples[("stethoscope_scoring_duration_seconds_count", (("machine", V1),))] == 3
    assert samples[("stethoscope_threshold", (("machine", V1),))] == pytest.approx(
        api.service.fleet[V1].threshold)


def test_healthz_needs_no_token_and_openapi_is_versioned(api):
    health = api.client.get("/healthz")
    assert health.status_code == 200
    assert health.json() | {"version": "x"} == {"status": "ok", "store": "ok", "machines": 2,
                                                 "version": "x"}
    assert api.client.get("/openapi.json").status_code == 401
    spec = api.client.get("/openapi.json", headers=api.headers("read")).json()
    assert spec["openapi"].startswith("3.")
    paths = set(spec["paths"])
    assert {"/v1/machines/{machine}/recordings", "/v1/machines", "/v1/alerts",
            "/v1/machines/{machine}/scores", "/v1/alerts/{alert_id}/ack",
            "/v1/recordings/{recording_id}/spectrogram.png",
            "/v1/recordings/{recording_id}/deviation.png", "/healthz", "/metrics"} <= paths
    assert all(p.startswith("/v1/") or p in ("/healthz", "/metrics") for p in paths)
    upload = spec["paths"]["/v1/machines/{machine}/recordings"]["post"]["requestBody"]
    assert set(upload["content"]) == {"audio/wav", "multipart/form-data"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_batches_alerts_state_and_schema(tmp_path, backend, request):
    url = (f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg_url"))
    store = Store(url)
    now = int(time.time() * 1000)

    def item(score: float, key: str | None = None, machine: str = V1, t: int = 0):
        return NewRecording(machine=machine, received_ms=now + t, score=score, threshold=1.0,
                            anomalous=score > 1.0, windows=[], duration_s=10.0,
                            model_version="v", idempotency_key=key)

    results = store.commit_recordings([item(0.5, "a"), item(2.0, "b", t=1), item(3.0, "c", t=2),
                                       item(0.4, "a", t=3), item(0.2, None, V2, t=4)])
    assert [r.replayed for r in results] == [False, False, False, True, False]
    assert results[3].recording["id"] == results[0].recording["id"]
    assert results[1].alert_opened and not results[2].alert_opened
    alert_id = results[1].alert["id"]
    assert results[2].recording["alert_id"] == alert_id
    alert = store.alert(alert_id)
    assert (alert["count"], alert["max_score"]) == (2, 3.0)
    assert (alert["first_recording_id"], alert["last_recording_id"]) == (
        results[1].recording["id"], results[2].recording["id"])
    later = store.commit_recordings([item(0.1, "a", t=9)])
    assert later[0].replayed and later[0].recording["score"] == 0.5
    states = store.machine_states()
    assert states[V1]["recordings"] == 3 and states[V1]["last_score"] == 3.0
    assert states[V2]["recordings"] == 1
    assert store.open_alert_counts() == {V1: 1}
    buckets = store.sparklines(now - 1000)
    assert [peak for _, peak in buckets[V1]] == [3.0] or len(buckets[V1]) == 2
    assert store.ack_alert(alert_id, "me", now)["acked_by"] == "me"
    assert store.ack_alert(alert_id, "you", now + 5)["acked_by"] == "me"  # first ack stays
    assert store.migrate() == 1  # already current: nothing to do
    store.close()
    if backend == "sqlite":
        import sqlite3

        with sqlite3.connect(tmp_path / "store.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused(tmp_path):
    from stethoscope.service.errors import ServiceError

    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(url).close()
    import sqlite3

    with sqlite3.connect(tmp_path / "store.db") as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 'from the future', 0)")
    with pytest.raises(ServiceError, match="schema version 99"):
        Store(url)


def test_real_server_on_loopback_streams_events(tmp_path, service_models, fleet, service_clips):
    app = create_app(settings_for(tmp_path, service_models), fleet=fleet)
    tokens = make_tokens(app)
    auth = {"Authorization": f"Bearer {tokens['read']}"}
    with LiveServer(app) as server:
        assert server.url.startswith("http://127.0.0.1:")
        events: list[tuple[str, dict]] = []
        connected = threading.Event()

        def listen() -> None:
            with httpx.stream("GET", server.url + "/v1/events", headers=auth,
                              timeout=10) as stream:
                kind = None
                for line in stream.iter_lines():
                    if line.startswith(": connected"):
                        connected.set()
                    elif line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        events.append((kind, json.loads(line[6:])))
                        if kind == "alert":
                            return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        assert connected.wait(10)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            start = time.monotonic()
            reply = client.post(f"/v1/machines/{V2}/recordings",
                                content=service_clips.anomalous_bytes(3),
                                headers={"Authorization": f"Bearer {tokens['score']}",
                                         "Content-Type": "audio/wav"})
            assert reply.status_code == 201
            listener.join(timeout=5)
            assert time.monotonic() - start < 2.5
            listing = client.get("/v1/machines", headers=auth).json()
        assert [k for k, _ in events] == ["recording", "alert"]
        assert events[0][1]["recording_id"] == reply.json()["recording_id"]
        assert events[1][1] == {"machine": V2, "alert_id": reply.json()["alert_id"],
                                "state": "opened"}
        assert {m["machine"]: m["status"] for m in listing["machines"]}[V2] == "anomalous"


def test_scoring_in_worker_processes_gives_the_same_results(tmp_path, service_models, fleet,
                                                           service_clips):
    with open_api(tmp_path, service_models, fleet, scoring_processes=1) as api:
        normal = api.post_wav(V1, service_clips.normal_bytes(0))
        bad = api.post_wav(V1, service_clips.anomalous_bytes(0))
        broken = api.post_wav(V1, service_clips.normal_bytes(0)[:5000], source="cut")
    expected = fleet[V1].detector.score_recordings([service_clips.normal[0]])[0]
    assert normal.status_code == 201
    assert normal.json()["score"] == pytest.approx(expected.score, rel=1e-5)
    assert bad.json()["anomalous"] is True and bad.json()["alert_id"] is not None
    assert broken.status_code == 422
    assert broken.json()["error"].startswith(f"upload to {V1} (cut): is truncated")
