"""The dashboard: login with a read token (kept in an HttpOnly cookie), the fleet at a
glance, one page per machine; both refresh their panel when a server-sent event says a
result or an alert changed. Server-rendered HTML, one small script, nothing from a CDN."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from stethoscope.service import charts
from stethoscope.service.api import COOKIE, service
from stethoscope.service.auth import TokenInfo
from stethoscope.service.core import Service, now_ms
from stethoscope.service.schemas import MACHINE_PATTERN, iso

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
DAY_MS = 86_400_000
COOKIE_SECONDS = 12 * 3600
RECENT = 12
router = APIRouter(include_in_schema=False)


class LoginRequired(Exception):
    """A page was asked for without a valid read token: go to the login page."""


def _user(request: Request) -> TokenInfo | None:
    info = service(request).tokens.verify(request.cookies.get(COOKIE))
    return info if info is not None and info.allows("read") else None


def page_user(request: Request) -> TokenInfo:
    info = _user(request)
    if info is None:
        raise LoginRequired()
    return info


def fragment_user(request: Request) -> TokenInfo:
    info = _user(request)
    if info is None:
        raise HTTPException(401, "log in again: the dashboard's token is missing or invalid")
    return info


def redirect_to_login(request: Request) -> RedirectResponse:
    target = request.url.path
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def _safe_next(target: str | None) -> str:
    """Only paths on this site (no ``//host`` or scheme): no open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def ago(ms: int | None, now: int) -> str:
    if ms is None:
        return "never"
    seconds = max(0, (now - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


# ---------------------------------------------------------------------- views (data)
def fleet_view(svc: Service) -> dict:
    now = now_ms()
    since = now - DAY_MS
    lines = svc.store.sparklines(since)
    machines = []
    for m in svc.machine_summaries():
        machines.append({**m, "ago": ago(m["last_received_ms"], now),
                         "spark": charts.sparkline(lines.get(m["machine"], []), m["threshold"],
                                                   since, now)})
    order = {"anomalous": 0, "silent": 1, "normal": 2}
    machines.sort(key=lambda m: (order[m["status"]], m["machine"]))
    counts = {s: sum(m["status"] == s for m in machines) for s in order}
    return {"machines": machines, "counts": counts, "updated": iso(now)}


def machine_view(svc: Service, name: str) -> dict:
    now = now_ms()
    summary = next(m for m in svc.machine_summaries() if m["machine"] == name)
    points = svc.store.timeline(name, now - DAY_MS)
    alerts = svc.store.alerts(state="all", machine=name, limit=50)
    t0, t1 = time_axis(points, now)
    chart = charts.timeline(charts.thin(points, 600), summary["threshold"],
                            [(a["id"], a["opened_ms"]) for a in alerts], t0, t1)
    recent = svc.store.history(name, limit=RECENT)
    for row in recent:
        row["when"] = iso(row["received_ms"])
        row["ago"] = ago(row["received_ms"], now)
    for alert in alerts:
        alert["opened"] = iso(alert["opened_ms"])
        alert["ago"] = ago(alert["last_ms"], now)
    return {"m": {**summary, "ago": ago(summary["last_received_ms"], now)}, "chart": chart,
            "recent": recent, "alerts": alerts, "updated": iso(now),
            "keep_audio": svc.keeper.enabled}


def time_axis(points: list[tuple[int, float, bool]], now: int) -> tuple[int, int]:
    """From the first point of the day to now, at least a minute, with a margin."""
    if not points:
        return now - DAY_MS, now
    start = min(points[0][0], now - 60_000)
    margin = (now - start) // 30
    return start - margin, now + margin


def _machine_or_404(svc: Service, name: str) -> None:
    if svc.machine(name) is None:
        raise HTTPException(404, f"no machine {name[:64]!r}")


def _page(request: Request, template: str, context: dict, status: int = 200) -> HTMLResponse:
    response = TEMPLATES.TemplateResponse(request, template, context, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# ---------------------------------------------------------------------- routes
@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:  # noqa: A002
    return _page(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login")
def login(request: Request, token: Annotated[str, Form(max_length=300)] = "",
          next: Annotated[str, Form(max_length=300)] = "/") -> Response:  # noqa: A002
    svc = service(request)
    info = svc.tokens.verify(token.strip())
    if info is None or not info.allows("read"):
        time.sleep(0.2)  # a little friction for guessing; tokens are unguessable anyway
        error = ("this token lacks the 'read' scope" if info is not None
                 else "unknown, revoked or mistyped token")
        return _page(request, "login.html", {"next": _safe_next(next), "error": error}, 401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE, token.strip(), max_age=COOKIE_SECONDS, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse)
def fleet_page(request: Request) -> HTMLResponse:
    user = page_user(request)
    svc = service(request)
    return _page(request, "fleet.html", {**fleet_view(svc), "user": user,
                                         "panel_url": "/ui/fleet", "machine": ""})


@router.get("/machines/{machine}", response_class=HTMLResponse)
def machine_page(request: Request, machine: str) -> HTMLResponse:
    user = page_user(request)
    svc = service(request)
    _check_name(machine)
    _machine_or_404(svc, machine)
    return _page(request, "machine.html", {**machine_view(svc, machine), "user": user,
                                           "panel_url": f"/ui/machines/{machine}",
                                           "machine": machine})


@router.get("/ui/fleet", response_class=HTMLResponse)
def fleet_panel(request: Request) -> HTMLResponse:
    fragment_user(request)
    return _page(request, "_fleet_panel.html", fleet_view(service(request)))


@router.get("/ui/machines/{machine}", response_class=HTMLResponse)
def machine_panel(request: Request, machine: str) -> HTMLResponse:
    fragment_user(request)
    svc = service(request)
    _check_name(machine)
    _machine_or_404(svc, machine)
    return _page(request, "_machine_panel.html", machine_view(svc, machine))


def _check_name(machine: str) -> None:
    if not re.fullmatch(MACHINE_PATTERN, machine):
        raise HTTPException(404, "no such machine")
