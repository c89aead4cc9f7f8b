"""The Redis spool: where accepted messages, their per-recipient state and their trace live.

Layout (every key under ``tlsrelay:``):

- ``msg:{id}``       hash: ``envelope`` (JSON), ``body`` (raw bytes, Received header included),
                     ``decisions`` (JSON, written by policy). Deleted when every recipient is final.
- ``rcpt:{id}``      hash: recipient → JSON ``{"state", "reply", "at"}``, state ``delivered`` or
                     ``bounced``: a recipient with a final state here is never sent again.
- ``trace:{id}``     list of JSON events, oldest first (kept ``TRACE_TTL`` after the last event).
- ``deferred``       sorted set: member = JSON delivery job, score = due time (unix seconds).
- ``tlsbroken:{host}:{port}``  set with a TTL when a STARTTLS handshake failed there.
- ``mtasts:{domain}``  the domain's cached MTA-STS policy or "none" (services/deliver/mtasts.py).
- ``tlsrpt:{YYYY-MM-DD}``  the day's TLS session counts for RFC 8460 reports (deliver/tlsrpt.py).

Writes that must not be half-done go in one ``MULTI``/``EXEC`` (or one Lua script): a failed
transaction leaves nothing behind. Functions raise ``redis.exceptions.RedisError`` (and
``OSError``) when Redis cannot be reached; callers decide what that means (ingest: 451).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel
import redis.sentinel

from services.common import queueing
from services.common.model import Decision, Envelope

PREFIX = "tlsrelay:"
DEFERRED = PREFIX + "deferred"
TRACE_TTL = 7 * 86400
FINAL_STATES = frozenset({"delivered", "bounced"})


def msg_key(message_id: str) -> str:
    return f"{PREFIX}msg:{message_id}"


def rcpt_key(message_id: str) -> str:
    return f"{PREFIX}rcpt:{message_id}"


def trace_key(message_id: str) -> str:
    return f"{PREFIX}trace:{message_id}"


def in_flight_key(message_id: str, domain: str) -> str:
    """Set while a delivery sends DATA (services.deliver.delivery); see RFC 1047."""
    return f"{PREFIX}inflight:{message_id}:{domain}"


def tls_broken_key(host: str, port: int) -> str:
    return f"{PREFIX}tlsbroken:{host}:{port}"


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
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(spec.sentinels), sentinel_kwargs={"password": spec.password, **TIMEOUTS}, **TIMEOUTS
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        spec.master, db=spec.db, password=spec.password
    )
    return client


def connect_async(url: str) -> aioredis.Redis:
    """An asyncio client (ingest); ``sentinel://`` as in :func:`connect`."""
    spec = SentinelUrl.parse(url)
    if spec is None:
        return aioredis.Redis.from_url(url, **TIMEOUTS)
    sentinel = aioredis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(spec.sentinels), sentinel_kwargs={"password": spec.password, **TIMEOUTS}, **TIMEOUTS
    )
    client: aioredis.Redis = sentinel.master_for(spec.master, db=spec.db, password=spec.password)
    return client


# --------------------------------------------------------------------------- ingest


async def accept(
    client: aioredis.Redis, envelope: Envelope, body: bytes, trace_ttl: float = TRACE_TTL
) -> None:
    """Store message and envelope and enqueue its ``policy`` task, all or nothing.

    One ``MULTI``/``EXEC`` round trip. When this returns, the message is in Redis (and in its AOF
    within the configured fsync window); when it raises, Redis holds none of it.
    """
    async with client.pipeline(transaction=True) as pipe:
        stage_message(pipe, envelope, body, trace_ttl)
        await pipe.execute()


def stage_message(
    pipe: redis.client.Pipeline | aioredis.client.Pipeline,
    envelope: Envelope,
    body: bytes,
    trace_ttl: float,
    **received: Any,
) -> None:
    """Buffer the writes that queue a new message (ingest, or a DSN the relay itself generates)
    into ``pipe``, a transaction the caller executes. ``received`` adds fields to the event."""
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
    pipe.lpush(queueing.QUEUE_POLICY, queueing.classify_task(envelope.id))


# --------------------------------------------------------------------------- workers


def load_envelope(client: redis.Redis, message_id: str) -> Envelope | None:
    """The stored envelope, or None when the message is gone (already final)."""
    raw: bytes | None = client.hget(msg_key(message_id), "envelope")  # type: ignore[assignment]
    return Envelope.from_json(json.loads(raw)) if raw else None


@dataclass(frozen=True)
class JobState:
    """What a delivery job needs from Redis, read in one round trip (see :func:`load_job`)."""

    envelope: Envelope | None
    body: bytes | None
    final: set[str]  # recipients already delivered or bounced
    in_flight: bytes | None  # the mark of an earlier run that died while sending DATA


def load_job(client: redis.Redis, message_id: str, domain: str) -> JobState:
    """Envelope, body, final recipients and the in-flight mark: one pipelined round trip."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hmget(msg_key(message_id), ["envelope", "body"])
        pipe.hgetall(rcpt_key(message_id))
        pipe.get(in_flight_key(message_id, domain))
        (raw_envelope, body), states, in_flight = pipe.execute()
    final = {k.decode() for k, v in states.items() if json.loads(v).get("state") in FINAL_STATES}
    envelope = Envelope.from_json(json.loads(raw_envelope)) if raw_envelope else None
    return JobState(envelope, body, final, in_flight)


def load_body(client: redis.Redis, message_id: str) -> bytes | None:
    raw: bytes | None = client.hget(msg_key(message_id), "body")  # type: ignore[assignment]
    return raw


def final_recipients(client: redis.Redis, message_id: str) -> set[str]:
    """Recipients that reached a final state (never to be sent again)."""
    states: dict[bytes, bytes] = client.hgetall(rcpt_key(message_id))  # type: ignore[assignment]
    return {k.decode() for k, v in states.items() if json.loads(v).get("state") in FINAL_STATES}


def record_classification(
    client: redis.Redis, envelope: Envelope, decisions: list[Decision], trace_ttl: float = TRACE_TTL
) -> None:
    """Store the decisions and enqueue one ``deliver`` task per destination domain, atomically."""
    groups = envelope.recipients_by_domain()
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(msg_key(envelope.id), "decisions", json.dumps([d.to_json() for d in decisions]))
        for decision in decisions:
            job = {
                "id": envelope.id,
                "domain": decision.domain,
                "recipients": list(groups[decision.domain]),
                "decision": decision.to_json(),
                "attempt": 1,
            }
            pipe.lpush(queueing.QUEUE_DELIVER, queueing.deliver_task(job))
        pipe.rpush(
            trace_key(envelope.id),
            event("classified", decisions=[d.to_json() for d in decisions]),
        )
        pipe.expire(trace_key(envelope.id), int(trace_ttl))
        pipe.execute()


def is_classified(client: redis.Redis, message_id: str) -> bool:
    return bool(client.hexists(msg_key(message_id), "decisions"))


def append_trace(
    client: redis.Redis, message_id: str, *events: str, trace_ttl: float = TRACE_TTL
) -> None:
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(trace_key(message_id), *events)
        pipe.expire(trace_key(message_id), int(trace_ttl))
        pipe.execute()


def read_trace(client: redis.Redis, message_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in client.lrange(trace_key(message_id), 0, -1)]
