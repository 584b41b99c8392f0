"""Command line of the service: ``stethoscope serve`` and ``stethoscope tokens``.

Argument parsing only, with no FastAPI import, so the base CLI works without the extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stethoscope.service.errors import ServiceError
from stethoscope.service.settings import DEFAULT_DATA_DIR, ServiceSettings, default_db_url

EXTRA_HINT = "install the service extra: pip install 'stethoscope[service]'"


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, metavar="URL",
                   help="store URL: sqlite:///file.db (default: DATA/store.db) or "
                        "postgresql://user:password@host/db")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR",
                   help=f"folder for the default store and kept audio (default {DEFAULT_DATA_DIR})")


def add_commands(sub) -> None:
    """Register ``serve`` and ``tokens`` on the main parser's subparsers."""
    p = sub.add_parser("serve", help="run the monitoring service (API + live dashboard)")
    p.add_argument("--models", type=Path, required=True, metavar="DIR",
                   help="one model folder per machine: DIR/<machine>/config.json")
    _store_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; beyond 127.0.0.1 only once a token exists "
                        "(default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="0: any free port (printed)")
    p.add_argument("--keep-audio", type=float, default=0.0, metavar="DAYS",
                   help="keep uploads this many days for their images (0-365; default 0)")
    p.add_argument("--audio-max-mb", type=float, default=2048.0,
                   help="bound on kept audio; oldest deleted first (default 2048)")
    p.add_argument("--max-upload-mb", type=float, default=32.0,
                   help="largest accepted upload (default 32)")
    p.add_argument("--rate-limit", type=float, default=50.0, metavar="PER_S",
                   help="requests per second per token (default 50)")
    p.add_argument("--rate-burst", type=int, default=100, help="burst per token (default 100)")
    p.add_argument("--silent-after", type=float, default=900.0, metavar="SECONDS",
                   help="a machine with no recording for this long is 'silent' (default 900)")
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")
    p.add_argument("--scoring-processes", type=_processes, default="auto", metavar="N",
                   help="score in N worker processes, each with its own copy of the models; "
                        "0: one thread of the server process; auto (default): 2 on a machine "
                        "with 2 or more cores, else 0")

    p = sub.add_parser("tokens", help="create, list and revoke the service's access tokens")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("create", help="make a token and print it (once; stored hashed)")
    t.add_argument("--scope", action="append", required=True,
                   help="score, read or admin; repeat or comma-separate for several")
    t.add_argument("--name", default="token", help="a label: who or what uses it")
    _store_args(t)
    t = tsub.add_parser("list", help="list tokens (never their values)")
    _store_args(t)
    t = tsub.add_parser("revoke", help="revoke a token by its id")
    t.add_argument("id", help="the id `tokens list` shows (stk_<id>_...)")
    _store_args(t)


def _processes(value: str) -> int:
    """``auto``: two scoring processes where there are two cores for them (measured: 1.1-1.3×
    the clips/s of one thread and a lower p99 at 20 clients, docs/benchmarks.md)."""
    if value == "auto":
        return 2 if (os.cpu_count() or 1) >= 2 else 0
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of processes or 'auto'") from None


def _db_url(args: argparse.Namespace) -> str:
    return args.db or default_db_url(args.data)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = ServiceSettings(
        models_dir=args.models, db_url=_db_url(args), data_dir=args.data, host=args.host,
        port=args.port, keep_audio_days=args.keep_audio, audio_max_mb=args.audio_max_mb,
        max_upload_mb=args.max_upload_mb, rate_limit=args.rate_limit,
        rate_burst=args.rate_burst, silent_after_s=args.silent_after,
        access_log=args.access_log, scoring_processes=args.scoring_processes)
    try:
        from stethoscope.service.server import serve
    except ImportError as err:
        raise ServiceError(f"`serve` needs {err.name}; {EXTRA_HINT}") from None
    return serve(settings)


def cmd_tokens(args: argparse.Namespace) -> int:
    try:
        from stethoscope.service.auth import TokenAuthority
        from stethoscope.service.store import Store
    except ImportError as err:
        raise ServiceError(f"`tokens` needs {err.name}; {EXTRA_HINT}") from None
    store = Store(_db_url(args))
    try:
        authority = TokenAuthority(store)
        if args.action == "create":
            token, row = authority.create(args.name, args.scope)
            print(f"created token {row['id']} ({row['name']}; scopes {' '.join(row['scopes'])});"
                  " it is shown only now and stored hashed", file=sys.stderr)
            print(token)
        elif args.action == "list":
            for row in authority.list():
                state = "revoked" if row["revoked_ms"] else "active"
                print(f"{row['id']}  {state:<7}  {' '.join(row['scopes']):<18}  {row['name']}")
        else:
            if not authority.revoke(args.id):
                raise ServiceError(f"no active token {args.id!r} in the store")
            print(f"revoked token {args.id}")
    finally:
        store.close()
    return 0


COMMANDS = {"serve": cmd_serve, "tokens": cmd_tokens}
