"""``stethoscope serve`` as a child process on a free loopback port: for tests, benchmarks
and scripts that need a real server they can start, kill -9 and start again."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from stethoscope.service.errors import ServiceError


class ServerProcess:
    """A real server process listening on ``127.0.0.1`` and a port the OS picked.

    Parameters
    ----------
    models : models folder (``DIR/<machine>/``).
    args : more ``serve`` options, e.g. ``["--db", url, "--keep-audio", "1"]``.
    log : file that receives the server's stderr (its logs).
    """

    def __init__(self, models: str | Path, *args: str, log: str | Path,
                 env: dict | None = None) -> None:
        self.command = [sys.executable, "-m", "stethoscope", "serve", "--models", str(models),
                        "--host", "127.0.0.1", "--port", "0", *args]
        self.log_path = Path(log)
        self.env = {**os.environ, "STETHOSCOPE_PROGRESS": "0", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self.first_token: str | None = None

    def start(self, timeout: float = 90.0) -> ServerProcess:
        """Start and wait until it prints where it listens and answers /healthz."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=log,
                                        stdin=subprocess.DEVNULL, env=self.env)
        log.close()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(self.process.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        while self.url is None or (self.first_token is None and not self._settled(lines)):
            line = self._next_line(lines, deadline)
            if line.startswith("dashboard: "):
                self.url = line.split(" ", 1)[1].strip().rstrip("/")
            elif line.startswith("token: "):
                self.first_token = line.split()[1]
        self._wait_healthy(deadline)
        return self

    @staticmethod
    def _settled(lines: queue.Queue) -> bool:
        """After the URL, a token line follows at once if there is one."""
        time.sleep(0.05)
        return lines.empty()

    def _next_line(self, lines: queue.Queue, deadline: float) -> str:
        while True:
            if self.process.poll() is not None and lines.empty():
                raise ServiceError(f"the server exited with {self.process.returncode}; see "
                                   f"{self.log_path}")
            try:
                return lines.get(timeout=max(0.01, min(0.2, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServiceError("the server did not start in time") from None

    def _wait_healthy(self, deadline: float) -> None:
        import urllib.request

        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise ServiceError("the server did not answer /healthz in time")

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """``kill -9``: no shutdown, no flush, as a crash or a power cut would leave it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Ask it to stop (SIGTERM), kill it if it will not; returns its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def _pump(stream, lines: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode("utf-8", "replace"))
    stream.close()
