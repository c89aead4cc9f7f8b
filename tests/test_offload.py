"""Redis calls off the deliver loop (services/deliver/offload.py, issue #20 item 1: nothing on the
loop blocks on a synchronous Redis call).

The pool itself: a call's result and error come back; a cancellation waits for the call to end,
hands its result to ``orphan`` and propagates (as ``TimeoutError`` out of ``asyncio.timeout``:
a round abandoned after ``delivery.job_timeout``). Then the lanes with Redis at a distance:
behind a proxy that holds every reply 50 ms, the lanes of one process have their Redis requests
in flight together, not one at a time. The pool's size: a thread per lane and one, at most
``offload.THREADS_MAX`` (each thread costs memory for the process's life), and a batch with more
lanes than threads delivers every job. No timed assertions: counts and ordering only.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import spool
from services.common.config import Config
from services.common.redisserver import EmbeddedRedis
from services.deliver import offload, sites
from services.deliver.batch import Deliverer
from services.deliver.delivery import Outcome
from services.deliver.offload import Offload
from services.deliver.shaping import Shaper
from tests.peers import Sink
from tests.test_batching import deliver, queue_jobs, routed

DOMAIN = "far.test"
TURNS = 20  # loop turns given to a cancellation to land (not a wait for a condition)


def blocked_call(started: threading.Event, release: threading.Event, done: list[str]) -> str:
    started.set()
    assert release.wait(10), "the test never released the call"
    done.append("committed")
    return "committed"


def test_a_call_gives_its_result_and_its_error() -> None:
    io = Offload(2)

    def fails() -> None:
        raise redis.exceptions.ConnectionError("Redis went away")

    async def main() -> None:
        assert await io(lambda a, b=0: a + b, 1, b=2) == 3
        with pytest.raises(redis.exceptions.ConnectionError):
            await io(fails)

    asyncio.run(main())
    io.close()


def test_a_cancelled_call_runs_to_its_end_then_the_cancellation_propagates() -> None:
    """A transaction under way when its lane is cancelled commits (or fails) first: the lane
    never goes on as if it had not run, and what it returned goes to ``orphan`` (e.g. a lease
    released, a claim noted)."""
    io = Offload(1)
    started, release = threading.Event(), threading.Event()
    done: list[str] = []
    orphans: list[str] = []

    async def main() -> None:
        task = asyncio.create_task(io(blocked_call, started, release, done, orphan=orphans.append))
        assert await asyncio.to_thread(started.wait, 10)
        task.cancel()
        for _ in range(TURNS):
            await asyncio.sleep(0)
        task.cancel()  # a second cancellation changes nothing
        for _ in range(TURNS):
            await asyncio.sleep(0)
        assert not task.done(), "the cancellation must wait for the call under way"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert done == ["committed"] and orphans == ["committed"]
    io.close()


def test_a_timeout_during_a_call_waits_for_it_and_is_still_a_timeout() -> None:
    """``delivery.job_timeout`` (``asyncio.timeout`` around a round) landing while the in-flight
    mark is being written: the mark is written, then the round is abandoned (TimeoutError),
    never left not knowing whether it was."""
    io = Offload(1)
    started, release = threading.Event(), threading.Event()
    done: list[str] = []
    after: list[str] = []

    async def release_later() -> None:
        await asyncio.to_thread(started.wait, 10)
        for _ in range(TURNS):
            await asyncio.sleep(0)
        release.set()

    async def main() -> None:
        releaser = asyncio.create_task(release_later())
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout_at(loop.time()):  # expires at the first await
                await io(blocked_call, started, release, done)
                after.append("DATA")  # never reached
        assert done == ["committed"], "the call ended before the timeout propagated"
        await releaser

    asyncio.run(main())
    assert after == []
    io.close()


def test_a_lease_taken_for_a_cancelled_round_is_released_not_held(store: redis.Redis) -> None:
    """The lease script ran while its round was abandoned (``delivery.job_timeout``): the lease
    it took has no session, so it is released (gone at the next tick), never renewed forever."""
    shaper = Shaper(Config(), store)
    shaper.io = Offload(1)
    spec = [{"name": "x", "match": ["x.example"], "connections": 2}]
    config = Config.model_validate({"delivery": {"shaping": {"sites": spec}}})
    s = sites.site_of(config, "x.example", [("mx.x.example", 25, "mx")])
    started, release = threading.Event(), threading.Event()
    acquire = shaper._acquire

    def slow_acquire(keys: list[str], args: list[str | float]) -> object:
        started.set()
        assert release.wait(10)
        return acquire(keys=keys, args=args)

    shaper._acquire = slow_acquire  # type: ignore[assignment]

    async def main() -> None:
        task = asyncio.create_task(shaper.take(s))
        assert await asyncio.to_thread(started.wait, 10)
        task.cancel()
        for _ in range(TURNS):
            await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    key = spool.site_key("leases", s.id)
    assert store.zcard(key) == 1, "the script took it"
    assert shaper.held == {}, "never held with no session"
    shaper.tick()
    assert store.zcard(key) == 0, "released at the next tick"
    shaper.io.close()


class RedisAtADistance:
    """A TCP proxy in front of Redis that holds every reply ``rtt`` seconds and counts the
    connections with a request in flight (sent, its reply not yet passed on): ``peak``."""

    def __init__(self, port: int, rtt: float) -> None:
        self.target, self.rtt = port, rtt
        self.port = 0
        self.in_flight = self.peak = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> RedisAtADistance:
        self.thread.start()
        start = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        start.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        waiting = [False]  # this connection has a request in flight
        try:
            await asyncio.gather(
                self._requests(reader, up_writer, waiting),
                self._replies(up_reader, writer, waiting),
            )
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            up_writer.close()
            self.tasks.discard(task)

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, waiting: list[bool]
    ) -> None:
        while data := await reader.read(65536):
            if not waiting[0]:
                waiting[0] = True
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
            up.write(data)
            await up.drain()
        up.write_eof()

    async def _replies(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, waiting: list[bool]
    ) -> None:
        while data := await up.read(65536):
            await asyncio.sleep(self.rtt)  # the reply's way back, held (in order)
            writer.write(data)
            await writer.drain()
            if waiting[0]:
                waiting[0] = False
                self.in_flight -= 1
        writer.write_eof()


@contextmanager
def far_client(redis_port: int, rtt: float) -> Iterator[tuple[redis.Redis, RedisAtADistance]]:
    with RedisAtADistance(redis_port, rtt) as far:
        client = redis.Redis(port=far.port)
        try:
            yield client, far
        finally:
            client.close()


@pytest.mark.parametrize(("mode", "count"), [("threads", 5), ("auto", 120)])
def test_lanes_wait_on_a_distant_redis_together_not_in_turn(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, mode: str, count: int
) -> None:
    """Redis 50 ms away: jobs over five lanes. The lanes' Redis calls (claims, marks, leases,
    recordings) are in flight at once — on the loop, each would stop every lane for a round
    trip, and at most one request (and the claims' keeper thread) would be in flight. ``auto``
    starts inline and sends the calls to the threads once it has measured the distance
    (``FAR_WINDOWS`` windows): more jobs, so that lanes are still running then."""
    lanes = 5
    with Sink("plain") as sink, far_client(valkey.port, 0.05) as (client, far):
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text,
            sessions_per_process=lanes, redis_calls=mode,
        )  # fmt: skip
        jobs = queue_jobs(store, DOMAIN, count)
        outcomes = deliver(config, client, jobs)
        peak = far.peak
    assert all(o is not None and len(o.delivered) == 1 for o in outcomes), outcomes
    assert len(sink.messages) == count
    assert not store.keys(spool.claim_key("*", DOMAIN)), "claims released"
    assert not store.keys(spool.in_flight_key("*", DOMAIN)), "marks cleared with the recordings"
    assert peak >= lanes - 1, f"Redis requests in flight at once: {peak}"


def test_the_pool_has_a_thread_per_lane_and_one_up_to_a_bound(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    assert offload.threads_for(1) == 2
    assert offload.threads_for(5) == 6  # the default lanes: one thread each, and one
    assert offload.threads_for(1000) == offload.THREADS_MAX == 8
    client = spool.connect(valkey.url)  # as a deliver process's
    for lanes, threads in ((5, 6), (1000, offload.THREADS_MAX)):
        config = routed(tmp_path, valkey, DOMAIN, "127.0.0.1:25", sessions_per_process=lanes)
        deliverer = Deliverer(config, client)
        assert deliverer.io.workers == threads
        deliverer.io.close()
    # Each thread holds a connection of the client's pool while it calls, besides the loop's own
    # calls and the claims' keeper: a thread per lane ran out of connections past 99 lanes
    # ("Too many connections": the task failed and ran again, re-sending what it had sent).
    assert client.connection_pool.max_connections > offload.THREADS_MAX + 2
    client.close()


def test_more_calls_than_threads_wait_their_turn_and_all_run() -> None:
    """30 calls at once on a pool of 3 threads: at most 3 run at a time (3 threads seen, and
    every call meets two others at a barrier: the pool runs its threads together), each waits for
    a free thread, and all end."""
    io = Offload(3)
    barrier = threading.Barrier(3, timeout=10)
    seen: set[int] = set()

    def call(n: int) -> int:
        seen.add(threading.get_ident())
        barrier.wait()
        return n

    async def main() -> list[int]:
        return await asyncio.gather(*(io(call, n) for n in range(30)))

    assert asyncio.run(main()) == list(range(30))
    io.close()
    assert len(seen) == 3


def test_a_batch_with_more_lanes_than_threads_delivers_every_job(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """20 lanes, 8 threads (``redis_calls: threads``, as with Redis far away): every lane's
    calls (claims, marks, leases, recordings) get a thread in turn; every job is delivered and
    recorded, its claim and mark gone."""
    lanes = 20
    before = {t.ident for t in threading.enumerate()}
    with Sink("plain") as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text,
            sessions_per_process=lanes, redis_calls="threads",
        )  # fmt: skip
        jobs = queue_jobs(store, DOMAIN, lanes)
        outcomes = deliver(config, store, jobs)
    assert all(o is not None and len(o.delivered) == 1 for o in outcomes), outcomes
    assert len(sink.messages) == lanes
    assert not store.keys(spool.claim_key("*", DOMAIN)), "claims released"
    assert not store.keys(spool.in_flight_key("*", DOMAIN)), "marks cleared with the recordings"
    pool = [t for t in threading.enumerate() if t.name.startswith("tlsrelay-redis")]
    assert 0 < len([t for t in pool if t.ident not in before]) <= offload.THREADS_MAX


def test_malloc_arenas_are_limited_with_glibc() -> None:
    glibc = "CS_GNU_LIBC_VERSION" in os.confstr_names and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    assert offload.limit_arenas() is glibc


def where_calls_run(io: Offload, call: Callable[[], object], count: int) -> list[str]:
    """``count`` calls through ``io``, one after another: for each, "loop" when it ran on the
    event loop's thread, "pool" when in a thread of the pool."""

    def called() -> int:
        call()
        return threading.get_ident()

    async def main() -> list[str]:
        here = threading.get_ident()
        return ["loop" if await io(called) == here else "pool" for _ in range(count)]

    return asyncio.run(main())


def far_call() -> None:
    """What a call to a Redis a millisecond away does on its thread: wait, not compute (the
    round trip stood in for; the decision measures wall time less CPU time)."""
    time.sleep(0.001)


def test_auto_calls_run_inline_while_redis_is_near_and_in_threads_once_far() -> None:
    """``delivery.redis_calls: auto``: calls that wait for nothing beyond their own CPU run on
    the loop (no thread hop); ``FAR_WINDOWS`` windows in a row of calls that all waited 1 ms
    send the next ones to the threads, where one call in ``PROBE_EVERY`` still runs inline to
    measure; a window of probes with a quick one brings them back."""
    io = Offload(2, mode="auto")
    assert where_calls_run(io, lambda: None, 3 * offload.WINDOW) == ["loop"] * 3 * offload.WINDOW
    measured = offload.FAR_WINDOWS * offload.WINDOW  # 1 ms: between NEAR and FAR
    first = where_calls_run(io, far_call, measured)
    assert first == ["loop"] * measured, "measured inline, then decided"
    assert not io.inline
    far = where_calls_run(io, far_call, 2 * offload.PROBE_EVERY)
    assert far.count("loop") == 2 and far[offload.PROBE_EVERY - 1] == "loop", far
    back = where_calls_run(io, lambda: None, offload.WINDOW * offload.PROBE_EVERY)
    assert io.inline and back[-1] == "loop", "quick probes brought the calls back inline"
    probing = (offload.WINDOW - 2) * offload.PROBE_EVERY  # the window had two far probes
    assert back[:probing].count("loop") == offload.WINDOW - 2, "the probes only, till then"
    assert set(back[probing:]) == {"loop"}, "then every call"
    io.close()


def test_auto_sends_the_calls_of_a_distant_redis_to_the_threads(valkey: EmbeddedRedis) -> None:
    """A real Redis 20 ms away (a proxy; past ``FAR``): after one window measured inline, its
    calls run in the pool's threads; the same through ``threads`` from the start; ``inline``
    never."""
    with far_client(valkey.port, 0.02) as (client, _):
        measured = offload.WINDOW  # past FAR: one window decides
        auto = where_calls_run(Offload(2, mode="auto"), client.ping, measured + 4)
        threads = where_calls_run(Offload(2, mode="threads"), client.ping, 3)
        inline = where_calls_run(Offload(2, mode="inline"), client.ping, 3)
    assert auto == ["loop"] * measured + ["pool"] * 4
    assert threads == ["pool"] * 3 and inline == ["loop"] * 3


def test_auto_keeps_the_calls_of_a_redis_on_this_host_inline(store: redis.Redis) -> None:
    """The same Redis without the proxy: its calls stay on the loop. (The least wait of a
    window decides; on a loaded machine a window may still see none quick, so the test asks
    for calls until one window kept them inline, within a bound.)"""
    io = Offload(2, mode="auto")
    for _ in range(50):
        where = where_calls_run(io, store.ping, offload.WINDOW)
        if io.inline and where == ["loop"] * offload.WINDOW:
            break
    else:
        pytest.fail("a Redis on this host never measured as near in 50 windows")
    io.close()


# A process pinned to one CPU at nice 19, that CPU taken by a busy process: each Redis reply then
# waits milliseconds in the run queue for the CPU. Prints where each of ``count`` calls ran.
_ON_A_BUSY_CPU = """
import asyncio, json, os, sys, threading
import redis
from services.deliver.offload import Offload
cpu, port, count = (int(a) for a in sys.argv[1:4])
os.sched_setaffinity(0, {cpu})
os.nice(19)
client = redis.Redis(port=port)
client.ping()
io = Offload(2, mode="auto")
def called():
    client.ping()
    return threading.get_ident()
async def main():
    here = threading.get_ident()
    return ["loop" if await io(called) == here else "pool" for _ in range(count)]
print(json.dumps(asyncio.run(main())))
"""


def calls_on_a_busy_cpu(port: int, count: int) -> list[str]:
    """Where ``count`` calls to the Redis on ``port`` ran ("loop", "pool"), made by a process
    that shares its one CPU with a busy one and yields it to it (nice 19)."""
    cpu = min(os.sched_getaffinity(0))
    busy = (  # dies with its parent (PR_SET_PDEATHSIG, SIGKILL), even a killed one
        f"import ctypes, os\nctypes.CDLL(None).prctl(1, 9)\n"
        f"os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    )
    hog = subprocess.Popen([sys.executable, "-c", busy])
    try:
        ran = subprocess.run(
            [sys.executable, "-c", _ON_A_BUSY_CPU, str(cpu), str(port), str(count)],
            capture_output=True, text=True, timeout=120, check=True,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
    finally:
        hog.kill()
        hog.wait()
    where: list[str] = json.loads(ran.stdout)
    return where


def test_auto_sends_a_distant_redis_to_the_threads_from_a_busy_cpu(valkey: EmbeddedRedis) -> None:
    """A Redis 20 ms away, called from a CPU another process keeps busy (the caller at nice
    19): every call waits its round trip, and for the CPU after it. Its calls go to the threads
    after the window that measured them (or at once, should one call have waited ``STALL``).
    (Taking the caller's run-queue time off the wait, as schedstat counts it, measured this
    Redis as near: with the scheduler's delayed dequeue the time a thread sleeps can be counted
    as time in the run queue.)"""
    with RedisAtADistance(valkey.port, 0.02) as far:
        distant = calls_on_a_busy_cpu(far.port, offload.WINDOW + 4)
    after = distant[offload.WINDOW :]  # in the threads; at most one a probe (PROBE_EVERY)
    assert after.count("pool") >= len(after) - 1, distant


def test_auto_one_window_without_a_quick_call_keeps_the_calls_inline() -> None:
    """A loaded machine: now and then a whole window of calls to a near Redis waits (for a
    core). Fewer than ``FAR_WINDOWS`` such windows in a row keep the calls inline; that many
    send them to the threads."""
    io = Offload(2, mode="auto")
    for _ in range(3):
        where = where_calls_run(io, far_call, (offload.FAR_WINDOWS - 1) * offload.WINDOW)
        where += where_calls_run(io, lambda: None, offload.WINDOW)
        assert where == ["loop"] * len(where) and io.inline
    assert where_calls_run(io, far_call, offload.FAR_WINDOWS * offload.WINDOW + 2)[-2:] == [
        "pool",
        "pool",
    ]
    io.close()


def stall_marks(deliverer: Deliverer, stall: float) -> None:
    """The in-flight marks' write (the SETs of one turn, in one pipeline) takes ``stall``
    seconds: Redis stalled for that call (inline, the loop waits it out with it)."""
    real = deliverer.ledger._mark_all

    def stalled(marks: list[tuple[str, str]]) -> list[Any]:
        time.sleep(stall)
        return real(marks)

    deliverer.ledger._mark_all = stalled  # type: ignore[method-assign]


@pytest.mark.parametrize("extensions", [("CHUNKING",), ()], ids=["BDAT", "DATA"])
@pytest.mark.parametrize("mode", ["threads", "inline"])
def test_a_job_timeout_that_falls_while_the_mark_is_written_abandons_the_round_unsent(
    mode: str,
    extensions: tuple[str, ...],
    tmp_path: Path,
    valkey: EmbeddedRedis,
    store: redis.Redis,
) -> None:
    """``delivery.job_timeout`` passes while the in-flight mark is being written (Redis slow
    for that call): the mark is written, then the round is abandoned with nothing sent — in
    the threads (the cancellation waits for the call) and inline alike. Inline, the loop is
    blocked in the call, so the timeout cannot land there: the message went out at once after
    it, past the deadline, and the round was abandoned with the message sent — deferred, and
    sent again at the retry (review finding)."""
    with Sink("plain", extensions=extensions) as sink:
        config = routed(tmp_path, valkey, DOMAIN, sink.address_text, redis_calls=mode,
                        job_timeout=1.0)  # fmt: skip
        jobs = queue_jobs(store, DOMAIN, 1)
        deliverer = Deliverer(config, store)
        stall_marks(deliverer, 1.5)

        async def run() -> list[Outcome | None]:
            try:
                return list(await deliverer.run_batch(jobs))
            finally:
                deliverer.pool.close_all()

        (outcome,) = asyncio.run(run())
        sink.wait_for(lambda: sink.closed_connections >= sink.connections, what="sessions over")
        assert sink.bdat_commands == 0 and not sink.messages  # (DATA went in a group: no 354)
    assert outcome is not None and not outcome.delivered and outcome.deferred


def test_auto_one_call_that_hangs_sends_the_next_ones_to_the_threads_at_once() -> None:
    """A call that hangs on the loop (a connection to a master that failed over and no longer
    answers, held until the socket timeout; Redis stalled) sends the next calls to the threads
    at once — not after a window of 32 in which every quick answer (a new connection to the new
    master, the replica's READONLY) keeps the least wait low and each dead connection of the
    pool holds the whole loop, lease renewals and every lane's session, for its timeout again
    (review finding: auto stayed inline through a Sentinel switch)."""
    io = Offload(2, mode="auto")
    assert where_calls_run(io, lambda: None, 4) == ["loop"] * 4
    assert where_calls_run(io, lambda: time.sleep(0.3), 1) == ["loop"], "measured inline"
    assert not io.inline
    assert where_calls_run(io, lambda: None, 3) == ["pool"] * 3
    io.close()


def test_auto_one_window_past_far_decides_alone() -> None:
    """A window whose least wait is past ``FAR`` (no machine's load made it) sends the calls
    to the threads at once: a Redis that far holds the loop for each of its inline calls."""
    io = Offload(2, mode="auto")
    where = where_calls_run(io, lambda: time.sleep(3 * offload.FAR / 2), offload.WINDOW + 2)
    assert where == ["loop"] * offload.WINDOW + ["pool"] * 2
    io.close()


def test_auto_runs_a_slow_call_in_the_threads_even_while_redis_is_near() -> None:
    """A ``slow`` call (the in-flight marks' ``WAIT`` for replicas with ``redis_min_replicas``,
    which may wait ``redis_replica_timeout`` on purpose) never runs inline: it would hold every
    lane of the process. Nor is it measured: the calls after it stay inline."""
    io = Offload(2, mode="auto")
    here = threading.get_ident()

    async def main() -> list[str]:
        runs = [await io(threading.get_ident, slow=slow) for slow in (False, True, False)]
        return ["loop" if ident == here else "pool" for ident in runs]

    assert asyncio.run(main()) == ["loop", "pool", "loop"]
    assert io.inline
    io.close()


def test_inline_still_runs_a_slow_call_in_a_thread() -> None:
    """``redis_calls: inline`` in a deliver process (workers > 0): the ``slow`` calls (the
    marks' ``WAIT``) run in threads of their own all the same, the others on the loop; with no
    workers at all (:data:`offload.INLINE`, tools and tests) everything stays on the loop."""
    io = Offload(2, mode="inline")
    here = threading.get_ident()

    async def main(io: Offload) -> list[str]:
        runs = [await io(threading.get_ident, slow=slow) for slow in (False, True, False)]
        return ["loop" if ident == here else "pool" for ident in runs]

    assert asyncio.run(main(io)) == ["loop", "pool", "loop"]
    io.close()
    assert asyncio.run(main(Offload(0))) == ["loop", "loop", "loop"]


def test_a_slow_call_never_holds_a_thread_of_the_pool() -> None:
    """``threads`` mode: while slow calls (WAITs for a stalled replica) wait, a plain call (a
    claim, a record, the shaper's lease renewal) still finds a thread of the pool at once."""
    io = Offload(1, mode="threads")
    release = threading.Event()

    async def main() -> tuple[str, bool]:
        slow = [asyncio.ensure_future(io(release.wait, 10, slow=True)) for _ in range(3)]
        await asyncio.sleep(0)  # the slow calls are submitted first
        plain = await asyncio.wait_for(io(threading.current_thread), 5)  # not behind them
        release.set()
        done = await asyncio.gather(*slow)
        return plain.name, all(done)

    name, waited = asyncio.run(main())
    assert not name.endswith(tuple(f"-slow_{i}" for i in range(3))) and "slow" not in name
    assert waited
    io.close()
