"""Operator actions on the deferred queue (``tlsrelay queue``): list, retry now, bounce.

- :func:`deferred` lists what waits: per (message, domain) job its id, age, recipients left,
  next attempt and last error.
- :func:`retry` makes matching entries due now (``ZADD XX``: an entry the scheduler already took
  is left alone); the scheduler moves them within ``delivery.scheduler_interval``.
- :func:`bounce` takes a message's entries out of the deferred set and bounces their recipients
  with a DSN (the same recording code as a delivery round), each entry in one transaction under
  ``WATCH`` of the set: an entry a concurrent scheduler took is left to it, and a failure half-way
  leaves the entry deferred, never removed without its bounce.

- Traffic shaping (services/deliver/shaping.py): :func:`suspend` stops attempts to a domain or a
  site until :func:`resume` (or until it expires); a suspended job waits in the deferred set
  marked ``throttled`` and is made due at once by ``resume``. :func:`sites` reports each busy or
  configured site: connections in use and the limit (lowered by back-off), messages in the
  current minute, back-off, suspension, jobs waiting.

Failure: Redis errors propagate; a message with nothing deferred is reported, not an error.
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.deliveryconfig import DEFAULT_SITE
from services.common.jobs import Job, job_key
from services.common.model import Reply
from services.deliver.delivery import Outcome
from services.deliver.ledger import Ledger
from services.deliver.shaping import SUSPENDED, SUSPENSION_REFRESH


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
    throttled: str | None = None  # waiting for a traffic-shaping limit: the reason

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "domain": self.domain,
            "recipients": list(self.recipients),
            "age_seconds": round(now - self.received_at, 1) if self.received_at else None,
            "next_attempt_in_seconds": round(self.due - now, 1),
            "attempts": self.attempt - 1,
            "last_error": self.last_error,
            "throttled": self.throttled,
        }


def _members(client: redis.Redis) -> list[tuple[bytes, float]]:
    """The deferred set's job documents with their due times. An entry that is not a job
    document (corruption, a hand edit) is left out here and left where it is: the scheduler
    keeps it, due again hourly, and logs it (services/deliver/scheduler.py)."""
    raw: list[tuple[bytes, float]] = client.zrange(  # type: ignore[assignment]
        spool.DEFERRED, 0, -1, withscores=True
    )
    return [(member, due) for member, due in raw if _readable(member)]


def _job(member: bytes) -> Job | None:
    """The entry as a :class:`Job`; None for a document a worker parked as it was because it is
    not one (services/deliver/batch.py: kept, never dropped)."""
    try:
        return Job.from_json(json.loads(member))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _readable(member: bytes) -> bool:
    try:
        doc = json.loads(member)
        job_key(doc)
        return isinstance(doc, dict)
    except (ValueError, TypeError, KeyError, IndexError):
        return False


def deferred(client: redis.Redis, message_id: str | None = None) -> list[Entry]:
    members = [(job, due) for m, due in _members(client) if (job := _job(m)) is not None]
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
            throttled=job.throttled[0] if job.throttled else None,
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
        if job_key(json.loads(member))[0] == message_id and _job(member) is not None:
            bounced += _bounce_entry(config, client, member)
    return bounced


def _bounce_entry(config: Config, client: redis.Redis, member: bytes) -> tuple[str, ...]:
    """One deferred entry: out of the deferred set and its recipients bounced (with the DSN) in
    ONE transaction, under ``WATCH`` of the set: an entry the scheduler took meanwhile is left to
    it (nothing bounced), and a failure leaves the entry where it was."""
    job = Job.from_json(json.loads(member))
    ledger = Ledger(config, client)
    noted = False
    for _ in range(BOUNCE_ATTEMPTS):
        with client.pipeline(transaction=True) as pipe:
            pipe.watch(spool.DEFERRED)  # type: ignore[no-untyped-call]
            if pipe.zscore(spool.DEFERRED, member) is None:
                return ()  # the scheduler (or another bounce) has it
            envelope, body = spool.load_envelope(client, job.id), spool.load_body(client, job.id)
            final = spool.load_job(client, job.id, job.domain).final
            pending = [r for r in job.recipients if r not in final]
            mark = spool.load_mark(client, job.id, job.domain)
            if mark is not None and pending and not noted:
                # A round parked after an unexpected error may have sent DATA unrecorded
                # (Ledger.park(keep_mark=True)): its mark, which the next run would have noted,
                # is deleted by this recording. Noted first, so the bounce says the host may
                # have the message (dsn.interrupted_note) and the trace keeps it.
                ledger.note_interrupted(job, mark)
                noted = True
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


# --------------------------------------------------------------------------- traffic shaping


def _label(config: Config, client: redis.Redis, target: str) -> str:
    """The metrics label of a suspension target: a configured site's name, the label of a site
    id seen before, a domain a configured site names; else ``default``."""
    shaping = config.delivery.shaping
    for site in shaping.sites:
        if site.name.lower() == target or _site_names(site.match, target):
            return site.name
    raw = client.hget(spool.SHAPING_SITES, target)
    return str(json.loads(raw)["label"]) if raw else DEFAULT_SITE


def _site_names(patterns: tuple[str, ...], domain: str) -> bool:
    return any(":" not in p and fnmatch.fnmatchcase(domain, p) for p in patterns)


def suspend(
    config: Config, client: redis.Redis, target: str, seconds: float | None, reason: str
) -> dict[str, Any]:
    """No attempts to ``target`` (a domain, a site's name or id) for ``seconds`` (None: until
    resumed); return the suspension as stored. Returns once every worker has seen it (about
    a second later)."""
    target = target.lower().rstrip(".")
    now = time.time()
    doc = {
        "at": now,
        "until": now + seconds if seconds else None,
        "reason": reason,
        "label": _label(config, client, target),
    }
    client.hset(spool.SHAPING_SUSPENDED, target, json.dumps(doc))
    # Every worker reads the suspensions at least this often: once it has passed, no round
    # starts there any more (one under way finishes).
    time.sleep(SUSPENSION_REFRESH)
    return doc


def resume(client: redis.Redis, target: str) -> tuple[bool, int]:
    """Lift the suspension of ``target``; make its suspended jobs due now. Returns (whether it
    was suspended, how many jobs were made due)."""
    target = target.lower().rstrip(".")
    was = bool(client.hdel(spool.SHAPING_SUSPENDED, target))
    now = time.time()
    members = []
    for member, _ in _members(client):
        doc = json.loads(member)
        throttled = doc.get("throttled") or {}
        hit = target in (str(doc.get("domain", "")).lower(), str(throttled.get("site", "")).lower())
        if throttled.get("reason") == SUSPENDED and hit:
            members.append(member)
    with client.pipeline(transaction=True) as pipe:
        for member in members:
            pipe.zadd(spool.DEFERRED, {member: now}, xx=True)
        pipe.execute()
    return was, len(members)


@dataclass(frozen=True)
class SiteState:
    """One site as ``tlsrelay queue sites`` shows it."""

    id: str
    label: str
    hosts: tuple[str, ...]
    connections: int  # leases in force (sessions open, busy or parked)
    limit: int  # the configured limit lowered by back-off
    configured: int
    rate: str | None  # the configured message rate
    messages_this_minute: int | None  # counted only where a rate is set
    backoff_steps: int
    suspended: dict[str, Any] | None
    waiting: int  # jobs parked as throttled for this site

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.id, "label": self.label, "hosts": list(self.hosts),
            "connections": self.connections, "limit": self.limit,
            "configured_limit": self.configured, "rate": self.rate,
            "messages_this_minute": self.messages_this_minute,
            "backoff_steps": self.backoff_steps, "suspended": self.suspended,
            "waiting": self.waiting,
        }  # fmt: skip


def sites(config: Config, client: redis.Redis) -> list[SiteState]:
    """Every configured site, and every other site with leases or jobs waiting."""
    now = time.time()
    known = _hash(client, spool.SHAPING_SITES)
    for site in config.delivery.shaping.sites:
        known.setdefault(site.name, {"label": site.name, "hosts": list(site.match)})
    waiting: dict[str, int] = {}
    for member, _ in _members(client):
        throttled = json.loads(member).get("throttled")
        if throttled:
            waiting[throttled["site"]] = waiting.get(throttled["site"], 0) + 1
    suspended = _hash(client, spool.SHAPING_SUSPENDED)
    states = [_state(config, client, i, doc, now, waiting, suspended) for i, doc in known.items()]
    configured = {s.name for s in config.delivery.shaping.sites}
    return [s for s in states if s.id in configured or s.connections or s.waiting or s.suspended]


def suspensions(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every suspension in force (target → at, until, reason, label); expired ones are
    forgotten here."""
    now, found = time.time(), _hash(client, spool.SHAPING_SUSPENDED)
    over = [t for t, doc in found.items() if doc.get("until") and float(doc["until"]) <= now]
    if over:
        client.hdel(spool.SHAPING_SUSPENDED, *over)
    return {t: doc for t, doc in found.items() if t not in over}


def _hash(client: redis.Redis, key: str) -> dict[str, dict[str, Any]]:
    raw: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def _state(
    config: Config,
    client: redis.Redis,
    site_id: str,
    doc: dict[str, Any],
    now: float,
    waiting: dict[str, int],
    suspended: dict[str, dict[str, Any]],
) -> SiteState:
    shaping, backoff = config.delivery.shaping, config.delivery.backoff
    own = next((s for s in shaping.sites if s.name == site_id), None)
    limits = own.limits(shaping.default) if own else shaping.default
    with client.pipeline(transaction=False) as pipe:
        pipe.zcount(spool.site_key("leases", site_id), now, "+inf")
        pipe.hmget(spool.site_key("backoff", site_id), "steps", "at")
        pipe.get(spool.site_key("count", f"{site_id}:{int(now // 60)}"))
        used, (steps_raw, at_raw), count = pipe.execute()
    steps = int(steps_raw or 0)
    if steps and at_raw:
        steps = max(0, steps - int((now - float(at_raw)) // backoff.recover_after))
    limit = max(1, int(limits.connections * backoff.factor**steps))
    label = str(doc.get("label", DEFAULT_SITE))
    stop = suspended.get(site_id.lower())
    if stop is not None and stop.get("until") and float(stop["until"]) <= now:
        stop = None
    return SiteState(
        site_id, label, tuple(doc.get("hosts", ())), int(used), limit, limits.connections,
        str(limits.rate) if limits.rate else None, int(count) if count else None, steps, stop,
        waiting.get(site_id, 0),
    )  # fmt: skip
