"""The monitoring service: ``stethoscope serve``.

A FastAPI application over the :class:`~stethoscope.Detector` (one model per machine, loaded
once), a SQLAlchemy store (SQLite in WAL mode by default, PostgreSQL by URL), access tokens
with scopes, Prometheus metrics and a server-rendered dashboard with live updates through
server-sent events. Install it with ``pip install 'stethoscope[service]'``.

>>> from stethoscope.service import ServiceSettings, create_app   # doctest: +SKIP
>>> app = create_app(ServiceSettings(models_dir="models"))        # doctest: +SKIP
"""

from __future__ import annotations

from stethoscope.service.errors import ServiceError
from stethoscope.service.settings import ServiceSettings

__all__ = ["ServiceError", "ServiceSettings", "create_app"]


def __getattr__(name: str):
    # Lazy: the settings and the CLI work without FastAPI installed.
    if name == "create_app":
        from stethoscope.service.app import create_app

        return create_app
    raise AttributeError(f"module 'stethoscope.service' has no attribute {name!r}")
