"""The lanes' shared state for one deliver task's batch (:mod:`services.deliver.batch` runs the
lanes; this holds what they share, on one event loop, with no locks).

:class:`Batch`: the documents in the batch's order (:func:`unique`: one per job, of two copies
the later attempt's), handed out one at a time, so a job is taken by one lane only; the task's
*start window* (``delivery.job_timeout`` / 10), after which no job starts and the ones taken but
not started are handed back; the destinations found unreachable (or throttled); the results.
:class:`Upcoming`: the lane's next job, claimed by the recording of the one before.
:class:`Holders`: which batch of the process works on each job (batches side by side).
:class:`Slots`: how many of a process's lanes may send to one site at once; :class:`SiteSlots`
holds them per site for the process and gives a round its share of its site (a slot, then the
sessions its addresses get: when every connection to the site is taken, some by the process's
other lanes, the lane waits up to :data:`SIBLING_WAIT` in all for one of theirs rather than
park its job; no slot or no session in time, the round is throttled). :class:`Bodies`:
the batch's message bodies, read a few megabytes at a time as the lanes reach them (off the
loop, :mod:`services.deliver.offload`; one read at a time, so a chunk is read once) and let go
once used.

Inputs: the task's documents and the jobs and states read from them, the configuration, the
process's shaper (:mod:`services.deliver.shaping`) and the round's addresses to try.

Failure: nothing here raises of its own; a Redis error reading bodies, or one of the shaper's or
the addresses' (:meth:`SiteSlots.share`), propagates to the lane (and so to the task, which runs
again). A round that gets no share of its site is throttled, not failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.jobs import Job, job_key
from services.common.model import Envelope
from services.deliver.claims import Claim
from services.deliver.delivery import Outcome
from services.deliver.offload import INLINE, Offload
from services.deliver.shaping import (
    CONNECTIONS,
    LINE,
    PARK_CONNECTIONS,
    RATE,
    SHORT_WAIT,
    Gate,
    Shaper,
    Throttle,
)
from services.deliver.sites import Site

Destination = tuple[Any, ...]  # domain, route, TLS mode, TLS profile: destination()
Unreachable = dict[Destination, Outcome]  # destinations that failed in this batch
# How long a lane waits for a session of its own process's other lanes to come free when every
# connection to the site is taken (their transactions end; longer → parked as throttled), at
# most half of delivery.job_timeout (a round that outlasts it is abandoned as an attempt).
SIBLING_WAIT = 30.0


@dataclass(frozen=True)
class Upcoming:
    """The job a batch looks at next, claimed by the recording of the one before."""

    key: tuple[str, str]
    envelope: Envelope | None  # as the batch read it (None: the message was gone)
    premark: bool  # it had something to send: its in-flight mark rides along

    @classmethod
    def of(
        cls, jobs: Sequence[Job | None], states: Sequence[spool.JobState], index: int | None
    ) -> Upcoming | None:
        job = jobs[index] if index is not None else None
        if job is None or index is None:
            return None
        state = states[index]
        return cls(job.key, state.envelope, _sendable(job, state))


class Batch:
    """One task's batch as its lanes share it (one event loop: no locks): the documents in
    order and which come next, the destinations found unreachable (or throttled), the results,
    and the jobs not started in the task's start window (handed back at the end)."""

    def __init__(
        self,
        docs: Sequence[Mapping[str, Any]],
        jobs: list[Job | None],
        states: list[spool.JobState],
        bodies: Bodies,
        order: list[int],
        window: float,
    ) -> None:
        self.docs, self.jobs, self.states, self.bodies = docs, jobs, states, bodies
        self.order, self.window = order, window
        self.started = time.monotonic()
        self.results: list[Outcome | None] = [None] * len(docs)
        self.unreachable: Unreachable = {}  # and destinations throttled (shaping)
        self.opened = asyncio.Event()  # the destination answered (or a job ended): all lanes go
        self._next = 0  # place in order of the next document to hand out
        self._begun = 0  # jobs started
        self._stopped = False  # the start window is over (or a lane failed)
        self._left: list[tuple[int, Claim | None]] = []  # taken, not started: handed back

    def take(self) -> int | None:
        """The next document (its index), None when none is left or time is up."""
        if self._stopped or self._next >= len(self.order):
            return None
        self._next += 1
        return self.order[self._next - 1]

    def window_ends(self) -> float:
        """When the start window ends, on the loop's clock."""
        loop = asyncio.get_running_loop()
        return loop.time() + self.started + self.window - time.monotonic()

    def may_start(self) -> bool:
        """Whether a job may start now: the batch's first always, the others within the start
        window (delivery.job_timeout / 10); after it, none."""
        if self._begun and time.monotonic() - self.started >= self.window:
            self._stopped = True
        if self._stopped:
            return False
        self._begun += 1
        return True

    def stop(self) -> None:
        """A lane failed: no job starts any more (nothing is handed back: the task runs again)."""
        self._stopped = True

    def leave(self, index: int, claim: Claim | None) -> None:
        """A document a lane took but did not start (time is up), with its claim if taken."""
        self._left.append((index, claim))

    def left(self) -> list[tuple[int, Claim | None]]:
        """What was not started, in the batch's order: the lanes' left documents and those
        never taken."""
        rest: list[tuple[int, Claim | None]] = []
        if self._stopped:
            rest = [(i, None) for i in self.order[self._next :]]
        place = {index: n for n, index in enumerate(self.order)}
        return sorted(self._left + rest, key=lambda item: place[item[0]])


@dataclass
class Slots:
    """How many of a process's lanes may send to one site at once (``size``)."""

    size: int
    busy: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)
    limit: int = 0  # the size it grows back to (0: the size it was made with)

    def __post_init__(self) -> None:
        self.limit = self.limit or self.size

    async def take(self, wait: float) -> bool:
        """A slot, waiting up to ``wait`` seconds for one (False: none came free)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.busy >= self.size:
            self.freed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.freed.wait(), remaining)
            except TimeoutError:
                return False
        self.busy += 1
        return True

    def give(self) -> None:
        self.busy -= 1
        self.freed.set()

    def shrink(self) -> bool:
        """A lane found every connection to the site taken (none came free within the wait)
        while others of this process's lanes send there: the process sends over the sessions
        it holds, as many lanes at once as are sending now, and the lane waits for one of them
        to come free (its session is parked, then reused). False when no other lane sends
        there: nothing in this process will come free, the round is throttled."""
        if self.busy < 1:
            return False
        self.size = self.busy
        return True

    def grow(self) -> None:
        """One more lane may send at once (up to ``limit``): the site had room of late."""
        if self.size < self.limit:
            self.size += 1
            self.freed.set()


class SiteSlots:
    """Per worker process: each site's :class:`Slots` (on the process's event loop), and a
    round's share of its site (:meth:`share`)."""

    def __init__(self, config: Config, shaper: Shaper) -> None:
        self.config = config
        self.shaper = shaper
        self._site_slots: dict[str, Slots] = {}  # site id → its slots on _slots_loop
        self._slots_loop: asyncio.AbstractEventLoop | None = None

    async def share(
        self, gate: Gate, outcome: Outcome, hops: Callable[[], Awaitable[None]]
    ) -> None:
        """The round's share of the site: a slot of this process, then a session per address
        (``hops``: a parked one, or a new one with a lease); else the round is throttled."""
        slots, wait = self.slots(gate.site), SHORT_WAIT
        until: float | None = None  # when the wait for the siblings' sessions ends, in all
        if slots.size < slots.limit:  # shrunk: the process sends over the sessions it holds
            until = time.monotonic() + min(SIBLING_WAIT, self.config.delivery.job_timeout / 2)
            wait = until - time.monotonic()
        while True:
            if not await slots.take(wait):  # this process's lanes hold the site's limit
                outcome.throttled = Throttle(CONNECTIONS, gate.site, PARK_CONNECTIONS)
                return
            try:
                await hops()
            finally:
                gate.close()
                slots.give()
            # Every connection to the site is taken, some by this process's other lanes: send
            # over theirs (the next that comes free), not park the job and the rest of its batch.
            if not _no_connection(outcome) or not slots.shrink():
                break
            # One wait in all, however often a sibling's session comes free and goes elsewhere
            # (to another worker, its lease taken): never abandoned, its worker not held longer.
            now = time.monotonic()
            if until is None:
                until = now + min(SIBLING_WAIT, self.config.delivery.job_timeout / 2)
            if now >= until:
                break  # throttled (outcome.throttled is still set)
            outcome.throttled = None
            wait = until - now
        if outcome.attempts and time.monotonic() >= self.shaper.full.get(gate.site.id, 0.0):
            slots.grow()  # the site had room of late: this process may try one more session

    def slots(self, site: Site) -> Slots:
        """The site's slots in this process: as many lanes as its connection limit may send to
        it at once (the leases bound all processes together; this keeps one process's lanes
        from queueing on leases that its own busy sessions hold). When the site's connections
        are all taken, the slots shrink to the sessions this process holds there, and grow back
        one at a time while the site has room (:meth:`Slots.shrink`)."""
        loop = asyncio.get_running_loop()
        if self._slots_loop is not loop:  # a worker has one loop; tests may run several
            self._slots_loop, self._site_slots = loop, {}
        slots = self._site_slots.get(site.id)
        if slots is None:
            size = min(site.limits.connections, self.config.delivery.sessions_per_process)
            slots = self._site_slots[site.id] = Slots(size)
        return slots


class Bodies:
    """A batch's message bodies, read a few megabytes at a time (``spool.budgeted``) as the batch
    reaches them, and let go once used: a worker never holds a whole batch of large messages."""

    def __init__(
        self,
        client: redis.Redis,
        jobs: list[Job | None],
        states: list[spool.JobState],
        io: Offload = INLINE,
    ) -> None:
        self.client = client
        self.io = io
        self._reading = asyncio.Lock()  # lanes wanting a body wait for the chunk being read
        self.ids = [job.id if job else "" for job in jobs]
        # Only jobs with something to send need their body (size 0 for the others).
        sizes = [
            (s.envelope.size or 1) if _sendable(j, s) and s.envelope else 0
            for j, s in zip(jobs, states, strict=True)
        ]
        self.sizes = sizes
        self.chunks = spool.budgeted(sizes)
        self.loaded: dict[int, bytes | None] = {}

    async def take(self, index: int) -> bytes | None:
        if not self.sizes[index]:
            return None
        async with self._reading:
            if index not in self.loaded:
                chunk = [i for i in next(c for c in self.chunks if index in c) if self.sizes[i]]
                ids = [self.ids[i] for i in chunk]
                bodies = await self.io(spool.load_bodies, self.client, ids)
                self.loaded.update(zip(chunk, bodies, strict=True))
        return self.loaded.pop(index)


def held_key(doc: Mapping[str, Any]) -> tuple[str, str] | None:
    """A document's job key as :class:`Holders` keeps it; None for one without a usable key (a
    document that is not a job may lack one, or carry values that cannot be a key)."""
    try:
        key = job_key(doc)
        hash(key)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return key


class Holders:
    """Per worker process (on its event loop): which of its batches works on each job now.

    A claim is the process's (one token, services/deliver/claims.py), so two batches of one
    process side by side (``delivery.tasks_per_process``) would both find a job "ours": the one
    that holds it here works on it, the other waits for it as it would wait for another
    process's claim (at most the claim's TTL; then it hands its copy back, services/deliver/
    batch.py). A holder is any object (a :class:`Batch`, or a parking)."""

    def __init__(self) -> None:
        self._holder: dict[tuple[str, str], object] = {}
        self._waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._holder

    def take(self, key: tuple[str, str], holder: object) -> bool:
        """Hold ``key`` if no one else does; whether ``holder`` holds it now."""
        return self._holder.setdefault(key, holder) is holder

    async def wait(self, key: tuple[str, str], holder: object, timeout: float) -> bool:
        """:meth:`take`, waiting up to ``timeout`` seconds for another holder to let go."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.take(key, holder):
            waiter = loop.create_future()
            self._waiters.setdefault(key, []).append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                return False
            finally:
                waiting = self._waiters.get(key, [])
                if waiter in waiting:
                    waiting.remove(waiter)
                if not waiting:
                    self._waiters.pop(key, None)
        return True

    def held_by(self, holder: object) -> list[tuple[str, str]]:
        return [key for key, held in self._holder.items() if held is holder]

    def let_go(self, key: tuple[str, str], holder: object) -> None:
        """``holder`` is done with ``key``: the next waiter may take it."""
        if self._holder.get(key) is holder:
            del self._holder[key]
            for waiter in self._waiters.pop(key, []):
                if not waiter.done():
                    waiter.set_result(None)

    def let_go_all(self, holder: object) -> None:
        for key in self.held_by(holder):
            self.let_go(key, holder)


def unique(jobs: Sequence[Job | None]) -> list[int]:
    """The indices of the documents to run, in order: one per (message, domain) — of two copies
    of a job in one task, the later attempt's (the recipients left are the same), at the place
    of the first. Documents that are not jobs are all kept (each is parked)."""
    order: list[int] = []
    first: dict[tuple[str, str], int] = {}  # job key → its place in order
    for i, job in enumerate(jobs):
        if job is None:
            order.append(i)
        elif job.key not in first:
            first[job.key] = len(order)
            order.append(i)
        else:
            place = first[job.key]
            kept = jobs[order[place]]
            if kept is not None and job.attempt > kept.attempt:
                order[place] = i
    return order


def _no_connection(outcome: Outcome) -> bool:
    """The round found no connection to its site free in time and tried nothing."""
    throttle = outcome.throttled
    return throttle is not None and throttle.reason == CONNECTIONS and not outcome.attempts


def _sendable(job: Job | None, state: spool.JobState) -> bool:
    """Whether a job has something to send, as far as ``state`` (read earlier) says."""
    if job is None or state.envelope is None:  # not a job; or the message is gone (its body too)
        return False
    return bool(state.pending(job))


def destination(job: Job) -> Destination:
    """Where a job goes, as far as reaching it is concerned: its domain, route and TLS."""
    decision = job.decision
    return (decision.domain, decision.route, decision.tls, decision.tls_profile)


def blocks_batch(outcome: Outcome) -> bool:
    """A throttled round whose limit holds for the rest of the batch to the same destination
    (connections, back-off, suspension; not a rate, which each message asks again, nor the
    site's line, where each message has its own place)."""
    throttle = outcome.throttled
    return throttle is not None and throttle.reason not in (RATE, LINE)
