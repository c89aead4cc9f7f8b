"""Tasks side by side in one deliver process (``delivery.tasks_per_process``) when things fail:
a batch whose parking failed keeps its reservation (the reclaim hands it back); a failed
batch's give-up parks only the jobs no other batch of the process sends (parking releases the
process's claim); a job's retry is not dropped because a stale copy of it is in another batch
(the later batch waits for the job, as for another process's claim). Found by a review of the
change, each test failing before its fix."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import queueing, retry, spool
from services.common.redisserver import EmbeddedRedis
from services.deliver.batch import Deliverer
from services.deliver.tasks import DeliverService
from tests.peers import Sink
from tests.test_batching import queue_jobs, routed, run_batches
from tests.test_task_overlap import stop

DOMAIN = "overlap.test"


def where(store: redis.Redis, job: dict[str, Any]) -> list[str]:
    """The places a task can be in (the rescue sweep's view) that still name ``job``."""
    found = []
    member = spool.waiting_job(job["id"], job["domain"])
    for name, raws in (
        ("queue", store.lrange(queueing.DELIVER_LIST, 0, -1)),
        ("reserved", [queueing.reserved(v) for v in store.hvals(queueing.UNACKED)]),
        ("retry", store.zrange(retry.RETRY, 0, -1)),
    ):
        for raw in raws:
            got = queueing.task_batch(raw) if isinstance(raw, str | bytes) else None
            if got and any(spool.waiting_job(d["id"], d["domain"]) == member for d in got[1]):
                found.append(name)
    return found


def test_a_batch_whose_parking_failed_keeps_its_reservation(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task was acknowledged (tasks_per_process 2); its batch raised and parking it failed
    (Redis blipped: retry.failed's Reject). Redis answers again by the time _batch's finally
    runs: the reservation must stay (handed back by the reclaim, as tasks.py says), not go —
    else the jobs are left to the rescue sweep alone (waiting:deliver, and only while the
    deliver queue is shorter than rescue.LIMIT)."""
    config = routed(tmp_path, valkey, DOMAIN, "127.0.0.1:9", tasks_per_process=2)
    jobs = queue_jobs(store, DOMAIN, 2)
    service = DeliverService(config, valkey.url)
    deliverer = service.deliverer

    async def broken(docs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Redis went away")

    def park_fails(*_: Any, **__: Any) -> None:
        raise redis.exceptions.ConnectionError("still away")

    monkeypatch.setattr(deliverer, "run_batch", broken)
    monkeypatch.setattr(retry, "_park", park_fails)
    try:
        service.deliver(jobs)  # returns at once: its task is acknowledged
        rejected = service._running[0].result(10)  # the batch ended, its parking failed
        assert rejected is not None
        for job in jobs:
            assert where(store, job), f"{job['id']}: in no queue, reservation or retry"
    finally:
        stop(service)


def test_a_failed_batch_s_give_up_leaves_the_claim_of_a_batch_still_sending(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Batch A sends J (slowly). Batch B of the same process carries J too (a second copy of
    its task) and K, whose state cannot be read (WRONGTYPE): B fails at its fifth try, and
    retry.CAP's give-up parks its documents — not J: parking it would release J's claim (the
    process's token: A's claim) and delete its in-flight mark while A is in DATA, and another
    process's copy of J would then claim it and send it too."""
    slow = "r0@overlap.test"
    with Sink("starttls", slow_for=lambda m: 2.0 if slow in m.rcpt_tos else 0.0) as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=2,
            tasks_per_process=2,
        )  # fmt: skip
        j, k = queue_jobs(store, DOMAIN, 2)
        store.delete(spool.rcpt_key(k["id"]))
        store.set(spool.rcpt_key(k["id"]), "not a hash")  # B's state read fails: WRONGTYPE
        service = DeliverService(config, valkey.url)
        claim, mark = spool.claim_key(j["id"], DOMAIN), spool.in_flight_key(j["id"], DOMAIN)
        try:
            service.deliver([j])  # A: returns at once, J under way
            (a,) = service._running
            deadline = time.monotonic() + 5
            while not store.exists(mark) and time.monotonic() < deadline:
                time.sleep(0.01)  # A is in DATA (marked, its final dot not answered yet)
            assert store.exists(claim) and store.exists(mark)
            b = threading.Thread(target=service.deliver, args=([j, k], retry.CAP - 1))
            b.start()  # B fails at once; deliver() then waits for A
            deadline = time.monotonic() + 5
            while store.zcard(spool.DEFERRED) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # B gave up: its own document (K) parked as a deferral
            assert store.zcard(spool.DEFERRED) == 1, "K only: J is A's"
            assert not a.done(), "A still waits for the answer to its final dot"
            held, marked = store.exists(claim), store.exists(mark)
            # Another process's copy of J (a rescue or a reclaim) now finds J unclaimed.
            other = Deliverer(config, store)

            async def other_run() -> Any:
                try:
                    return await other.run(j)
                finally:
                    other.pool.close_all()

            outcome = asyncio.run(other_run())
            b.join(10)
        finally:
            stop(service)
        arrived = [r for m in sink.messages for r in m.rcpt_tos]
        assert outcome is None and arrived.count(slow) == 1, (outcome, arrived, held, marked)
        assert held and marked, (held, marked)


def test_a_job_s_retry_is_not_dropped_for_a_stale_copy_another_batch_holds(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """J was deferred by its attempt 1; its retry (attempt 2) is in batch B, and a stale copy of
    attempt 1 (a reclaimed reservation, a rescue) is in batch A of the same process. A takes J
    first and finds nothing to send (deferred by its attempt: "the retry owns those"); B must
    not skip J as A's but wait for A to let it go, then send it — else the retry is gone: J in
    no queue, reservation, retry or deferred set, and nothing sent."""
    with Sink("starttls") as sink:
        config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=4)
        (j,) = queue_jobs(store, DOMAIN, 1)
        (rcpt,) = j["recipients"]
        state = {"state": spool.DEFERRED_STATE, "attempt": 1}
        store.hset(spool.rcpt_key(j["id"]), rcpt, __import__("json").dumps(state))
        retry_copy = {**j, "attempt": 2}
        run_batches(Deliverer(config, store), [j], [retry_copy])
        arrived = [r for m in sink.messages for r in m.rcpt_tos]
    deferred = store.zrange(spool.DEFERRED, 0, -1)
    assert arrived == [rcpt] or deferred or where(store, j), (arrived, deferred)
