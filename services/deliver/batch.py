"""Deliver a batch of jobs (one ``deliver`` task: one destination domain) and record each round.

A job is (message, destination domain, its recipients, the policy decision) — a
:class:`services.common.jobs.Job`; a task carries their documents (one per job: of two copies of
a job in one task, the later attempt's). The jobs run in up to ``delivery.sessions_per_process``
*lanes* at once on the task's event loop (issue #20: a destination far away answers in tens of
milliseconds; the lanes wait on it together). Each lane takes the next job in the batch's order
and runs it over its own session (reused connections,
:class:`services.deliver.pool.ConnectionPool`); the lanes but the first start once the first
job's destination answered (or its job ended), so an unreachable destination costs one attempt
per batch, not one per lane — unless that destination took a message from this process within
the last ``WARM`` seconds: then all lanes start at once (as Postfix starts a destination it
knows at several deliveries at once), and a task costs no round trip of slow start. At most
the site's connection limit of them send to one site at once (more wait up to
``shaping.SHORT_WAIT``, then the job is parked as throttled). For each job:

1. claim it (:mod:`services.deliver.claims`), reading the job's state as it is now; a job
   another worker holds is waited for until its claim ends (recorded, or its owner died), at
   most the claim's TTL with any wait for another batch of this process; a copy still held
   then is handed back, never dropped (the owner's copy may be stale, or the owner dead);
2. skip recipients already final (never re-send an accepted recipient) and those deferred by
   this attempt or a later one (a redelivered task: their retry is in the deferred set); with
   nothing left, just close the job (:meth:`services.deliver.ledger.Ledger.close`);
3. plan the round (:mod:`services.deliver.plan`: hosts, the DANE/MTA-STS destination policy,
   TLS);
4. traffic shaping, then each address in order until one runs a transaction, all within
   ``delivery.job_timeout`` (steps 3–4: :class:`services.deliver.sending.Sending`, a part of
   :class:`Deliverer`, whose module docstring says how);
5. record the round in one transaction (:mod:`services.deliver.ledger`), which also claims the
   lane's next job (the next in the batch's order no lane has taken) — or, when a shaping
   limit stopped it before anything was tried, park it as throttled
   (:meth:`services.deliver.ledger.Ledger.throttle`: not an attempt), and the rest of the batch
   to that destination with it (but for a rate or the line, which each message asks again); a
   throttled round gives back the rate cell it took.

Exactly once with lanes: a job is taken by one lane only (the batch's order is handed out on
one event loop) and claimed before it is looked at, as before. The lanes' Redis calls (claims,
recordings, in-flight marks, leases and rates, the batch's reads) run in a thread pool of the
process (:mod:`services.deliver.offload`), so a lane waiting on Redis never holds up the others;
the state they share (the batch, the ledger's premarks, the shaper's leases) is read and changed
on the loop only, before and after each call. Each round is still recorded in ONE transaction,
in one thread, on a connection of its own: no other lane can come between its writes, and a
cancellation cannot leave it half-way (the call runs to its end — committed or failed — before
the cancellation propagates; a claim it took is noted all the same). The in-flight mark is
awaited before DATA goes out, and with ``redis_min_replicas`` acknowledged by the replicas
(services/deliver/sending.py says how); the marks claims write ahead are remembered per job
(:class:`services.deliver.marks.Marks`, a part of the ledger), never one for the whole process.
A Redis error in one lane stops the others from starting jobs; they finish and record the rounds
under way, then the error propagates and the task runs again.

Batches side by side (``delivery.tasks_per_process``, services/deliver/tasks.py): their lanes
share ``delivery.sessions_per_process`` permits. A claim is the process's (one token), so the
process notes which batch works on each job and another batch waits for it (lanes.Holders, at
most a claim's TTL, then hands its copy back: never dropped), as for another process's claim;
a batch's end releases only its own claims. Each batch renews the per-batch memories, but
not the premarks of jobs the others hold.

Time: a task starts no new job once it has run ``delivery.job_timeout`` / 10 (its *start
window*); its lanes then stop, and the jobs none started (with the claims their recordings took
for them) go back to the ``deliver`` queue as a new task (one transaction, then
this task is acknowledged). So a task ends within ``DeliveryConfig.task_budget`` (the window,
a claim's TTL, one job's round: at most 1.6 × job_timeout, plus a few Redis round trips), well
below ``celery.visibility_timeout`` (at least twice job_timeout, checked at start-up) after
which kombu would hand it to a second worker.

The batch's state is read in one round trip, its bodies a few megabytes at a time (the lanes'
shared state: :mod:`services.deliver.lanes`). When a job
finds its destination unreachable, the rest of the batch with the same route and TLS
requirement is deferred with the same error instead of waiting out the same timeouts again.

Failure: an unexpected error in one job defers its recipients like any temporary failure (retry
schedule, queue lifetime, then a bounce; the error in the trace); a document that is not a job is
parked for a retry (never dropped); either way the batch goes on. Redis errors propagate (the
Celery task is then not acknowledged and runs again; recipients already recorded are not sent
again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.jobs import Job, job_key
from services.common.model import Envelope
from services.deliver import mx, session
from services.deliver.attempt import Timeouts
from services.deliver.claims import Claim
from services.deliver.delivery import Outcome, throttle_detail, throttle_reply
from services.deliver.lanes import (
    Batch,
    Bodies,
    Destination,
    Holders,
    SiteSlots,
    Upcoming,
    blocks_batch,
    destination,
    held_key,
    unique,
)
from services.deliver.ledger import Ledger
from services.deliver.offload import Offload, threads_for
from services.deliver.plan import Planner
from services.deliver.pool import ConnectionPool
from services.deliver.sending import Sending
from services.deliver.shaping import Shaper, joins_line

log = logging.getLogger("tlsrelay.deliver")

# A destination that took a message from this process this recently (seconds) is warm: a batch
# to it starts all its lanes at once instead of trying one job first.
WARM = 60.0
WARM_KEEP = 10_000  # destinations remembered at most (the oldest are forgotten first)
OUT_OF_TIME = (  # the note of the jobs a task hands back: not started, and why that may be
    "not started in this task (its start window, delivery.job_timeout / 10, ran out, or "
    "another worker held the job): queued again"
)


class Deliverer(Sending):
    """Per worker process: configuration, Redis client, planner, ledger, connection pool."""

    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.config = config
        self.client = client
        delivery = config.delivery
        resolver = mx.make_resolver(delivery.dns_servers, timeout=delivery.connect_timeout)
        self.planner = Planner(config, client, resolver)
        self.ledger = Ledger(config, client)
        self.shaper = Shaper(config, client)
        self.pool = ConnectionPool(
            delivery.reuse_max_messages, delivery.reuse_idle_timeout, self.shaper.release
        )
        self.shaper.attach(self.pool.leases, self.pool.close_one, self.pool.expire)
        # Redis calls off the loop (services/deliver/offload.py): one thread per lane, one for
        # the shaper's tick and the batch's reads, at most offload.THREADS_MAX; inline while
        # Redis is near (redis_calls).
        self.io = Offload(threads_for(delivery.sessions_per_process), mode=delivery.redis_calls)
        self.ledger.io = self.shaper.io = self.io
        # Batches run side by side on the loop (delivery.tasks_per_process): which of them works
        # on each job (the claim token is the whole process's); their lanes share
        # delivery.sessions_per_process permits.
        self.holders = Holders()
        self._permits: asyncio.Semaphore | None = None
        self._permits_loop: asyncio.AbstractEventLoop | None = None
        self.timeouts = Timeouts(
            config.hostname,
            connect=delivery.connect_timeout,
            command=delivery.command_timeout,
            greeting=delivery.greeting_timeout,
            data=delivery.data_timeout,
            pipelining=delivery.pipelining,
            chunking=delivery.chunking,
        )
        self._answered: dict[Destination, float] = {}  # destination → last message taken here
        self.site_slots = SiteSlots(config, self.shaper)  # this process's lanes per site

    async def run_batch(self, docs: Sequence[Mapping[str, Any]]) -> list[Outcome | None]:
        """Deliver and record a task's batch of job documents, up to
        ``delivery.sessions_per_process`` at once (lanes, each taking the next job in order);
        each job's outcome is recorded as soon as it is known, in a transaction of its own or
        shared with the rounds that ended in the same turn of the loop (a worker dying mid-batch
        re-sends nothing already recorded). One result per document; None:
        nothing was sent for it (nothing left to do, another process holds it, a copy of another
        document, handed back for lack of time, or parked)."""
        self.shaper.ensure_ticking()
        jobs = [_read(doc) for doc in docs]
        states = await self.io(spool.load_jobs, self.client, [job_key(doc) for doc in docs])
        self.planner.new_batch()
        self.ledger.new_batch(keep=self.holders)  # the premarks of the batches under way stay
        batch = Batch(docs, jobs, states, Bodies(self.client, jobs, states, self.io), unique(jobs),
                       self.config.delivery.task_window)  # fmt: skip
        lanes = max(1, min(self.config.delivery.sessions_per_process, len(batch.order)))
        if self._warm(jobs, batch.order):
            batch.opened.set()
        try:
            ends = await asyncio.gather(
                *(self._lane(batch, first=n == 0) for n in range(lanes)), return_exceptions=True
            )
            for end in ends:  # a Redis error: the other lanes finished their rounds first
                if isinstance(end, BaseException):
                    raise end
            left = batch.left()
            if left:
                handed = [docs[i] for i, _ in left]
                await self.io(self.ledger.hand_back, handed, [c for _, c in left], OUT_OF_TIME)
                log.info("handed back %d jobs: %s", len(left), OUT_OF_TIME)
        except BaseException:  # premarks no DATA followed go (else: a false interruption)
            unused = self.ledger.unused_premarks(self.holders.held_by(batch))
            await self.io(self.ledger.drop_premarks, unused)
            raise
        finally:
            mine = self.holders.held_by(batch)
            if self.ledger.claims.held:  # none of this batch's is left but after an error
                await self.io(self.ledger.claims.release_all, mine)
            self.holders.let_go_all(batch)  # after: another batch taking one claims it anew
            await session.closed()  # the QUITs of the batch's sessions, after its recording
        return batch.results

    def _warm(self, jobs: Sequence[Job | None], order: Sequence[int]) -> bool:
        """Whether the batch's first job goes to a destination that took a message from this
        process within the last ``WARM`` seconds."""
        first = next((jobs[i] for i in order if jobs[i] is not None), None)
        at = self._answered.get(destination(first)) if first is not None else None
        return at is not None and time.monotonic() - at < WARM

    def _answering(self, where: Destination, batch: Batch) -> Callable[[], None]:
        """What a round calls when its peer is about to take the message: the batch's other
        lanes may start, and the destination is warm for the batches after it."""

        def reached() -> None:
            batch.opened.set()
            self._answered.pop(where, None)  # newest last: the oldest are dropped first
            self._answered[where] = time.monotonic()
            while len(self._answered) > WARM_KEEP:
                del self._answered[next(iter(self._answered))]

        return reached

    async def _lane(self, batch: Batch, first: bool) -> None:
        """One lane: the batch's next job, then the next, until none is left or time is up.
        The lanes but the first wait until the destination answered the first (or its job
        ended): an unreachable destination is then tried once per batch, not once per lane."""
        if not first:
            await batch.opened.wait()
        permits = self._lane_permits()
        claimed: Claim | None = None  # the next job's, taken by this lane's last recording
        try:
            try:  # a permit (the process's other batches' lanes hold the rest) in the window
                async with asyncio.timeout_at(batch.window_ends()):
                    await permits.acquire()
            except TimeoutError:  # none: this batch starts nothing, its jobs are handed back
                batch.stop()
                return
            try:
                index = batch.take()
                while index is not None:
                    index, claimed = await self._step(batch, index, claimed)
                    batch.opened.set()
            finally:
                permits.release()
        except BaseException:  # the batch fails (the task runs again): no lane starts a job
            batch.stop()
            raise
        finally:
            batch.opened.set()

    def _lane_permits(self) -> asyncio.Semaphore:
        """The process's lanes at once, across its batches: ``delivery.sessions_per_process``."""
        loop = asyncio.get_running_loop()
        if self._permits is None or self._permits_loop is not loop:  # tests run several loops
            self._permits = asyncio.Semaphore(self.config.delivery.sessions_per_process)
            self._permits_loop = loop
        return self._permits

    async def _step(
        self, batch: Batch, i: int, claimed: Claim | None
    ) -> tuple[int | None, Claim | None]:
        """Run the batch's document ``i`` (``claimed``: its claim, when the lane took it ahead);
        return the lane's next document and its claim (None, None: the lane ends)."""
        job = batch.jobs[i]
        if job is None:
            if not await self._park_doc(batch, i):
                batch.leave(i, None)  # handed back at the batch's end, parked when J is free
            return batch.take(), None
        if not batch.may_start():
            batch.leave(i, claimed)
            return None, None
        until = time.monotonic() + self.ledger.claims.ttl + 0.5  # ONE wait, whoever holds it
        if not await self.holders.wait(job.key, batch, until - time.monotonic()):
            # Still another batch's: handed back (never dropped: the copy there may be stale,
            # left at its window, or a non-job's parking), as a job not started in time.
            log.info("%s to %s is another batch's of this process: handed back", *job.key)
            batch.leave(i, None)
            return batch.take(), None
        # Let go once its claim went (recorded, closed, left); after an error the batch's end
        # releases the claim first (run_batch).
        step = await self._held_step(batch, i, job, claimed, until)
        self.holders.let_go(job.key, batch)
        return step

    async def _held_step(
        self, batch: Batch, i: int, job: Job, claimed: Claim | None, until: float
    ) -> tuple[int | None, Claim | None]:
        taken: list[int] = []  # the document this lane takes next, claimed by its recording

        def upcoming() -> Upcoming | None:
            after = batch.take()
            if after is None:
                return None
            taken.append(after)
            found = batch.jobs[after]  # claimed ahead only when no other batch holds it
            if found is None or not self.holders.take(found.key, batch):
                return None
            return Upcoming.of(batch.jobs, batch.states, after)

        claimed_next: Claim | None = None
        try:
            if claimed is None or claimed.key != job.key:
                claimed = await self.ledger.claim_async(job.key, batch.states[i].envelope)
            claim = claimed
            if not claim.ours:
                claim = await self._wait_for(claim, batch.states[i].envelope, until)
            if claim.ours:
                batch.results[i], claimed_next = await self._run(job, claim, batch, i, upcoming)
            else:  # handed back, never dropped: the owner's copy may be stale, or it died
                log.info("%s to %s is %s's: handed back", *job.key, claim.owner)
                batch.leave(i, None)
        except redis.exceptions.RedisError:
            raise
        except Exception:
            # Not in sending (that ends as a recorded deferral: Sending.send) but in
            # claiming or recording: the round may have sent DATA unrecorded, so the
            # in-flight mark stays and the retry says so (RFC 1047), as after a crash.
            log.exception("delivery of %s to %s failed unexpectedly", job.id, job.domain)
            await self.io(self.ledger.park, job, keep_mark=True)
        return (taken[0] if taken else batch.take()), claimed_next

    async def _park_doc(self, batch: Batch, i: int) -> bool:
        """Park a document that is not a job (for a retry), unless a batch of this process
        (this one too: another lane) holds a job of its id and domain: parking would release
        that job's claim and its in-flight mark. Whether it was parked."""
        key = held_key(batch.docs[i])
        if key is not None and key in self.holders:
            log.warning("%s to %s: a copy that is not a job, handed back: the job is sent", *key)
            return False
        parking = object()
        if key is not None:
            self.holders.take(key, parking)
        try:
            await self.io(self.ledger.park, batch.docs[i])
        finally:
            if key is not None:
                self.holders.let_go(key, parking)
        return True

    async def shutdown(self) -> None:
        """The worker process stops: close the parked sessions and release every connection
        lease now (a process that dies instead leaves them to expire)."""
        self.pool.close_all()
        self.shaper.close()

    async def run(self, doc: Mapping[str, Any]) -> Outcome | None:
        """Deliver and record one job; None when there was nothing left to do."""
        return (await self.run_batch([doc]))[0]

    async def _wait_for(self, claim: Claim, known: Envelope | None, until: float) -> Claim:
        """A job another process holds: its claim ends when that process records the job, or
        within the claim's TTL when it died. Wait that long at most (``until``, counted from
        before any wait for another batch of this process), looking now and then; then the
        job is ours — or still held, and its copy is handed back (:meth:`_held_step`)."""
        ttl = self.ledger.claims.ttl
        while not claim.ours and time.monotonic() < until:
            await asyncio.sleep(min(0.5, ttl / 6))
            claim = await self.ledger.claim_async(claim.key, known)
        return claim

    async def _run(
        self,
        job: Job,
        claim: Claim,
        batch: Batch,
        index: int,
        upcoming: Callable[[], Upcoming | None] = lambda: None,
    ) -> tuple[Outcome | None, Claim | None]:
        """One claimed job: its outcome (None: nothing was sent) and the claim of the job
        ``upcoming()`` gives (the lane's next), taken by its recording (None: not taken)."""
        assert claim.state is not None
        state = claim.state
        envelope = state.envelope
        if envelope is None or all(r in state.final for r in job.recipients):
            await self.io(self.ledger.close, job, envelope)
            return None, None
        pending = state.pending(job)
        if not pending:  # deferred by this attempt already: the retry is theirs
            await self.io(self.ledger.leave, claim)
            return None, None
        body = await batch.bodies.take(index) or await self.io(spool.load_body, self.client, job.id)
        if body is None:
            await self.io(self.ledger.close, job, envelope)
            return None, None
        state = replace(state, body=body)
        if state.in_flight is not None:
            await self.io(self.ledger.note_interrupted, job, state.in_flight)
        key = destination(job)
        unreachable = batch.unreachable
        if key in unreachable:
            outcome = unreachable[key].not_tried(pending)
        else:
            reached = self._answering(key, batch)
            outcome = await self.send(job, envelope, body, pending, reached)
            if outcome.unreachable or blocks_batch(outcome):
                unreachable.setdefault(key, outcome)
        round_ = self.ledger.round(job, envelope, body, state)
        if outcome.throttled is not None:
            throttle = outcome.throttled
            reply = throttle_reply(throttle)
            if round_.now < round_.expires:  # waits, parked: not an attempt, lifetime unchanged
                await self.io(self.ledger.throttle, round_, claim, throttle, reply)
                if joins_line(self.config, throttle):  # it waits in the site's line now
                    self.shaper.saw_line(throttle.site.id, True)
                return None, None
            # Expired: bounced as a deferral. The sender reads why in general words (the DSN);
            # which limit of which site held it is for the operator (log and trace).
            outcome.deferred = dict.fromkeys(pending, reply)
            outcome.skipped = throttle_detail(throttle)
            log.warning("%s to %s bounced at its expiry: %s", *job.key, outcome.skipped)
        after = upcoming()
        if after is None:
            return outcome, await self.ledger.record_async(round_, outcome)
        next_claim = await self.ledger.record_async(
            round_, outcome, after.key, premark=after.premark, known=after.envelope
        )
        return outcome, next_claim


def _read(doc: Mapping[str, Any]) -> Job | None:
    """The job in a task's document; None (logged) for one that is not a job: it is parked."""
    try:
        return Job.from_json(doc)
    except (KeyError, ValueError, TypeError):
        log.exception("delivery of %s to %s failed unexpectedly", *job_key(doc))
        return None
