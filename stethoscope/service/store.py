"""The store: SQLAlchemy tables and the repository the API, the dashboard and the CLI use.

SQLite (WAL journal, ``synchronous=FULL``) is the embedded default; PostgreSQL works the
same by URL. Times are integer milliseconds since the epoch (UTC) in every table, so the
bucket arithmetic is the same SQL on both. Results are written in batches by
:class:`~stethoscope.service.writer.CommitQueue`, one transaction per batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from stethoscope.service.errors import ServiceError

BUCKET_MS = 15 * 60 * 1000  # sparkline buckets: 96 a day
_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite: INTEGER PRIMARY KEY = rowid

METADATA = MetaData()

tokens = Table(
    "tokens", METADATA,
    Column("id", String(16), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("scopes", String(64), nullable=False),  # space-separated
    Column("secret_hash", String(64), nullable=False),  # hex SHA-256; the token is never kept
    Column("created_ms", BigInteger, nullable=False),
    Column("revoked_ms", BigInteger),
)

recordings = Table(
    "recordings", METADATA,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("machine", String(64), nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    Column("recorded_ms", BigInteger),
    Column("score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("anomalous", Boolean, nullable=False),
    Column("windows", Text, nullable=False),  # JSON list of {start_s, end_s, score, anomalous}
    Column("duration_s", Float, nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("source", String(200)),
    Column("idempotency_key", String(200)),
    Column("alert_id", BigInteger),
    Column("audio_key", String(64)),
    Column("token_id", String(16)),
    UniqueConstraint("machine", "idempotency_key", name="uq_recordings_idempotency"),
    Index("ix_recordings_machine_id", "machine", "id"),
    Index("ix_recordings_machine_received", "machine", "received_ms"),
    Index("ix_recordings_audio", "audio_key"),
)

alerts = Table(
    "alerts", METADATA,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("machine", String(64), nullable=False),
    Column("opened_ms", BigInteger, nullable=False),
    Column("last_ms", BigInteger, nullable=False),
    Column("count", Integer, nullable=False),
    Column("max_score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("first_recording_id", BigInteger),
    Column("last_recording_id", BigInteger),
    Column("acked_ms", BigInteger),
    Column("acked_by", String(100)),
    Index("ix_alerts_machine_open", "machine", "acked_ms"),
)

machine_state = Table(
    "machine_state", METADATA,
    Column("machine", String(64), primary_key=True),
    Column("last_recording_id", BigInteger, nullable=False),
    Column("last_ms", BigInteger, nullable=False),
    Column("last_score", Float, nullable=False),
    Column("last_threshold", Float, nullable=False),
    Column("last_anomalous", Boolean, nullable=False),
    Column("recordings", BigInteger, nullable=False),
)

score_buckets = Table(
    "score_buckets", METADATA,
    Column("machine", String(64), primary_key=True),
    Column("bucket_ms", BigInteger, primary_key=True),
    Column("count", Integer, nullable=False),
    Column("max_score", Float, nullable=False),
    Column("sum_score", Float, nullable=False),
)


@dataclass
class NewRecording:
    """A scored upload on its way into the store."""

    machine: str
    received_ms: int
    score: float
    threshold: float
    anomalous: bool
    windows: list[dict]
    duration_s: float
    model_version: str
    recorded_ms: int | None = None
    source: str | None = None
    idempotency_key: str | None = None
    audio_key: str | None = None
    token_id: str | None = None


@dataclass
class CommitResult:
    """A committed recording as stored (``replayed``: it was already there, same key)."""

    recording: dict[str, Any]
    replayed: bool = False
    alert_opened: bool = False
    alert: dict[str, Any] | None = field(default=None)


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean the psycopg 3 driver the extra installs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def _sqlite_engine(url) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below open transactions
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss too
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())

    return engine


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the settings the service relies on."""
    try:
        parsed = make_url(normalise_url(url))
    except ArgumentError:
        raise ServiceError(f"--db {url!r} is not a database URL (e.g. sqlite:///store.db or "
                           "postgresql://user:password@127.0.0.1/db)") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    try:
        return create_engine(parsed, pool_pre_ping=True, pool_size=8, max_overflow=8)
    except (ArgumentError, ImportError, SQLAlchemyError) as err:
        raise ServiceError(f"--db {safe_url(url)}: {str(err).splitlines()[0]}") from None


def _row(row) -> dict[str, Any] | None:
    return None if row is None else dict(row._mapping)


def recording_dict(row) -> dict[str, Any]:
    data = dict(row._mapping) if not isinstance(row, dict) else dict(row)
    data["windows"] = json.loads(data["windows"]) if isinstance(data["windows"], str) \
        else data["windows"]
    data["anomalous"] = bool(data["anomalous"])
    return data


class Store:
    """Repository over the tables above; every method opens and closes its own
    transaction, so it is safe from many threads.

    Parameters
    ----------
    url : SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://...``).
    migrate : bring the schema up to date on open (see :mod:`.migrations`).
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        # what the writer knows exists (only this process's writer adds rows; none are
        # deleted): it then updates them in one statement per batch
        self._known_states: set[str] | None = None
        self._buckets_seen: set[tuple[str, int]] = set()
        if migrate:
            self.migrate()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> int:
        from stethoscope.service.migrations import upgrade

        try:
            return upgrade(self.engine)
        except OperationalError as err:
            reason = str(err.orig).splitlines()[0] if err.orig else str(err).splitlines()[0]
            raise ServiceError(f"cannot open the store {safe_url(self.url)} ({reason})") \
                from None

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    # ------------------------------------------------------------------ tokens
    def add_token(self, token_id: str, name: str, scopes: str, secret_hash: str,
                  created_ms: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(tokens.insert().values(id=token_id, name=name, scopes=scopes,
                                                secret_hash=secret_hash,
                                                created_ms=created_ms))

    def token(self, token_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return _row(conn.execute(select(tokens).where(tokens.c.id == token_id)).first())

    def list_tokens(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(tokens).order_by(tokens.c.created_ms)).all()
        return [_row(r) for r in rows]

    def revoke_token(self, token_id: str, now_ms: int) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(update(tokens).where(tokens.c.id == token_id,
                                                     tokens.c.revoked_ms.is_(None))
                                .values(revoked_ms=now_ms))
        return done.rowcount > 0

    def count_active_tokens(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(tokens)
                                    .where(tokens.c.revoked_ms.is_(None))).scalar_one())

    # ------------------------------------------------------------------ writing results
    def commit_recordings(self, items: list[NewRecording]) -> list[CommitResult]:
        """Store ``items`` in one transaction; all are committed when this returns.

        A recording whose ``idempotency_key`` its machine already has (in the store or
        earlier in ``items``) is not stored again: its result is the stored one with
        ``replayed=True``. An anomalous recording opens an alert for its machine, or joins
        the machine's open (unacknowledged) one. Statements per batch: one insert of all
        recordings, and a few per machine and alert (not per recording).
        """
        self._new_states: set[str] = set()
        self._new_buckets: set[tuple[str, int]] = set()
        with self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
            with conn.begin():
                replays = self._stored_keys(conn, items)
                fresh: list[NewRecording] = []
                slots: list[tuple[str, Any]] = []  # ("new", index in fresh) or ("replay", key)
                for item in items:
                    key = (item.machine, item.idempotency_key)
                    if item.idempotency_key is not None and key in replays:
                        slots.append(("replay", key))
                        continue
                    if item.idempotency_key is not None:
                        replays[key] = None  # a later copy in this batch replays this one
                    slots.append(("new", len(fresh)))
                    fresh.append(item)
                stored = self._insert_fresh(conn, fresh)
                for (machine, key_value), row in list(replays.items()):
                    if row is None:  # stored just now
                        replays[(machine, key_value)] = next(
                            r.recording for r in stored
                            if r.recording["machine"] == machine
                            and r.recording["idempotency_key"] == key_value)
        # committed: only now may the rows made by this batch be taken as existing
        self._state_rows_seen().update(self._new_states)
        self._buckets_seen.update(self._new_buckets)
        return [stored[ref] if kind == "new"
                else CommitResult(replays[ref], replayed=True) for kind, ref in slots]

    def _stored_keys(self, conn: Connection, items: list[NewRecording]
                     ) -> dict[tuple[str, str], dict | None]:
        """The already stored recordings of the items' idempotency keys (one query)."""
        wanted = {(i.machine, i.idempotency_key) for i in items
                  if i.idempotency_key is not None}
        if not wanted:
            return {}
        rows = conn.execute(select(recordings).where(
            recordings.c.idempotency_key.in_(sorted({key for _, key in wanted})))).all()
        return {(r.machine, r.idempotency_key): recording_dict(r) for r in rows
                if (r.machine, r.idempotency_key) in wanted}

    def _insert_fresh(self, conn: Connection, items: list[NewRecording]) -> list[CommitResult]:
        if not items:
            return []
        alerts_of = self._alerts_for(conn, items)
        values = []
        for item in items:
            row = {k: getattr(item, k) for k in (
                "machine", "received_ms", "recorded_ms", "score", "threshold", "anomalous",
                "duration_s", "model_version", "source", "idempotency_key", "audio_key",
                "token_id")}
            row["windows"] = json.dumps(item.windows, separators=(",", ":"))
            alert = alerts_of.get(item.machine) if item.anomalous else None
            row["alert_id"] = alert["id"] if alert else None
            values.append(row)
        ids = [r[0] for r in conn.execute(
            recordings.insert().returning(recordings.c.id, sort_by_parameter_order=True),
            values).all()]
        results = []
        for item, row, rec_id in zip(items, values, ids, strict=True):
            alert = alerts_of.get(item.machine) if item.anomalous else None
            opened = False
            if alert is not None:
                opened = alert.pop("_new", False)
                alert["first_recording_id"] = alert["first_recording_id"] or rec_id
                alert["last_recording_id"] = rec_id
            results.append(CommitResult({**row, "id": rec_id, "windows": item.windows},
                                        alert_opened=opened,
                                        alert=dict(alert) if alert else None))
        for alert in alerts_of.values():
            conn.execute(update(alerts).where(alerts.c.id == alert["id"]).values(
                last_ms=alert["last_ms"], count=alert["count"], max_score=alert["max_score"],
                first_recording_id=alert["first_recording_id"],
                last_recording_id=alert["last_recording_id"]))
        self._update_machine_states(conn, items, ids)
        self._update_buckets(conn, items)
        return results

    def _alerts_for(self, conn: Connection, items: list[NewRecording]) -> dict[str, dict]:
        """Per machine with anomalous items: its open alert, updated in memory with them
        (or a new one, inserted now and marked ``_new``)."""
        out: dict[str, dict] = {}
        for item in items:
            if not item.anomalous:
                continue
            alert = out.get(item.machine)
            if alert is None:
                alert = _row(conn.execute(
                    select(alerts).where(alerts.c.machine == item.machine,
                                         alerts.c.acked_ms.is_(None))
                    .order_by(alerts.c.id.desc()).limit(1)).first())
                if alert is None:
                    alert = {"machine": item.machine, "opened_ms": item.received_ms,
                             "last_ms": item.received_ms, "count": 0, "max_score": item.score,
                             "threshold": item.threshold, "first_recording_id": None,
                             "last_recording_id": None, "acked_ms": None, "acked_by": None}
                    alert["id"] = conn.execute(alerts.insert().values(**alert)
                                               ).inserted_primary_key[0]
                    alert["_new"] = True
                out[item.machine] = alert
            alert.update(last_ms=max(alert["last_ms"], item.received_ms),
                         count=alert["count"] + 1,
                         max_score=max(alert["max_score"], item.score))
        return out

    def _update_machine_states(self, conn: Connection, items: list[NewRecording],
                               ids: list[int]) -> None:
        """Each machine's last result and count: one UPDATE for all the batch's machines
        (executemany), an INSERT for a machine's first result."""
        last: dict[str, dict] = {}
        for item, rec_id in zip(items, ids, strict=True):
            entry = last.setdefault(item.machine, {"b_machine": item.machine, "b_count": 0})
            entry.update(b_id=rec_id, b_ms=item.received_ms, b_score=item.score,
                         b_threshold=item.threshold, b_anomalous=item.anomalous)
            entry["b_count"] += 1
        known = self._state_rows(conn) | self._new_states
        fresh = [e for m, e in last.items() if m not in known]
        if len(fresh) < len(last):
            conn.execute(update(machine_state)
                         .where(machine_state.c.machine == bindparam("b_machine"))
                         .values(last_recording_id=bindparam("b_id"),
                                 last_ms=bindparam("b_ms"), last_score=bindparam("b_score"),
                                 last_threshold=bindparam("b_threshold"),
                                 last_anomalous=bindparam("b_anomalous"),
                                 recordings=machine_state.c.recordings + bindparam("b_count")),
                         [e for m, e in last.items() if m in known])
        for e in fresh:
            conn.execute(machine_state.insert().values(
                machine=e["b_machine"], last_recording_id=e["b_id"], last_ms=e["b_ms"],
                last_score=e["b_score"], last_threshold=e["b_threshold"],
                last_anomalous=e["b_anomalous"], recordings=e["b_count"]))
            self._new_states.add(e["b_machine"])

    def _state_rows(self, conn: Connection) -> set[str]:
        """Machines that have a ``machine_state`` row (read once; rows are never deleted)."""
        if self._known_states is None:
            self._known_states = set(conn.execute(select(machine_state.c.machine)).scalars())
        return self._known_states

    def _state_rows_seen(self) -> set[str]:
        if self._known_states is None:
            self._known_states = set()
            with self.engine.connect() as conn:
                self._known_states = set(conn.execute(select(machine_state.c.machine))
                                         .scalars())
        return self._known_states

    def _update_buckets(self, conn: Connection, items: list[NewRecording]) -> None:
        """The 15-minute sparkline buckets: one UPDATE (executemany) for the buckets that
        exist, an INSERT for each new one."""
        sums: dict[tuple[str, int], dict] = {}
        for item in items:
            bucket = item.received_ms - item.received_ms % BUCKET_MS
            entry = sums.setdefault((item.machine, bucket), {
                "b_machine": item.machine, "b_bucket": bucket, "b_count": 0, "b_sum": 0.0,
                "b_max": item.score})
            entry["b_count"] += 1
            entry["b_sum"] += item.score
            entry["b_max"] = max(entry["b_max"], item.score)
        known = [e for key, e in sums.items()
                 if key in self._new_buckets or self._bucket_known(conn, key)]
        if known:
            greatest = func.greatest if self.dialect == "postgresql" else func.max
            conn.execute(update(score_buckets).where(
                score_buckets.c.machine == bindparam("b_machine"),
                score_buckets.c.bucket_ms == bindparam("b_bucket"))
                .values(count=score_buckets.c.count + bindparam("b_count"),
                        sum_score=score_buckets.c.sum_score + bindparam("b_sum"),
                        max_score=greatest(score_buckets.c.max_score, bindparam("b_max"))),
                known)
        for key, e in sums.items():
            if e not in known:
                conn.execute(score_buckets.insert().values(
                    machine=e["b_machine"], bucket_ms=e["b_bucket"], count=e["b_count"],
                    max_score=e["b_max"], sum_score=e["b_sum"]))
                self._new_buckets.add(key)

    def _bucket_known(self, conn: Connection, key: tuple[str, int]) -> bool:
        if key in self._buckets_seen:
            return True
        exists = conn.execute(select(score_buckets.c.count).where(
            score_buckets.c.machine == key[0], score_buckets.c.bucket_ms == key[1])).first()
        if exists is not None:  # committed before this batch began
            if len(self._buckets_seen) > 100_000:
                self._buckets_seen.clear()
            self._buckets_seen.add(key)
        return exists is not None

    # ------------------------------------------------------------------ reading results
    def recording(self, rec_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(recordings).where(recordings.c.id == rec_id)).first()
        return None if row is None else recording_dict(row)

    def history(self, machine: str, *, since_ms: int | None = None,
                until_ms: int | None = None, limit: int = 100,
                before_id: int | None = None) -> list[dict[str, Any]]:
        """A machine's recordings, newest first; page on with ``before_id``."""
        query = select(recordings).where(recordings.c.machine == machine)
        if since_ms is not None:
            query = query.where(recordings.c.received_ms >= since_ms)
        if until_ms is not None:
            query = query.where(recordings.c.received_ms < until_ms)
        if before_id is not None:
            query = query.where(recordings.c.id < before_id)
        query = query.order_by(recordings.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [recording_dict(r) for r in conn.execute(query).all()]

    def timeline(self, machine: str, since_ms: int, limit: int = 2000
                 ) -> list[tuple[int, float, bool]]:
        """``(received_ms, score, anomalous)`` of a machine since ``since_ms``, oldest first
        (at most the ``limit`` newest)."""
        query = (select(recordings.c.received_ms, recordings.c.score, recordings.c.anomalous)
                 .where(recordings.c.machine == machine, recordings.c.received_ms >= since_ms)
                 .order_by(recordings.c.id.desc()).limit(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [(int(t), float(s), bool(a)) for t, s, a in reversed(rows)]

    def machine_states(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            return {r.machine: _row(r) for r in conn.execute(select(machine_state)).all()}

    def open_alert_counts(self) -> dict[str, int]:
        query = (select(alerts.c.machine, func.count()).where(alerts.c.acked_ms.is_(None))
                 .group_by(alerts.c.machine))
        with self.engine.connect() as conn:
            return {m: int(n) for m, n in conn.execute(query).all()}

    def sparklines(self, since_ms: int) -> dict[str, list[tuple[int, float]]]:
        """``machine -> [(bucket start ms, max score)]`` of the 15-minute buckets since
        ``since_ms``, oldest first."""
        query = (select(score_buckets.c.machine, score_buckets.c.bucket_ms,
                        score_buckets.c.max_score)
                 .where(score_buckets.c.bucket_ms >= since_ms - since_ms % BUCKET_MS)
                 .order_by(score_buckets.c.machine, score_buckets.c.bucket_ms))
        out: dict[str, list[tuple[int, float]]] = {}
        with self.engine.connect() as conn:
            for machine, bucket, peak in conn.execute(query).all():
                out.setdefault(machine, []).append((int(bucket), float(peak)))
        return out

    # ------------------------------------------------------------------ alerts
    def alerts(self, *, state: str = "open", machine: str | None = None, limit: int = 100,
               before_id: int | None = None, since_ms: int | None = None
               ) -> list[dict[str, Any]]:
        """Alerts newest first: ``state`` "open" (unacknowledged), "acked" or "all"."""
        query = select(alerts)
        if state == "open":
            query = query.where(alerts.c.acked_ms.is_(None))
        elif state == "acked":
            query = query.where(alerts.c.acked_ms.is_not(None))
        if machine is not None:
            query = query.where(alerts.c.machine == machine)
        if before_id is not None:
            query = query.where(alerts.c.id < before_id)
        if since_ms is not None:
            query = query.where(alerts.c.last_ms >= since_ms)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(alerts.c.id.desc()).limit(limit)).all()
        return [_row(r) for r in rows]

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return _row(conn.execute(select(alerts).where(alerts.c.id == alert_id)).first())

    def ack_alert(self, alert_id: int, by: str, now_ms: int) -> dict[str, Any] | None:
        """Acknowledge an alert (again: no change); None when there is no such alert."""
        with self.engine.begin() as conn:
            conn.execute(update(alerts).where(alerts.c.id == alert_id,
                                              alerts.c.acked_ms.is_(None))
                         .values(acked_ms=now_ms, acked_by=by))
            return _row(conn.execute(select(alerts).where(alerts.c.id == alert_id)).first())

    # ------------------------------------------------------------------ kept audio
    def audio_keys_before(self, before_ms: int, limit: int = 10_000) -> list[str]:
        query = (select(recordings.c.audio_key)
                 .where(recordings.c.audio_key.is_not(None),
                        recordings.c.received_ms < before_ms).limit(limit))
        with self.engine.connect() as conn:
            return [k for (k,) in conn.execute(query).all()]

    def forget_audio(self, keys: list[str]) -> None:
        if not keys:
            return
        with self.engine.begin() as conn:
            for start in range(0, len(keys), 500):
                conn.execute(update(recordings)
                             .where(recordings.c.audio_key.in_(keys[start:start + 500]))
                             .values(audio_key=None))
