"""The ``deliver`` Celery task and the deliver worker's process wiring.

The task is a thin wrapper: it runs :meth:`services.deliver.batch.Deliverer.run_batch` for its batch
of jobs on this process's event loop (one per worker process, kept for its lifetime so the
connection pool lives on it; its Redis calls run in a small thread pool beside it,
services/deliver/offload.py). The loop runs in a thread of its own, between tasks too: parked
sessions are closed when idle too long or when another worker waits for their site's connection
lease, and the leases this process holds are renewed (services/deliver/shaping.py). An unexpected
error in delivery code is not allowed to drop a job: the job is put back into the deferred set (due
after the first retry step) and the error is logged. Anything that escapes the batch (a Redis error,
``WRONGTYPE`` included) parks the whole task for a retry with backoff (services/common/retry.py:
never dropped, never a hot loop); after ``retry.CAP`` tries its jobs become ordinary deferrals. Jobs
already recorded are skipped when it runs again (their recipients are final or deferred, and a job
another process is sending is left to it — services/deliver/claims.py).

A task ends within ``delivery.task_budget``: it starts no new job after ``delivery.task_window``
and queues the rest again (services/deliver/batch.py), so it is acknowledged well before
``celery.visibility_timeout`` would hand it to a second worker, and a warm shutdown (SIGTERM)
waits at most that long for it (the deliver pods' ``terminationGracePeriodSeconds`` is longer).

Open files: each process keeps up to ``delivery.sessions_per_process`` sessions open, a socket
each: the worker raises its soft ``RLIMIT_NOFILE`` to match (within the hard limit; a warning
when that is too low), before the pool processes fork (:func:`raise_open_files`).

Memory: each process keeps up to ``delivery.sessions_per_process`` sessions open; their TLS
transports read 4 KiB at a time instead of asyncio's 256 KiB
(:func:`services.deliver.tlscontext.bound_read_buffers`, set when the process starts delivering);
its Redis calls run in a pool of at most 8 threads, which share 2 malloc arenas
(:mod:`services.deliver.offload`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_shutdown, worker_ready, worker_shutdown

from services.common import queueing, retry, spool
from services.common.config import Config
from services.deliver.batch import Deliverer
from services.deliver.offload import limit_arenas
from services.deliver.scheduler import SchedulerThread
from services.deliver.tlscontext import bound_read_buffers

log = logging.getLogger("tlsrelay.deliver")
FILES_BESIDES_SESSIONS = 64  # Redis connections, the pool's pipes, logs, DNS, metrics, headroom


def raise_open_files(sessions: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` (the pool processes inherit it) to what
    ``sessions`` open sessions need, one socket each plus :data:`FILES_BESIDES_SESSIONS`, within
    the hard limit; never lower it. A hard limit below the need is logged: sessions beyond it
    fail to connect (``EMFILE``) and their jobs are deferred. The soft limit in force is
    returned. (1 000 sessions per process need more than the common soft limit of 1 024.)"""
    need = sessions + FILES_BESIDES_SESSIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        log.warning(
            "delivery.sessions_per_process %d needs about %d open files per deliver process; "
            "the hard limit is %d (raise it, e.g. ulimit -Hn or LimitNOFILE=)",
            sessions,
            need,
            hard,
        )
    return max(target, soft)


class DeliverService:
    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.redis_url = redis_url
        raise_open_files(config.delivery.sessions_per_process)  # before the pool forks
        self._deliverer: Deliverer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def deliverer(self) -> Deliverer:
        if self._deliverer is None:  # per process: created after the prefork fork
            bound_read_buffers()  # 4 KiB per TLS session, not 256 (services/deliver/tlscontext.py)
            limit_arenas()  # before its threads start (services/deliver/offload.py)
            self._deliverer = Deliverer(self.config, spool.connect(self.redis_url))
            self._loop = asyncio.new_event_loop()
            loop = self._loop
            threading.Thread(
                target=loop.run_forever, name="tlsrelay-deliver-loop", daemon=True
            ).start()
        return self._deliverer

    def deliver(self, jobs: list[dict[str, Any]], retries: int = 0) -> None:
        """Run the batch; if anything raises, park it for a retry (services/common/retry.py);
        after ``retry.CAP`` tries its jobs become ordinary deferrals."""
        deliverer = self.deliverer
        assert self._loop is not None
        try:
            asyncio.run_coroutine_threadsafe(deliverer.run_batch(jobs), self._loop).result()
        except Exception as exc:

            def defer_jobs() -> None:
                for doc in jobs:
                    deliverer.ledger.park(doc)

            retry.failed(deliverer.client, queueing.TASK_DELIVER, jobs, retries, exc, defer_jobs)

    def shutdown(self) -> None:
        """A pool process exits: its parked sessions close and its leases go (best effort,
        bounded: a process that cannot reach Redis leaves them to expire)."""
        if self._deliverer is None or self._loop is None:
            return
        done = asyncio.run_coroutine_threadsafe(self._deliverer.shutdown(), self._loop)
        try:
            done.result(timeout=5)
        except Exception as exc:  # Redis down, or the loop stuck: the leases expire anyway
            log.warning("deliver: leases not released at shutdown: %s", exc)


def register(app: Celery, service: DeliverService) -> None:
    @app.task(name=queueing.TASK_DELIVER, bind=True)  # type: ignore[untyped-decorator]
    def deliver(task: Task, jobs: list[dict[str, Any]] | dict[str, Any]) -> None:
        # A single job: a task queued before tasks carried batches.
        service.deliver([jobs] if isinstance(jobs, dict) else jobs, task.request.retries or 0)

    delivery = service.config.delivery
    scheduler = SchedulerThread(
        service.redis_url,
        delivery.scheduler_interval,
        delivery.batch_max,
        delivery.rescue_interval,
        service.config.celery.visibility_timeout,
    )

    @worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def release_leases(**_: object) -> None:
        service.shutdown()

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def start_scheduler(**_: object) -> None:
        scheduler.start()

    @worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def stop_scheduler(**_: object) -> None:
        scheduler.stop()
