"""Operator actions on the deferred queue (``tlsrelay queue``): list, retry now, bounce.

- :func:`deferred` lists what waits: per (message, domain) job its id, age, recipients left,
  next attempt and last error.
- :func:`retry` makes matching entries due now (``ZADD XX``: an entry the scheduler already took
  is left alone); the scheduler moves them within ``delivery.scheduler_interval``.
- :func:`bounce` takes a message's entries out of the deferred set and bounces their recipients
  with a DSN (the same recording code as a delivery round), each entry in one transaction under
  ``WATCH`` of the set: an entry a concurrent scheduler took is left to it, and a failure half-way
  leaves the entry deferred, never removed without its bounce.

Failure: Redis errors propagate; a message with nothing deferred is reported, not an error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.jobs import Job, job_key
from services.common.model import Reply
from services.deliver.delivery import Outcome
from services.deliver.ledger import Ledger


@dataclass(frozen=True)
class Entry:
    """One deferred job as the operator sees it."""

    id: str
    domain: str
    recipients: tuple[str, ...]
    due: float
    attempt: int
    last_error: str
    received_at: float | None  # None when the message is gone (should not happen)

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "domain": self.domain,
            "recipients": list(self.recipients),
            "age_seconds": round(now - self.received_at, 1) if self.received_at else None,
            "next_attempt_in_seconds": round(self.due - now, 1),
            "attempts": self.attempt - 1,
            "last_error": self.last_error,
        }


def _members(client: redis.Redis) -> list[tuple[bytes, float]]:
    raw: list[tuple[bytes, float]] = client.zrange(  # type: ignore[assignment]
        spool.DEFERRED, 0, -1, withscores=True
    )
    return raw


def deferred(client: redis.Redis, message_id: str | None = None) -> list[Entry]:
    members = [(Job.from_json(json.loads(m)), due) for m, due in _members(client)]
    jobs = [(job, due) for job, due in members if message_id in (None, job.id)]
    envelopes = {job.id: spool.load_envelope(client, job.id) for job, _ in jobs}
    return [
        Entry(
            id=job.id,
            domain=job.domain,
            recipients=job.recipients,
            due=due,
            attempt=job.attempt,
            last_error=job.last_error or "",
            received_at=env.received_at if (env := envelopes[job.id]) else None,
        )
        for job, due in jobs
    ]


def retry(client: redis.Redis, message_id: str | None = None) -> int:
    """Make matching deferred entries due now; return how many."""
    now = time.time()
    members = [m for m, _ in _members(client) if message_id in (None, job_key(json.loads(m))[0])]
    with client.pipeline(transaction=True) as pipe:
        for member in members:
            pipe.zadd(spool.DEFERRED, {member: now}, xx=True)
        pipe.execute()
    return len(members)


# The deferred set changes with every deferral and scheduler move: a busy relay may need a few
# tries before the set stays still from WATCH to EXEC (each try takes a few milliseconds).
BOUNCE_ATTEMPTS = 100


def bounce(config: Config, client: redis.Redis, message_id: str) -> list[str]:
    """Give up on a deferred message: bounce its deferred recipients; return them."""
    bounced: list[str] = []
    for member, _ in _members(client):
        if job_key(json.loads(member))[0] == message_id:
            bounced += _bounce_entry(config, client, member)
    return bounced


def _bounce_entry(config: Config, client: redis.Redis, member: bytes) -> tuple[str, ...]:
    """One deferred entry: out of the deferred set and its recipients bounced (with the DSN) in
    ONE transaction, under ``WATCH`` of the set: an entry the scheduler took meanwhile is left to
    it (nothing bounced), and a failure leaves the entry where it was."""
    job = Job.from_json(json.loads(member))
    ledger = Ledger(config, client)
    for _ in range(BOUNCE_ATTEMPTS):
        with client.pipeline(transaction=True) as pipe:
            pipe.watch(spool.DEFERRED)  # type: ignore[no-untyped-call]
            if pipe.zscore(spool.DEFERRED, member) is None:
                return ()  # the scheduler (or another bounce) has it
            envelope, body = spool.load_envelope(client, job.id), spool.load_body(client, job.id)
            final = spool.load_job(client, job.id, job.domain).final
            pending = [r for r in job.recipients if r not in final]
            pipe.multi()
            pipe.zrem(spool.DEFERRED, member)
            try:
                if envelope is None or body is None or not pending:  # gone, or nothing left
                    pipe.execute()  # a stale entry: never bounce a recipient already final
                    return ()
                outcome = _given_up(job, pending)
                ledger.record(ledger.round(job, envelope, body), outcome, pipe=pipe)
            except redis.WatchError:
                continue
        return tuple(pending)
    raise redis.WatchError(f"deferred set too busy: {job.id} not bounced, try again")


def _given_up(job: Job, pending: list[str]) -> Outcome:
    reason = f"given up by the administrator; last error: {job.last_error or 'none'}"
    outcome = Outcome(note="The relay's administrator stopped retrying this message.")
    outcome.bounced = dict.fromkeys(pending, Reply(550, "5.0.0", reason))
    return outcome
