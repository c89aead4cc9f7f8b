"""Which worker processes are alive, kept in Redis, so the work of a dead one is handed back within
a minute instead of waiting out ``celery.visibility_timeout``.

Each worker process (a Celery worker's main process, and each pool process) has an id
(:func:`new_id`: role, host, pid and a random part, so a restarted pid is a new worker) and
beats: ``tlsrelay:worker:{id}`` is set every :data:`INTERVAL` seconds with a :data:`TTL` (value:
the JSON list of delivery tags of the tasks the process holds — the main process's reserved
tasks; empty for pool processes), and the id is added to the registry set ``tlsrelay:workers``.
A worker is alive while its key exists: :func:`alive`. A process that dies stops beating and
counts as dead ``TTL`` seconds later at most; one that cannot reach Redis for that long counts
as dead too (its tasks may then run twice: delivery claims guard against sending twice).

API for other parts: :func:`beat`, :func:`alive`, :func:`current` (this process's id, once its
:class:`Beacon` started), :func:`holders` (tags held by live workers, for the sweep that hands
back a dead worker's tasks: ``services/deliver/rescue.py``), :func:`hold` / :func:`let_go` /
:func:`holding` (work a pool process holds after its task was acknowledged; its beats name
it). Redis errors propagate, except in :class:`Beacon`, which logs them and beats again at the
next interval.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterable

import redis

from services.common import spool

log = logging.getLogger("tlsrelay.liveness")

INTERVAL = 5.0  # seconds between beats
TTL = 15.0  # a worker silent for this long is dead
REGISTRY = spool.PREFIX + "workers"

_current: str | None = None
# Tags of work this process holds besides the tasks Celery reserved for it (a deliver pool
# process's batch still in flight after its task was acknowledged: services/deliver/tasks.py).
_holding: set[str] = set()
_holding_lock = threading.Lock()


def worker_key(worker_id: str) -> str:
    return f"{spool.PREFIX}worker:{worker_id}"


def new_id(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def current() -> str | None:
    """The id this process beats under (None before its :class:`Beacon` started)."""
    return _current


def beat(client: redis.Redis, worker_id: str, ttl: float = TTL, held: Iterable[str] = ()) -> None:
    """``worker_id`` is alive for ``ttl`` more seconds and holds the tasks ``held``."""
    with client.pipeline(transaction=True) as pipe:
        pipe.set(worker_key(worker_id), json.dumps(sorted(held)), px=int(ttl * 1000))
        pipe.sadd(REGISTRY, worker_id)
        pipe.execute()


def hold(tag: str) -> None:
    """This process holds the work reserved under ``tag`` from now (its beats name it)."""
    with _holding_lock:
        _holding.add(tag)


def let_go(tag: str) -> None:
    with _holding_lock:
        _holding.discard(tag)


def holding() -> list[str]:
    """The tags :func:`hold` added and :func:`let_go` did not remove."""
    with _holding_lock:
        return sorted(_holding)


def alive(client: redis.Redis, worker_id: str) -> bool:
    return bool(client.exists(worker_key(worker_id)))


def holders(client: redis.Redis) -> set[str]:
    """Delivery tags held by live workers; the dead leave the registry (a worker that missed its
    beats and comes back adds itself again)."""
    ids = sorted(m.decode() for m in client.smembers(REGISTRY))  # type: ignore[union-attr]
    if not ids:
        return set()
    values = client.mget([worker_key(i) for i in ids])
    dead = [i for i, v in zip(ids, values, strict=True) if v is None]
    if dead:
        client.srem(REGISTRY, *dead)
    return {tag for v in values if v is not None for tag in json.loads(v)}


class Beacon(threading.Thread):
    """Beats for this process every :data:`INTERVAL` until :meth:`stop`; ``held()`` says which
    delivery tags it holds at each beat. A thread of its own: a worker's event loop blocks while
    the broker reconnects, and must not look dead meanwhile."""

    def __init__(
        self, redis_url: str, worker_id: str, held: Callable[[], Iterable[str]] = tuple
    ) -> None:
        super().__init__(name="tlsrelay-liveness", daemon=True)
        self.redis_url, self.worker_id, self.held = redis_url, worker_id, held
        self._stopped = threading.Event()

    def start(self) -> None:
        global _current
        _current = self.worker_id
        super().start()

    def run(self) -> None:
        client = spool.connect(self.redis_url)
        while True:
            try:
                beat(client, self.worker_id, TTL, self.held())
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("liveness beat failed (Redis unavailable): %s", exc)
            if self._stopped.wait(INTERVAL):
                break
        client.close()  # the key expires: a warm shutdown's tasks are not handed out early

    def stop(self) -> None:
        self._stopped.set()
