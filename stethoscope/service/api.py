"""REST API, version 1: uploads, machines, history, alerts, images, tokens, live events."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from stethoscope.service import schemas
from stethoscope.service.auth import TokenInfo
from stethoscope.service.core import Service, now_ms
from stethoscope.service.schemas import MACHINE_PATTERN, iso, parse_time
from stethoscope.service.scoring import UploadRejected

COOKIE = "stethoscope_token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSRF_HEADER = "x-requested-with"
WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave",
             "application/octet-stream")
_bearer = HTTPBearer(auto_error=False, description="a token from `stethoscope tokens create`")

ERRORS = {code: {"model": schemas.Error, "description": text} for code, text in (
    (400, "bad request"), (401, "missing or invalid token"), (403, "the token lacks the scope"),
    (404, "no such machine, recording or alert"), (422, "invalid parameters or audio"),
    (429, "rate limit exceeded"))}
UPLOAD_ERRORS = {**ERRORS, 413: {"model": schemas.Error, "description": "upload too large"},
                 415: {"model": schemas.Error, "description": "not a WAV upload"}}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "audio/wav": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}}}}}

Machine = Annotated[str, Path(pattern=MACHINE_PATTERN, description="machine name")]


def service(request: Request) -> Service:
    return request.app.state.service


def presented_token(request: Request, bearer: HTTPAuthorizationCredentials | None
                    ) -> tuple[str | None, bool]:
    """The token of a request and whether it came from the dashboard's cookie."""
    if bearer is not None:
        return bearer.credentials, False
    cookie = request.cookies.get(COOKIE)
    return (cookie, True) if cookie else (None, False)


def require(scope: str):
    """A dependency that lets the request through with a valid token holding ``scope``
    (401 without one, 403 with the wrong scope, 429 over the rate limit)."""

    async def check(request: Request,
                    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                    ) -> TokenInfo:
        svc = service(request)
        token, from_cookie = presented_token(request, bearer)
        info = svc.tokens.verify(token)
        if info is None:
            raise HTTPException(401, "missing or invalid token (send Authorization: Bearer "
                                "<token>)", headers={"WWW-Authenticate": "Bearer"})
        if not info.allows(scope):
            raise HTTPException(403, f"this token lacks the {scope!r} scope")
        if from_cookie and request.method not in SAFE_METHODS \
                and request.headers.get(CSRF_HEADER) != "stethoscope":
            raise HTTPException(403, "a write through the dashboard cookie needs the header "
                                "X-Requested-With: stethoscope")
        wait = svc.limiter.retry_after(info.id)
        if wait:
            raise HTTPException(429, f"rate limit of {svc.settings.rate_limit:g} requests/s "
                                "per token exceeded",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return info

    return check


Score = Annotated[TokenInfo, Depends(require("score"))]
Read = Annotated[TokenInfo, Depends(require("read"))]
Admin = Annotated[TokenInfo, Depends(require("admin"))]
router = APIRouter(prefix="/v1")


def _time_param(value: str | None, name: str) -> int | None:
    try:
        return parse_time(value, name)
    except ValueError as err:
        raise HTTPException(422, str(err)) from None


def _machine_or_404(svc: Service, name: str):
    machine = svc.machine(name)
    if machine is None:
        raise HTTPException(404, f"no machine {name!r} (the models folder has "
                            f"{len(svc.fleet)} machines; GET /v1/machines lists them)")
    return machine


async def read_upload(request: Request) -> bytes:
    """The WAV bytes of an upload: the raw body (audio/wav) or multipart field ``file``."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise UploadRejected(422, "a multipart upload needs the WAV in a field 'file'")
        data = await upload.read()
        await form.close()
    elif kind in WAV_TYPES or kind == "":
        data = await request.body()
    else:
        raise UploadRejected(415, f"Content-Type {kind!r} is not a WAV upload; send the WAV "
                             "as the body with Content-Type: audio/wav, or as multipart "
                             "field 'file'")
    if not data:
        raise UploadRejected(400, "the upload is empty (0 bytes); send a WAV file")
    return data


@router.post("/machines/{machine}/recordings", status_code=201, response_model=schemas.Recording,
             responses={**UPLOAD_ERRORS, 200: {"model": schemas.Recording,
                                               "description": "already stored (same "
                                               "Idempotency-Key): the stored result"}},
             openapi_extra=UPLOAD_BODY, summary="Score a recording and store its result")
async def post_recording(
    request: Request, response: Response, machine: Machine, token: Score,
    recorded_at: Annotated[str | None, Query(max_length=64,
                                             description="ISO 8601 time of recording")] = None,
    source: Annotated[str | None, Query(max_length=200,
                                        description="who sent it (a file name, a stream)")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200, description=(
        "repeat an upload with the same key after a lost reply: stored once"))] = None,
) -> schemas.Recording:
    """Score a WAV (the body with ``Content-Type: audio/wav``, or multipart field ``file``)
    with the machine's model; the result is committed to the store before the reply."""
    svc = service(request)
    model = _machine_or_404(svc, machine)
    recorded_ms = _time_param(recorded_at, "recorded_at")
    data = await read_upload(request)
    result = await svc.accept_upload(model, data, recorded_ms=recorded_ms, source=source,
                                     idempotency_key=idempotency_key, token_id=token.id)
    if result.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return schemas.recording_out(result.recording)


@router.get("/machines", response_model=schemas.Machines, responses=ERRORS,
            summary="Every machine with its model, last score, status and open alerts")
def list_machines(request: Request, _: Read) -> schemas.Machines:
    svc = service(request)
    return schemas.Machines(machines=[_machine_out(m) for m in svc.machine_summaries()],
                            silent_after_s=svc.settings.silent_after_s)


@router.get("/machines/{machine}", response_model=schemas.Machine, responses=ERRORS,
            summary="One machine")
def get_machine(request: Request, machine: Machine, _: Read) -> schemas.Machine:
    svc = service(request)
    _machine_or_404(svc, machine)
    return _machine_out(next(m for m in svc.machine_summaries() if m["machine"] == machine))


def _machine_out(summary: dict) -> schemas.Machine:
    return schemas.Machine(**{k: v for k, v in summary.items() if k != "last_received_ms"},
                           last_received_at=iso(summary["last_received_ms"]))


@router.get("/machines/{machine}/scores", response_model=schemas.ScoresPage, responses=ERRORS,
            summary="A machine's history, newest first, paginated")
def machine_scores(
    request: Request, machine: Machine, _: Read,
    since: Annotated[str | None, Query(max_length=64, description="ISO 8601, inclusive")] = None,
    until: Annotated[str | None, Query(max_length=64, description="ISO 8601, exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**62,
                                        description="next_cursor of the previous page")] = None,
) -> schemas.ScoresPage:
    svc = service(request)
    _machine_or_404(svc, machine)
    rows = svc.store.history(machine, since_ms=_time_param(since, "since"),
                             until_ms=_time_param(until, "until"), limit=limit + 1,
                             before_id=cursor)
    more = len(rows) > limit
    rows = rows[:limit]
    return schemas.ScoresPage(machine=machine, items=[schemas.recording_out(r) for r in rows],
                              next_cursor=rows[-1]["id"] if more else None)


@router.get("/recordings/{recording_id}", response_model=schemas.Recording, responses=ERRORS,
            summary="One stored result")
def get_recording(request: Request, recording_id: Annotated[int, Path(ge=1, le=2**62)],
                  _: Read) -> schemas.Recording:
    row = service(request).store.recording(recording_id)
    if row is None:
        raise HTTPException(404, f"no recording {recording_id}")
    return schemas.recording_out(row)


def _image(kind: str):
    def endpoint(request: Request, recording_id: Annotated[int, Path(ge=1, le=2**62)],
                 _: Read) -> Response:
        png = service(request).render_png(recording_id, kind)
        if png is None:
            raise HTTPException(404, f"recording {recording_id} has no kept audio (none, "
                                "expired, or --keep-audio is 0)")
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    endpoint.__name__ = f"recording_{kind}"
    return endpoint


for _kind, _summary in (("spectrogram", "The recording's log-mel spectrogram"),
                        ("deviation", "Where the recording deviates from normal")):
    router.add_api_route(f"/recordings/{{recording_id}}/{_kind}.png", _image(_kind),
                         methods=["GET"], summary=_summary, responses={
                             **ERRORS, 200: {"content": {"image/png": {}},
                                             "description": "PNG image"}},
                         response_class=Response)


@router.get("/alerts", response_model=schemas.AlertsPage, responses=ERRORS,
            summary="Alerts, newest first")
def list_alerts(
    request: Request, _: Read,
    state: Annotated[str, Query(pattern="^(open|acked|all)$")] = "open",
    machine: Annotated[str | None, Query(pattern=MACHINE_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> schemas.AlertsPage:
    rows = service(request).store.alerts(state=state, machine=machine, limit=limit + 1,
                                         before_id=cursor)
    more = len(rows) > limit
    rows = rows[:limit]
    return schemas.AlertsPage(items=[schemas.alert_out(r) for r in rows],
                              next_cursor=rows[-1]["id"] if more else None)


@router.post("/alerts/{alert_id}/ack", response_model=schemas.Alert, responses=ERRORS,
             summary="Acknowledge an alert (admin)")
def ack_alert(request: Request, alert_id: Annotated[int, Path(ge=1, le=2**62)],
              token: Admin) -> schemas.Alert:
    svc = service(request)
    row = svc.store.ack_alert(alert_id, token.name, now_ms())
    if row is None:
        raise HTTPException(404, f"no alert {alert_id}")
    svc.hub.publish("alert", {"machine": row["machine"], "alert_id": row["id"],
                              "state": "acknowledged"})
    return schemas.alert_out(row)


@router.get("/tokens", response_model=schemas.Tokens, responses=ERRORS,
            summary="Every token (without secrets) (admin)")
def list_tokens(request: Request, _: Admin) -> schemas.Tokens:
    return schemas.Tokens(tokens=[schemas.token_out(r) for r in service(request).tokens.list()])


@router.post("/tokens", status_code=201, response_model=schemas.TokenCreated, responses=ERRORS,
             summary="Make a token (admin); the reply is the only time it is shown")
def create_token(request: Request, body: schemas.TokenRequest, _: Admin) -> schemas.TokenCreated:
    token, row = service(request).tokens.create(body.name, list(body.scopes))
    return schemas.TokenCreated(token=token, **schemas.token_out(row).model_dump())


@router.delete("/tokens/{token_id}", status_code=204, responses=ERRORS,
               summary="Revoke a token (admin)", response_class=Response)
def revoke_token(request: Request, token_id: Annotated[str, Path(pattern="^[0-9a-f]{1,16}$")],
                 _: Admin) -> Response:
    if not service(request).tokens.revoke(token_id):
        raise HTTPException(404, f"no active token {token_id}")
    return Response(status_code=204)


@router.get("/events", responses={**ERRORS, 200: {"content": {"text/event-stream": {}},
                                                  "description": "server-sent events"}},
            summary="Live results and alert changes (server-sent events)",
            response_class=StreamingResponse)
async def events(request: Request, _: Read) -> StreamingResponse:
    """Events ``recording`` (a result was stored) and ``alert`` (opened, updated,
    acknowledged), each with JSON data."""
    return StreamingResponse(service(request).hub.stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def store_ok(svc: Service) -> bool:
    return await run_in_threadpool(svc.store.ping)
