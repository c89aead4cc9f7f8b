"""The Redis spool: where accepted messages, their per-recipient state and their trace live.

Layout (every key under ``tlsrelay:``):

- ``msg:{id}``       hash: ``envelope`` (JSON), ``body`` (raw bytes, Received header included),
                     ``decisions`` (JSON, written by policy), for a REQUIRETLS DSN ``fallback``
                     (its redacted twin's body). Deleted when every recipient is final.
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
transaction leaves nothing behind. A new message is written only under an id no message (nor
trace) has (:data:`STORE_NEW`): a colliding id leaves the message already there untouched, and
ingest stores the new one under another id (:class:`IdTaken`). Functions raise
``redis.exceptions.RedisError`` (and ``OSError``) when Redis cannot be reached; callers decide
what that means (ingest: 451).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel
import redis.sentinel

from services.common import queueing, redispack
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


def interrupted_key(message_id: str, domain: str) -> str:
    """Set (for the trace's lifetime) once a delivery to ``domain`` was found interrupted while
    sending DATA: where and since when, for the bounce that may follow
    (services/deliver/marks.py ``note_interrupted``, services/deliver/dsn.py)."""
    return f"{PREFIX}interrupted:{message_id}:{domain}"


def tls_broken_key(host: str, port: int) -> str:
    return f"{PREFIX}tlsbroken:{host}:{port}"


# Traffic shaping (services/deliver/shaping.py): per site, its connection leases (a sorted set
# by expiry), back-off state, rate cells and the "someone waits" flag; the sites seen (id → JSON
# with its label) and the operator's suspensions (target → JSON with until, reason, label).
SHAPING = PREFIX + "shaping:"
SHAPING_SITES = SHAPING + "sites"
SHAPING_SUSPENDED = SHAPING + "suspended"


def site_key(part: str, site_id: str) -> str:
    """A site's shaping key: ``part`` is leases, waiting, backoff, rate, crate, count, line
    (the jobs waiting for the site, services/deliver/shaping.py) or wake."""
    return f"{SHAPING}{part}:{site_id}"


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
        options = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        packing = redispack.connection_kwargs(options)  # commands packed in C
        return redis.Redis.from_url(url, **TIMEOUTS, **packing)
    sentinel = redis.sentinel.Sentinel(
        list(spec.sentinels), sentinel_kwargs={"password": spec.password, **TIMEOUTS}, **TIMEOUTS
    )
    client: redis.Redis = sentinel.master_for(
        spec.master, db=spec.db, password=spec.password, **redispack.connection_kwargs()
    )
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


class IdTaken(Exception):
    """The message's id belongs to another message (or its trace): nothing of it was stored."""


# A new message, written only if its id is free: no msg:{id} and no trace:{id} (a finished
# message's trace outlives it). The same envelope already stored is this very write sent again
# (the client retried after a lost reply): done. Returns 1 when stored, 0 when the id is taken.
# KEYS: msg, trace, waiting:policy. ARGV: envelope, body, first event, trace TTL, score, id,
# and optionally a fallback body (see stage_message).
STORE_NEW = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return redis.call('HGET', KEYS[1], 'envelope') == ARGV[1] and 1 or 0
end
redis.call('HSET', KEYS[1], 'envelope', ARGV[1], 'body', ARGV[2])
if ARGV[7] then redis.call('HSET', KEYS[1], 'fallback', ARGV[7]) end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
return 1
"""


async def accept(
    client: aioredis.Redis, envelope: Envelope, body: bytes, trace_ttl: float = TRACE_TTL
) -> None:
    """Store one message and envelope and enqueue its ``policy`` task, all or nothing.

    One ``MULTI``/``EXEC`` round trip. When this returns, the message is in Redis (and in its AOF
    within the configured fsync window); when it raises, Redis holds none of it (:class:`IdTaken`:
    another message has its id; store it under a new one). Ingest uses
    :class:`services.common.commit.Committer`, which does the same for several messages at once.
    """
    async with client.pipeline(transaction=True) as pipe:
        stage_message(pipe, envelope, body, trace_ttl)
        stored, _ = await pipe.execute()
    if not stored:
        raise IdTaken(envelope.id)


def stage_message(
    pipe: redis.client.Pipeline | aioredis.client.Pipeline,
    envelope: Envelope,
    body: bytes,
    trace_ttl: float,
    enqueue: bool = True,
    fallback: bytes | None = None,
    **received: Any,
) -> None:
    """Buffer the writes that queue a new message (ingest, or a DSN the relay itself generates)
    into ``pipe``, a transaction the caller executes: first one :data:`STORE_NEW` script, whose
    reply is 0 when the id was taken (nothing stored). ``received`` adds fields to the event.
    ``enqueue=False``: the caller pushes the ``policy`` task itself (one for a batch).
    ``fallback``: a body kept with the message (a REQUIRETLS DSN's redacted twin, sent when it
    fails: :func:`load_fallback`), gone with the message."""
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
    keys = (msg_key(envelope.id), trace_key(envelope.id), WAITING_POLICY)
    doc = json.dumps(envelope.to_json())
    args: list[bytes | str | float] = [doc, body, first, int(trace_ttl), envelope.received_at]
    args += [envelope.id, *([fallback] if fallback is not None else [])]
    pipe.eval(STORE_NEW, 3, *keys, *args)
    if enqueue:
        pipe.lpush(queueing.POLICY_LIST, queueing.classify_task([envelope.id]))


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
    in_flight: bytes | None  # the mark of an earlier run that died while sending DATA (claims)
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
    """For each (message id, domain): envelope, recipients' states and whether a delay notice
    went out — all jobs in one pipelined round trip. Bodies are left out (``body`` None; the
    caller reads them with :func:`load_bodies`, a few megabytes at a time), and so are in-flight
    marks (``in_flight`` None): the job's claim reads its mark when it is taken
    (services/deliver/claims.py), which is the read that counts."""
    with client.pipeline(transaction=False) as pipe:
        for message_id, _domain in jobs:
            pipe.hmget(msg_key(message_id), ["envelope", "delay_warned"])
            pipe.hgetall(rcpt_key(message_id))
        replies = pipe.execute()
    states = []
    for i in range(len(jobs)):
        (raw_envelope, warned), rcpts = replies[2 * i : 2 * i + 2]
        states.append(job_state(raw_envelope, warned, rcpts, None))
    return states


def load_job(client: redis.Redis, message_id: str, domain: str) -> JobState:
    """:func:`load_jobs` for one job."""
    return load_jobs(client, [(message_id, domain)])[0]


def load_body(client: redis.Redis, message_id: str) -> bytes | None:
    raw: bytes | None = client.hget(msg_key(message_id), "body")  # type: ignore[assignment]
    return raw


def load_mark(client: redis.Redis, message_id: str, domain: str) -> bytes | None:
    """The job's in-flight mark (RFC 1047: services/deliver/marks.py), if one stands."""
    raw: bytes | None = client.get(in_flight_key(message_id, domain))  # type: ignore[assignment]
    return raw


def load_fallback(client: redis.Redis, message_id: str) -> bytes | None:
    """The fallback body stored with a message (:func:`stage_message`), if any."""
    raw: bytes | None = client.hget(msg_key(message_id), "fallback")  # type: ignore[assignment]
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


# Which of KEYS (msg:{id}) are not to be classified (1) — they carry decisions already, or the
# message is gone (no envelope: writing decisions would create a hash with nothing else, no TTL,
# never delivered nor removed) — or are (0), in one round trip.
CLASSIFIED = """
local out = {}
for i, key in ipairs(KEYS) do
  local done = redis.call('HEXISTS', key, 'decisions') == 1
  out[i] = (done or redis.call('HEXISTS', key, 'envelope') == 0) and 1 or 0
end
return out
"""
WATCH_ATTEMPTS = 10  # optimistic transactions retried this often before giving up (raising)


def record_classifications(
    client: redis.Redis,
    classified: list[tuple[Envelope, list[Decision]]],
    trace_ttl: float = TRACE_TTL,
    batch_max: int = 50,
    message_ids: Sequence[str] = (),
) -> list[str]:
    """Store the decisions of several messages and enqueue their delivery jobs, atomically: one
    ``deliver`` task per destination domain with up to ``batch_max`` jobs (so one worker sends a
    domain's messages over one connection). ``message_ids`` (the whole policy task, including
    messages skipped as gone or already classified) leave ``waiting:policy``.

    Idempotent: the messages' hashes are ``WATCH``ed and those that have decisions already (a
    copy of the same task ran at the same time) are left out, so two copies queue one set of
    deliveries; so are those gone since they were read (deleted, or after a failover read from
    the old master); when a watched hash changes before ``EXEC`` the transaction is tried again.
    Returns the ids classified here; ``redis.WatchError`` after :data:`WATCH_ATTEMPTS` tries."""
    for _ in range(WATCH_ATTEMPTS):
        with client.pipeline(transaction=True) as pipe:
            fresh = _not_yet_classified(pipe, classified)
            pipe.multi()
            _stage_classifications(pipe, fresh, trace_ttl, batch_max, message_ids)
            try:
                pipe.execute()
            except redis.WatchError:
                continue
            return [envelope.id for envelope, _ in fresh]
    raise redis.WatchError(f"classifications not recorded after {WATCH_ATTEMPTS} attempts")


def _not_yet_classified(
    pipe: redis.client.Pipeline, classified: list[tuple[Envelope, list[Decision]]]
) -> list[tuple[Envelope, list[Decision]]]:
    """WATCH the messages' hashes (``pipe`` then runs commands at once until ``multi()``) and
    keep those still stored without decisions."""
    if not classified:
        return []
    keys = [msg_key(envelope.id) for envelope, _ in classified]
    pipe.watch(*keys)  # type: ignore[no-untyped-call]
    done: list[int] = pipe.eval(CLASSIFIED, len(keys), *keys)
    return [item for item, decided in zip(classified, done, strict=True) if not decided]


def _stage_classifications(
    pipe: redis.client.Pipeline,
    classified: list[tuple[Envelope, list[Decision]]],
    trace_ttl: float,
    batch_max: int,
    message_ids: Sequence[str],
) -> None:
    jobs: list[Job] = []
    waiting: dict[str, float] = {}
    batch = len(message_ids) or len(classified)  # shown in the trace: messages in the task
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
        pipe.lpush(queueing.DELIVER_LIST, queueing.deliver_task([j.to_json() for j in chunk]))
    if waiting:
        pipe.zadd(WAITING_DELIVER, waiting)
    gone = list(message_ids) or [envelope.id for envelope, _ in classified]
    if gone:
        pipe.zrem(WAITING_POLICY, *gone)


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
