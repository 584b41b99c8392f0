"""Run the service with uvicorn: check the settings, refuse an open server, bind, print
where it listens (and a first token when the store has none), serve until stopped."""

from __future__ import annotations

import socket
import sys
from typing import TextIO

from stethoscope.service.errors import ServiceError
from stethoscope.service.settings import ServiceSettings, is_loopback

FIRST_TOKEN_NAME = "first admin token"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServiceError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def freeze_startup_objects() -> None:
    """Move everything made at start (torch, the models, the app: ~280,000 objects) out of
    the garbage collector's sight: a full collection over them takes 100-250 ms here
    (measured), a pause of every request in flight whenever one strikes. What requests
    make is still collected as usual."""
    import gc

    gc.collect()
    gc.freeze()


def log_config() -> dict:
    """uvicorn's logging with the access log on stderr too (stdout carries results only)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(settings: ServiceSettings, *, out: TextIO = sys.stdout) -> int:
    """Serve until interrupted; returns the exit code.

    Prints ``dashboard: URL`` (and, when the store holds no token yet and the server
    listens on loopback only, ``token: ...`` for a new admin token, shown once) to
    ``out``; logs go to stderr.

    Raises
    ------
    ServiceError
        when asked to listen beyond loopback while no token exists, or cannot listen.
    """
    import uvicorn

    from stethoscope.service.app import create_app
    from stethoscope.service.auth import TokenAuthority
    from stethoscope.service.machines import load_fleet
    from stethoscope.service.store import Store, safe_url

    store = Store(settings.db_url)
    authority = TokenAuthority(store)
    has_tokens = store.count_active_tokens() > 0
    if not has_tokens and not is_loopback(settings.host):
        raise ServiceError(f"refusing to listen on {settings.host}: the store has no access "
                           "token, so anyone who reaches the port could use it; create one "
                           "first with `stethoscope tokens create --scope admin` (same --db), "
                           "or listen on 127.0.0.1")
    fleet = load_fleet(settings.models_dir)
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    first = None if has_tokens else authority.create(FIRST_TOKEN_NAME, ["admin"])[0]
    app = create_app(settings, fleet=fleet, store=store)
    print(f"stethoscope serve: {len(fleet)} machine(s) ({', '.join(list(fleet)[:5])}"
          f"{', ...' if len(fleet) > 5 else ''}); store {safe_url(store.url)}", file=sys.stderr)
    print(f"dashboard: {url_of(settings.host, port)}", file=out)
    if first is not None:
        print(f"token: {first}   (admin; shown only now, stored hashed: keep it)", file=out)
    out.flush()
    freeze_startup_objects()
    config = uvicorn.Config(app, log_level="info", access_log=settings.access_log,
                            log_config=log_config(), timeout_graceful_shutdown=3,
                            server_header=False, lifespan="on", backlog=2048)
    make_server(config).run(sockets=[sock])
    return 0


def make_server(config):
    """A uvicorn server that, when told to stop, first ends the live-event streams (they
    never end by themselves, and uvicorn waits for open responses before it exits)."""
    import uvicorn

    class ServiceServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            service = getattr(getattr(config.app, "state", None), "service", None)
            if service is not None:
                service.hub.close()
            await super().shutdown(sockets=sockets)

    return ServiceServer(config)
