"""Health for orchestrators (Kubernetes probes), deliberately independent of Redis: a Redis
outage must not get healthy processes restarted — they reconnect by themselves.

- ingest: ``/ready`` (200 while accepting connections; 503 before the listeners are up and while
  draining after SIGTERM) and ``/live`` (200 while its event loop keeps beating; 503 when the
  loop has been stuck longer than ``LIVE_AFTER``), served next to ``/metrics``.
- workers: a heartbeat file ``<data_dir>/heartbeat-<service>`` touched every
  ``celery.heartbeat_interval`` by a thread that a worker bootstep starts and stops;
  ``tlsrelay healthcheck policy|deliver`` succeeds while the file is fresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

LIVE_AFTER = 30.0  # seconds without an event-loop beat before /live says 503


class IngestHealth:
    """Shared between the SMTP event loop (writer) and the HTTP thread (reader)."""

    def __init__(self) -> None:
        self.ready = False
        self.beat = time.monotonic()

    def live(self) -> bool:
        return time.monotonic() - self.beat < LIVE_AFTER


INGEST = IngestHealth()

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def with_probes(app: WsgiApp, health: IngestHealth = INGEST) -> WsgiApp:
    """Wrap the metrics WSGI app: ``/ready`` and ``/live`` answered here, the rest by ``app``."""

    def probes(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/ready", "/live"):
            return app(environ, start_response)
        ok = health.ready if path == "/ready" else health.live()
        status = "200 OK" if ok else "503 Service Unavailable"
        body = b"ok\n" if ok else b"not ready\n" if path == "/ready" else b"stuck\n"
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return probes


def heartbeat_path(data_dir: Path, service: str) -> Path:
    return data_dir / f"heartbeat-{service}"


class Heartbeat(threading.Thread):
    """Touches the heartbeat file every ``interval`` seconds until ``stop()`` (then removes it)."""

    def __init__(self, path: Path, interval: float) -> None:
        super().__init__(name="tlsrelay-heartbeat", daemon=True)
        self.path, self.interval = path, interval
        self._stopped = threading.Event()

    def run(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._stopped.is_set():
            self.path.touch()
            self._stopped.wait(self.interval)

    def stop(self) -> None:
        self._stopped.set()
        self.path.unlink(missing_ok=True)


def check_heartbeat(path: Path, max_age: float) -> tuple[bool, str]:
    """(healthy, explanation) for ``tlsrelay healthcheck``."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False, f"no heartbeat file {path} (worker not started, or stopping)"
    if age > max_age:
        return False, f"heartbeat {path} is {age:.0f}s old (limit {max_age:.0f}s): worker stuck"
    return True, f"heartbeat {age:.1f}s old"
