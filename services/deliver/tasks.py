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
another process holds is waited for, then queued again if still held — services/deliver/claims.py).

A task ends within ``delivery.task_budget``: it starts no new job after ``delivery.task_window``
and queues the rest again (services/deliver/batch.py), so it is acknowledged well before
``celery.visibility_timeout`` would hand it to a second worker, and a warm shutdown (SIGTERM)
waits at most that long for it (the deliver pods' ``terminationGracePeriodSeconds`` is longer).

Tasks side by side (``delivery.tasks_per_process``, 2 by default): a prefork pool process runs one
Celery task at a time, and a task's batch ends with its slowest job — far away, the lanes that
finished early would wait for it. So the task starts its batch on the loop and returns once at most
``tasks_per_process`` - 1 batches are still under way (the oldest awaited first): with 2, task N
returns when batch N - 1 is done, and the next task's jobs take the lanes batch N's leave (the
lanes of all batches share ``sessions_per_process``; a job in two batches is worked on by one at a
time: services/deliver/batch.py; a batch that gets no lane within its start window starts nothing
and hands its jobs back, so each ends within ``delivery.task_budget``). So task N is acknowledged
while its jobs may still be in flight; before that, the batch is reserved under a tag of the
process's own in kombu's ``unacked`` hash, which its beats name (services/common/broker.py,
liveness.py) and which goes when the batch is recorded. A process that dies meanwhile leaves it
there: the reclaim hands it back within half a minute, as any reserved task of a dead worker
(services/deliver/rescue.py), and the rescue sweep counts its jobs as queued, not lost. A batch
that fails is parked for a retry as before (from the loop, in a thread). A pool process that exits
(warm shutdown, recycling) first waits for its batches under way, within ``delivery.task_budget``.
Redis refusing the reservation: the task waits for its own batch.

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
import collections
import concurrent.futures
import logging
import resource
import threading
import time
import uuid
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_process_shutdown, worker_ready, worker_shutdown

from services.common import broker, eventloop, liveness, queueing, retry, spool
from services.common.config import Config
from services.deliver.batch import Deliverer
from services.deliver.lanes import held_key
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
        # The batches under way on the loop, oldest first (delivery.tasks_per_process at most).
        self._running: collections.deque[concurrent.futures.Future[None]] = collections.deque()

    @property
    def deliverer(self) -> Deliverer:
        if self._deliverer is None:  # per process: created after the prefork fork
            bound_read_buffers()  # asyncio TLS: 4 KiB a session (services/deliver/tlscontext.py)
            limit_arenas()  # before its threads start (services/deliver/offload.py)
            self._deliverer = Deliverer(self.config, spool.connect(self.redis_url))
            self._loop = eventloop.new_event_loop(self.config.event_loop)
            loop = self._loop
            threading.Thread(
                target=loop.run_forever, name="tlsrelay-deliver-loop", daemon=True
            ).start()
        return self._deliverer

    def deliver(self, jobs: list[dict[str, Any]], retries: int = 0) -> None:
        """Start the batch on the loop; return once at most ``delivery.tasks_per_process`` - 1
        batches are still under way — this one among them, with 2 or more: the next task's jobs
        then take the lanes this one's leave. A batch that raises is parked for a retry
        (services/common/retry.py; after ``retry.CAP`` tries its jobs become ordinary
        deferrals). Never raises but :class:`celery.exceptions.Reject` (Redis down while this
        task's own batch failed: the task goes back to its queue)."""
        deliverer = self.deliverer
        assert self._loop is not None
        keep = self.config.delivery.tasks_per_process - 1
        tag, reserved = self._reserve(deliverer, jobs, retries) if keep else (None, False)
        if not reserved:  # not reserved on its own: this task waits for its batch
            keep = 0
        running = asyncio.run_coroutine_threadsafe(
            self._batch(deliverer, jobs, retries, tag), self._loop
        )
        self._running.append(running)
        while len(self._running) > keep:
            oldest = self._running.popleft()
            try:
                rejected = oldest.result()  # _batch returns what parking it could not
            except Exception as exc:  # cancelled with the loop (the process ends)
                if oldest is not running:  # acknowledged: its reservation goes to the reclaim
                    log.error("deliver: a batch of an earlier task ended: %s", exc)
                    continue
                retry.failed(deliverer.client, queueing.TASK_DELIVER, jobs, retries, exc)
                return
            if rejected is not None and oldest is running:
                raise rejected

    def _reserve(
        self, deliverer: Deliverer, jobs: list[dict[str, Any]], retries: int
    ) -> tuple[str, bool]:
        """Reserve the batch under a tag of this process's (kombu's ``unacked``, named by its
        beats: services/common/broker.py, liveness.py) before its task is acknowledged: should
        the process die, the reclaim hands it back within half a minute, as a dead worker's
        reserved tasks; while it lives, the rescue sweep counts its jobs as queued. The tag, and
        whether it is reserved: not when Redis refused (the task then waits for its batch,
        reserved as Celery reserved it; the tag stays held, as the write may have landed)."""
        tag = f"tlsrelay-batch-{uuid.uuid4().hex}"
        liveness.hold(tag)  # first: a beat names it before any reclaim could find it
        task = queueing.task_payload(
            queueing.TASK_DELIVER, [jobs], queueing.QUEUE_DELIVER, retries=retries
        )
        try:
            broker.reserve(deliverer.client, tag, task, queueing.QUEUE_DELIVER, time.time())
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("deliver: batch not reserved on its own, its task waits for it: %s", exc)
            return tag, False
        return tag, True

    @staticmethod
    def _unreserve(client: redis.Redis, tag: str) -> None:
        """The batch is recorded (or parked): its reservation goes. Best effort: one left
        behind is handed back by the reclaim, and finds its jobs recorded (nothing is sent
        again; a job another process holds waits for its claim)."""
        try:
            broker.unreserve(client, tag)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("deliver: reservation %s left to the reclaim: %s", tag, exc)
        finally:
            liveness.let_go(tag)

    async def _batch(
        self, deliverer: Deliverer, jobs: list[dict[str, Any]], retries: int, tag: str | None
    ) -> Reject | None:
        """One task's batch on the loop, then its reservation (``tag``) goes. A failure is
        parked (in a thread: the loop goes on); when even that fails (Redis down) the Reject
        is returned: its task, if still waiting, goes back to its queue; and the reservation
        stays, let go: the reclaim hands it back (about 25 s), as a dead worker's."""
        loop = asyncio.get_running_loop()
        done = False
        try:
            rejected = await self._run_or_park(deliverer, jobs, retries)
            done = rejected is None
            return rejected
        finally:
            if tag is not None and done:
                await loop.run_in_executor(None, self._unreserve, deliverer.client, tag)
            elif tag is not None:
                liveness.let_go(tag)

    async def _run_or_park(
        self, deliverer: Deliverer, jobs: list[dict[str, Any]], retries: int
    ) -> Reject | None:
        try:
            await deliverer.run_batch(jobs)
            return None
        except Exception as exc:
            error = exc

        # A plain retry (retries < CAP) re-queues every job: it releases no claim. The give-up
        # parks only the jobs no other batch of this process holds (parking releases the claim,
        # the process's: services/deliver/lanes.py, Holders) and queues the others again.
        parking = object()
        free = [_free(deliverer, doc, parking) for doc in jobs]
        held = [doc for doc, ok in zip(jobs, free, strict=True) if not ok]

        def defer_jobs() -> None:
            for doc, ok in zip(jobs, free, strict=True):
                if ok:
                    deliverer.ledger.park(doc)
            if held:  # never dropped (the copy there may be stale): queued again, claims kept
                why = "another batch of this process held it when its batch gave up"
                deliverer.ledger.hand_back(held, [None] * len(held), why)

        def park() -> Reject | None:
            try:
                retry.failed(
                    deliverer.client, queueing.TASK_DELIVER, jobs, retries, error, defer_jobs
                )
            except Reject as rejected:  # its task goes back to its queue, if not acknowledged
                return rejected  # yet; else the reclaim hands its reservation back
            return None

        try:
            return await asyncio.get_running_loop().run_in_executor(None, park)
        finally:
            deliverer.holders.let_go_all(parking)

    def shutdown(self) -> None:
        """A pool process exits: its parked sessions close and its leases go (best effort,
        bounded: a process that cannot reach Redis leaves them to expire)."""
        if self._deliverer is None or self._loop is None:
            return
        # The batches still under way (their tasks acknowledged) end first, as a task would.
        budget = time.monotonic() + self.config.delivery.task_budget
        while self._running:
            try:
                self._running.popleft().result(timeout=max(0.0, budget - time.monotonic()))
            except Exception as exc:  # stuck past its budget: reclaimed once the process is gone
                log.warning("deliver: a batch still under way at shutdown: %s", exc)
        done = asyncio.run_coroutine_threadsafe(self._deliverer.shutdown(), self._loop)
        try:
            done.result(timeout=5)
        except Exception as exc:  # Redis down, or the loop stuck: the leases expire anyway
            log.warning("deliver: leases not released at shutdown: %s", exc)


def _free(deliverer: Deliverer, doc: dict[str, Any], holder: object) -> bool:
    """Whether ``doc``'s job is free of the process's other batches (then ``holder`` holds it);
    a document without a job key is nobody's."""
    key = held_key(doc)
    return key is None or deliverer.holders.take(key, holder)


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
