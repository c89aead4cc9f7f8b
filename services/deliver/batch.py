"""Deliver a batch of jobs (one ``deliver`` task: one destination domain) and record each round.

A job is (message, destination domain, its recipients, the policy decision) — a
:class:`services.common.jobs.Job`; a task carries their documents. For each job, in order, so
they share a reused connection (:class:`services.deliver.pool.ConnectionPool`):

1. skip recipients already final (never re-send an accepted recipient); with nothing left, just
   close the job (:meth:`services.deliver.ledger.Ledger.close`);
2. plan the round (:mod:`services.deliver.plan`: hosts, the MTA-STS destination policy, TLS);
3. try each address in order with :func:`services.deliver.session.attempt` until one runs a
   transaction, or ``delivery.mx_session_limit`` sessions that reached a greeting ran none
   (:class:`services.deliver.delivery.Outcome` says what its replies mean);
4. record the round in one transaction (:mod:`services.deliver.ledger`).

The batch's state is read in one round trip, its bodies a few megabytes at a time. When a job
finds its destination unreachable, the rest of the batch with the same route and TLS
requirement is deferred with the same error instead of waiting out the same timeouts again.

Failure: an unexpected error in one job defers its recipients like any temporary failure (retry
schedule, queue lifetime, then a bounce; the error in the trace); a document that is not a job is
parked for a retry (never dropped); either way the batch goes on. Redis errors propagate (the
Celery task is then not acknowledged and runs again; recipients already recorded are not sent
again).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.jobs import Job, job_key
from services.common.model import Envelope, Reply
from services.deliver import mx
from services.deliver.delivery import NO_HOST, Outcome
from services.deliver.dsn import one_line
from services.deliver.ledger import Ledger
from services.deliver.plan import Planner
from services.deliver.pool import ConnectionPool
from services.deliver.session import Hooks, Timeouts, attempt

log = logging.getLogger("tlsrelay.deliver")

Unreachable = dict[tuple[Any, ...], Outcome]  # destinations that failed in this batch


class Deliverer:
    """Per worker process: configuration, Redis client, planner, ledger, connection pool."""

    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.config = config
        self.client = client
        delivery = config.delivery
        resolver = mx.make_resolver(delivery.dns_servers, timeout=delivery.connect_timeout)
        self.planner = Planner(config, client, resolver)
        self.ledger = Ledger(config, client)
        self.pool = ConnectionPool(delivery.reuse_max_messages, delivery.reuse_idle_timeout)
        self.timeouts = Timeouts(
            config.hostname,
            connect=delivery.connect_timeout,
            command=delivery.command_timeout,
            greeting=delivery.greeting_timeout,
            data=delivery.data_timeout,
        )

    async def run_batch(self, docs: Sequence[Mapping[str, Any]]) -> list[Outcome | None]:
        """Deliver and record a task's batch of job documents, one after another; each job's
        outcome is recorded in its own transaction as soon as it is known (a worker dying
        mid-batch re-sends nothing already recorded). None: nothing was sent for that job
        (nothing left to do, or it was parked)."""
        jobs = [_read(doc) for doc in docs]
        states = spool.load_jobs(self.client, [job_key(doc) for doc in docs])
        bodies = _Bodies(self.client, jobs, states)
        self.planner.new_batch()
        unreachable: Unreachable = {}
        results: list[Outcome | None] = []
        for i, (job, state) in enumerate(zip(jobs, states, strict=True)):
            upcoming = _sendable(jobs[i + 1], states[i + 1]) if i + 1 < len(jobs) else None
            if job is None:
                self.ledger.park(docs[i])
                results.append(None)
                continue
            try:
                state = replace(state, body=bodies.take(i))
                results.append(await self._run(job, state, unreachable, upcoming))
            except redis.exceptions.RedisError:
                raise
            except Exception as exc:
                log.exception("delivery of %s to %s failed unexpectedly", job.id, job.domain)
                self._failed(job, state, exc)
                results.append(None)
        return results

    def _failed(self, job: Job, state: spool.JobState, exc: Exception) -> None:
        """An unexpected error: the job's pending recipients are deferred under the normal retry
        and queue-lifetime rules (a bounce with its DSN once the lifetime is over), the error in
        the trace. Parked for a retry only when even that cannot be recorded."""
        pending = [r for r in job.recipients if r not in state.final]
        if state.envelope is not None and pending:
            error = one_line(f"internal error: {type(exc).__name__}: {exc}", 300)
            outcome = Outcome(deferred=dict.fromkeys(pending, Reply(451, "4.3.0", error)))
            try:
                round_ = self.ledger.round(job, state.envelope, state.body or b"", state)
                self.ledger.record(round_, outcome)
                return
            except redis.exceptions.RedisError:
                raise
            except Exception:
                log.exception("recording the failure of %s to %s failed", job.id, job.domain)
        self.ledger.park(job)

    async def run(self, doc: Mapping[str, Any]) -> Outcome | None:
        """Deliver and record one job; None when there was nothing left to do."""
        return (await self.run_batch([doc]))[0]

    async def _run(
        self,
        job: Job,
        state: spool.JobState,
        unreachable: Unreachable,
        upcoming: tuple[str, str] | None = None,
    ) -> Outcome | None:
        envelope, body = state.envelope, state.body
        pending = [r for r in job.recipients if r not in state.final]
        if envelope is None or body is None or not pending:
            self.ledger.close(job, envelope)
            return None
        if state.in_flight is not None:
            self.ledger.note_interrupted(job, state.in_flight)
        decision = job.decision
        key = (decision.domain, decision.route, decision.tls, decision.tls_profile)
        if key in unreachable:
            outcome = unreachable[key].not_tried(pending)
        else:
            outcome = await self.send(job, envelope, body, pending)
            if outcome.unreachable:
                unreachable[key] = outcome
        self.ledger.record(self.ledger.round(job, envelope, body, state), outcome, upcoming)
        return outcome

    async def send(self, job: Job, envelope: Envelope, body: bytes, pending: list[str]) -> Outcome:
        """One round: plan it, then try each address in order until one runs a transaction."""
        plan = await self.planner.plan(job.decision, envelope.relaxes_destination_tls)
        changed = plan.decision if plan.decision != job.decision else None
        outcome = Outcome(decision=changed, sts=plan.report)
        if plan.refused is not None:
            outcome.refuse(pending, plan.refused)
            outcome.unreachable = plan.unreachable
            return outcome
        errors: list[Reply] = []
        hooks = Hooks(self.planner.remember_broken, lambda p: self.ledger.mark_in_flight(job, p))
        sessions, session_limit = 0, self.config.delivery.mx_session_limit
        for hop in plan.hops:
            # Bounded work: at most mx_session_limit greeted sessions per round (Postfix
            # smtp_mx_session_limit); the per-job deadline belongs in this same check.
            if session_limit and sessions >= session_limit:
                break
            settings = self.planner.tls(plan, hop)
            result = await attempt(
                hop.peer, envelope, pending, body, settings, self.timeouts, hooks, self.pool
            )
            outcome.attempts.append(result)
            if not result.next_host:
                outcome.settle(result.replies, hop.peer.host)
                return outcome
            sessions += result.greeted
            errors.append(result.error or NO_HOST)
        outcome.no_transaction(pending, errors)
        return outcome


class _Bodies:
    """A batch's message bodies, read a few megabytes at a time (``spool.budgeted``) as the batch
    reaches them, and let go once used: a worker never holds a whole batch of large messages."""

    def __init__(
        self, client: redis.Redis, jobs: list[Job | None], states: list[spool.JobState]
    ) -> None:
        self.client = client
        self.ids = [job.id if job else "" for job in jobs]
        # Only jobs with something to send need their body (size 0 for the others).
        sizes = [
            (s.envelope.size or 1) if _sendable(j, s) and s.envelope else 0
            for j, s in zip(jobs, states, strict=True)
        ]
        self.sizes = sizes
        self.chunks = spool.budgeted(sizes)
        self.loaded: dict[int, bytes | None] = {}

    def take(self, index: int) -> bytes | None:
        if not self.sizes[index]:
            return None
        if index not in self.loaded:
            chunk = [i for i in next(c for c in self.chunks if index in c) if self.sizes[i]]
            bodies = spool.load_bodies(self.client, [self.ids[i] for i in chunk])
            self.loaded.update(zip(chunk, bodies, strict=True))
        return self.loaded.pop(index)


def _read(doc: Mapping[str, Any]) -> Job | None:
    """The job in a task's document; None (logged) for one that is not a job: it is parked."""
    try:
        return Job.from_json(doc)
    except (KeyError, ValueError, TypeError):
        log.exception("delivery of %s to %s failed unexpectedly", *job_key(doc))
        return None


def _sendable(job: Job | None, state: spool.JobState) -> tuple[str, str] | None:
    """(message id, domain) of a job that has something to send, else None."""
    if job is None or state.envelope is None:  # not a job; or the message is gone (its body too)
        return None
    if all(r in state.final for r in job.recipients):
        return None
    return job.key
