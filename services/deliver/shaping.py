"""Traffic shaping per destination site: connection leases, rates and back-off, shared by every
worker process and pod through Redis.

A **site** is where connections go, with its limits (:mod:`services.deliver.sites`).

- **Connections**: every open SMTP session to a site, busy or parked for reuse, holds a *lease*:
  a member of the site's sorted set ``tlsrelay:shaping:leases:<site>`` scored by its expiry
  (Redis time). A lease is taken in one Lua call
  (:data:`~services.deliver.shapingscripts.ACQUIRE`, which also drops expired leases, applies
  the back-off and the connection rate) and renewed every :data:`TICK` by the process holding
  it (:meth:`Shaper.tick`, one call for all its leases); a killed worker's leases expire within
  :data:`LEASE_TTL`, never a counter that leaks. A process waiting for a lease sets the site's
  ``waiting`` flag; a process holding a parked session to that site closes it at its next tick
  (and idle ones after ``delivery.reuse_idle_timeout``).
- **Rates** (``rate`` per message, ``connection_rate`` per new connection) are a generic cell
  rate algorithm (GCRA) in one Lua call, with a burst of the rate's count.
- **Back-off**: a reply line of the destination (greeting, MAIL, RCPT) matching one of
  ``delivery.backoff.replies`` multiplies the site's connection limit by ``factor`` for every
  worker (one step per second at most, never below 1); one step comes back per
  ``recover_after`` (:data:`~services.deliver.shapingscripts.BACKOFF`).
- **Suspension** (``tlsrelay queue suspend``): read from ``tlsrelay:shaping:suspended`` at most
  once per :data:`SUSPENSION_REFRESH` per process.

When a limit is reached the job waits: within the worker when the wait is short (at most
:data:`SHORT_WAIT`, sleeping, never spinning), else it is parked as *throttled*
(:meth:`services.deliver.ledger.Ledger.throttle`): not an attempt, not a retry step. A round
that passed the ``rate`` and then met a connection limit gives its cell back
(:meth:`Shaper.refund`): it sent nothing.

**The site's line** (review finding 8, ``delivery.shaping.line``): a job parked for a limit of
its whole site (:data:`LINE_REASONS`) waits in the site's line by its message's acceptance
time, and younger mail no longer passes the oldest :func:`front_of` jobs waiting there. How,
and what a process asks of it, is told with its scripts in :mod:`services.deliver.shapingscripts`.

Costs: one Redis round trip per new connection (the lease, with the line's ``EXISTS``), one per
message only for a site with a ``rate`` or a line, and one per :data:`TICK` per process while it
holds leases. In a deliver process the lease, rate and renewal scripts run in its thread pool
(:mod:`services.deliver.offload`), off the event loop; ``held``, the released leases and the
lines seen are changed on the loop only. Still on the loop: the suspensions (one read per
:data:`SUSPENSION_REFRESH`), a back-off step (only after a matching reply), a rate cell given
back (only for a round a connection limit stopped) and :meth:`Shaper.admit` (only while a line
stands at the site).

Failure: Redis errors propagate from :meth:`Gate.lease`, :meth:`Shaper.pace` and
:meth:`Shaper.suspended`, all before anything is sent (the task is parked for a retry: nothing is
sent without a lease, nothing dropped, no TLS requirement changed — shaping never chooses TLS);
:meth:`Shaper.backoff` runs after an attempt that may have delivered, so its Redis errors are
logged and ignored; a failed tick is logged and tried again (leases live :data:`LEASE_TTL`, ten
ticks). A lease that expired while its holder could not renew it is marked lost: its session
finishes the transaction under way and is then closed, never parked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.deliveryconfig import SiteLimits
from services.common.values import RateLimit
from services.deliver import observe, shapingscripts
from services.deliver.offload import INLINE, Offload
from services.deliver.sites import Site, site_of

log = logging.getLogger("tlsrelay.shaping")

LEASE_TTL = 10.0  # seconds a lease outlives its holder's last renewal
TICK = 1.0  # how often a process renews its leases and looks for waiters
SHORT_WAIT = 5.0  # the longest wait within the worker; longer → parked as throttled
WAITING_TTL = 3.0  # how long a waiter's flag stands (it is set again while it waits)
SUSPENSION_REFRESH = 1.0  # how stale a process's copy of the suspensions may be
PARK_CONNECTIONS = 5.0  # a job parked for want of a connection comes back after this
PARK_SUSPENDED = 300.0  # a suspended site's jobs look again at least this often
CLOSING_WAIT = 0.05  # after closing a parked session of our own for ourselves
PARK_LINE = 60.0  # a job waiting behind older ones comes back after this unless called first
FRONT_PER_CONNECTION = 2  # a site's line's front holds at least this many jobs per connection
LINE_MEMORY = 2 * TICK  # how long a process goes on asking the line after it last saw one
WAKE_EVERY_MS = 1000  # the line's front is looked over at most this often per site
REGISTER_EVERY = 60.0  # a process refreshes a site's entry in the list of sites this often

CONNECTIONS, CONNECTION_RATE, RATE, SUSPENDED, BACKOFF, LINE = (
    "connections", "connection_rate", "rate", "suspended", "backoff", "line",
)  # fmt: skip
REASONS = (CONNECTIONS, CONNECTION_RATE, RATE, SUSPENDED, BACKOFF, LINE)
# The reasons that put a job in its site's line: a limit of the whole site. Not a suspension,
# which may name one domain of the site (its jobs must not hold up the others) and ends with
# `resume`, which makes them due at once.
LINE_REASONS = frozenset({CONNECTIONS, CONNECTION_RATE, RATE, BACKOFF, LINE})


@dataclass(frozen=True)
class Throttle:
    """A limit was reached: why, at which site, and how long until it is worth trying again."""

    reason: str  # one of REASONS
    site: Site
    wait: float  # seconds


@dataclass(eq=False)
class Lease:
    """The right to hold one open session to ``site`` (busy or parked)."""

    site: Site
    id: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
    lost: bool = False  # a renewal found it gone (expired meanwhile): close when idle

    @property
    def key(self) -> str:
        return spool.site_key("leases", self.site.id)


def joins_line(config: Config, throttle: Throttle) -> bool:
    """Whether a round stopped by ``throttle`` waits in its site's line (``delivery.shaping.line``
    on, and a limit of the whole site: :data:`LINE_REASONS`)."""
    return config.delivery.shaping.line and throttle.reason in LINE_REASONS


def front_of(config: Config, limits: SiteLimits) -> int:
    """How many of the oldest jobs waiting in a site's line may take its capacity at once (its
    front): a task's worth (``delivery.batch_max``), or :data:`FRONT_PER_CONNECTION` per
    connection of its configured limit if that is more."""
    return max(config.delivery.batch_max, max(1, limits.connections) * FRONT_PER_CONNECTION)


def line_member(job_doc: dict[str, object]) -> str:
    """A job's member in its site's line: its member in the deferred set (sorted keys)."""
    return json.dumps(job_doc, sort_keys=True)


def _cell(rate: RateLimit | None) -> tuple[float, float]:
    """GCRA's emission interval and burst tolerance for ``rate`` ((0, 0): no limit): a burst
    of ``count`` cells, then one per ``window / count``."""
    if rate is None:
        return 0.0, 0.0
    interval = rate.window / rate.count
    return interval, interval * (rate.count - 1)


class Shaper:
    """Per worker process: the leases it holds, its copy of the suspensions, the scripts."""

    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.config = config
        self.client = client
        self.held: dict[str, Lease] = {}  # lease id → lease (busy or parked)
        self._dropped: list[Lease] = []  # released, to be removed from Redis
        self._acquire = client.register_script(shapingscripts.ACQUIRE)
        self._pace = client.register_script(shapingscripts.PACE)
        self._backoff = client.register_script(shapingscripts.BACKOFF)
        self._renew = client.register_script(shapingscripts.RENEW)
        self._admit = client.register_script(shapingscripts.ADMIT)
        self._refund = client.register_script(shapingscripts.REFUND)
        # site id → until when (monotonic) this process asks the site's line before a round
        # (set whenever a reply of Redis said the site has one: see Shaper.admit)
        self.lines: dict[str, float] = {}
        self._registered: dict[str, float] = {}  # site id → when its entry was last written
        self._suspended: dict[str, dict[str, object]] = {}
        self._suspended_at = -1e9
        # site id → until when (monotonic) a round here already waited in vain for a lease:
        # later rounds to it park at once instead of sleeping again (see Gate.lease)
        self.full: dict[str, float] = {}
        self._ticking: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.parked: Callable[[], list[Lease]] = list  # the pool's parked sessions' leases
        self.close_parked: Callable[[str], int] = lambda site_id: 0  # close one for a waiter
        self.expire_parked: Callable[[], None] = lambda: None  # idle ones past their timeout
        # Where rounds and the tick make their Redis calls: the deliver process's threads (set
        # by services/deliver/batch.py); held, _dropped and lines change on the loop only.
        self.io: Offload = INLINE

    def attach(
        self,
        parked: Callable[[], list[Lease]],
        close_parked: Callable[[str], int],
        expire_parked: Callable[[], None],
    ) -> None:
        """The connection pool's parked sessions (services/deliver/pool.py), which the tick
        closes when idle too long or when another worker waits for their site."""
        self.parked, self.close_parked, self.expire_parked = parked, close_parked, expire_parked

    # ----------------------------------------------------------------- what a round asks

    def site(self, domain: str, hosts: Iterable[tuple[str, int, str]]) -> Site:
        return site_of(self.config, domain, hosts)

    def suspended(self, site: Site, domain: str) -> Throttle | None:
        """A suspension of the domain or the site (its configured name, or its id), if any.
        The suspensions are read at most once per :data:`SUSPENSION_REFRESH`; a copy that says
        "suspended" is read again first, so a round never waits on a stale copy after
        ``resume`` (that costs a Redis call only for rounds that are not sent anyway)."""
        now = time.time()
        fresh = now - self._suspended_at < SUSPENSION_REFRESH
        if not fresh:
            self._read_suspensions(now)
        throttle = self._suspension(site, domain, now)
        if throttle is not None and fresh:
            self._read_suspensions(now)
            throttle = self._suspension(site, domain, now)
        return throttle

    def _read_suspensions(self, now: float) -> None:
        raw: dict[bytes, bytes] = self.client.hgetall(spool.SHAPING_SUSPENDED)  # type: ignore[assignment]
        self._suspended = {k.decode(): json.loads(v) for k, v in raw.items()}
        self._suspended_at = now

    def _suspension(self, site: Site, domain: str, now: float) -> Throttle | None:
        for target in (domain.lower(), site.id.lower()):
            entry = self._suspended.get(target)
            until = float(entry.get("until") or 0) if entry else 0.0  # type: ignore[arg-type]
            if entry is not None and (not until or until > now):
                wait = min(until - now if until else PARK_SUSPENDED, PARK_SUSPENDED)
                return Throttle(SUSPENDED, site, max(1.0, wait))
        return None

    async def pace(self, site: Site) -> Throttle | None:
        """One message to ``site``: its ``rate`` (one Redis call, only when set); a short wait
        is slept here, a longer one returned."""
        interval, tolerance = _cell(site.limits.rate)
        if not interval:
            return None
        minute = int(time.time() // 60)
        keys = [spool.site_key("rate", site.id), spool.site_key("count", f"{site.id}:{minute}")]
        waited = 0.0
        while True:
            wait = int(await self.io(self._pace, keys=keys, args=[interval, tolerance])) / 1000
            if not wait:
                if waited:  # a round that met the limit and waited here (else: parked)
                    observe.throttled(site.label, RATE)
                return None
            if waited + wait > SHORT_WAIT:
                return Throttle(RATE, site, wait)
            await asyncio.sleep(wait)
            waited += wait

    def refund(self, site: Site, paced_at: float | None = None) -> None:
        """Give back the rate cell :meth:`pace` took for a round that then sent nothing (a
        connection limit stopped it): a throttled round must not spend the site's rate.
        ``paced_at``: when :meth:`pace` counted the message (``time.time()``), so that the
        minute it was counted in is the one given back, however long the round waited since. A
        Redis error is logged (the rate is then a cell short for one window), never raised: the
        round is still parked."""
        interval, _ = _cell(site.limits.rate)
        if not interval:
            return
        minute = int((time.time() if paced_at is None else paced_at) // 60)
        keys = [spool.site_key("rate", site.id), spool.site_key("count", f"{site.id}:{minute}")]
        try:
            self._refund(keys=keys, args=[interval])
        except redis.exceptions.RedisError as exc:
            log.warning("site %s: rate cell not given back, Redis unavailable: %s", site.id, exc)

    # ----------------------------------------------------------------- the site's line

    def front(self, site: Site) -> int:
        """The front of ``site``'s line for the scripts that ask it; 0 with
        ``delivery.shaping.line`` off: no line is asked, not even one left from when it was on
        (its jobs leave it as they are recorded)."""
        return front_of(self.config, site.limits) if self.config.delivery.shaping.line else 0

    def queued(self, site: Site) -> bool:
        """Whether this process saw a line at ``site`` lately (within :data:`LINE_MEMORY`)."""
        return time.monotonic() < self.lines.get(site.id, 0.0)

    def saw_line(self, site_id: str, queued: bool) -> None:
        if queued:
            self.lines[site_id] = time.monotonic() + LINE_MEMORY
        else:
            self.lines.pop(site_id, None)

    def admit(self, site: Site, seniority: float) -> Throttle | None:
        """Ask the site's line (one Redis call) whether a round of a message accepted at
        ``seniority`` may go: None, or a :data:`LINE` throttle when :meth:`front` older jobs
        wait there. Asked when this process saw a line there lately or the job itself waited
        in one; the lease asks it too (:meth:`_take`), so a process that does not know of the
        line yet only lets a round pass on a session it already holds (for at most a tick)."""
        keys = [
            spool.site_key("line", site.id), spool.DEFERRED, spool.WAITING_DELIVER,
            spool.site_key("wake", site.id),
        ]  # fmt: skip
        args: list[str | int] = [repr(seniority), self.front(site), WAKE_EVERY_MS]
        admitted, queued = self._admit(keys=keys, args=args)
        self.saw_line(site.id, bool(queued))
        return None if admitted else Throttle(LINE, site, PARK_LINE)

    def gate(self, site: Site, seniority: float = 0.0) -> Gate:
        return Gate(self, site, seniority)

    def backoff(self, site: Site, replies: Sequence[str]) -> bool:
        """The destination's reply lines of an attempt: when one matches a
        ``delivery.backoff.replies`` pattern, the site's connection limit steps down for
        every worker. Returns whether it did."""
        patterns = self.config.delivery.backoff.replies
        if not any(p.search(line) for line in replies for p in patterns):
            return False
        backoff = self.config.delivery.backoff
        args: list[str | float] = [0, 0, site.limits.connections, backoff.factor]
        args.append(backoff.recover_after)
        observe.backoff_event(site.label)
        try:  # after an attempt that may have delivered: never make the round run again
            steps, limit = self._backoff(keys=[spool.site_key("backoff", site.id)], args=args)
        except redis.exceptions.RedisError as exc:
            log.warning("site %s: back-off not recorded, Redis unavailable: %s", site.id, exc)
            return False
        log.warning("site %s asked us to slow down: limit now %s (%s steps)", site.id, limit, steps)
        return True

    # ----------------------------------------------------------------- leases

    def _take(self, site: Site, seniority: float = 0.0) -> Lease | Throttle:
        """A lease for a new session to ``site`` for a round of a message accepted at
        ``seniority`` (0: ahead of any line), or why not."""
        lease, sent, register, keys, args = self._ask(site, seniority)
        return self._took(lease, sent, register, self._acquire(keys=keys, args=args))

    async def take(
        self, site: Site, seniority: float = 0.0, waits: bool = True
    ) -> Lease | Throttle:
        """:meth:`_take` with its script in a thread (:attr:`io`); a lease it took for a round
        cancelled meanwhile is released (to go at the next tick), never held with no session.
        ``waits=False``: a look that will not wait for a connection (a successor session,
        services/deliver/pool.py) never sets the site's ``waiting`` flag, which would close
        other processes' parked sessions for a connection nobody needs yet, and gets no lease
        while that flag stands: the connection is for the round waiting for it."""

        def orphan(reply: list[Any]) -> None:
            got = self._took(lease, sent, register, reply)
            if isinstance(got, Lease):
                self.release(got)

        lease, sent, register, keys, args = self._ask(site, seniority, waits)
        reply = await self.io(self._acquire, keys=keys, args=args, orphan=orphan)
        return self._took(lease, sent, register, reply)

    def _ask(
        self, site: Site, seniority: float, waits: bool = True
    ) -> tuple[Lease, list[Lease], float | None, list[str], list[str | float]]:
        """A new lease of ``site``, the released leases of the site dropped with it, when the
        site's entry is written (None: not now), and the keys and arguments of
        :data:`~services.deliver.shapingscripts.ACQUIRE`."""
        lease = Lease(site)
        interval, tolerance = _cell(site.limits.connection_rate)
        backoff = self.config.delivery.backoff
        sent = [d for d in self._dropped if d.site.id == site.id]
        keys = [
            lease.key,
            spool.site_key("backoff", site.id),
            spool.site_key("crate", site.id),
            spool.site_key("waiting", site.id),
            spool.SHAPING_SITES,
            spool.site_key("line", site.id),
            spool.DEFERRED,
            spool.WAITING_DELIVER,
            spool.site_key("wake", site.id),
        ]
        now = time.monotonic()
        register = now - self._registered.get(site.id, -1e9) >= REGISTER_EVERY
        args: list[str | float] = [
            lease.id, LEASE_TTL, site.limits.connections, backoff.factor,
            backoff.recover_after, interval, tolerance, site.id,
            site.document() if register else "", WAITING_TTL if waits else 0, repr(seniority),
            self.front(site), WAKE_EVERY_MS, *(d.id for d in sent),
        ]  # fmt: skip
        return lease, sent, now if register else None, keys, args

    def _took(
        self, lease: Lease, sent: list[Lease], register: float | None, reply: list[Any]
    ) -> Lease | Throttle:
        """The lease script's reply: the lease, now held, or why not; ``sent`` are gone."""
        ok, what, number, queued = reply
        site = lease.site
        self._dropped = [d for d in self._dropped if all(d is not s for s in sent)]
        self.saw_line(site.id, bool(queued))
        if not ok:
            reason = what.decode() if isinstance(what, bytes) else str(what)
            return Throttle(reason, site, PARK_LINE if reason == LINE else number / 1000)
        if register is not None:
            self._registered[site.id] = register
        self.held[lease.id] = lease
        return lease

    def release(self, lease: Lease) -> None:
        """The session is closed: the lease goes at the next tick (or with the next lease
        taken for its site, whichever comes first)."""
        if self.held.pop(lease.id, None) is not None:
            self._dropped.append(lease)

    def close(self) -> None:
        """The process stops: every lease it holds goes now (its sessions are closed by the
        caller), rather than within :data:`LEASE_TTL`."""
        self._dropped += list(self.held.values())
        self.held.clear()
        self.tick()

    def ensure_ticking(self) -> None:
        """Start :meth:`run` on the running loop (once per loop)."""
        loop = asyncio.get_running_loop()
        if self._ticking is not loop:
            self._ticking = loop
            self._task = loop.create_task(self.run())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick_async()
            except redis.exceptions.RedisError as exc:
                log.warning("shaping: lease renewal failed, trying again: %s", exc)
            except Exception:
                log.exception("shaping: tick failed")

    def tick(self) -> None:
        """Renew every lease held, drop released ones, close a parked session for each site
        another worker waits for, and note which of those sites have a line (a round that
        would take a parked session there asks it first: :meth:`admit`). One Redis call; none
        when nothing is held."""
        asked = self._renewal()
        if asked is not None:
            leases, parked_sites, dropped, keys, args = asked
            try:
                replies = self._renew(keys=keys, args=args)
            except BaseException:
                self._dropped = dropped + self._dropped  # dropped at the next tick
                raise
            self._renewed(leases, parked_sites, replies)

    async def tick_async(self) -> None:
        """:meth:`tick` with its script in a thread (:attr:`io`)."""
        asked = self._renewal()
        if asked is not None:
            leases, parked_sites, dropped, keys, args = asked
            try:
                replies = await self.io(self._renew, keys=keys, args=args)
            except BaseException:
                self._dropped = dropped + self._dropped
                raise
            self._renewed(leases, parked_sites, replies)

    def _renewal(
        self,
    ) -> tuple[list[Lease], list[str], list[Lease], list[str], list[str | float]] | None:
        """What a tick asks: the leases held, the sites of parked sessions, the released leases
        (taken out of ``_dropped`` now: put back if the call fails), the script's keys and
        arguments; None: nothing to ask."""
        self.expire_parked()
        leases = list(self.held.values())
        if not leases and not self._dropped:
            return None
        parked_sites = sorted({lease.site.id for lease in self.parked()})
        keys = [lease.key for lease in leases] + [
            spool.site_key(part, s) for s in parked_sites for part in ("waiting", "line")
        ]
        dropped, self._dropped = self._dropped, []
        args: list[str | float] = [len(leases), 2 * len(parked_sites), LEASE_TTL]
        args += [lease.id for lease in leases] + [f"{d.key}|{d.id}" for d in dropped]
        return leases, parked_sites, dropped, keys, args

    def _renewed(self, leases: list[Lease], parked_sites: list[str], replies: list[int]) -> None:
        for lease, renewed in zip(leases, replies[: len(leases)], strict=True):
            lease.lost = lease.lost or not renewed
        flags = replies[len(leases) :]
        for site_id, waiting, queued in zip(parked_sites, flags[::2], flags[1::2], strict=True):
            self.saw_line(site_id, bool(queued))
            if waiting:
                self.close_parked(site_id)


class Gate:
    """The leases of one delivery round to one site: a lease whose session failed is kept for
    the next address of the round (no second call), and released when the round ends.
    ``seniority``: when the round's message was accepted (its place in the site's line)."""

    def __init__(self, shaper: Shaper, site: Site, seniority: float = 0.0) -> None:
        self.shaper = shaper
        self.site = site
        self.seniority = seniority
        self._spare: Lease | None = None

    async def lease(self, parked: Callable[[], bool] | None = None) -> Lease | Throttle | None:
        """A lease for a new session: the round's spare one, else a new one, waiting within
        the worker up to :data:`SHORT_WAIT` (polling with growing pauses, the site's waiting
        flag set so that parked sessions elsewhere close). Older jobs waiting in the site's
        line (:data:`LINE`) are not waited for here: the round joins the line at once.

        ``parked``: whether this process now holds a parked session the round could use (its
        own lanes park theirs between messages). Asked after each look that found no lease,
        before closing a parked session of ours for this round: True ends the wait with None,
        and the round takes that session instead of closing it (closing it would hand its
        connection to whichever process looks next, and leave this one without any)."""
        if self._spare is not None:
            lease, self._spare = self._spare, None
            if not lease.lost:
                return lease
            self.shaper.release(lease)
        waited, pause, first = 0.0, 0.1, ""
        # A round to this site waited in vain a moment ago: one look, no sleep (else every
        # task to a full site — one per domain — would hold its worker SHORT_WAIT in turn).
        hurry = time.monotonic() < self.shaper.full.get(self.site.id, 0.0)
        closing = False  # one of our parked sessions is being closed for this round
        while True:
            got = await self.shaper.take(self.site, self.seniority)
            if isinstance(got, Throttle) and got.reason == LINE:
                return got  # older jobs wait for the site: this round joins them, no wait here
            if isinstance(got, Lease):
                self.shaper.full.pop(self.site.id, None)
                if first:  # a round that met a limit and waited here (else: parked)
                    observe.throttled(self.site.label, first)
                return got
            if parked is not None and parked():
                if first:  # it met a limit and waited here, as a round that then gets a lease
                    observe.throttled(self.site.label, first)
                return None  # one of our lanes parked a session the round can use: take it
            first = first or got.reason
            wait = got.wait or pause
            if got.reason != CONNECTION_RATE and not closing:  # one per round, not one per look
                closing = bool(self.shaper.close_parked(self.site.id))
                if closing:
                    wait = CLOSING_WAIT  # one of our parked sessions held it: its QUIT frees it
            if (hurry and not closing and got.reason != CONNECTION_RATE) or (
                waited + wait > SHORT_WAIT
            ):
                park = got.wait if got.reason == CONNECTION_RATE else PARK_CONNECTIONS
                if got.reason != CONNECTION_RATE:
                    self.shaper.full[self.site.id] = time.monotonic() + PARK_CONNECTIONS
                return Throttle(got.reason, self.site, max(park, 1.0))
            await asyncio.sleep(wait)
            waited, pause = waited + wait, min(1.0, pause * 2)

    def give_back(self, lease: Lease | None) -> None:
        """A session of this round closed: keep its lease for the next address."""
        if lease is None:
            return
        if self._spare is not None:
            self.shaper.release(self._spare)
        self._spare = lease

    def close(self) -> None:
        """The round is over: its spare lease goes."""
        if self._spare is not None:
            self.shaper.release(self._spare)
            self._spare = None
