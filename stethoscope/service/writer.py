"""Group commit: results from many requests go into one transaction, and each request is
answered only after the transaction holding its result has committed.

One writer thread takes whatever results are waiting (up to ``max_batch``), commits them
together and then wakes their requests; with one commit per batch instead of one per
request, a durable commit (fsync) is paid once for all the requests that arrived while
the previous one was on disk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

from stethoscope.service.store import CommitResult, NewRecording, Store

log = logging.getLogger("stethoscope.service")
_STOP = object()


class CommitQueue:
    """Commits :class:`NewRecording` items in batches on a writer thread.

    Parameters
    ----------
    store : where the results go.
    max_batch : most results in one transaction.
    on_commit : called on the writer thread with each committed batch's results.
    on_batch : called with ``(batch size, seconds)`` after each commit (metrics).
    """

    def __init__(self, store: Store, *, max_batch: int = 256,
                 on_commit: Callable[[list[CommitResult]], None] | None = None,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.store = store
        self.max_batch = max_batch
        self.on_commit = on_commit
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stethoscope-writer",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the writer thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None

    async def submit(self, item: NewRecording) -> CommitResult:
        """Queue ``item`` and wait until it is committed; raises what the store raised."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((item, loop, future))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list) -> None:
        start = time.perf_counter()
        try:
            results = self.store.commit_recordings([item for item, _, _ in batch])
        except Exception as error:  # noqa: BLE001 - isolate the item that fails, commit the rest
            if len(batch) == 1:
                item, loop, future = batch[0]
                log.error("could not store a result for %s: %s", item.machine,
                          str(error).splitlines()[0] if str(error) else type(error).__name__)
                _resolve(loop, future, error=error)
                return
            for one in batch:
                self._commit([one])
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - start)
        for (_, loop, future), result in zip(batch, results, strict=True):
            _resolve(loop, future, result=result)
        if self.on_commit is not None:
            try:
                self.on_commit(results)
            except Exception:  # noqa: BLE001 - live updates must never lose a commit
                log.exception("live update after a commit failed")


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, *,
             result: CommitResult | None = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the request's loop is gone (server stopped): nothing to wake
        pass
