"""Deliver tasks side by side in one process (``delivery.tasks_per_process``, issue #20): the next
task's jobs take the lanes the last task's jobs leave, instead of waiting for its slowest one.

Real Redis (the ``store`` fixture), the deliverer's own code against real SMTP sinks that count
the transactions they hold at once (``Sink.busy_peak``). What must hold:

- the lanes of all the batches of a process stay within ``delivery.sessions_per_process``;
- a job in two batches under way at once (a task queued again by the rescue sweep, say) is sent
  once: the process's claim token is the same for both, so the second batch leaves it;
- one batch's end releases only its own claims, never those of a batch still sending;
- a task returns once at most ``tasks_per_process`` - 1 batches are under way (its own among
  them), its batch reserved meanwhile under a tag the process's beats name (handed back like a
  dead worker's reserved task should the process die: tests/test_dead_worker.py, test_crash.py),
  and the process waits for them before it exits.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings
from pathlib import Path
from typing import Any

import redis

from services.common import liveness, queueing, spool
from services.common.redisserver import EmbeddedRedis
from services.deliver import session
from services.deliver.batch import Deliverer
from services.deliver.tasks import DeliverService
from tests.peers import Sink
from tests.test_batching import queue_jobs, routed, run_batches, write_config
from tests.test_sessions import delivered_once, settled

DOMAIN = "overlap.test"


def stop(service: DeliverService) -> None:
    """What the pool process's exit does (``worker_process_shutdown``), then what its end
    does: the loop stops, the Redis connections close, the rest goes with the process."""
    service.shutdown()
    loop = service._loop
    assert loop is not None

    async def finish() -> None:  # as asyncio.run ends: what is still running is cancelled
        await session.closed()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(finish(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    for thread in threading.enumerate():  # the loop's thread ends: it lets go of the loop
        if thread.name == "tlsrelay-deliver-loop":
            thread.join(10)
    assert not loop.is_running()
    service.deliverer.client.connection_pool.disconnect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        loop.close()
        service._deliverer = service._loop = None
        gc.collect()


def test_batches_side_by_side_share_the_process_s_lanes(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Two batches to two sites (each site's slots would allow three lanes): three lanes in
    all run jobs at once, not three per batch — a process's sessions, and so its open files
    and memory, stay within ``delivery.sessions_per_process``."""
    other = "other.test"
    with Sink("starttls", data_delay=0.2) as sink, Sink("starttls", data_delay=0.2) as sink2:
        routes = {DOMAIN: sink.address_text, other: sink2.address_text}
        config = write_config(
            tmp_path / "c.yaml",
            {"redis_url": valkey.url, "delivery": {"routes": routes, "sessions_per_process": 3}},
        )
        jobs, jobs2 = queue_jobs(store, DOMAIN, 6), queue_jobs(store, other, 6)
        deliverer = Deliverer(config, store)
        step, running, peak = deliverer._step, 0, 0

        async def counted(*args: Any) -> Any:  # observes the lanes' jobs, changes nothing
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                return await step(*args)
            finally:
                running -= 1

        deliverer._step = counted  # type: ignore[method-assign,assignment]
        first, second = run_batches(deliverer, jobs, jobs2)
        assert all(o is not None and len(o.delivered) == 1 for o in first + second)
        delivered_once(sink, jobs)
        delivered_once(sink2, jobs2)
        assert peak == 3, peak
    settled(store, jobs + jobs2)


def test_a_job_in_two_batches_under_way_is_sent_once(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Both batches carry every job; the process's claim is the same token for both, so
    without the process's own record of what each batch took both would send them."""
    with Sink("starttls", data_delay=0.1) as sink:
        config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=4)
        jobs = queue_jobs(store, DOMAIN, 6)
        first, second = run_batches(Deliverer(config, store), jobs, list(reversed(jobs)))
        sent = [o for o in first + second if o is not None]
        assert len(sent) == 6 and all(len(o.delivered) == 1 for o in sent), (first, second)
        delivered_once(sink, jobs)
    settled(store, jobs)


def test_one_batch_s_end_leaves_the_claims_of_a_batch_still_sending(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """A short batch ends while a long one sends: the long one's claims stay held (another
    process could otherwise take its job and send it too)."""
    slow = "r0@overlap.test"
    with Sink("starttls", slow_for=lambda m: 1.0 if slow in m.rcpt_tos else 0.0) as sink:
        config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=4)
        jobs = queue_jobs(store, DOMAIN, 3)
        deliverer = Deliverer(config, store)
        seen: list[set[str]] = []
        short, run = jobs[1:], deliverer.run_batch

        async def looking(docs: Any) -> Any:  # what is held when the short batch ends
            results = await run(docs)
            if docs is short:
                seen.append(deliverer.ledger.claims.held)
            return results

        deliverer.run_batch = looking  # type: ignore[method-assign]
        run_batches(deliverer, jobs[:1], short)
        delivered_once(sink, jobs)
    slow_claim = spool.claim_key(jobs[0]["id"], DOMAIN)
    assert seen == [{slow_claim}], seen  # held still when the short batch ended
    settled(store, jobs)


def test_a_task_returns_while_its_batch_is_under_way_and_the_next_waits_for_it(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    with Sink("starttls", data_delay=0.5) as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=2,
            tasks_per_process=2,
        )  # fmt: skip
        jobs = queue_jobs(store, DOMAIN, 4)
        service = DeliverService(config, valkey.url)
        try:
            service.deliver(jobs[:2])
            # Returned at once: nothing has arrived yet (each final dot is answered after 0.5 s).
            assert sink.messages == [] and len(service._running) == 1
            # Meanwhile the batch is reserved on its own, under a tag this process's beats name:
            # should the process die, it is handed back as a dead worker's reserved task.
            (tag,) = liveness.holding()
            (entry,) = store.hvals(queueing.UNACKED)
            document = queueing.reserved(entry)
            assert document is not None
            assert queueing.task_batch(document) == (queueing.TASK_DELIVER, jobs[:2])
            assert store.zscore(queueing.UNACKED_INDEX, tag) is not None
            service.deliver(jobs[2:])  # returns once the first batch is recorded
            for job in jobs[:2]:
                assert not store.exists(spool.msg_key(job["id"])), job
            assert len(service._running) == 1
            assert store.hget(queueing.UNACKED, tag) is None
        finally:
            stop(service)  # waits for the second batch
        assert not service._running
        assert liveness.holding() == [] and store.hlen(queueing.UNACKED) == 0
        delivered_once(sink, jobs)
        assert sink.busy_peak <= 2, sink.summary()
    settled(store, jobs)


def test_one_task_per_process_returns_once_its_jobs_are_recorded(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    with Sink("starttls", data_delay=0.2) as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=2,
            tasks_per_process=1,
        )  # fmt: skip
        jobs = queue_jobs(store, DOMAIN, 2)
        service = DeliverService(config, valkey.url)
        try:
            service.deliver(jobs)
            assert not service._running and store.hlen(queueing.UNACKED) == 0
            settled(store, jobs)
        finally:
            stop(service)
        delivered_once(sink, jobs)


def test_a_batch_that_gets_no_lane_in_its_start_window_hands_its_jobs_back(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The only lane is taken by a slow batch past the next batch's start window (a tenth of
    delivery.job_timeout): that batch starts nothing — not even its first job — and queues its
    jobs again, so every batch ends within delivery.task_budget of its own start (a warm
    shutdown, and kombu's visibility timeout, count on that)."""
    slow = "r0@overlap.test"
    with Sink("starttls", slow_for=lambda m: 1.5 if slow in m.rcpt_tos else 0.0) as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=1, job_timeout="5s"
        )
        jobs = queue_jobs(store, DOMAIN, 3)
        first, second = run_batches(Deliverer(config, store), jobs[:1], jobs[1:])
        assert first[0] is not None and len(first[0].delivered) == 1
        assert second == [None, None]
        assert [r for m in sink.messages for r in m.rcpt_tos] == [slow]
    (raw,) = store.lrange(queueing.DELIVER_LIST, 0, -1)
    assert queueing.task_batch(raw) == (queueing.TASK_DELIVER, jobs[1:])
