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

Failure: every caller of a failed transaction gets the exception (none of the batch was stored,
or — :class:`NotReplicated` — not confirmed); a message whose id is taken gets
:class:`services.common.spool.IdTaken` (nothing of it stored).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import queueing
from services.common.model import Envelope
from services.common.spool import IdTaken, stage_message


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
        if self.min_replicas:
            return await self._replicated(messages)
        async with self.client.pipeline(transaction=True) as pipe:
            self._stage(pipe, messages)
            replies = await pipe.execute()
        return [bool(reply) for reply in replies[: len(messages)]]

    async def _replicated(self, messages: list[tuple[Envelope, bytes]]) -> list[bool]:
        """``MULTI`` … ``EXEC`` ``WAIT`` in one pipeline on one connection; raise
        :class:`NotReplicated` unless ``min_replicas`` acknowledged within the timeout."""
        wait_ms = max(1, round(self.replica_timeout * 1000))
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.execute_command("MULTI")
            self._stage(pipe, messages)
            pipe.execute_command("EXEC")
            pipe.execute_command("WAIT", self.min_replicas, wait_ms)
            replies = await pipe.execute()  # a queueing error or EXECABORT raises here
        executed: list[Any] = replies[-2]
        failed = [reply for reply in executed if isinstance(reply, Exception)]
        if failed:
            raise failed[0]
        acknowledged = int(replies[-1])
        if acknowledged < self.min_replicas:
            raise NotReplicated(
                f"{acknowledged} of {self.min_replicas} replicas acknowledged the commit "
                f"within {self.replica_timeout:g}s"
            )
        return [bool(reply) for reply in executed[: len(messages)]]

    def _stage(
        self, pipe: aioredis.client.Pipeline, messages: list[tuple[Envelope, bytes]]
    ) -> None:
        for envelope, body in messages:
            stage_message(pipe, envelope, body, self.trace_ttl, enqueue=False)
        ids = [envelope.id for envelope, _ in messages]
        pipe.lpush(queueing.POLICY_LIST, queueing.classify_task(ids))
