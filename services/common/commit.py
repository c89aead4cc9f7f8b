"""The ingest commit: group commit of accepted messages, and (optionally) replica acknowledgement.

:class:`Committer` writes messages that finish DATA close together in one ``MULTI``/``EXEC`` with
one ``policy`` task (:func:`services.common.spool.stage_message`), and each caller's ``accept``
returns only once that transaction succeeded — so ``250`` means the message is in Redis.

With ``redis_min_replicas`` > 0 it also means that many replicas have it: right after ``EXEC``,
on the same connection, ``WAIT numreplicas timeout`` (``WAIT`` counts the writes of its own
connection and does not block inside ``MULTI``). The commit is sent as one non-transactional
pipeline ``MULTI … EXEC WAIT``, so it holds one connection and costs one round trip. Fewer
acknowledgements within ``redis_replica_timeout`` → :class:`NotReplicated` (a Redis error:
ingest answers ``451 4.3.0``). The message stays stored on the master, so the client's retry may
duplicate it: at least once, never lost by a failover right after ``250``.

Policy tasks gather commits under load (``task_window``, ``task_max``): each Celery task costs
its worker's main process and pool process a few milliseconds whatever it carries (about a tenth
of the relay's CPU per message on loopback with one commit per task: bench/README.md, "Session
11"), and a ``policy`` task's messages become ``deliver`` tasks of the same size. So while
messages arrive more often than once per ``window``, a commit's transaction carries no task of
its own until the messages waiting for one reach ``task_max`` (a full ``deliver`` task) or the
first of them has waited ``task_window``: the commit that reaches either carries one task for
them all, and a timer sends it alone when no commit comes in time. Mail that trickles in gets
its task in its own transaction, as before. The messages are stored (and their ``250`` sent)
either way: a task waits in this process's memory only, at most ``task_window``; should the
process die meanwhile, they are in ``waiting:policy`` and the rescue sweep queues them
(services/deliver/rescue.py). A transaction or a timer's push that fails keeps them waiting for
the next commit, or a timer's retry (``RETRY_FIRST``, doubling up to ``RETRY_MAX``); with
``redis_min_replicas``, so does a timer's push the replicas did not acknowledge.

Failure: every caller of a failed transaction gets the exception (none of the batch was stored,
or — :class:`NotReplicated` — not confirmed); a message whose id is taken gets
:class:`services.common.spool.IdTaken` (nothing of it stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import queueing
from services.common.model import Envelope
from services.common.spool import IdTaken, stage_message

log = logging.getLogger("tlsrelay.ingest")


RETRY_FIRST = 1.0  # seconds before a failed policy task is sent again when no commit comes ...
RETRY_MAX = 30.0  # ... doubling up to this while Redis keeps failing it


class NotReplicated(RedisError):
    """The commit is on the master but fewer replicas than required acknowledged it in time."""


class Committer:
    """Group commit for ingest: messages that finish DATA close together share one ``MULTI``/
    ``EXEC`` and one ``policy`` task (as PostgreSQL's ``commit_delay`` or Kafka's ``linger.ms``).

    :meth:`accept` adds a message to the open batch and waits for the batch's transaction. A batch
    is written ``window`` seconds after its first message arrived, but only while messages arrive
    more often than once per ``window`` (a moving average of the gaps between them): otherwise
    nobody would join it, so it is written on the next turn of the event loop (which still groups
    messages finished in the same turn). It is written at once when it holds ``max_batch``
    messages, or a message of every open session (``sessions``): then no one else can join it, so
    a lone sender, or clients that wait for their 250 before sending more, are not slowed by the
    window. So the batch grows with the load: one message at 10/s, several at hundreds per
    second, where the Celery hops' cost per task matters.

    Each caller's ``accept`` returns only after EXEC succeeded and raises what the transaction
    raised (then none of the batch was stored: every session answers 451).
    A caller that stops waiting (timeout) does not stop the write: its message may be stored
    although its client was told 451 — the same as with one transaction per message.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        trace_ttl: float,
        window: float,
        max_batch: int,
        sessions: Callable[[], int] | None = None,
        min_replicas: int = 0,
        replica_timeout: float = 1.0,
        task_window: float = 0.0,
        task_max: int = 1,
    ) -> None:
        self.client = client
        self.min_replicas = min_replicas  # WAIT for this many replicas after EXEC (0: don't)
        self.replica_timeout = replica_timeout
        self.sessions = sessions  # how many SMTP sessions are open (None: unknown)
        self.trace_ttl = trace_ttl
        self.window = window
        self.max_batch = max_batch
        self._batch: list[tuple[Envelope, bytes, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._last = 0.0  # when the previous message arrived (loop time)
        self._gap = math.inf  # moving average of the time between messages
        self.task_window = task_window  # under load, a policy task waits this long at most ...
        self.task_max = task_max  # ... for this many messages
        self._untasked: list[str] = []  # stored, their policy task not yet sent (oldest first)
        self._untasked_since = 0.0  # when the oldest of them was stored (loop time)
        self._task_timer: asyncio.TimerHandle | None = None
        self._retry = 0.0  # back-off of the timer that sends put-back ids again (0: none failed)
        self._closing = False  # close() sends what waits: no timer of its own from then on

    async def accept(self, envelope: Envelope, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._last:
            gap = now - self._last
            self._gap = gap if math.isinf(self._gap) else 0.8 * self._gap + 0.2 * gap
        self._last = now
        done: asyncio.Future[None] = loop.create_future()
        self._batch.append((envelope, body, done))
        if len(self._batch) >= self.max_batch or self._everyone_waits():
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._linger(), self._flush)
        await asyncio.shield(done)

    def _everyone_waits(self) -> bool:
        """Every open session has a message in this batch: nobody else can join it now."""
        return self.sessions is not None and len(self._batch) >= self.sessions()

    def _linger(self) -> float:
        return 0.0 if self._gap >= self.window else self.window

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if batch:
            write = asyncio.get_running_loop().create_task(self._write(batch))
            self._writes.add(write)  # keep a reference until it is done
            write.add_done_callback(self._writes.discard)

    async def _write(self, batch: list[tuple[Envelope, bytes, asyncio.Future[None]]]) -> None:
        try:
            stored = await self._commit([(envelope, body) for envelope, body, _ in batch])
        except Exception as exc:
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        except BaseException:  # cancelled (shutdown): the callers must not wait forever
            for _, _, done in batch:
                done.cancel()
            raise
        for (envelope, _, done), ok in zip(batch, stored, strict=True):
            if not done.done():
                done.set_result(None) if ok else done.set_exception(IdTaken(envelope.id))

    async def _commit(self, messages: list[tuple[Envelope, bytes]]) -> list[bool]:
        """One transaction: the messages and their policy task; whether each was stored (False:
        its id was taken, see ``spool.STORE_NEW``). With ``min_replicas``: :meth:`_replicated`."""
        ids = [envelope.id for envelope, _ in messages]
        tasked = self._task_ids(ids)  # the ids this transaction's policy task names (or none)
        try:
            if self.min_replicas:
                stored = await self._replicated(messages, tasked)
            else:
                async with self.client.pipeline(transaction=True) as pipe:
                    self._stage(pipe, messages, tasked)
                    replies = await pipe.execute()
                stored = [bool(reply) for reply in replies[: len(messages)]]
        except BaseException:
            new = set(ids)
            self._untask([i for i in tasked if i not in new], put_back=True)  # still waiting
            raise
        if tasked:
            self._retry = 0.0
        else:
            self._untask([i for i, ok in zip(ids, stored, strict=True) if ok])
        return stored

    def _task_ids(self, ids: list[str]) -> list[str]:
        """The message ids the policy task of a transaction storing ``ids`` names: those waiting
        for one and ``ids`` — none while messages arrive fast and the waiting are fewer than
        ``task_max`` and younger than ``task_window`` (module docstring)."""
        waiting = self._untasked
        now = asyncio.get_running_loop().time()
        loaded = self._gap < self.window and self.task_window > 0
        young = not waiting or now - self._untasked_since < self.task_window
        if loaded and young and len(waiting) + len(ids) < self.task_max:
            return []
        self._untasked = []
        self._cancel_task_timer()
        return waiting + ids

    def _untask(self, ids: list[str], put_back: bool = False) -> None:
        """``ids`` (stored) wait for a policy task: the next commit's, or the timer's.
        ``put_back``: a task naming them was not sent (Redis failed it): ahead of the rest; the
        next commit carries them, or the timer after a back-off (1 s, doubling up to
        :data:`RETRY_MAX`) when none comes — not the rescue sweep's minute and a half."""
        if not ids:
            return
        loop = asyncio.get_running_loop()
        if not self._untasked:
            self._untasked_since = loop.time()
        self._untasked = ids + self._untasked if put_back else self._untasked + ids
        if put_back:
            self._retry = min(max(2 * self._retry, RETRY_FIRST), RETRY_MAX)
            due = loop.time() + self._retry
        else:
            due = self._untasked_since + self.task_window
        if self._closing:
            return
        if self._task_timer is None or due < self._task_timer.when():
            self._cancel_task_timer()
            self._task_timer = loop.call_at(due, self._send_task)

    def _cancel_task_timer(self) -> None:
        if self._task_timer is not None:
            self._task_timer.cancel()
            self._task_timer = None

    def _send_task(self) -> None:
        """The timer: the waiting messages' policy task, on its own (no commit came in time)."""
        self._task_timer = None
        ids, self._untasked = self._untasked, []
        if ids:
            push = asyncio.get_running_loop().create_task(self._push_task(ids))
            self._writes.add(push)
            push.add_done_callback(self._writes.discard)

    async def _push_task(self, ids: list[str]) -> None:
        """The waiting messages' policy task on its own. With ``min_replicas`` it counts as sent
        only once that many replicas acknowledged it (``LPUSH`` ``WAIT`` on one connection, as
        a commit): a failover must not drop it and leave its messages to the rescue sweep. A
        push that was not acknowledged is sent again like one that failed; the policy task is
        idempotent (services/policy/tasks.py), so a second copy on the master classifies
        nothing twice."""
        task = queueing.classify_task(ids)
        try:
            if self.min_replicas:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.lpush(queueing.POLICY_LIST, task)
                    pipe.execute_command("WAIT", self.min_replicas, self._wait_ms)
                    _, acknowledged = await pipe.execute()
                self._check_replicas(int(acknowledged), "policy task")
            else:
                await self.client.lpush(queueing.POLICY_LIST, task)
        except Exception as exc:  # they wait for the next commit's task, or the retry
            log.warning("policy task for %d stored messages not sent yet: %s", len(ids), exc)
            self._untask(ids, put_back=True)
        else:
            self._retry = 0.0

    async def close(self, timeout: float = 5.0) -> None:
        """Shutting down: the writes under way end (bounded), then the waiting messages' policy
        task goes out. What cannot be sent is left to the rescue sweep. A write that ends
        meanwhile arms no timer (its push would outlive this, cut by the client's close)."""
        self._closing = True
        self._cancel_task_timer()
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)
        ids, self._untasked = self._untasked, []
        if ids:  # a failure is logged and left to the rescue sweep (closing: no retry timer)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._push_task(ids), timeout)

    async def _replicated(
        self, messages: list[tuple[Envelope, bytes]], tasked: list[str]
    ) -> list[bool]:
        """``MULTI`` … ``EXEC`` ``WAIT`` in one pipeline on one connection; raise
        :class:`NotReplicated` unless ``min_replicas`` acknowledged within the timeout."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.execute_command("MULTI")
            self._stage(pipe, messages, tasked)
            pipe.execute_command("EXEC")
            pipe.execute_command("WAIT", self.min_replicas, self._wait_ms)
            replies = await pipe.execute()  # a queueing error or EXECABORT raises here
        executed: list[Any] = replies[-2]
        failed = [reply for reply in executed if isinstance(reply, Exception)]
        if failed:
            raise failed[0]
        self._check_replicas(int(replies[-1]), "commit")
        return [bool(reply) for reply in executed[: len(messages)]]

    @property
    def _wait_ms(self) -> int:
        return max(1, round(self.replica_timeout * 1000))

    def _check_replicas(self, acknowledged: int, what: str) -> None:
        if acknowledged < self.min_replicas:
            raise NotReplicated(
                f"{acknowledged} of {self.min_replicas} replicas acknowledged the {what} "
                f"within {self.replica_timeout:g}s"
            )

    def _stage(
        self,
        pipe: aioredis.client.Pipeline,
        messages: list[tuple[Envelope, bytes]],
        tasked: list[str],
    ) -> None:
        for envelope, body in messages:
            stage_message(pipe, envelope, body, self.trace_ttl, enqueue=False)
        if tasked:
            pipe.lpush(queueing.POLICY_LIST, queueing.classify_task(tasked))
