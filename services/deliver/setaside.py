"""The ledger's writes for a job that is set aside rather than recorded as a round: parked
after an unexpected error, throttled by a traffic-shaping limit, or handed back for lack of time
(:class:`SetAside`, a part of :class:`services.deliver.ledger.Ledger`, whose docstring states
what each guarantees) — and the look, under WATCH, that lets one "delayed" DSN go out per
message, which rounds and throttled jobs share.

Each is ONE transaction, releasing the job's claim in it. Failure: Redis errors propagate (the
task runs again); a WATCH that fired is looked at again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from services.common import queueing, spool
from services.common.config import Config
from services.common.jobs import Job, job_key
from services.common.model import Reply
from services.deliver import dsn, observe, recording, scheduler, shaping, shapingscripts
from services.deliver.claims import Claim, Claims
from services.deliver.delivery import Outcome, Round
from services.deliver.shaping import Throttle


class SetAside:
    """Needs, from the ledger: its client, configuration, claims, mark TTL and the DSN a
    round calls for (``_notice``)."""

    client: redis.Redis
    config: Config
    claims: Claims
    _mark_ttl: int
    _notice: Callable[[Round, Outcome], dsn.Notice | None]

    def _delay_notice_due(self, pipe: redis.client.Pipeline, message_id: str) -> bool:
        """Whether the "delayed" DSN this round calls for is still to be sent: the message is
        stored and no notice went out. WATCHes the message, so that the transaction (then
        opened) fails when another job of the message sends one (or finishes it) meanwhile."""
        key = spool.msg_key(message_id)
        pipe.watch(key)  # type: ignore[no-untyped-call]
        stored = bool(pipe.hexists(key, "envelope"))
        warned = bool(pipe.hexists(key, "delay_warned"))
        pipe.multi()
        return stored and not warned

    # ----------------------------------------------------------------- unexpected errors

    def park(self, job: Job | Mapping[str, Any], keep_mark: bool = False) -> None:
        """Put a job that failed unexpectedly (or a document that is not one) back into the
        deferred set, due after the first retry step, so a bug never drops mail. ``keep_mark``:
        its in-flight mark stays (the round may have sent DATA and not been recorded: the retry
        then says ``interrupted``, as after a crash in the RFC 1047 window)."""
        message_id, domain = job.key if isinstance(job, Job) else job_key(job)
        due = time.time() + self.config.delivery.retry_schedule[0]
        with self.client.pipeline(transaction=True) as pipe:
            scheduler.stage_deferral(pipe, job, due)
            pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(message_id, domain))
            if not keep_mark:
                pipe.delete(spool.in_flight_key(message_id, domain))
            self.claims.stage_release(pipe, (message_id, domain))
            pipe.rpush(spool.trace_key(message_id), spool.event("error", domain=domain))
            pipe.expire(spool.trace_key(message_id), int(self.config.trace_ttl))
            pipe.execute()

    # ----------------------------------------------------------------- traffic shaping

    def throttle(self, round_: Round, claim: Claim, throttle: Throttle, reply: Reply) -> None:
        """A shaping limit stopped the job's round before anything was sent: it waits in the
        deferred set, due when the limit permits (never after its expiry), marked as throttled
        — the same attempt and retry step, nothing recorded for its recipients — and leaves
        ``waiting:deliver`` as a deferral does (the scheduler queues it again when due, so the
        rescue sweep sees it as queued). One transaction, releasing the claim (and the
        in-flight mark: no DATA went out in this round), placing it in its site's line for a
        limit of the whole site (``shaping.LINE_REASONS``; out of the line it was in under its
        old document). A message that has waited ``delivery.delay_warning_after`` gets its one
        "delayed" DSN here too (``reply``: why its recipients wait), as a deferral would send
        it.

        No TLSRPT counts (RFC 8460) here, though the round looked its MTA-STS/DANE policy up:
        it tried no session, and the round that does try plans again and counts its lookups
        once (:meth:`record`), as does the last round if the lifetime ends first. Counting
        them here would count one message's policy failure once per wait."""
        pending = round_.state.pending(round_.job)
        waiting = Outcome(deferred=dict.fromkeys(pending, reply))
        notice = self._notice(round_, waiting)
        while True:
            try:
                return self._throttle(round_, claim, throttle, notice)
            except redis.exceptions.WatchError:  # another job of the message sent the notice
                continue

    def _throttle(
        self, round_: Round, claim: Claim, throttle: Throttle, notice: dsn.Notice | None
    ) -> None:
        job = round_.job
        message_id, domain = job.key
        due = min(time.time() + throttle.wait, round_.expires)
        site = throttle.site
        parked = job.throttle(throttle.reason, site.id)
        with self.client.pipeline(transaction=True) as pipe:
            if notice is not None and not self._delay_notice_due(pipe, message_id):
                notice = None
            scheduler.stage_deferral(pipe, parked, due)
            if job.throttled is not None:  # its place in the line was under its old document
                pipe.zrem(spool.site_key("line", job.throttled[1]), recording.line_member(job))
            if shaping.joins_line(self.config, throttle):  # in its site's line, by seniority
                keys = [spool.site_key("line", site.id), spool.DEFERRED]
                member = recording.line_member(parked)
                args: list[str | int] = [member, repr(round_.envelope.received_at)]
                args += [shaping.front_of(self.config, site.limits), self._mark_ttl]
                pipe.eval(shapingscripts.JOIN_LINE, len(keys), *keys, *args)
            pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(message_id, domain))
            pipe.delete(spool.in_flight_key(message_id, domain))
            self.claims.stage_release(pipe, claim.key)
            events = [
                spool.event(
                    "throttled", domain=domain, reason=throttle.reason, site=site.id,
                    due=round(due, 3),
                )
            ]  # fmt: skip
            if notice is not None:
                events.append(
                    recording.stage_notice(pipe, message_id, notice, self.config.trace_ttl)
                )
            pipe.rpush(spool.trace_key(message_id), *events)
            pipe.expire(spool.trace_key(message_id), int(self.config.trace_ttl))
            pipe.execute()
        observe.throttled(site.label, throttle.reason)
        if notice is not None:
            observe.dsn_sent(notice.action)

    # ----------------------------------------------------------------- out of time

    def hand_back(
        self, docs: Sequence[Mapping[str, Any]], claims: Sequence[Claim | None], why: str
    ) -> None:
        """The jobs a task did not start (its time is up) go back to the ``deliver`` queue as a
        new task, each with a trace event saying ``why``; ``claims``: those of them already
        claimed (by the recordings of the lanes' previous jobs), released here with the marks
        they set. One transaction: the task that gave them back is acknowledged only after it
        committed."""
        with self.client.pipeline(transaction=True) as pipe:
            for claim in claims:
                if claim is None or not claim.ours:
                    continue
                if claim.marked:
                    pipe.delete(spool.in_flight_key(*claim.key))
                self.claims.stage_release(pipe, claim.key)
            for doc in docs:
                message_id, domain = job_key(doc)
                event = spool.event("requeued", queue="deliver", domain=domain, note=why)
                pipe.rpush(spool.trace_key(message_id), event)
                pipe.expire(spool.trace_key(message_id), int(self.config.trace_ttl))
            pipe.lpush(queueing.DELIVER_LIST, queueing.deliver_task([dict(d) for d in docs]))
            pipe.execute()
