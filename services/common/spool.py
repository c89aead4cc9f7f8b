"""The Redis spool: where accepted messages, their per-recipient state and their trace live.

Layout (every key under ``tlsrelay:``):

- ``msg:{id}``       hash: ``envelope`` (JSON), ``body`` (raw bytes, Received header included),
                     ``decisions`` (JSON, written by policy). Deleted when every recipient is final.
- ``rcpt:{id}``      hash: recipient → JSON ``{"state", "reply", "at"}``, state ``delivered`` or
                     ``bounced`` (final: never sent again) or ``deferred`` (with ``attempt``: the
                     round that deferred it; a copy of that round's job or an earlier one skips
                     it, the retry waits in ``deferred``). Deleted with ``msg:{id}``; it also
                     expires ``max_queue_lifetime`` + a day after its last write (a safety net:
                     the message is final long before).
- ``trace:{id}``     list of JSON events, oldest first (kept ``TRACE_TTL`` after the last event).
- ``claim:{id}:{domain}``  the owner (``host:pid:random``) of a delivery job being worked on:
                     ``SET NX`` with a short TTL the owner refreshes (services/deliver/claims.py).
- ``inflight:{id}:{domain}``  set while a delivery sends DATA (RFC 1047), with a TTL.
- ``deferred``       sorted set: member = JSON delivery job, score = due time (unix seconds).
- ``deferred:since`` sorted set: message ids with something deferred, score = acceptance time.
- ``tlsbroken:{host}:{port}``  set with a TTL when a STARTTLS handshake failed there.
- ``waiting:policy``  sorted set: message ids not yet classified, score = acceptance time.
- ``waiting:deliver`` sorted set: ``"{id} {domain}"`` jobs queued for delivery (not deferred),
                     score = acceptance time. Celery tasks carry batches, so the task lists'
                     lengths are not message counts; these two sets are (the queue gauges). Both
                     are written in the transactions that queue and consume the work, and
                     removing a member twice is harmless, so a redelivered task cannot skew them.
- ``mtasts:{domain}``  the domain's cached MTA-STS policy or "none" (services/deliver/mtasts.py).
- ``tlsrpt:{YYYY-MM-DD}``  the day's TLS session counts for RFC 8460 reports (deliver/tlsrpt.py).

Writes that must not be half-done go in one ``MULTI``/``EXEC`` (or one Lua script): a failed
transaction leaves nothing behind. Functions raise ``redis.exceptions.RedisError`` (and
``OSError``) when Redis cannot be reached; callers decide what that means (ingest: 451).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel
import redis.sentinel

from services.common import queueing
from services.common.jobs import Job
from services.common.model import Decision, Envelope

PREFIX = "tlsrelay:"
DEFERRED = PREFIX + "deferred"
# The deferred messages by acceptance time (member message id): services/deliver/scheduler.py
# writes and prunes it, the queue gauges read it (services/common/metrics.py).
DEFERRED_SINCE = DEFERRED + ":since"
TRACE_TTL = 7 * 86400
FINAL_STATES = frozenset({"delivered", "bounced"})
DEFERRED_STATE = "deferred"  # in rcpt:{id}, with the attempt that deferred the recipient
WAITING_POLICY = PREFIX + "waiting:policy"
WAITING_DELIVER = PREFIX + "waiting:deliver"


def msg_key(message_id: str) -> str:
    return f"{PREFIX}msg:{message_id}"


def rcpt_key(message_id: str) -> str:
    return f"{PREFIX}rcpt:{message_id}"


def trace_key(message_id: str) -> str:
    return f"{PREFIX}trace:{message_id}"


def claim_key(message_id: str, domain: str) -> str:
    """The exclusive claim of one delivery job (services/deliver/claims.py)."""
    return f"{PREFIX}claim:{message_id}:{domain}"


def in_flight_key(message_id: str, domain: str) -> str:
    """Set while a delivery sends DATA (services.deliver.ledger); see RFC 1047."""
    return f"{PREFIX}inflight:{message_id}:{domain}"


def tls_broken_key(host: str, port: int) -> str:
    return f"{PREFIX}tlsbroken:{host}:{port}"


def waiting_job(message_id: str, domain: str) -> str:
    """The ``waiting:deliver`` member of one delivery job."""
    return f"{message_id} {domain}"


def event(kind: str, **fields: Any) -> str:
    """One trace event as stored: JSON with ``at`` (unix seconds) and ``event``."""
    return json.dumps({"at": round(time.time(), 6), "event": kind, **fields}, sort_keys=True)


@dataclass(frozen=True)
class SentinelUrl:
    """``sentinel://[:password@]host:port[,host:port...]/master_name[/db]`` (Redis Sentinel):
    the sentinels to ask, the monitored master's name, the database and the password (used for
    the master and, as Redis deployments usually share it, for the sentinels)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl | None:
        """The parts of a ``sentinel://`` URL, None for any other scheme; ValueError if bad."""
        if not url.startswith("sentinel://"):
            return None
        parts = urlsplit(url)
        hosts = parts.netloc.rpartition("@")[2]
        path = [p for p in parts.path.split("/") if p]
        if not hosts or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(f"expected sentinel://[:password@]host:port[,...]/master[/db]: {url}")
        sentinels = tuple(_host_port(h) for h in hosts.split(","))
        password = unquote(parts.password) if parts.password else None
        return cls(sentinels, path[0], int(path[1]) if len(path) == 2 else 0, password)

    def kombu_url(self) -> str:
        """kombu's form: one ``sentinel://`` URL per sentinel joined by ``;`` (the master name
        goes into ``broker_transport_options['master_name']``)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return ";".join(f"sentinel://{auth}{h}:{p}/{self.db}" for h, p in self.sentinels)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


TIMEOUTS: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5}


def connect(url: str) -> redis.Redis:
    """A synchronous client (workers). Timeouts keep a dead Redis from hanging a task forever.
    A ``sentinel://`` URL gives a client that follows the master through failovers."""
    spec = SentinelUrl.parse(url)
    if spec is None:
        return redis.Redis.from_url(url, **TIMEOUTS)
    sentinel = redis.sentinel.Sentinel(
        list(spec.sentinels), sentinel_kwargs={"password": spec.password, **TIMEOUTS}, **TIMEOUTS
    )
    client: redis.Redis = sentinel.master_for(spec.master, db=spec.db, password=spec.password)
    return client


def connect_async(url: str) -> aioredis.Redis:
    """An asyncio client (ingest); ``sentinel://`` as in :func:`connect`."""
    spec = SentinelUrl.parse(url)
    if spec is None:
        return aioredis.Redis.from_url(url, **TIMEOUTS)
    sentinel = aioredis.sentinel.Sentinel(
        list(spec.sentinels), sentinel_kwargs={"password": spec.password, **TIMEOUTS}, **TIMEOUTS
    )
    client: aioredis.Redis = sentinel.master_for(spec.master, db=spec.db, password=spec.password)
    return client


# --------------------------------------------------------------------------- ingest


async def accept(
    client: aioredis.Redis, envelope: Envelope, body: bytes, trace_ttl: float = TRACE_TTL
) -> None:
    """Store one message and envelope and enqueue its ``policy`` task, all or nothing.

    One ``MULTI``/``EXEC`` round trip. When this returns, the message is in Redis (and in its AOF
    within the configured fsync window); when it raises, Redis holds none of it. Ingest uses
    :class:`Committer`, which does the same for several messages at once.
    """
    async with client.pipeline(transaction=True) as pipe:
        stage_message(pipe, envelope, body, trace_ttl)
        await pipe.execute()


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
    ) -> None:
        self.client = client
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
            async with self.client.pipeline(transaction=True) as pipe:
                for envelope, body, _ in batch:
                    stage_message(pipe, envelope, body, self.trace_ttl, enqueue=False)
                ids = [envelope.id for envelope, _, _ in batch]
                pipe.lpush(queueing.QUEUE_POLICY, queueing.classify_task(ids))
                await pipe.execute()
        except Exception as exc:
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        except BaseException:  # cancelled (shutdown): the callers must not wait forever
            for _, _, done in batch:
                done.cancel()
            raise
        for _, _, done in batch:
            if not done.done():
                done.set_result(None)


def stage_message(
    pipe: redis.client.Pipeline | aioredis.client.Pipeline,
    envelope: Envelope,
    body: bytes,
    trace_ttl: float,
    enqueue: bool = True,
    **received: Any,
) -> None:
    """Buffer the writes that queue a new message (ingest, or a DSN the relay itself generates)
    into ``pipe``, a transaction the caller executes. ``received`` adds fields to the event.
    ``enqueue=False``: the caller pushes the ``policy`` task itself (one for a batch)."""
    first = event(
        "received",
        client=envelope.client_address,
        helo=envelope.client_helo,
        tls=envelope.inbound_tls.version,
        cipher=envelope.inbound_tls.cipher,
        size=envelope.size,
        sender=envelope.sender,
        recipients=list(envelope.recipients),
        listener=envelope.listener,
        tenant=envelope.tenant,
        auth_user=envelope.auth_user,
        client_cert=envelope.client_cert,
        **received,
    )
    pipe.hset(
        msg_key(envelope.id), mapping={"envelope": json.dumps(envelope.to_json()), "body": body}
    )
    pipe.rpush(trace_key(envelope.id), first)
    pipe.expire(trace_key(envelope.id), int(trace_ttl))
    pipe.zadd(WAITING_POLICY, {envelope.id: envelope.received_at})
    if enqueue:
        pipe.lpush(queueing.QUEUE_POLICY, queueing.classify_task([envelope.id]))


# --------------------------------------------------------------------------- workers


def load_envelope(client: redis.Redis, message_id: str) -> Envelope | None:
    """The stored envelope, or None when the message is gone (already final)."""
    raw: bytes | None = client.hget(msg_key(message_id), "envelope")  # type: ignore[assignment]
    return Envelope.from_json(json.loads(raw)) if raw else None


@dataclass(frozen=True)
class JobState:
    """What a delivery job needs from Redis, read in one round trip (see :func:`load_jobs`)."""

    envelope: Envelope | None
    body: bytes | None  # None from load_jobs: read separately (load_bodies), as needed
    final: dict[str, str]  # recipient → its final state (delivered / bounced), when it has one
    in_flight: bytes | None  # the mark of an earlier run that died while sending DATA
    delay_warned: bool = False  # a "delayed" DSN was sent already
    # recipient → the attempt that deferred it (its retry, one attempt on, is in the deferred set)
    deferred: dict[str, int] = field(default_factory=dict)

    def pending(self, job: Job) -> list[str]:
        """The job's recipients to send now: neither final nor deferred by this attempt or a later
        one (a redelivered task, or a second copy of the job: the retry owns those)."""
        return [
            r
            for r in job.recipients
            if r not in self.final and self.deferred.get(r, 0) < job.attempt
        ]


def recipient_states(raw: dict[bytes, bytes]) -> tuple[dict[str, str], dict[str, int]]:
    """``rcpt:{id}`` as (final recipient → state, deferred recipient → the attempt that did)."""
    final: dict[str, str] = {}
    deferred: dict[str, int] = {}
    for key, value in raw.items():
        doc = json.loads(value)
        state = doc.get("state")
        if state in FINAL_STATES:
            final[key.decode()] = state
        elif state == DEFERRED_STATE:
            deferred[key.decode()] = int(doc.get("attempt", 0))
    return final, deferred


def job_state(
    raw_envelope: bytes | None,
    warned: bytes | None,
    rcpts: dict[bytes, bytes],
    in_flight: bytes | None,
) -> JobState:
    """A :class:`JobState` (body left out) from what Redis holds for the job."""
    final, deferred = recipient_states(rcpts)
    envelope = Envelope.from_json(json.loads(raw_envelope)) if raw_envelope else None
    return JobState(envelope, None, final, in_flight, warned is not None, deferred)


def load_jobs(client: redis.Redis, jobs: list[tuple[str, str]]) -> list[JobState]:
    """For each (message id, domain): envelope, recipients' states, in-flight mark and whether a
    delay notice went out — all jobs in one pipelined round trip. Bodies are left out (``body``
    None; the caller reads them with :func:`load_bodies`, a few megabytes at a time)."""
    with client.pipeline(transaction=False) as pipe:
        for message_id, domain in jobs:
            pipe.hmget(msg_key(message_id), ["envelope", "delay_warned"])
            pipe.hgetall(rcpt_key(message_id))
            pipe.get(in_flight_key(message_id, domain))
        replies = pipe.execute()
    states = []
    for i in range(len(jobs)):
        (raw_envelope, warned), rcpts, in_flight = replies[3 * i : 3 * i + 3]
        states.append(job_state(raw_envelope, warned, rcpts, in_flight))
    return states


def load_job(client: redis.Redis, message_id: str, domain: str) -> JobState:
    """:func:`load_jobs` for one job."""
    return load_jobs(client, [(message_id, domain)])[0]


def load_body(client: redis.Redis, message_id: str) -> bytes | None:
    raw: bytes | None = client.hget(msg_key(message_id), "body")  # type: ignore[assignment]
    return raw


BODY_BUDGET = 8 * 1024 * 1024  # bytes of message bodies a worker process reads at once


def load_unclassified(client: redis.Redis, message_ids: list[str]) -> list[Envelope]:
    """The envelope of each message that is still stored and not yet classified, in one
    pipelined round trip. Messages gone (final) or already classified (a redelivered ``policy``
    task) are left out. Bodies: :func:`load_bodies`."""
    with client.pipeline(transaction=False) as pipe:
        for message_id in message_ids:
            pipe.hmget(msg_key(message_id), ["envelope", "decisions"])
        rows = pipe.execute()
    return [
        Envelope.from_json(json.loads(e)) for e, decided in rows if e is not None and not decided
    ]


def load_bodies(client: redis.Redis, message_ids: Sequence[str]) -> list[bytes | None]:
    """The bodies of these messages (None for one that is gone), in one pipelined round trip."""
    with client.pipeline(transaction=False) as pipe:
        for message_id in message_ids:
            pipe.hget(msg_key(message_id), "body")
        bodies: list[bytes | None] = pipe.execute()
    return bodies


def budgeted(sizes: Sequence[int], budget: int | None = None) -> list[range]:
    """Consecutive index ranges whose sizes add up to at most ``budget`` (a bigger item alone):
    how a batch reads its bodies, so a worker holds a few megabytes of mail, not a batch of
    35 MB messages (bodies stay in Redis, issue #9). ``budget`` None: :data:`BODY_BUDGET`."""
    budget = BODY_BUDGET if budget is None else budget
    chunks, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            chunks.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks


def record_classifications(
    client: redis.Redis,
    classified: list[tuple[Envelope, list[Decision]]],
    trace_ttl: float = TRACE_TTL,
    batch_max: int = 50,
    message_ids: Sequence[str] = (),
) -> None:
    """Store the decisions of several messages and enqueue their delivery jobs, atomically: one
    ``deliver`` task per destination domain with up to ``batch_max`` jobs (so one worker sends a
    domain's messages over one connection). ``message_ids`` (the whole policy task, including
    messages skipped as gone or already classified) leave ``waiting:policy``."""
    jobs: list[Job] = []
    waiting: dict[str, float] = {}
    batch = len(message_ids) or len(classified)  # shown in the trace: messages in the task
    with client.pipeline(transaction=True) as pipe:
        for envelope, decisions in classified:
            groups = envelope.recipients_by_domain()
            as_json = [d.to_json() for d in decisions]
            pipe.hset(msg_key(envelope.id), "decisions", json.dumps(as_json))
            classified_event = event("classified", decisions=as_json, batch=batch)
            pipe.rpush(trace_key(envelope.id), classified_event)
            pipe.expire(trace_key(envelope.id), int(trace_ttl))
            for decision in decisions:
                jobs.append(Job(envelope.id, decision.domain, groups[decision.domain], decision))
                waiting[waiting_job(envelope.id, decision.domain)] = envelope.received_at
        for chunk in queueing.domain_batches(jobs, batch_max, lambda j: j.domain):
            pipe.lpush(queueing.QUEUE_DELIVER, queueing.deliver_task([j.to_json() for j in chunk]))
        if waiting:
            pipe.zadd(WAITING_DELIVER, waiting)
        gone = list(message_ids) or [envelope.id for envelope, _ in classified]
        if gone:
            pipe.zrem(WAITING_POLICY, *gone)
        pipe.execute()


def append_trace(
    client: redis.Redis, message_id: str, *events: str, trace_ttl: float = TRACE_TTL
) -> None:
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(trace_key(message_id), *events)
        pipe.expire(trace_key(message_id), int(trace_ttl))
        pipe.execute()


def read_trace(client: redis.Redis, message_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in client.lrange(trace_key(message_id), 0, -1)]


# --------------------------------------------------------------------------- deferred index

DEFERRED_SINCE_PAGE = 10  # entries of the index read at once, oldest first
DEFERRED_SINCE_PAGES = 5  # pages looked at per scrape or prune before giving up for this round


def deferred_since_page(client: redis.Redis, start: int) -> list[tuple[bytes, float]]:
    """``DEFERRED_SINCE_PAGE`` (message id, acceptance time) entries of the index from ``start``."""
    page: list[tuple[bytes, float]] = client.zrange(  # type: ignore[assignment]
        DEFERRED_SINCE, start, start + DEFERRED_SINCE_PAGE - 1, withscores=True
    )
    return page


def messages_exist(client: redis.Redis, message_ids: Sequence[bytes | str]) -> list[bool]:
    """Whether each message is still stored (its ``msg:{id}`` hash exists), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for message_id in message_ids:
            text = message_id.decode() if isinstance(message_id, bytes) else message_id
            pipe.exists(msg_key(text))
        return [bool(found) for found in pipe.execute()]
