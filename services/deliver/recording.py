"""The writes of a delivery round's recording, staged in the caller's Redis transaction.

:meth:`services.deliver.ledger.Ledger.record` opens ONE transaction per round and stages into it,
from here: the recipients' states (:func:`stage_states`), the retry (:func:`stage_retry`), the
DSN the round calls for and a REQUIRETLS DSN's redacted twin (:func:`stage_notice`,
:func:`stage_fallback`), the posture counts of a delivery (:func:`stage_posture`), the job
leaving its site's line (:func:`stage_leave_line`) and the job leaving ``waiting:deliver``, its
in-flight mark and, once every recipient is final, the message (:func:`stage_end`); the trace
events of the round are gathered on the way (:func:`round_events`). The ledger's other
transactions (closing or parking a throttled job) use :func:`stage_notice` and
:func:`stage_leave_line` too.

Inputs: the pipeline (after ``multi()``), the round being written (:class:`Recording`) and the
settings each function names (TTLs, the retry schedule, the posture retention). Nothing here
executes the transaction, reads Redis or counts metrics: the ledger does, once it committed.

Failure: staging only queues commands, so Redis errors come when the ledger executes the
transaction (and propagate from there); :func:`stage_posture` never raises: a failure to
compute the posture counts is logged and counted, and the round is recorded without them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.jobs import Job
from services.common.model import Envelope, Reply
from services.deliver import dsn, observe, posture, scheduler, shaping, shapingscripts, sites
from services.deliver.delivery import Outcome, Round, retry_due

log = logging.getLogger("tlsrelay.deliver")


@dataclass(frozen=True)
class Recording:
    """One round being written: what it was, what came of it, the DSN it calls for."""

    round: Round
    outcome: Outcome
    notice: dsn.Notice | None

    @property
    def job(self) -> Job:
        return self.round.job


def round_events(rec: Recording) -> list[str]:
    """The trace events of the round itself: MTA-STS, each attempt, a skip."""
    domain, outcome = rec.job.domain, rec.outcome
    events = _sts_events(outcome) + [
        spool.event("attempt", domain=domain, **a.to_json()) for a in outcome.attempts
    ]
    if outcome.skipped:
        events.append(spool.event("skipped", domain=domain, note=outcome.skipped))
    return events


def stage_states(pipe: redis.client.Pipeline, rec: Recording) -> list[str]:
    """Delivered and bounced recipients become final in ``rcpt:{id}``; deferred ones are noted
    with this attempt (a redelivered copy of this job skips them: the retry is theirs)."""
    events = []
    for state, replies in (("delivered", rec.outcome.delivered), ("bounced", rec.outcome.bounced)):
        if replies:
            mapping = _states(state, replies, rec.round.now)
            pipe.hset(spool.rcpt_key(rec.job.id), mapping=mapping)
            events.append(spool.event(state, domain=rec.job.domain, **_replies(replies)))
    if rec.outcome.deferred:
        attempt = rec.job.attempt
        mapping = _states(spool.DEFERRED_STATE, rec.outcome.deferred, rec.round.now, attempt)
        pipe.hset(spool.rcpt_key(rec.job.id), mapping=mapping)
    return events


def stage_posture(
    pipe: redis.client.Pipeline, round_: Round, outcome: Outcome, retention_days: int
) -> tuple[int | None, dict[str, int]]:
    """A round that delivered adds its posture counts to this transaction (one script;
    :mod:`services.deliver.posture`, kept ``retention_days``): the index of its reply and the
    counts. Never raises: a failure is logged and counted, and the round is recorded without
    them."""
    if not outcome.delivered or not outcome.attempts:
        return None, {}
    try:
        counts = posture.columns(outcome.attempts[-1])
        if not counts:  # that attempt sent nothing: no delivery to count
            return None, {}
        return posture.stage(pipe, round_.job.domain, counts, round_.now, retention_days), counts
    except Exception:
        log.exception("posture counts of %s to %s not recorded", *round_.job.key)
        observe.posture_error()
        return None, {}


def stage_end(
    pipe: redis.client.Pipeline,
    rec: Recording,
    events: list[str],
    complete: bool,
    rcpt_ttl: int,
    trace_ttl: float,
) -> int | None:
    """The job leaves the waiting set and loses its in-flight mark; the message is deleted
    when complete (with the mark: one DEL), else its recipients' states are read back (the
    reply at the index returned; None: not read); the trace gets the round's events."""
    message_id, domain = rec.job.key
    at_states = None
    pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(message_id, domain))
    mark = spool.in_flight_key(message_id, domain)
    if complete:
        events.append(spool.event("completed"))
        pipe.delete(mark, spool.msg_key(message_id), spool.rcpt_key(message_id))
        scheduler.stage_completion(pipe, message_id)
    else:
        pipe.delete(mark)
        pipe.expire(spool.rcpt_key(message_id), rcpt_ttl)
        if not rec.outcome.deferred:  # the other jobs may have finished meanwhile: look
            at_states = len(pipe)
            pipe.hgetall(spool.rcpt_key(message_id))
    pipe.rpush(spool.trace_key(message_id), *events)
    pipe.expire(spool.trace_key(message_id), int(trace_ttl))
    return at_states


def stage_retry(
    pipe: redis.client.Pipeline, rec: Recording, retry_schedule: tuple[float, ...]
) -> str:
    """Back into the deferred set, with what is left and the reply that deferred it."""
    deferred = rec.outcome.deferred
    due = retry_due(rec.round, retry_schedule)
    retry = rec.job.retry(list(deferred), str(next(iter(deferred.values()))))
    scheduler.stage_deferral(pipe, retry, due)
    return spool.event("deferred", domain=retry.domain, due=round(due, 3), **_replies(deferred))


def stage_notice(
    pipe: redis.client.Pipeline, message_id: str, notice: dsn.Notice, trace_ttl: float
) -> str:
    """The DSN ``notice`` about ``message_id``, queued as a new message (a "delayed" one noted
    on the message: it goes out once); returns its trace event."""
    ttl, action = trace_ttl, notice.action
    spool.stage_message(
        pipe, notice.envelope, notice.body, ttl,
        fallback=notice.fallback, dsn_for=message_id, action=action,
    )  # fmt: skip
    if notice.action == dsn.DELAYED:
        pipe.hset(spool.msg_key(message_id), "delay_warned", notice.envelope.id)
    recipients = list(notice.envelope.recipients)
    return spool.event("dsn", action=notice.action, dsn_id=notice.envelope.id, to=recipients)


def stage_fallback(
    pipe: redis.client.Pipeline, dsn_id: str, twin: Envelope, body: bytes, trace_ttl: float
) -> str:
    """The redacted twin of the REQUIRETLS DSN ``dsn_id``, queued; returns its trace event."""
    spool.stage_message(pipe, twin, body, trace_ttl, fallback_for=dsn_id)
    note = "this DSN could not travel with REQUIRETLS: its redacted twin is sent without"
    return spool.event("fallback", dsn_id=twin.id, to=list(twin.recipients), note=note)


def stage_leave_line(pipe: redis.client.Pipeline, job: Job, config: Config) -> None:
    """A job that waited in its site's line (its document says throttled) is recorded or
    closed: it leaves the line, and the next one is called in (one script, only for such
    jobs; shapingscripts.LEAVE_LINE)."""
    if job.throttled is None:
        return
    site_id = job.throttled[1]
    front = shaping.front_of(config, sites.limits_of(config, site_id))
    keys = [spool.site_key("line", site_id), spool.DEFERRED]
    pipe.eval(shapingscripts.LEAVE_LINE, len(keys), *keys, line_member(job), front)


def line_member(job: Job) -> str:
    """The job's member in its site's line (:func:`services.deliver.shaping.line_member`)."""
    return shaping.line_member(job.to_json())


def _sts_events(outcome: Outcome) -> list[str]:
    """The ``mta-sts`` trace event: the policy that applied (mode, id), any relaxation by
    ``TLS-Required: No``, MX hosts skipped, a lookup failure. None for domains without one.
    Then the ``dane`` event of every MX round while DANE is active: whether it applies, each
    host's TLSA records, and what each certificate check said."""
    sts = outcome.sts
    events = []
    if sts is not None and (sts.policy is not None or sts.error is not None):
        events.append(spool.event("mta-sts", **sts.trace_fields()))
    if sts is not None and sts.dane is not None:
        checks = [(a.peer.host, a.peer.address, a.dane) for a in outcome.attempts]
        events.append(spool.event("dane", domain=sts.domain, **sts.dane.trace_fields(checks)))
    return events


def _states(
    state: str, replies: dict[str, Reply], now: float, attempt: int | None = None
) -> dict[Any, Any]:
    extra = {} if attempt is None else {"attempt": attempt}
    return {
        r: json.dumps({"state": state, "reply": str(reply), "at": now, **extra})
        for r, reply in replies.items()
    }


def _replies(replies: dict[str, Reply]) -> dict[str, Any]:
    return {"recipients": {r: str(reply) for r, reply in replies.items()}}
