"""Send one round of a batch's job (steps 3–4 of services/deliver/batch.py): plan it, shape it,
try its addresses — :class:`Sending`, a part of :class:`services.deliver.batch.Deliverer`.

3. plan the round (:mod:`services.deliver.plan`: hosts, the DANE/MTA-STS destination policy,
   TLS);
4. traffic shaping (:mod:`services.deliver.shaping`): the round's site, its suspension, its
   line (older mail waiting for the site goes first) and message rate; then try each address
   in order with :func:`services.deliver.session.attempt`
   (a new session only with a connection lease of the site) until one runs a transaction, or
   ``delivery.mx_session_limit`` sessions that reached a greeting ran none
   (:class:`services.deliver.delivery.Outcome` says what its replies mean) — all within
   ``delivery.job_timeout``, after which the round is abandoned and deferred; the destination's
   throttling replies step the site's limit down (back-off).

The in-flight mark (:mod:`services.deliver.marks`) is awaited before DATA goes out (a
``delivery.job_timeout`` landing meanwhile waits for the mark, then abandons the round unsent —
a mark written on the loop, inline or not, is followed by a look at the deadline for that; to a
peer without PIPELINING it is written on the loop, as nothing may yield between the last RCPT
reply and DATA). With ``redis_min_replicas`` > 0 the mark must also be acknowledged by that
many replicas before DATA (a ``WAIT``; to a peer without PIPELINING, written and waited for
before MAIL instead): too few in ``redis_replica_timeout`` and the round is deferred unsent
(``451 4.3.0``, the reason in the trace), like a round abandoned before DATA; its recording
deletes the mark, and its message-rate cell goes back (nothing was sent). For
:data:`UNREPLICATED_HOLD` after that, rounds this process starts are deferred the same way at
once, without a session (but for a message at its last try, whose lifetime ends before the
hold: deferred, it would be bounced untried): while the replicas do not answer (a failover:
until a replica is back in sync, seconds), each round would otherwise open or take a session
and go as far as RCPT for nothing, and wait ``redis_replica_timeout`` for its own ``WAIT``.

Failure: an unexpected error in sending defers the round's pending recipients like any
temporary failure (:meth:`Sending.send`: under the normal retry and queue-lifetime rules, the
error in the reply and so in the trace); Redis errors propagate (the task runs again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import redis

from services.common.config import Config
from services.common.jobs import Job
from services.common.model import Envelope, Reply
from services.deliver import observe
from services.deliver.attempt import Hooks, Peer, Timeouts
from services.deliver.delivery import (
    NO_HOST,
    Outcome,
    abandoned_reply,
    throttled_reply,
    unreplicated_reply,
)
from services.deliver.dsn import one_line
from services.deliver.lanes import SiteSlots
from services.deliver.ledger import Ledger, MarkNotReplicated
from services.deliver.plan import Plan, Planner
from services.deliver.pool import ConnectionPool
from services.deliver.session import attempt
from services.deliver.shaping import Gate, Shaper, Throttle
from services.deliver.sites import Site

log = logging.getLogger("tlsrelay.deliver")

# Seconds after a round's mark went unacknowledged during which this process's new rounds are
# deferred unsent without trying (at least redis_replica_timeout: what each would wait).
UNREPLICATED_HOLD = 1.0


class Sending:
    """Needs, from the deliverer: its configuration, planner, ledger, shaper, connection pool,
    site slots and timeouts."""

    config: Config
    planner: Planner
    ledger: Ledger
    shaper: Shaper
    pool: ConnectionPool
    site_slots: SiteSlots
    timeouts: Timeouts
    _unreplicated: tuple[float, str] = (0.0, "")  # until (loop time), and why (module docstring)

    async def send(
        self,
        job: Job,
        envelope: Envelope,
        body: bytes,
        pending: list[str],
        reached: Callable[[], None] = lambda: None,
    ) -> Outcome:
        """One round, abandoned (and deferred) when it outlasts ``delivery.job_timeout``;
        ``reached`` is called when a peer is about to receive the message. An unexpected error
        (a bug, an odd certificate, a policy value that broke a parser) defers the pending
        recipients under the normal retry and queue-lifetime rules (a bounce with its DSN once
        the lifetime is over), the error in the reply and so in the trace. Redis errors
        propagate (the task runs again)."""
        outcome = Outcome()
        data: list[Peer] = []  # where DATA was under way when time ran out
        limit = self.config.delivery.job_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit

        def in_time() -> None:
            # The mark is written: the message may go only if the round's time is not up. A
            # mark written on the loop (inline, services/deliver/offload.py, or to a peer
            # without PIPELINING) held the loop, so a deadline passed meanwhile has not landed
            # yet: it would land only after the message went. Abandoned here, unsent.
            if loop.time() >= deadline:
                raise TimeoutError("delivery.job_timeout passed while the mark was written")

        # The peer goes into ``data`` once the mark is written and in time, just before the
        # message: a deadline landing during the mark's write (with redis_min_replicas, its
        # WAIT: up to redis_replica_timeout) abandons a round that sent nothing, whose reply
        # must not say the destination may have it.
        async def before_data(peer: Peer) -> None:
            await self.ledger.mark_in_flight_async(job, peer)  # written before DATA, always
            in_time()
            data.append(peer)
            reached()

        def before_data_now(peer: Peer) -> None:  # see attempt.Hooks: no await before DATA
            self.ledger.mark_in_flight(job, peer)
            in_time()
            data.append(peer)
            reached()

        async def before_mail(peer: Peer) -> None:  # redis_min_replicas, no PIPELINING
            await self.ledger.mark_before_mail_async(job, peer)  # acknowledged before MAIL

        hooks = Hooks(self.planner.remember_broken, before_data, before_data_now)
        if self.ledger.min_replicas:
            hooks = replace(hooks, before_mail=before_mail)
            until, why = self._unreplicated
            # A round's mark went unacknowledged a moment ago: deferred unsent, not tried —
            # unless the message's queue lifetime ends before the hold does (its last try: the
            # deferral would bounce it untried); that round waits for its own mark.
            expires = envelope.received_at + self.config.delivery.max_queue_lifetime
            if loop.time() < until and time.time() + (until - loop.time()) < expires:
                outcome.abandon(pending, unreplicated_reply(f"{why} (a moment ago); not tried"))
                return outcome

        try:
            async with asyncio.timeout_at(deadline):
                await self._send(job, envelope, body, pending, outcome, hooks)
        except TimeoutError:
            outcome.abandon(pending, abandoned_reply(limit, data[-1] if data else None))
        except MarkNotReplicated as exc:  # DATA not sent: a temporary failure, retried
            outcome.abandon(pending, unreplicated_reply(str(exc)))
            observe.unreplicated_mark()
            log.warning("%s to %s deferred: %s", *job.key, exc)
            hold = max(UNREPLICATED_HOLD, self.config.redis_replica_timeout)
            self._unreplicated = (loop.time() + hold, str(exc))
        except redis.exceptions.RedisError:
            raise  # the task runs again
        except Exception as exc:  # unexpected (see above)
            log.exception("delivery of %s to %s failed unexpectedly", job.id, job.domain)
            error = one_line(f"internal error: {type(exc).__name__}: {exc}", 300)
            return Outcome(deferred=dict.fromkeys(pending, Reply(451, "4.3.0", error)))
        return outcome

    async def _send(
        self,
        job: Job,
        envelope: Envelope,
        body: bytes,
        pending: list[str],
        outcome: Outcome,
        hooks: Hooks,
    ) -> None:
        """Plan the round, then try each address in order until one runs a transaction."""
        plan = await self.planner.plan(
            job.decision, envelope.relaxes_destination_tls, envelope.requiretls
        )
        outcome.decision = plan.decision if plan.decision != job.decision else None
        outcome.sts = plan.report
        if plan.refused is not None:
            outcome.refuse(pending, plan.refused)
            outcome.unreachable = plan.unreachable
            return
        site = self.shaper.site(job.domain, plan.destinations)
        throttled = self.shaper.suspended(site, job.domain) or self._line(job, site, envelope)
        paced_at = time.time()  # the minute the rate counts this message in (refund below)
        outcome.throttled = throttled or await self.shaper.pace(site)
        if outcome.throttled is not None:
            return
        refund = False
        try:
            gate = self.shaper.gate(site, envelope.received_at)
            hops = partial(self._hops, plan, gate, envelope, body, pending, outcome, hooks)
            await self.site_slots.share(gate, outcome, hops)
        except MarkNotReplicated:
            refund = True  # stopped before DATA: nothing sent
            raise
        finally:
            if refund or outcome.throttled is not None:  # the rate cell it took goes back
                self.shaper.refund(site, paced_at)

    def _line(self, job: Job, site: Site, envelope: Envelope) -> Throttle | None:
        """The site's line (services/deliver/shaping.py): asked for a job that waited in it,
        or at a site where this process saw one lately; older jobs waiting there go first."""
        if not self.config.delivery.shaping.line:
            return None  # off: not asked (a line left from when it was on holds no one)
        if job.throttled is None and not self.shaper.queued(site):
            return None
        return self.shaper.admit(site, envelope.received_at)

    async def _hops(
        self,
        plan: Plan,
        gate: Gate,
        envelope: Envelope,
        body: bytes,
        pending: list[str],
        outcome: Outcome,
        hooks: Hooks,
    ) -> None:
        """Try each address of the plan in order until one runs a transaction; every new
        session with a connection lease of ``gate``'s site (else the round is throttled)."""
        errors: list[Reply] = []
        sessions, session_limit = 0, self.config.delivery.mx_session_limit
        for hop in plan.hops:
            # Bounded work: at most mx_session_limit greeted sessions per round (Postfix
            # smtp_mx_session_limit); the whole round runs within delivery.job_timeout (send).
            if session_limit and sessions >= session_limit:
                break
            settings = self.planner.tls(plan, hop)
            result = await attempt(
                hop.peer, envelope, pending, body, settings, self.timeouts, hooks, self.pool, gate
            )
            if result.throttled is not None:
                if not outcome.attempts:
                    outcome.throttled = result.throttled  # nothing tried: the round waits
                    return
                errors.append(throttled_reply(result.throttled) or NO_HOST)  # an address
                break  # failed and its lease went elsewhere meanwhile: try again later
            outcome.attempts.append(result)
            self.shaper.backoff(gate.site, result.server_replies)
            if not result.next_host:
                outcome.settle(result.replies, hop.peer.host)
                return
            sessions += result.greeted
            errors.append(result.error or NO_HOST)
        outcome.no_transaction(pending, errors)
