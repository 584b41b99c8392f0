"""The JSON the API speaks (pydantic models; they make the OpenAPI spec)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

MACHINE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


def iso(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC (``2025-01-31T12:00:00.000Z``)."""
    if ms is None:
        return None
    text = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_time(value: str | None, name: str) -> int | None:
    """ISO 8601 text (naive means UTC) as milliseconds since the epoch; ValueError with a
    one-line message when it is not a time."""
    if value is None or value == "":
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time such as "
                         f"2025-01-31T12:00:00Z, not {value[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return int(moment.timestamp() * 1000)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"{name} is out of range: {value[:40]!r}") from None


class Error(BaseModel):
    error: str = Field(description="one line: what is wrong")
    status: int


class Window(BaseModel):
    start_s: float
    end_s: float
    score: float | None
    anomalous: bool


class Recording(BaseModel):
    recording_id: int
    machine: str
    score: float
    threshold: float
    anomalous: bool
    windows: list[Window]
    model_version: str
    received_at: str
    recorded_at: str | None = None
    source: str | None = None
    duration_s: float
    alert_id: int | None = None
    audio_kept: bool = False


class Machine(BaseModel):
    machine: str
    model: str
    model_version: str
    threshold: float
    status: Literal["normal", "anomalous", "silent"]
    last_score: float | None = None
    last_anomalous: bool | None = None
    last_received_at: str | None = None
    last_recording_id: int | None = None
    recordings: int = 0
    open_alerts: int = 0


class Machines(BaseModel):
    machines: list[Machine]
    silent_after_s: float


class ScoresPage(BaseModel):
    machine: str
    items: list[Recording]
    next_cursor: int | None = Field(None, description="pass as ?cursor= for the next page")


class Alert(BaseModel):
    alert_id: int
    machine: str
    opened_at: str
    last_at: str
    count: int = Field(description="anomalous recordings while the alert was open")
    max_score: float
    threshold: float
    first_recording_id: int | None = None
    last_recording_id: int | None = None
    acknowledged: bool
    acknowledged_at: str | None = None
    acknowledged_by: str | None = None


class AlertsPage(BaseModel):
    items: list[Alert]
    next_cursor: int | None = None


class Token(BaseModel):
    id: str
    name: str
    scopes: list[str]
    created_at: str
    revoked_at: str | None = None


class TokenCreated(Token):
    token: str = Field(description="the token itself: shown this once, stored only hashed")


class TokenRequest(BaseModel):
    name: str = Field("token", min_length=1, max_length=100)
    scopes: list[Literal["score", "read", "admin"]] = Field(min_length=1, max_length=3)


class Tokens(BaseModel):
    tokens: list[Token]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    store: Literal["ok", "unreachable"]
    machines: int
    version: str


def recording_out(row: dict) -> Recording:
    return Recording(recording_id=row["id"], machine=row["machine"], score=row["score"],
                     threshold=row["threshold"], anomalous=row["anomalous"],
                     windows=row["windows"], model_version=row["model_version"],
                     received_at=iso(row["received_ms"]), recorded_at=iso(row["recorded_ms"]),
                     source=row["source"], duration_s=row["duration_s"],
                     alert_id=row["alert_id"], audio_kept=row["audio_key"] is not None)


def alert_out(row: dict) -> Alert:
    return Alert(alert_id=row["id"], machine=row["machine"], opened_at=iso(row["opened_ms"]),
                 last_at=iso(row["last_ms"]), count=row["count"], max_score=row["max_score"],
                 threshold=row["threshold"], first_recording_id=row["first_recording_id"],
                 last_recording_id=row["last_recording_id"],
                 acknowledged=row["acked_ms"] is not None,
                 acknowledged_at=iso(row["acked_ms"]), acknowledged_by=row["acked_by"])


def token_out(row: dict) -> Token:
    return Token(id=row["id"], name=row["name"], scopes=row["scopes"],
                 created_at=iso(row["created_ms"]), revoked_at=iso(row["revoked_ms"]))
