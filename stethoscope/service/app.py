"""The FastAPI application: the API, the dashboard, /healthz, /metrics, and the error
handling that makes every error a one-line JSON answer (never a traceback)."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stethoscope import __version__
from stethoscope.errors import StethoscopeError
from stethoscope.service import api, dashboard, schemas
from stethoscope.service.core import Service
from stethoscope.service.machines import MachineModel
from stethoscope.service.scoring import UploadRejected
from stethoscope.service.settings import ServiceSettings
from stethoscope.service.store import Store

log = logging.getLogger("stethoscope.service")
STATIC = Path(__file__).parent / "static"
MULTIPART_ALLOWANCE = 64 * 1024  # form boundaries and headers around the WAV


class UploadTooLarge(Exception):
    """The request body grew past the upload limit while it was being read."""


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()), "status": status},
                        status_code=status, headers=headers)


class Guard:
    """Pure-ASGI outer layer: refuses bodies over the limit (by Content-Length at once,
    else while they stream in) and counts every answer in the metrics by route template."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service
        self.limit = service.settings.max_upload_bytes + MULTIPART_ALLOWANCE

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            self.service.metrics.rejected.labels("too_large").inc()
            response = error_response(413, self._too_large())
            await response(scope, receive, send)
            self._observe(scope, 413, start)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise UploadTooLarge()
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, counting_send)
        finally:
            self._observe(scope, status["code"], start)

    def _too_large(self) -> str:
        return (f"upload larger than the limit of {self.service.settings.max_upload_mb:g} MB "
                "(--max-upload-mb)")

    def _observe(self, scope, status: int, start: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or (
            "/static" if scope["path"].startswith("/static/") else "unmatched")
        self.service.metrics.observe_request(scope["method"], template, status,
                                             time.perf_counter() - start)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _validation_message(err: RequestValidationError) -> str:
    problems = []
    for item in err.errors()[:3]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "request"
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(problems)


def install_error_handlers(app: FastAPI, service: Service) -> None:
    """Every error as ``{"error": one line, "status": code}``; unexpected ones are logged
    with an id (the traceback goes to the server log only) and answered 500."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404 and exc.detail == "Not Found":
            return error_response(404, f"no such endpoint {request.url.path[:100]!r}")
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on this endpoint")
        return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(422, _validation_message(exc))

    @app.exception_handler(UploadRejected)
    async def rejected(request: Request, exc: UploadRejected):
        service.metrics.rejected.labels(str(exc.status)).inc()
        return error_response(exc.status, exc.message)

    @app.exception_handler(UploadTooLarge)
    async def too_large(request: Request, exc: UploadTooLarge):
        service.metrics.rejected.labels("too_large").inc()
        return error_response(413, f"upload larger than the limit of "
                              f"{service.settings.max_upload_mb:g} MB (--max-upload-mb)",
                              {"Connection": "close"})

    @app.exception_handler(dashboard.LoginRequired)
    async def login_required(request: Request, exc: dashboard.LoginRequired):
        return dashboard.redirect_to_login(request)

    @app.exception_handler(StethoscopeError)
    async def user_error(request: Request, exc: StethoscopeError):
        return error_response(422, str(exc))

    @app.exception_handler(SQLAlchemyError)
    async def store_down(request: Request, exc: SQLAlchemyError):
        incident = uuid.uuid4().hex[:8]
        log.error("store error %s: %s", incident, str(exc).splitlines()[0])
        return error_response(503, f"the store is unavailable; try again (incident {incident})",
                              {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        incident = uuid.uuid4().hex[:8]
        log.error("unexpected error %s on %s %s", incident, request.method, request.url.path,
                  exc_info=exc)
        return error_response(500, f"internal error (incident {incident}; see the server log)")


def create_app(settings: ServiceSettings, *, fleet: dict[str, MachineModel] | None = None,
               store: Store | None = None) -> FastAPI:
    """The service as an ASGI app (run it with uvicorn; ``stethoscope serve`` does).

    Parameters
    ----------
    settings : checked settings.
    fleet, store : already loaded models / an open store (default: from the settings).
    """
    service = Service(settings, fleet=fleet, store=store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="stethoscope", version=__version__, lifespan=lifespan,
                  description="Machine-sound monitoring: post recordings, get scores, "
                  "watch the fleet. Every endpoint but /healthz needs a bearer token.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    install_error_handlers(app, service)
    app.include_router(api.router)
    app.include_router(dashboard.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", response_model=schemas.Health, tags=["health"],
             summary="Liveness and store reachability (no token needed)",
             responses={503: {"model": schemas.Health, "description": "store unreachable"}})
    async def healthz() -> Response:
        ok = await api.store_ok(service)
        body = schemas.Health(status="ok" if ok else "degraded",
                              store="ok" if ok else "unreachable",
                              machines=len(service.fleet), version=__version__)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_spec(_: api.Read) -> JSONResponse:
        """The OpenAPI spec (read scope, like every endpoint but /healthz)."""
        return JSONResponse(app.openapi())

    @app.get("/metrics", response_class=Response, tags=["health"],
             summary="Prometheus metrics (read scope)",
             responses={**api.ERRORS, 200: {"content": {"text/plain": {}},
                                            "description": "Prometheus text format"}})
    def metrics(_: api.Read) -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    app.add_middleware(Guard, service=service)
    return app
