"""Shared set-up of the service tests (no tests here): small valve models trained once,
clips (real DCASE valve clips, simulated ones without ../shared/data), apps on SQLite or
the real PostgreSQL of STETHOSCOPE_TEST_POSTGRES, and a real uvicorn server on loopback."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import SHARED_DATA

fastapi = pytest.importorskip("fastapi", reason="the service extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from stethoscope.service import ServiceSettings, create_app  # noqa: E402
from stethoscope.service.machines import load_fleet  # noqa: E402

MACHINES = ("valve-1", "valve-2")
PG_ENV = "STETHOSCOPE_TEST_POSTGRES"


def wav_bytes(wave: np.ndarray, sample_rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def whistle(clip: Path) -> bytes:
    """A normal clip with a loud 3 kHz whistle over it: far above any valve threshold."""
    wave, rate = sf.read(clip, dtype="float32")
    tone = 0.3 * np.sin(2 * np.pi * 3000 * np.arange(len(wave)) / rate)
    return wav_bytes(np.clip(wave + tone, -1, 1).astype(np.float32), rate)


@dataclass
class Clips:
    train: list[Path]
    normal: list[Path]  # held out from training
    source: str

    def normal_bytes(self, i: int = 0) -> bytes:
        return self.normal[i % len(self.normal)].read_bytes()

    def anomalous_bytes(self, i: int = 0) -> bytes:
        return whistle(self.normal[i % len(self.normal)])


@pytest.fixture(scope="session")
def service_clips(tmp_path_factory) -> Clips:
    """20 training clips and the held-out normal clips the default detector trained on them
    calls normal: the service tests need recordings whose verdict is "normal", and at a 3 %
    false-alarm promise one held-out normal clip in 20 may be flagged (one is, on the real
    valve)."""
    real = SHARED_DATA / "dcase2023_valve" / "train"
    if real.is_dir():
        clips, source = sorted(real.glob("*.wav"))[:40], "real DCASE 2023 valve clips"
    else:
        from stethoscope.datasets import find_clips
        from stethoscope.simulate import simulate_dataset

        root = simulate_dataset("valve", 30, 0, tmp_path_factory.mktemp("sim"), seed=0,
                                progress=False)
        clips, source = [c.path for c in find_clips(root)], "simulated valve clips"
    from stethoscope import Detector

    train, held_out = clips[:20], clips[20:]
    verdicts = Detector(progress=False).fit(train).predict(held_out)
    normal = [path for path, flagged in zip(held_out, verdicts, strict=True) if not flagged]
    assert len(normal) >= 8, f"only {len(normal)} of {len(held_out)} held-out clips are normal"
    return Clips(train, normal, source)


@pytest.fixture(scope="session")
def service_models(tmp_path_factory, service_clips) -> Path:
    """``models/valve-1`` and ``models/valve-2``: the default detector on 20 clips."""
    from stethoscope import Detector

    models = tmp_path_factory.mktemp("models")
    Detector(progress=False).fit(service_clips.train).save(models / MACHINES[0])
    shutil.copytree(models / MACHINES[0], models / MACHINES[1])
    return models


@pytest.fixture(scope="session")
def fleet(service_models):
    return load_fleet(service_models)


@pytest.fixture
def pg_url():
    """A fresh schema in the test PostgreSQL (dropped afterwards), as a URL."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL store tests need {PG_ENV} (CI sets it; locally: "
                    "bash .ci/start-postgres and export the URL from .ci/run)")
    from sqlalchemy import create_engine, text

    schema = f"test_{uuid.uuid4().hex[:10]}"
    engine = create_engine(base)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def settings_for(tmp: Path, models: Path, db_url: str | None = None, **overrides
                 ) -> ServiceSettings:
    return ServiceSettings(models_dir=models, data_dir=tmp / "data", db_url=db_url,
                           **overrides)


@dataclass
class Api:
    """A TestClient on a fresh app, with one token per scope set."""

    client: TestClient
    app: object
    tokens: dict[str, str]

    def headers(self, scope: str = "admin", **more) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}", **more}

    def post_wav(self, machine: str, body: bytes, scope: str = "score", **params):
        return self.client.post(f"/v1/machines/{machine}/recordings", content=body,
                                params=params, headers=self.headers(scope, **{
                                    "Content-Type": "audio/wav"}))

    @property
    def service(self):
        return self.app.state.service


TOKEN_SCOPES = {"score": ["score"], "read": ["read"], "admin": ["admin"],
                "read+score": ["read", "score"]}


def make_tokens(app) -> dict[str, str]:
    authority = app.state.service.tokens
    return {name: authority.create(f"test {name}", scopes)[0]
            for name, scopes in TOKEN_SCOPES.items()}


def open_api(tmp: Path, models: Path, fleet, db_url: str | None = None, *,
             raise_server_exceptions: bool = True, **overrides):
    """Context manager: an :class:`Api` over a new app (lifespan running)."""
    from contextlib import contextmanager

    @contextmanager
    def session():
        app = create_app(settings_for(tmp, models, db_url, **overrides), fleet=fleet)
        tokens = make_tokens(app)
        with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
            yield Api(client, app, tokens)
        app.state.service.store.close()

    return session()


class LiveServer:
    """The app served by a real uvicorn on 127.0.0.1, on a port the OS picked, in a
    thread of this process (started and stopped by the test)."""

    def __init__(self, app) -> None:
        import uvicorn

        from stethoscope.service.server import bind_socket, make_server

        self.app = app
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = make_server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()
