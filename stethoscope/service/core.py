"""The service's parts wired together: models, store, tokens, limits, metrics, live events,
the group-commit writer and the kept audio. The API and the dashboard are thin layers over
:class:`Service`."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import lru_cache

from stethoscope.service.auth import TokenAuthority
from stethoscope.service.events import EventHub
from stethoscope.service.machines import MachineModel, load_fleet
from stethoscope.service.metrics import ServiceMetrics
from stethoscope.service.ratelimit import RateLimiter
from stethoscope.service.retention import AudioKeeper
from stethoscope.service.schemas import iso
from stethoscope.service.scoring import ProcessScorer, ThreadScorer
from stethoscope.service.settings import ServiceSettings
from stethoscope.service.store import CommitResult, NewRecording, Store
from stethoscope.service.writer import CommitQueue

log = logging.getLogger("stethoscope.service")
SWEEP_EVERY_S = 60.0


def now_ms() -> int:
    return int(time.time() * 1000)


class Service:
    """One running service.

    Parameters
    ----------
    settings : the checked settings.
    fleet : the machines' models (default: loaded from ``settings.models_dir``).
    store : the store (default: opened from ``settings.db_url``, schema migrated).
    """

    def __init__(self, settings: ServiceSettings, *, fleet: dict[str, MachineModel] | None = None,
                 store: Store | None = None) -> None:
        self.settings = settings
        self.fleet = fleet if fleet is not None else load_fleet(settings.models_dir)
        self.store = store if store is not None else Store(settings.db_url)
        self.tokens = TokenAuthority(self.store)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.metrics = ServiceMetrics()
        self.hub = EventHub()
        self.keeper = AudioKeeper(settings.audio_dir, settings.keep_audio_days,
                                  int(settings.audio_max_mb * 1024 * 1024))
        self.writer = CommitQueue(self.store, max_batch=settings.commit_batch,
                                  on_commit=self._after_commit, on_batch=self._observe_batch)
        self.scorer = (ProcessScorer(settings.models_dir, settings.scoring_processes)
                       if settings.scoring_processes else
                       ThreadScorer(self.fleet, self.keeper.tmp))
        self._sweeper: asyncio.Task | None = None
        self._lifespans = 0
        self.render_png = lru_cache(maxsize=64)(self._render_png)
        for name, machine in self.fleet.items():
            self.metrics.threshold.labels(name).set(machine.threshold)

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Start the writer and the audio sweeper; a second lifespan on the same app (a test
        harness running its own) only counts, and the last stop stops them."""
        self._lifespans += 1
        if self._lifespans > 1:
            return
        self.hub.bind(asyncio.get_running_loop())
        await self.scorer.start()
        self.writer.start()
        if self.keeper.enabled:
            self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        self._lifespans -= 1
        if self._lifespans > 0:
            return
        self.hub.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.writer.stop)
        self.scorer.close()
        self.keeper.close()

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self.keeper.sweep, self.store)
            except Exception:  # noqa: BLE001 - a failed sweep is retried, never fatal
                log.exception("sweeping kept audio failed")
            await asyncio.sleep(SWEEP_EVERY_S)

    # ------------------------------------------------------------------ uploads
    def machine(self, name: str) -> MachineModel | None:
        return self.fleet.get(name)

    async def accept_upload(self, machine: MachineModel, data: bytes, *, recorded_ms: int | None,
                            source: str | None, idempotency_key: str | None,
                            token_id: str | None) -> CommitResult:
        """Score an upload and store its result; returns once the result is committed.

        Raises
        ------
        UploadRejected
            when the upload is not a WAV the model can use (the detector's one-line error).
        """
        loop = asyncio.get_running_loop()
        received = now_ms()
        kept = None
        try:
            label = f"upload to {machine.name}" + (f" ({source})" if source else "")
            scored = await self.scorer.score(machine.name, data, label)
            self.metrics.scoring_seconds.labels(machine.name).observe(scored.seconds)
            kept = (await loop.run_in_executor(None, self.keeper.keep, data)
                    if self.keeper.enabled else None)  # an fsync: off the event loop
            item = NewRecording(machine=machine.name, received_ms=received, score=scored.score,
                                threshold=machine.threshold, anomalous=scored.anomalous,
                                windows=scored.windows, duration_s=scored.duration_s,
                                model_version=machine.version, recorded_ms=recorded_ms,
                                source=source, idempotency_key=idempotency_key,
                                audio_key=kept, token_id=token_id)
            result = await self.writer.submit(item)
            if result.replayed and kept:
                self.keeper.path_for(kept).unlink(missing_ok=True)
            return result
        except BaseException:
            if kept:
                self.keeper.path_for(kept).unlink(missing_ok=True)
            raise

    def _after_commit(self, results: list[CommitResult]) -> None:
        for result in results:
            if result.replayed:
                continue
            rec = result.recording
            self.metrics.observe_recording(rec["machine"], rec["score"], rec["anomalous"])
            self.hub.publish("recording", {
                "machine": rec["machine"], "recording_id": rec["id"], "score": rec["score"],
                "threshold": rec["threshold"], "anomalous": rec["anomalous"],
                "received_at": iso(rec["received_ms"]), "alert_id": rec["alert_id"]})
            if result.alert is not None:
                self.hub.publish("alert", {"machine": rec["machine"],
                                           "alert_id": result.alert["id"],
                                           "state": "opened" if result.alert_opened
                                           else "updated"})

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.commit_batch.observe(size)
        self.metrics.commit_seconds.observe(seconds)

    # ------------------------------------------------------------------ reading
    def machine_status(self, state: dict | None, open_alerts: int, now: int) -> str:
        """normal, anomalous (an open alert or the last recording), or silent (nothing
        for longer than ``silent_after_s``)."""
        if open_alerts or (state is not None and state["last_anomalous"]):
            return "anomalous"
        if state is None or now - state["last_ms"] > self.settings.silent_after_s * 1000:
            return "silent"
        return "normal"

    def machine_summaries(self) -> list[dict]:
        states = self.store.machine_states()
        counts = self.store.open_alert_counts()
        now = now_ms()
        out = []
        for name, machine in self.fleet.items():
            state = states.get(name)
            out.append({
                "machine": name, "model": machine.model_name, "model_version": machine.version,
                "threshold": machine.threshold,
                "status": self.machine_status(state, counts.get(name, 0), now),
                "last_score": state["last_score"] if state else None,
                "last_anomalous": bool(state["last_anomalous"]) if state else None,
                "last_received_ms": state["last_ms"] if state else None,
                "last_recording_id": state["last_recording_id"] if state else None,
                "recordings": int(state["recordings"]) if state else 0,
                "open_alerts": counts.get(name, 0)})
        return out

    def _render_png(self, recording_id: int, kind: str) -> bytes | None:
        from stethoscope.service.images import render_png

        row = self.store.recording(recording_id)
        if row is None or row["audio_key"] is None or row["machine"] not in self.fleet:
            return None
        path = self.keeper.path_for(row["audio_key"])
        if not path.is_file():
            return None
        title = f"{row['machine']} · recording {recording_id} · score {row['score']:.3g}"
        return render_png(self.fleet[row["machine"]], path, kind, title)
