"""Prometheus metrics of one app (its own registry, so several apps in a process never
mix): requests, their latency, scoring latency, scores and verdicts per machine."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    """The service's counters, gauges and histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stethoscope_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("stethoscope_http_request_duration_seconds",
                                         "Time to answer a request", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.scoring_seconds = Histogram("stethoscope_scoring_duration_seconds",
                                         "Time to decode and score one upload", ["machine"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.commit_seconds = Histogram("stethoscope_commit_duration_seconds",
                                        "Time to commit one batch of results",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.commit_batch = Histogram("stethoscope_commit_batch_size",
                                      "Results committed per transaction",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.recordings = Counter("stethoscope_recordings", "Recordings scored and stored",
                                  ["machine", "verdict"], registry=r)
        self.rejected = Counter("stethoscope_uploads_rejected", "Uploads refused",
                                ["reason"], registry=r)
        self.last_score = Gauge("stethoscope_last_score", "Score of the latest recording",
                                ["machine"], registry=r)
        self.threshold = Gauge("stethoscope_threshold", "Decision threshold of the model",
                               ["machine"], registry=r)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_recording(self, machine: str, score: float, anomalous: bool) -> None:
        self.recordings.labels(machine, "anomalous" if anomalous else "normal").inc()
        self.last_score.labels(machine).set(score)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
