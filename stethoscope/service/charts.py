"""Inline SVG charts for the dashboard: a sparkline and a score timeline with the threshold
line and alert markers. Drawn on the server, so a page paints with no script at all."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape

NORMAL, ANOMALOUS, THRESHOLD, ALERT, AXIS = "#2b6cb0", "#c53030", "#c53030", "#dd6b20", "#718096"


def _y_range(scores: list[float], threshold: float) -> tuple[float, float]:
    values = [*scores, threshold]
    low, high = min(values), max(values)
    pad = (high - low) * 0.12 or abs(high) * 0.1 or 1.0
    return low - pad, high + pad


def sparkline(points: list[tuple[int, float]], threshold: float, t0: int, t1: int, *,
              width: int = 160, height: int = 34) -> str:
    """``points`` ``(time ms, score)`` between ``t0`` and ``t1`` as a small SVG line with a
    dashed threshold; points above the threshold in red."""
    if not points:
        return (f'<svg class="spark" width="{width}" height="{height}" role="img" '
                f'aria-label="no recordings in the last day"><text x="4" y="{height // 2 + 4}" '
                f'fill="{AXIS}" font-size="11">no data</text></svg>')
    low, high = _y_range([s for _, s in points], threshold)
    span = max(t1 - t0, 1)

    def xy(t: int, s: float) -> tuple[float, float]:
        return (2 + (t - t0) / span * (width - 4),
                height - 2 - (s - low) / (high - low) * (height - 4))

    coords = [xy(t, s) for t, s in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    ty = xy(t0, threshold)[1]
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" '
                   f'fill="{ANOMALOUS if s > threshold else NORMAL}"/>'
                   for (x, y), (_, s) in zip(coords, points, strict=True)
                   if s > threshold or len(points) == 1)
    return (f'<svg class="spark" width="{width}" height="{height}" role="img" '
            f'aria-label="scores of the last day">'
            f'<line x1="0" x2="{width}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="{THRESHOLD}" '
            f'stroke-dasharray="3 2" stroke-width="1"/>'
            f'<polyline points="{line}" fill="none" stroke="{NORMAL}" stroke-width="1.5"/>'
            f'{dots}</svg>')


def _clock(ms: int, with_date: bool) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%d %b %H:%M" if with_date else "%H:%M:%S")


def timeline(points: list[tuple[int, float, bool]], threshold: float,
             alerts: list[tuple[int, int]], t0: int, t1: int, *, width: int = 860,
             height: int = 240) -> str:
    """Score against time: ``points`` ``(time ms, score, anomalous)``, the threshold as a
    dashed red line, ``alerts`` ``(alert id, opened ms)`` as orange markers. Times in UTC."""
    left, right, top, bottom = 56, 40, 14, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    scores = [s for _, s, _ in points]
    low, high = _y_range(scores or [threshold], threshold)
    span = max(t1 - t0, 1)

    def x(t: int) -> float:
        return left + (t - t0) / span * plot_w

    def y(s: float) -> float:
        return top + plot_h - (s - low) / (high - low) * plot_h

    parts = [f'<svg class="timeline" viewBox="0 0 {width} {height}" width="100%" '
             f'role="img" aria-label="score timeline">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" '
             f'stroke="#e2e8f0"/>']
    for i in range(5):
        value = low + (high - low) * i / 4
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end" '
                     f'font-size="11" fill="{AXIS}">{value:.3g}</text>')
    with_date = span > 86_400_000 / 2
    for i in range(6):
        t = t0 + span * i // 5
        parts.append(f'<text x="{x(t):.1f}" y="{height - 8}" text-anchor="middle" '
                     f'font-size="11" fill="{AXIS}">{_clock(t, with_date)}</text>')
    ty = y(threshold)
    parts.append(f'<line class="threshold" x1="{left}" x2="{left + plot_w}" y1="{ty:.1f}" '
                 f'y2="{ty:.1f}" stroke="{THRESHOLD}" stroke-dasharray="6 4"/>'
                 f'<text x="{left + 4}" y="{ty - 4:.1f}" '
                 f'font-size="11" fill="{THRESHOLD}">threshold {threshold:.3g}</text>')
    for alert_id, opened in alerts:
        if t0 <= opened <= t1:
            ax = x(opened)
            parts.append(f'<g class="alert-marker"><title>alert {alert_id}</title>'
                         f'<line x1="{ax:.1f}" x2="{ax:.1f}" y1="{top}" y2="{top + plot_h}" '
                         f'stroke="{ALERT}" stroke-width="1.5" opacity="0.7"/>'
                         f'<path d="M{ax - 5:.1f},{top} L{ax + 5:.1f},{top} L{ax:.1f},{top + 8}'
                         f' Z" fill="{ALERT}"/></g>')
    if points:
        line = " ".join(f"{x(t):.1f},{y(s):.1f}" for t, s, _ in points)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{NORMAL}" '
                     f'stroke-width="1.5"/>')
        for t, s, bad in points:
            parts.append(f'<circle class="point{" bad" if bad else ""}" cx="{x(t):.1f}" '
                         f'cy="{y(s):.1f}" r="{3 if bad else 2}" '
                         f'fill="{ANOMALOUS if bad else NORMAL}"><title>'
                         f'{escape(_clock(t, True))} score {s:.4g}</title></circle>')
    else:
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" '
                     f'text-anchor="middle" fill="{AXIS}">no recordings yet</text>')
    parts.append("</svg>")
    return "".join(parts)


def thin(points: list[tuple[int, float, bool]], most: int) -> list[tuple[int, float, bool]]:
    """At most ``most`` points: the highest score of each run of consecutive points, so a
    spike survives the thinning."""
    if len(points) <= most:
        return points
    step = -(-len(points) // most)
    return [max(points[i:i + step], key=lambda p: p[1]) for i in range(0, len(points), step)]
