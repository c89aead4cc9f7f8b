"""Redis calls of a deliver process, made off its event loop (issue #20: nothing on the loop
blocks on a synchronous Redis call).

A deliver process runs its lanes (services/deliver/batch.py) on one event loop. redis-py's
client is synchronous: a call made on the loop stops every lane of the process for a round trip
to Redis — nothing on loopback, 0.5–2 ms in a cluster, for each of the dozens of calls a message
takes. :class:`Offload` runs such a call in a small thread pool of its own, so that the loop goes
on while it waits. redis-py's client and connection pool are thread-safe; a pipeline or
transaction holds one connection of its own for its whole life, in the thread that runs it.

Its size (:func:`threads_for`): one thread per lane and one for the shaper's tick and the
batch's reads, but never more than :data:`THREADS_MAX`. The calls are short (a round trip or
two, none blocks on another) and the lanes spend most of their time on their SMTP sessions, so a
few threads keep every lane's calls moving; a call made while all are busy waits its turn in the
pool's queue (first come, first served). Each thread costs memory for its life: its stack's
touched pages, its Redis connection and its parser's buffers, and — with glibc — a malloc arena
of its own that keeps what was freed in it. With a thread per lane, 1 000 lanes started up to a
few hundred threads and cost 20–30 MB (bench/README.md, "Session 6"). :func:`limit_arenas`
makes a process's threads share glibc's arenas.

What runs in a thread is the Redis I/O and what depends on its reply only; state owned by the
loop (the ledger's premarks, the shaper's leases) is read before the call and changed after it,
on the loop, by the caller.

A call is never abandoned half-way: once started it runs to its end in its thread. A
cancellation that lands while it runs (``delivery.job_timeout``'s ``asyncio.timeout``) waits for
it to end, hands its result to ``orphan`` (on the loop: e.g. a lease taken for a round that will
not use it is released), then propagates. So a transaction that committed is never taken for one
that did not, and nothing a call wrote is left unaccounted for.

Still on the loop, being rare or cached: the suspensions' read (once a second at most), a
back-off step (after a matching reply), the "TLS broken" memory (one EXISTS per peer and batch,
a SET after a failed handshake), the MTA-STS policy cache (MX-routed mail), the site's line
(only while one stands) and, to a peer without PIPELINING, the in-flight mark when the premark
missed (nothing may yield between the last RCPT reply and DATA: services/deliver/attempt.py).
With ``redis_min_replicas`` > 0 the marks' ``WAIT`` for replicas (services/deliver/ledger.py) is
``slow``: in threads of their own (made at the first such call, in every ``redis_calls``
mode; only :data:`INLINE`, with no threads at all, runs it on the loop) — not the pool's, where
it would hold a thread the claims, records and lease renewals wait for —
as it may wait up to ``redis_replica_timeout``; to a peer without PIPELINING that mark is
written and awaited before MAIL, so the mark on the loop is not needed there.

Inline when Redis is near (``delivery.redis_calls``, :class:`Offload`'s ``mode``): a thread hop
(submit, the thread's wake-up, the result handed back to the loop) costs 50–130 µs of CPU on a
small machine, more than a round trip to a Redis on the same host waits. ``auto`` (the default)
measures what a call waits for beyond its own CPU (wall time minus the calling thread's CPU
time): while the least of a window of such waits stays below :data:`NEAR` the calls run inline on
the loop (each one measured); once the least wait of :data:`FAR_WINDOWS` windows in a row is
above it (Redis in another host, behind a proxy, or stalled) — or of one window above :data:`FAR`
(no machine's load made that) — they go to the threads, where every :data:`PROBE_EVERY`-th call
still runs inline to look again (one quick probe in a window of them brings them back). The
least wait of a window is the distance, not the machine's load: one quick answer is enough to
show Redis is near, and a round trip far away is never quick. An inline call blocks the loop for
its round trip: a far Redis does so for the calls that measure it (a window, or up to
``FAR_WINDOWS`` windows for one between NEAR and FAR away: at 1 ms, 0.1 s in all), then for at
most one probe in :data:`PROBE_EVERY`. A Redis that stops answering holds an inline call for
the client's socket timeout (its error then fails the task, which runs again): the loop's other
lanes wait too, as they would, having nothing to record their rounds in — once: a call that
waited :data:`STALL` sends the next ones to the threads at once (a pool's other dead connections
after a failover would hold the loop again each), and the probes bring them back.

A cancellation cannot land during an inline call: a deadline (``delivery.job_timeout``) that
passes meanwhile lands at the caller's next await, after the call returned its result to it (so
no ``orphan``: the caller has the result). Where that matters — the in-flight mark, after which
the message goes out without an await — the caller looks at the deadline itself
(services/deliver/sending.py: the round is abandoned unsent, as in the threads).

Failure: the call's exception propagates unchanged to the awaiting coroutine (a Redis error: the
task runs again).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final, Generic, Literal, TypeVar

T = TypeVar("T")
Item = TypeVar("Item")
Mode = Literal["auto", "threads", "inline"]

# A least wait below NEAR is a Redis on this host, or as near (a round trip across a zone is
# more). On a machine whose CPUs are saturated a call to a Redis on this host waits milliseconds
# too, for a core (measured: a median of 6 ms, a tenth under 0.5 ms), so the least of a window of
# WINDOW calls decides, not any one of them; and on such a machine one window in thirty still saw
# no quick call, in bursts: with one window deciding, a loaded benchmark sent a third of its calls
# to the threads (bench/README.md, "Session 7"). So FAR_WINDOWS windows in a row must be far.
# (The time the caller waited in the run queue, Linux's schedstat, cannot be taken off: with the
# scheduler's delayed dequeue it also counts time the thread slept — a Redis 20 ms away then
# measured as near.)
NEAR = 500e-6  # s
WINDOW = 32  # measured calls per decision
FAR_WINDOWS = 3  # windows in a row whose least wait is above NEAR: the calls go to the threads
# A window whose least wait is above FAR decides alone: the saturated benchmark's far windows
# stayed under 1.4 ms, and a Redis that far holds the loop for each of its inline calls.
FAR = 2e-3  # s
PROBE_EVERY = 16  # in the threads, one call in this many runs inline, measured
# One inline call that waited this long sends the calls to the threads at once, whatever the
# window: a connection that hangs (a master that failed over, a stalled Redis) held the whole
# loop for it, and the pool's next dead connection would again, while the least of the window
# stays low on the quick answers in between. The probes bring the calls back inline.
STALL = 0.25  # s

log = logging.getLogger(__name__)

THREADS_MAX: Final = 8  # threads of a deliver process's pool, whatever its lanes
ARENAS_MAX: Final = 2  # glibc malloc arenas of a deliver process (its default: 8 per core)
M_ARENA_MAX: Final = -8  # glibc's mallopt parameter (malloc.h)


def threads_for(lanes: int) -> int:
    """The pool's threads for a process of ``lanes`` lanes: one per lane and one, at most
    :data:`THREADS_MAX`."""
    return min(lanes + 1, THREADS_MAX)


def limit_arenas() -> bool:
    """With glibc: at most :data:`ARENAS_MAX` malloc arenas in this process, for the threads
    started from now on. glibc gives each new thread an arena of its own, up to 8 per core; an
    arena keeps the memory freed in it, so every thread that once read a large Redis reply or ran
    TLS handshakes keeps its own share of free memory. Whether it was set (False: not glibc, or
    refused; nothing changes). Call it before the process starts its threads (after a fork)."""
    try:
        if "CS_GNU_LIBC_VERSION" not in os.confstr_names or not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(None)
        done = bool(libc.mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(ARENAS_MAX)))
    except (OSError, ValueError, AttributeError) as exc:
        log.debug("malloc arenas not limited: %s", exc)
        return False
    return done


class Offload:
    """A deliver process's thread pool for Redis calls (``workers``: its threads; 0: calls run
    inline on the loop, as in tools and tests that use one object alone). ``mode``: ``threads``
    always, ``inline`` never (no pool), ``auto`` inline while Redis is near (module docstring;
    it starts inline, and decides after each :data:`WINDOW` calls)."""

    def __init__(self, workers: int, name: str = "tlsrelay-redis", mode: Mode = "threads") -> None:
        use_pool = workers > 0 and mode != "inline"
        self.workers = workers if use_pool else 0  # the pool's threads, at most
        self._pool = ThreadPoolExecutor(workers, name) if use_pool else None
        self._auto = use_pool and mode == "auto"
        # In a deliver process (workers > 0) the ``slow`` calls (a WAIT for replicas) go to
        # threads of their own, made at the first one, whatever the mode: on the loop such a
        # call would hold every lane for up to redis_replica_timeout, and in the pool it would
        # hold a thread the claims, records and the shaper's lease renewals wait for.
        self._slow_workers = workers if workers > 0 else 0
        self._slow_pool: ThreadPoolExecutor | None = None
        self._name = name
        self.inline = not use_pool or self._auto  # where the next call runs
        self._least = math.inf  # the least wait of the window so far
        self._measured = 0  # calls measured in this window
        self._far = 0  # windows in a row (inline) whose least wait was above NEAR
        self._calls = 0  # calls since the last probe (in the threads)

    async def __call__(
        self,
        fn: Callable[..., T],
        *args: Any,
        orphan: Callable[[T], object] | None = None,
        slow: bool = False,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)`` in a thread of the pool; its result, or its exception. A
        cancellation waits for the call to end, gives its result to ``orphan`` (if any; not on
        an error), then propagates. ``slow``: a call that may wait on purpose (a ``WAIT`` for
        replicas, up to ``redis_replica_timeout``): in threads of its own unless ``workers``
        is 0, never inline nor measured (its wait says nothing of
        Redis's distance, and it would hold the loop)."""
        call = functools.partial(fn, *args, **kwargs)
        pool = self._pool
        if slow and self._slow_workers:
            pool = self._slow_threads()
        elif pool is None:
            return call()
        elif self._auto and self._probe():
            return self._measure(call)
        future: Future[T] = pool.submit(call)
        waiting = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(waiting)
        except asyncio.CancelledError:
            await _settled(waiting)
            if orphan is not None and not future.exception():
                orphan(future.result())
            raise

    def _slow_threads(self) -> ThreadPoolExecutor:
        """The threads of the ``slow`` calls, made at the first one."""
        if self._slow_pool is None:
            self._slow_pool = ThreadPoolExecutor(self._slow_workers, f"{self._name}-slow")
        return self._slow_pool

    def _probe(self) -> bool:
        """In ``auto``: whether this call runs inline (all of them while Redis is near; one in
        :data:`PROBE_EVERY` otherwise)."""
        if self.inline:
            return True
        self._calls += 1
        if self._calls < PROBE_EVERY:
            return False
        self._calls = 0
        return True

    def _measure(self, call: Callable[[], T]) -> T:
        """``call()`` inline, its wait (wall time less this thread's CPU time) counted towards
        the window's decision — an error's too: a Redis that timed out was not near."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return call()
        finally:
            waited = (time.perf_counter() - wall) - (time.thread_time() - cpu)
            self._least = min(self._least, waited)
            self._measured += 1
            if waited >= STALL:  # it held the loop: the threads now, not after the window
                self.inline, self._far = False, 0
                self._least, self._measured, self._calls = math.inf, 0, 0
            elif self._measured >= WINDOW:
                near = self._least < NEAR
                self._far = 0 if near or not self.inline else self._far + 1
                if near:
                    self.inline = True  # from the threads too: one quick probe in a window
                elif self.inline and (self._far >= FAR_WINDOWS or self._least >= FAR):
                    self.inline, self._far = False, 0
                self._least, self._measured, self._calls = math.inf, 0, 0

    def close(self) -> None:
        """No more calls; those under way end in their threads. (A deliver process does not
        close its pool: its idle threads end with it, and a lane still running at shutdown
        keeps its calls.)"""
        for pool in (self._pool, self._slow_pool):
            if pool is not None:
                pool.shutdown(wait=False)


INLINE = Offload(0)  # for objects used without a deliver loop's pool


class Gathered(Generic[Item, T]):
    """The calls made in one turn of the loop, made together: ``run(items)`` — one Redis round
    trip for all of them (a pipeline or a transaction) — in ``io``, at the loop's next turn. A
    deliver process's lanes claim, mark and record this way (services/deliver/ledger.py).

    ``run`` returns one result per item, in order: its value, or the exception of its own
    command (the others' results stand). An exception of ``run`` itself (Redis unreachable)
    goes to every caller of the group. A caller cancelled once its call is made — it is made
    all the same, even when the cancellation lands before its group was sent — waits for the
    group, hands its own result to ``orphan`` (as :class:`Offload` does), then propagates."""

    def __init__(
        self, run: Callable[[list[Item]], list[T | Exception]], slow: bool = False
    ) -> None:
        self._run = run
        self.slow = slow  # run may wait on purpose (Offload's ``slow``): never inline
        self._due: list[tuple[Item, asyncio.Future[T]]] = []
        self._flushing: set[asyncio.Task[None]] = set()  # held: a task only weakly referenced
        self._next: asyncio.Task[None] | None = None  # the group's, until it takes the calls
        self.groups = 0  # round trips made (for tests and benchmarks)

    async def __call__(
        self, io: Offload, item: Item, orphan: Callable[[T], object] | None = None
    ) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._next is not None and self._next.get_loop() is not loop:
            # An earlier loop's group (tests run several loops; one may close with its group
            # still scheduled): it never runs, and its callers went with their loop.
            self._due = [due for due in self._due if due[1].get_loop() is loop]
            self._next = None
        self._due.append((item, future))
        if self._next is None or self._next.done():  # the first of this turn: the group goes
            self._next = loop.create_task(self._flush(io))  # at the loop's next turn
            self._flushing.add(self._next)
            self._next.add_done_callback(self._flushing.discard)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:  # the call is made all the same (a round's recording
            await _settled(future)  # must never be dropped): waited for, handed on
            if orphan is not None and not future.cancelled() and future.exception() is None:
                orphan(future.result())
            raise

    async def _flush(self, io: Offload) -> None:
        group, self._due, self._next = self._due, [], None
        self.groups += 1
        try:
            results = await io(self._run, [item for item, _ in group], slow=self.slow)
            if len(results) != len(group):
                raise RuntimeError(f"{len(results)} results for {len(group)} calls")
        except Exception as exc:
            for _, future in group:
                future.set_exception(exc)
            return
        except BaseException:  # the loop ends: so do its callers
            for _, future in group:
                future.cancel()
            raise
        for (_, future), result in zip(group, results, strict=True):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


async def _settled(waiting: asyncio.Future[Any]) -> None:
    """Until ``waiting`` is done, whatever further cancellations land meanwhile (they are
    part of the one already propagating)."""
    while not waiting.done():
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            continue
        except BaseException:  # the call's own error: done
            return
