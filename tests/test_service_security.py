"""Access to the service: every endpoint but /healthz needs a token with the right scope,
tokens are never stored or logged in clear, names and ids cannot climb out of their
folders, clients are rate-limited, an open server is refused, no answer holds a traceback."""
# ruff: noqa: F811 - the shared fixtures are imported by name, then used as arguments

from __future__ import annotations

import re

import pytest
from test_service_support import (  # noqa: F401 - fixtures
    MACHINES,
    fleet,
    open_api,
    service_clips,
    service_models,
    settings_for,
)

from stethoscope.service.errors import ServiceError
from stethoscope.service.process import ServerProcess

V1 = MACHINES[0]
NEEDS = {("POST", "/v1/machines/{machine}/recordings"): "score",
         ("POST", "/v1/alerts/{alert_id}/ack"): "admin",
         ("GET", "/v1/tokens"): "admin", ("POST", "/v1/tokens"): "admin",
         ("DELETE", "/v1/tokens/{token_id}"): "admin"}
WRONG = {"score": "read", "read": "score", "admin": "read+score"}
PATH_VALUES = {"machine": V1, "alert_id": "1", "recording_id": "1", "token_id": "abc123"}


@pytest.fixture
def api(tmp_path, service_models, fleet, service_clips):
    with open_api(tmp_path, service_models, fleet, keep_audio_days=1,
                  raise_server_exceptions=False) as session:
        session.post_wav(V1, service_clips.anomalous_bytes(0))  # recording 1, alert 1
        yield session


def operations(app) -> list[tuple[str, str]]:
    spec = app.openapi()
    return [(method.upper(), path) for path, item in spec["paths"].items()
            for method in item if method in ("get", "post", "put", "delete", "patch")]


def call(api, method: str, template: str, headers: dict):
    path = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], template)
    kwargs = {"headers": headers}
    if template.endswith("/recordings"):
        kwargs["content"] = b"RIFF"
    if (method, template) == ("POST", "/v1/tokens"):
        kwargs["json"] = {"name": "x", "scopes": ["read"]}
    return api.client.request(method, path, **kwargs)


def test_every_endpoint_but_healthz_needs_a_token_with_its_scope(api):
    ops = operations(api.app)
    assert len(ops) >= 14
    for method, template in ops:
        if template == "/healthz":
            assert call(api, method, template, {}).status_code == 200
            continue
        needed = NEEDS.get((method, template), "read")
        for headers in ({}, {"Authorization": "Bearer nonsense"},
                        {"Authorization": "Bearer stk_0123456789ab_wrongsecret"},
                        {"Authorization": "Basic dXNlcjpwYXNz"}):
            reply = call(api, method, template, headers)
            assert reply.status_code == 401, (method, template, headers, reply.status_code)
            assert reply.headers["www-authenticate"] == "Bearer"
        wrong = call(api, method, template, api.headers(WRONG[needed]))
        assert wrong.status_code == 403, (method, template, wrong.status_code)
        assert needed in wrong.json()["error"]
        if template == "/v1/events":
            continue  # an endless stream: allowed access is tested on a real server
        right = call(api, method, template, api.headers(needed))
        assert right.status_code not in (401, 403), (method, template, right.status_code)


def test_the_openapi_spec_needs_a_read_token_too(api):
    assert api.client.get("/openapi.json").status_code == 401
    assert api.client.get("/openapi.json", headers=api.headers("score")).status_code == 403
    spec = api.client.get("/openapi.json", headers=api.headers("read"))
    assert spec.status_code == 200 and spec.json()["info"]["title"] == "stethoscope"


def test_dashboard_pages_need_a_read_token_cookie(api):
    client = api.client
    for page in ("/", f"/machines/{V1}"):
        reply = client.get(page, follow_redirects=False)
        assert reply.status_code == 303 and reply.headers["location"].startswith("/login")
    for fragment in ("/ui/fleet", f"/ui/machines/{V1}"):
        assert client.get(fragment).status_code == 401
    refused = client.post("/login", data={"token": api.tokens["score"]}, follow_redirects=False)
    assert refused.status_code == 401 and "read" in refused.text
    assert "stethoscope_token" not in refused.headers.get("set-cookie", "")
    assert client.get("/login").status_code == 200  # the login page itself is public
    assert client.get("/static/dashboard.js").status_code == 200
    ok = client.post("/login", data={"token": api.tokens["read"], "next": "//evil.example/"},
                     follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/"  # no open redirect
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/").status_code == 200
    # a write through the cookie needs the dashboard's header (no cross-site forms)
    assert client.post("/v1/alerts/1/ack").status_code == 403
    assert client.post("/v1/alerts/1/ack", headers={"X-Requested-With": "stethoscope"}
                       ).status_code == 403  # the read token lacks admin
    client.post("/logout")
    assert client.get("/", follow_redirects=False).status_code == 303


def test_revoked_tokens_stop_working(api):
    made = api.client.post("/v1/tokens", json={"name": "temp", "scopes": ["read"]},
                           headers=api.headers("admin"))
    assert made.status_code == 201
    token, token_id = made.json()["token"], made.json()["id"]
    auth = {"Authorization": f"Bearer {token}"}
    assert api.client.get("/v1/machines", headers=auth).status_code == 200
    listed = api.client.get("/v1/tokens", headers=api.headers("admin")).json()["tokens"]
    assert token_id in {t["id"] for t in listed}
    assert all(set(t) == {"id", "name", "scopes", "created_at", "revoked_at"} for t in listed)
    assert api.client.delete(f"/v1/tokens/{token_id}", headers=api.headers("admin")
                             ).status_code == 204
    assert api.client.get("/v1/machines", headers=auth).status_code == 401
    assert api.client.delete(f"/v1/tokens/{token_id}", headers=api.headers("admin")
                             ).status_code == 404


def _store_dump(url: str) -> str:
    from sqlalchemy import create_engine, text

    from stethoscope.service.store import METADATA

    engine = create_engine(url)
    with engine.connect() as conn:
        rows = [str(tuple(r)) for table in METADATA.sorted_tables
                for r in conn.execute(text(f"SELECT * FROM {table.name}"))]
    engine.dispose()
    return "\n".join(rows)


def test_tokens_are_stored_only_as_hashes(api):
    import hashlib

    dump = _store_dump(api.service.settings.db_url)
    raw = api.service.settings.db_url.split("///", 1)[1]
    with open(raw, "rb") as handle:
        disk = handle.read()
    for token in api.tokens.values():
        secret = token.split("_", 2)[2]
        assert token not in dump and secret not in dump
        assert secret.encode() not in disk
        assert hashlib.sha256(secret.encode()).hexdigest() in dump


def test_tokens_never_reach_the_server_log(tmp_path, service_models, service_clips):
    import httpx

    log = tmp_path / "server.log"
    with ServerProcess(service_models, "--data", str(tmp_path / "data"), "--access-log",
                       log=log) as server:
        token = server.first_token
        assert token and token.startswith("stk_")
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, timeout=20) as client:
            assert client.post(f"/v1/machines/{V1}/recordings", headers={
                **auth, "Content-Type": "audio/wav"}, content=service_clips.normal_bytes(0)
                ).status_code == 201
            assert client.post(f"/v1/machines/{V1}/recordings", headers={
                **auth, "Content-Type": "audio/wav"}, content=b"garbage").status_code == 422
            assert client.get("/v1/machines", headers=auth).status_code == 200
            assert client.post("/login", data={"token": token}).status_code in (200, 303)
            bad = token[:-3] + "xyz"
            assert client.get("/v1/machines", headers={"Authorization": f"Bearer {bad}"}
                              ).status_code == 401
    text = log.read_text()
    assert "POST /v1/machines/valve-1/recordings" in text  # the access log is on
    secret = token.split("_", 2)[2]
    assert token not in text and secret not in text and secret[:-3] not in text


TRAVERSALS = ["..", "...", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "valve-1%00", "%2e%2e%2fvalve-1",
              "valve-1%2F..%2Fvalve-2", "a..b", ".hidden", "~root", "valve-1%5C..%5C"]


def raw_get(url: str, path: str, token: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side clean-up of ``..``)."""
    import socket

    host, port = url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                     f"{token}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_path_traversal_in_names_and_ids_is_refused(api, tmp_path, service_models, fleet):
    from test_service_support import LiveServer, make_tokens

    from stethoscope.service import create_app

    read, score = api.headers("read"), api.headers("score", **{"Content-Type": "audio/wav"})
    for name in TRAVERSALS:
        for reply in (api.client.get(f"/v1/machines/{name}/scores", headers=read),
                      api.client.post(f"/v1/machines/{name}/recordings", headers=score,
                                      content=b"RIFF"),
                      api.client.get(f"/machines/{name}", follow_redirects=False),
                      api.client.get(f"/ui/machines/{name}", headers=read)):
            assert reply.status_code in (303, 401, 404, 422), (name, reply.status_code)
    app = create_app(settings_for(tmp_path / "raw", service_models), fleet=fleet)
    token = make_tokens(app)["admin"]
    with LiveServer(app) as server:  # the raw paths, as curl --path-as-is sends them
        for path in ("/v1/machines/../../etc/passwd/scores", "/v1/machines/..%2F..%2Fx/scores",
                     "/v1/recordings/../1/spectrogram.png", "/static/../app.py",
                     "/static/../../../../etc/passwd", "/static/..%2f..%2fapp.py",
                     "/machines/../../etc/passwd", "/v1/tokens/../../x"):
            status, body = raw_get(server.url, path, token)
            assert status in (404, 405, 422), (path, status)
            assert b"root:" not in body and b"import" not in body, path
    for rid in ("../1", "..%2F1", "1%2F..", "-1", "0", "1e3", "%2e%2e"):
        for kind in ("spectrogram", "deviation"):
            reply = api.client.get(f"/v1/recordings/{rid}/{kind}.png", headers=read)
            assert reply.status_code in (404, 422), (rid, reply.status_code)
    for tid in ("..", "..%2F..", "../etc"):
        reply = api.client.delete(f"/v1/tokens/{tid}", headers=api.headers("admin"))
        assert reply.status_code in (404, 422)
    for asset in ("/static/../app.py", "/static/..%2Fapp.py", "/static/%2e%2e/store.py",
                  "/static/..%2F..%2F..%2Fpyproject.toml"):
        reply = api.client.get(asset)
        assert reply.status_code == 404 and "import" not in reply.text, asset
    assert api.service.keeper.path_for("0" * 32).parent == api.service.settings.audio_dir
    with pytest.raises(ValueError):
        api.service.keeper.path_for("../../etc/passwd")


def test_machine_folders_with_unsafe_names_are_refused(tmp_path, service_models):
    import shutil

    from stethoscope.service.machines import load_fleet

    models = tmp_path / "models"
    shutil.copytree(service_models / V1, models / "bad name;rm")
    with pytest.raises(ServiceError, match="machine folder names"):
        load_fleet(models, warm_up=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ServiceError, match="holds no model folders"):
        load_fleet(empty)
    with pytest.raises(ServiceError, match="no such models folder"):
        load_fleet(tmp_path / "missing")


def test_rate_limit_per_token(tmp_path, service_models, fleet):
    with open_api(tmp_path, service_models, fleet, rate_limit=0.5, rate_burst=3) as api:
        codes = [api.client.get("/v1/machines", headers=api.headers("read")).status_code
                 for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        limited = api.client.get("/v1/machines", headers=api.headers("read"))
        assert int(limited.headers["retry-after"]) >= 1
        assert "rate limit" in limited.json()["error"]
        assert api.client.get("/v1/machines", headers=api.headers("admin")).status_code == 200


def test_unexpected_errors_answer_json_without_traceback(api, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("secret internals /srv/x.py line 3")

    monkeypatch.setattr(api.service, "machine_summaries", broken)
    reply = api.client.get("/v1/machines", headers=api.headers("read"))
    assert reply.status_code == 500
    body = reply.json()
    assert body["error"].startswith("internal error (incident ")
    assert "Traceback" not in reply.text and "secret internals" not in reply.text

    from sqlalchemy import text

    with api.service.store.engine.begin() as conn:
        conn.execute(text("DROP TABLE alerts"))
    gone = api.client.get("/v1/alerts", headers=api.headers("read"))
    assert gone.status_code == 503 and "store is unavailable" in gone.json()["error"]
    assert "Traceback" not in gone.text and "alerts" not in gone.json()["error"]


def test_serve_refuses_to_listen_beyond_loopback_without_a_token(tmp_path, service_models):
    from stethoscope.service.server import serve
    from stethoscope.service.settings import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    for host in ("0.0.0.0", "::"):
        with pytest.raises(ServiceError, match="refusing to listen"):
            serve(settings_for(tmp_path, service_models, host=host))
    from stethoscope.service.store import Store

    store = Store(settings_for(tmp_path, service_models).db_url)
    assert store.count_active_tokens() == 0  # the refusal made no token
    store.close()
