"""The ledger: every Redis write about a delivery job, and the metrics counted once they commit.

- :meth:`Ledger.record` writes a round in ONE transaction: per-recipient results
  (``rcpt:{id}``), the trace events, the TLSRPT counts (:func:`services.deliver.tlsrpt.stage`),
  for what is left a deferred entry due per ``delivery.retry_schedule``
  (:func:`services.deliver.scheduler.stage_deferral`), the DSN the round calls for (queued as a
  new message with a null reverse-path, :func:`services.deliver.dsn.notice`; for a REQUIRETLS
  DSN that failed for good, its redacted twin instead of a DSN about it), the job leaving
  ``waiting:deliver`` and its in-flight mark — so a round is neither lost nor doubled. The
  message is deleted once every recipient is final; when another domain's job may have finished
  meanwhile, a second transaction finishes it (:meth:`Ledger.finish_if_final`).
- In-flight marks (RFC 1047): :meth:`Ledger.mark_in_flight` just before DATA; a mark found by a
  later run means a worker died while sending, and :meth:`Ledger.note_interrupted` says so.
  Within a batch the recording transaction also sets the next job's mark (one round trip less).
- :meth:`Ledger.park` puts a job that failed unexpectedly back into the deferred set, due after
  the first retry step, so a bug in delivery code never drops mail.

Metrics (``services.deliver.observe``): a recorded round, its DSN, a message becoming final and an
interrupted delivery are counted here, after their transaction committed — each in one place.

Failure: Redis errors propagate (the Celery task is then not acknowledged and runs again; what was
recorded is not sent again).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.jobs import Job, job_key
from services.common.model import Envelope, Reply
from services.deliver import dsn, observe, scheduler, tlsrpt
from services.deliver.delivery import Outcome, Round, expire, retry_due
from services.deliver.session import Peer

RFC1047 = (
    "a worker stopped while sending DATA; recipients not recorded as delivered are sent again, "
    "so the destination may receive this message twice (RFC 1047)"
)


@dataclass(frozen=True)
class _Recording:
    """One round being written: what it was, what came of it, the DSN it calls for."""

    round: Round
    outcome: Outcome
    notice: dsn.Notice | None

    @property
    def job(self) -> Job:
        return self.round.job


class Ledger:
    """Per worker process: the Redis writes of delivery jobs."""

    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.config = config
        self.client = client
        self._mark_ttl = int(config.celery.visibility_timeout * 4)
        self._last_peer: Peer | None = None  # where the last DATA went
        self._premarked: tuple[str, str, str, int] | None = None  # (id, domain, address, port)

    def round(
        self, job: Job, envelope: Envelope, body: bytes, state: spool.JobState | None = None
    ) -> Round:
        """The round to record now. ``state``: what was read before it (:func:`spool.load_jobs`);
        read now when not given."""
        if state is None:
            state = spool.load_job(self.client, envelope.id, job.domain)
        lifetime = self.config.delivery.max_queue_lifetime
        return Round(job, envelope, body, state, time.time(), envelope.received_at + lifetime)

    def record(
        self,
        round_: Round,
        outcome: Outcome,
        upcoming: tuple[str, str] | None = None,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """Write the round's results in one transaction, with the DSN it calls for (if any);
        delete the message once every recipient is final. ``upcoming``: the (message id,
        domain) the batch sends next, whose in-flight mark rides in this transaction. ``pipe``:
        the caller's transaction (after ``multi()``, with its own commands staged first and
        what it decided on WATCHed); executed here, ``redis.WatchError`` propagates."""
        expire(round_, outcome, self.config.delivery.max_queue_lifetime)
        notice = dsn.notice(
            round_, outcome, self.config.hostname, self.config.delivery.delay_warning_after
        )
        fallback = self._fallback(round_, outcome)
        rec = _Recording(round_, outcome, notice)
        # Final when nothing is left: known here unless another domain's job is still open.
        final = {**round_.state.final, **outcome.final}
        complete = set(final) >= set(round_.envelope.recipients)
        events, sts_failures = _round_events(rec), 0
        with pipe or self.client.pipeline(transaction=True) as pipe:
            if outcome.sts is not None:  # TLSRPT counts ride this transaction
                sts_failures = tlsrpt.stage(pipe, outcome.sts, outcome.attempts, round_.now)
            events += _stage_states(pipe, rec)
            if outcome.deferred:
                events.append(self._stage_retry(pipe, rec))
            if notice is not None:
                events.append(self._stage_notice(pipe, round_.envelope.id, notice))
            if fallback is not None:
                events.append(self._stage_fallback(pipe, round_.envelope.id, *fallback))
            pipe.delete(spool.in_flight_key(*round_.job.key))
            premark = self._premark(pipe, upcoming)
            self._stage_end(pipe, rec, events, complete)
            replies = pipe.execute()
        self._premarked = premark
        self._count(rec, sts_failures)
        if complete:
            _final(final.values())
        elif not outcome.deferred:
            self.finish_if_final(round_.envelope, replies[-3])

    def _stage_end(
        self, pipe: redis.client.Pipeline, rec: _Recording, events: list[str], complete: bool
    ) -> None:
        """The job leaves the waiting set; the message is deleted when complete, else its
        recipients' states are read back (``replies[-3]``); the trace gets the round's events."""
        message_id, domain = rec.job.key
        pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(message_id, domain))
        if complete:
            events.append(spool.event("completed"))
            pipe.delete(spool.msg_key(message_id))
            scheduler.stage_completion(pipe, message_id)
        elif not rec.outcome.deferred:  # the other jobs may have finished meanwhile: look
            pipe.hgetall(spool.rcpt_key(message_id))
        pipe.rpush(spool.trace_key(message_id), *events)
        pipe.expire(spool.trace_key(message_id), int(self.config.trace_ttl))

    def _stage_retry(self, pipe: redis.client.Pipeline, rec: _Recording) -> str:
        """Back into the deferred set, with what is left and the reply that deferred it."""
        deferred = rec.outcome.deferred
        due = retry_due(rec.round, self.config.delivery.retry_schedule)
        retry = rec.job.retry(list(deferred), str(next(iter(deferred.values()))))
        scheduler.stage_deferral(pipe, retry, due)
        return spool.event("deferred", domain=retry.domain, due=round(due, 3), **_replies(deferred))

    def _stage_notice(
        self, pipe: redis.client.Pipeline, message_id: str, notice: dsn.Notice
    ) -> str:
        ttl, action = self.config.trace_ttl, notice.action
        spool.stage_message(
            pipe, notice.envelope, notice.body, ttl,
            fallback=notice.fallback, dsn_for=message_id, action=action,
        )  # fmt: skip
        if notice.action == dsn.DELAYED:
            pipe.hset(spool.msg_key(message_id), "delay_warned", notice.envelope.id)
        recipients = list(notice.envelope.recipients)
        return spool.event("dsn", action=notice.action, dsn_id=notice.envelope.id, to=recipients)

    def _fallback(self, round_: Round, outcome: Outcome) -> tuple[Envelope, bytes] | None:
        """The redacted twin to send now that this REQUIRETLS DSN failed for good, if any."""
        if not dsn.fallback_due(round_.envelope, bool(outcome.bounced)):
            return None
        body = spool.load_fallback(self.client, round_.envelope.id)
        if body is None:
            return None
        return dsn.fallback_envelope(round_.envelope, body, round_.now), body

    def _stage_fallback(
        self, pipe: redis.client.Pipeline, dsn_id: str, twin: Envelope, body: bytes
    ) -> str:
        spool.stage_message(pipe, twin, body, self.config.trace_ttl, fallback_for=dsn_id)
        note = "this DSN could not travel with REQUIRETLS: its redacted twin is sent without"
        return spool.event("fallback", dsn_id=twin.id, to=list(twin.recipients), note=note)

    def _count(self, rec: _Recording, sts_failures: int) -> None:
        """The round's metrics, once its transaction committed."""
        outcome = rec.outcome
        observe.delivery_round(outcome, rec.round.envelope.received_at, rec.round.now)
        if outcome.sts is not None:
            observe.mta_sts(outcome.sts, outcome, sts_failures)
        if rec.notice is not None:
            observe.dsn_sent(rec.notice.action)

    # ----------------------------------------------------------------- in flight (RFC 1047)

    def mark_in_flight(self, job: Job, peer: Peer) -> None:
        """Mark the job as sending DATA; ``record`` clears the mark in its transaction. A mark
        found at the start of a later run means a worker died in the RFC 1047 window.

        Within a batch the mark is usually set already: the previous job's recording
        transaction set it for the next job, naming the peer it had just used (one Redis round
        trip less per message). It is set here when that guess was wrong or there was none. So
        the mark may precede DATA by a few commands: a worker dying in between reports a
        possible duplicate that cannot be one (on the safe side)."""
        self._last_peer = peer
        if self._premarked == (job.id, job.domain, peer.address, peer.port):
            return
        key = spool.in_flight_key(job.id, job.domain)
        self.client.set(key, _in_flight_note(peer), ex=self._mark_ttl)

    def _premark(
        self, pipe: redis.client.Pipeline, upcoming: tuple[str, str] | None
    ) -> tuple[str, str, str, int] | None:
        peer = self._last_peer
        if upcoming is None or peer is None:
            return None
        pipe.set(spool.in_flight_key(*upcoming), _in_flight_note(peer), ex=self._mark_ttl)
        return (*upcoming, peer.address, peer.port)

    def note_interrupted(self, job: Job, raw: bytes) -> None:
        """An earlier run's in-flight mark was found: a worker died while sending DATA."""
        previous = json.loads(raw)
        host, since = previous["host"], previous["at"]
        event = spool.event("interrupted", domain=job.domain, host=host, since=since, note=RFC1047)
        spool.append_trace(self.client, job.id, event, trace_ttl=self.config.trace_ttl)
        observe.interrupted()

    # ----------------------------------------------------------------- nothing to send

    def close(self, job: Job, envelope: Envelope | None) -> None:
        """Nothing left to send (recipients final, or the message gone): the job leaves the
        waiting set and its mark; a message an earlier run left unfinished is finished."""
        message_id, domain = job.key
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(message_id, domain))
            pipe.delete(spool.in_flight_key(message_id, domain))
            pipe.hgetall(spool.rcpt_key(message_id))
            states = pipe.execute()[-1]
        if envelope is not None:  # an earlier run recorded them and died before finishing
            self.finish_if_final(envelope, states)

    def finish_if_final(self, envelope: Envelope, raw: dict[bytes, bytes]) -> None:
        """``raw``: the recipients' states read in the recording transaction (after its writes),
        so of two domain jobs finishing together the later one sees every recipient final."""
        states = {k.decode(): json.loads(v).get("state") for k, v in raw.items()}
        states = {r: state for r, state in states.items() if state in spool.FINAL_STATES}
        if set(states) >= set(envelope.recipients):
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(spool.msg_key(envelope.id))
                pipe.rpush(spool.trace_key(envelope.id), spool.event("completed"))
                scheduler.stage_completion(pipe, envelope.id)
                deleted = pipe.execute()[0]
            if deleted:  # both may see all final; only one of them deleted the message
                _final(states.values())

    # ----------------------------------------------------------------- unexpected errors

    def park(self, job: Job | Mapping[str, Any]) -> None:
        """Put a job that failed unexpectedly (or a document that is not one) back into the
        deferred set, due after the first retry step, so a bug never drops mail."""
        message_id, domain = job.key if isinstance(job, Job) else job_key(job)
        due = time.time() + self.config.delivery.retry_schedule[0]
        with self.client.pipeline(transaction=True) as pipe:
            scheduler.stage_deferral(pipe, job, due)
            pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(message_id, domain))
            pipe.delete(spool.in_flight_key(message_id, domain))
            pipe.rpush(spool.trace_key(message_id), spool.event("error", domain=domain))
            pipe.expire(spool.trace_key(message_id), int(self.config.trace_ttl))
            pipe.execute()


def _final(states: Iterable[str]) -> None:
    """A message became final (counted by whichever transaction deleted it)."""
    observe.message_final(states)


def _round_events(rec: _Recording) -> list[str]:
    """The trace events of the round itself: MTA-STS, each attempt, a skip."""
    domain, outcome = rec.job.domain, rec.outcome
    events = _sts_events(outcome) + [
        spool.event("attempt", domain=domain, **a.to_json()) for a in outcome.attempts
    ]
    if outcome.skipped:
        events.append(spool.event("skipped", domain=domain, note=outcome.skipped))
    return events


def _stage_states(pipe: redis.client.Pipeline, rec: _Recording) -> list[str]:
    """Delivered and bounced recipients become final in ``rcpt:{id}``."""
    events = []
    for state, replies in (("delivered", rec.outcome.delivered), ("bounced", rec.outcome.bounced)):
        if replies:
            mapping = _states(state, replies, rec.round.now)
            pipe.hset(spool.rcpt_key(rec.job.id), mapping=mapping)
            events.append(spool.event(state, domain=rec.job.domain, **_replies(replies)))
    return events


def _sts_events(outcome: Outcome) -> list[str]:
    """The ``mta-sts`` trace event: the policy that applied (mode, id), any relaxation by
    ``TLS-Required: No``, MX hosts skipped, a lookup failure. None for domains without one."""
    sts = outcome.sts
    if sts is None or (sts.policy is None and sts.error is None):
        return []
    return [spool.event("mta-sts", **sts.trace_fields())]


def _in_flight_note(peer: Peer) -> str:
    return json.dumps({"host": peer.host, "address": peer.address, "at": time.time()})


def _states(state: str, replies: dict[str, Reply], now: float) -> dict[Any, Any]:
    return {
        r: json.dumps({"state": state, "reply": str(reply), "at": now})
        for r, reply in replies.items()
    }


def _replies(replies: dict[str, Reply]) -> dict[str, Any]:
    return {"recipients": {r: str(reply) for r, reply in replies.items()}}
