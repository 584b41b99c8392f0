"""Explicit, versioned schema: ``schema_version`` says which steps a store has had.

Each step is a function of a connection, applied once, in order, inside one transaction
together with its row in ``schema_version``. Hand-written rather than Alembic: one linear
list is all the service needs, with no migration scripts folder to ship and find.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, text

from stethoscope.service.errors import ServiceError


def _v1_initial(conn: Connection) -> None:
    from stethoscope.service.store import METADATA

    METADATA.create_all(conn)


# (version, description, step): append only; never edit a released step.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "tokens, recordings, alerts, machine state, score buckets", _v1_initial),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                  "description VARCHAR(200) NOT NULL, applied_ms BIGINT NOT NULL)")


def current_version(conn: Connection) -> int:
    """The highest applied step (0 for an empty store)."""
    conn.execute(text(_VERSION_TABLE))
    return int(conn.execute(text("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
               .scalar_one())


def upgrade(engine: Engine) -> int:
    """Apply every missing step; returns the store's version afterwards.

    Safe when two servers start at once: PostgreSQL takes an advisory lock, SQLite an
    immediate (write) transaction, so the second waits and then finds nothing to do.

    Raises
    ------
    ServiceError
        when the store was written by a newer stethoscope (its version is unknown here).
    """
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7355608)"))
            version = current_version(conn)
            if version > SCHEMA_VERSION:
                raise ServiceError(f"the store has schema version {version}, newer than this "
                                   f"stethoscope knows ({SCHEMA_VERSION}); upgrade stethoscope")
            for number, description, step in MIGRATIONS:
                if number > version:
                    step(conn)
                    conn.execute(text("INSERT INTO schema_version (version, description, "
                                      "applied_ms) VALUES (:v, :d, :t)"),
                                 {"v": number, "d": description, "t": int(time.time() * 1000)})
                    version = number
    return version
