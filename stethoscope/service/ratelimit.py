"""Per-token rate limit: a token bucket for each token, in this process's memory.

Hand-written: it is ten lines, and the libraries that do it (slowapi, limits) key on
client addresses and bring storage back-ends the service does not need.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """``rate`` requests per second per key on average, bursts of up to ``burst``.

    >>> limiter = RateLimiter(rate=1.0, burst=2)
    >>> [limiter.allow("t") for _ in range(3)][:2]
    [True, True]
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Take one request from ``key``'s bucket; False when it is empty."""
        return self.retry_after(key) == 0.0

    def retry_after(self, key: str) -> float:
        """0.0 when the request may go ahead (and counts), else seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
