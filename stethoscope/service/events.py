"""Live updates: committed results and alert changes, fanned out to server-sent-event
subscribers (the dashboard). Publishing is thread-safe; subscribers live on the loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

KEEPALIVE_S = 15.0
QUEUE_SIZE = 256


class EventHub:
    """Fan-out of events to every connected subscriber of this process."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the subscribers run on (set at start-up)."""
        self._loop = loop

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, data: dict) -> None:
        """Send ``data`` as an event named ``kind``; callable from any thread."""
        if self._loop is None or self._loop.is_closed():
            return
        message = f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
        try:
            self._loop.call_soon_threadsafe(self._deliver, message)
        except RuntimeError:  # the loop closed meanwhile (shutting down)
            pass

    def _deliver(self, message: str | None) -> None:
        for queue in list(self._subscribers):
            if queue.full():  # a stalled client: drop its oldest, keep the newest
                queue.get_nowait()
            queue.put_nowait(message)

    def close(self) -> None:
        """End every subscription (server shutting down)."""
        self.closed = True
        self._deliver(None)

    async def stream(self) -> AsyncIterator[str]:
        """One subscriber's messages: a ``retry`` hint, then events and keep-alive comments
        until the hub closes (the server stops) or the client goes away."""
        queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        try:
            yield "retry: 1000\n: connected\n\n"
            while not self.closed:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if message is None:
                    return
                yield message
        finally:
            self._subscribers.discard(queue)
