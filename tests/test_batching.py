"""Batching (issue #8): ingest's group commit, policy tasks that classify several messages, and
deliver tasks that send several jobs to one destination — against a real Redis, real sockets and,
end to end, the real worker processes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import yaml

from services.common import commit, queueing, spool
from services.common.config import Config, load_config
from services.common.model import Decision, Envelope, TlsMode, new_message_id
from services.common.redisserver import EmbeddedRedis, free_port
from services.deliver import scheduler
from services.deliver.batch import Deliverer
from tests.peers import Sink
from tests.world import World, make_world, message, wait_until

BODY = b"Subject: batch\r\n\r\nHello.\r\n"


def deferred_members(client: redis.Redis) -> list[bytes]:
    """The deferred set's members (JSON job documents), lowest score first."""
    return cast(list[bytes], client.zrange(spool.DEFERRED, 0, -1))


def tasks(client: redis.Redis, queue: str) -> list[list[Any]]:
    """The batches carried by the queued tasks of ``queue``, oldest first."""
    found = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        (batch,), _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        found.append(batch)
    return found


def envelope(*recipients: str) -> Envelope:
    return Envelope(new_message_id(), "s@origin.test", recipients, received_at=time.time())


async def commit_all(url: str, envelopes: list[Envelope], window: float, max_batch: int) -> None:
    client = spool.connect_async(url)
    try:
        committer = commit.Committer(client, spool.TRACE_TTL, window, max_batch)
        await asyncio.gather(*(committer.accept(e, BODY) for e in envelopes))
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- group commit


def test_messages_accepted_together_share_one_transaction_and_one_policy_task(
    valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    envelopes = [envelope(f"r{i}@dest.test") for i in range(10)]
    asyncio.run(commit_all(valkey.url, envelopes, window=0.05, max_batch=100))
    assert tasks(store, queueing.POLICY_LIST) == [[e.id for e in envelopes]]
    for e in envelopes:
        assert store.hget(spool.msg_key(e.id), "body") == BODY
    assert store.zcard(spool.WAITING_POLICY) == 10


def test_a_commit_holds_at_most_batch_max_messages(
    valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    envelopes = [envelope(f"r{i}@dest.test") for i in range(10)]
    asyncio.run(commit_all(valkey.url, envelopes, window=0.05, max_batch=4))
    batches = tasks(store, queueing.POLICY_LIST)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == sorted(e.id for e in envelopes)


def test_a_failed_commit_fails_every_message_of_its_batch(tmp_path: Path) -> None:
    """Redis gone: every waiting session hears the error (→ 451), none waits forever."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    envelopes = [envelope("r@dest.test") for _ in range(3)]

    async def run() -> list[Any]:
        client = spool.connect_async(url)
        committer = commit.Committer(client, spool.TRACE_TTL, 0.01, 100)
        try:
            return await asyncio.gather(
                *(committer.accept(e, BODY) for e in envelopes), return_exceptions=True
            )
        finally:
            await client.aclose()

    results = asyncio.run(run())
    assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results


def test_a_batch_waits_for_company_only_when_company_is_coming(
    valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The window is spent only while messages come faster than one per window and more
    sessions may join: a lone sender (its session is the batch's only one) or a trickle is
    written at once."""

    async def linger_after_two(sessions: int) -> float:
        client = spool.connect_async(valkey.url)
        try:
            committer = commit.Committer(client, spool.TRACE_TTL, 0.5, 100, lambda: sessions)
            for _ in range(2):  # two quick commits: the average gap is well under the window
                await committer.accept(envelope("r@dest.test"), BODY)
            third = asyncio.ensure_future(committer.accept(envelope("r@dest.test"), BODY))
            await asyncio.sleep(0)  # let it open its batch
            timer = committer._timer  # None: written at once (every session is in the batch)
            linger = timer.when() - asyncio.get_running_loop().time() if timer else 0.0
            await third
            return linger
        finally:
            await client.aclose()

    assert asyncio.run(linger_after_two(sessions=5)) > 0.25
    assert asyncio.run(linger_after_two(sessions=1)) <= 0.0
    assert len(tasks(store, queueing.POLICY_LIST)) == 6


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait on the loop until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def policy_tasks_when(store: redis.Redis, count: int) -> list[list[Any]]:
    """The policy tasks queued, once there are ``count`` of them (a deadline, not a sleep)."""
    wait_until(lambda: len(tasks(store, queueing.POLICY_LIST)) >= count, 10, "policy tasks")
    return tasks(store, queueing.POLICY_LIST)


def test_under_load_a_policy_task_gathers_consecutive_commits(
    valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Each Celery task costs the same whatever it carries: while messages come fast, commits
    leave their task to the next until the waiting messages make a full deliver task
    (task_max), and a timer sends the rest after task_window. A first message, with no load
    yet, gets its task in its own commit."""
    envelopes = [envelope(f"r{i}@dest.test") for i in range(12)]

    async def run() -> None:
        client = spool.connect_async(valkey.url)
        try:
            committer = commit.Committer(
                client, spool.TRACE_TTL, 0.5, 100, lambda: 1, task_window=0.3, task_max=10
            )
            for e in envelopes:  # one session: each commit is written at once, the next soon
                await committer.accept(e, BODY)
            assert committer._untasked == [envelopes[-1].id]  # the timer's
            await until(lambda: not committer._untasked and not committer._writes)  # 0.3 s
        finally:
            await client.aclose()

    asyncio.run(run())
    ids = [e.id for e in envelopes]
    assert policy_tasks_when(store, 3) == [ids[:1], ids[1:11], ids[11:]]
    assert all(store.hget(spool.msg_key(i), "body") == BODY for i in ids)


async def a_failed_push(client: Any, store: redis.Redis, waiting: Envelope) -> commit.Committer:
    """A committer under load whose timer's push of ``waiting``'s task failed (the queue's key
    has the wrong type): ``waiting`` stored, its id put back, the key still wrong."""
    committer = commit.Committer(
        client, spool.TRACE_TTL, 0.5, 100, lambda: 1, task_window=0.05, task_max=10
    )
    await committer.accept(envelope("r@dest.test"), BODY)  # no load yet: its own task
    store.delete(queueing.POLICY_LIST)
    store.set(queueing.POLICY_LIST, "not a list")
    await committer.accept(waiting, BODY)  # loaded: waits for a task (the timer, 50 ms)
    await until(lambda: committer._retry > 0 and not committer._writes)  # its push failed
    assert committer._untasked == [waiting.id]
    return committer


def test_messages_whose_policy_task_failed_go_with_the_next_commit(
    valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The timer's push fails (here: the queue's key has the wrong type): its messages, stored
    and answered 250, go with the next commit's task when one comes before the retry (1 s)."""
    second, third = envelope("r@dest.test"), envelope("r@dest.test")

    async def run() -> None:
        client = spool.connect_async(valkey.url)
        try:
            committer = await a_failed_push(client, store, second)
            assert committer._task_timer is not None  # the retry's, a second away
            store.delete(queueing.POLICY_LIST)
            committer._untasked_since -= 1  # the waiting message is older than task_window
            await committer.accept(third, BODY)
            assert committer._untasked == []
        finally:
            await client.aclose()

    asyncio.run(run())
    assert tasks(store, queueing.POLICY_LIST) == [[second.id, third.id]]


def test_a_failed_push_is_sent_again_without_waiting_for_a_commit(
    valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The timer's push fails while Redis is briefly unavailable (here: the queue's key has the
    wrong type) and then no commit comes (the burst is over): the stored, 250-answered message
    must not wait for the rescue sweep (a minute and a half or more): its task goes out again,
    after a back-off, without a new commit."""
    second = envelope("r@dest.test")

    async def run() -> None:
        client = spool.connect_async(valkey.url)
        try:
            committer = await a_failed_push(client, store, second)
            store.delete(queueing.POLICY_LIST)  # Redis is fine again; no commit comes
            await until(lambda: not committer._untasked and not committer._writes, timeout=5)
        finally:
            await client.aclose()

    asyncio.run(run())
    assert tasks(store, queueing.POLICY_LIST) == [[second.id]]


def test_closing_sends_the_task_of_what_was_stored(
    valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Shutdown does not wait for the timer, nor leave the messages to the rescue sweep."""
    envelopes = [envelope("r@dest.test") for _ in range(3)]

    async def run() -> None:
        client = spool.connect_async(valkey.url)
        try:
            committer = commit.Committer(
                client, spool.TRACE_TTL, 0.5, 100, lambda: 1, task_window=30, task_max=10
            )
            for e in envelopes:
                await committer.accept(e, BODY)
            await committer.close()
            assert committer._task_timer is None
        finally:
            await client.aclose()

    asyncio.run(run())
    ids = [e.id for e in envelopes]
    assert tasks(store, queueing.POLICY_LIST) == [ids[:1], ids[1:]]


# --------------------------------------------------------------------------- deliver batches


def write_config(path: Path, settings: dict[str, Any]) -> Config:
    path.write_text(yaml.safe_dump(settings))
    return load_config(path)


def routed(
    tmp_path: Path, valkey: EmbeddedRedis, domain: str, address: str, **delivery: Any
) -> Config:
    """A configuration whose mail for ``domain`` goes to ``address`` (``delivery``: more
    ``delivery`` settings)."""
    settings = {"redis_url": valkey.url, "delivery": {"routes": {domain: address}, **delivery}}
    return write_config(tmp_path / "c.yaml", settings)


def queue_jobs(client: redis.Redis, domain: str, count: int) -> list[dict[str, Any]]:
    """``count`` stored messages to ``domain``, classified opportunistic: their jobs."""
    jobs = []
    for i in range(count):
        e = envelope(f"r{i}@{domain}")
        with client.pipeline(transaction=True) as pipe:
            spool.stage_message(pipe, e, BODY, spool.TRACE_TTL)
            pipe.execute()
        decision = Decision(domain=domain, tls=TlsMode.OPPORTUNISTIC)
        jobs.append(
            {"id": e.id, "domain": domain, "recipients": [f"r{i}@{domain}"],
             "decision": decision.to_json(), "attempt": 1}
        )  # fmt: skip
    return jobs


def queue_old_job(
    client: redis.Redis, domain: str, age: float, local: str = "r", attempt: int = 1
) -> dict[str, Any]:
    """A message to ``local@domain`` stored as accepted ``age`` seconds ago, classified
    opportunistic: its job (at ``attempt``)."""
    old = Envelope(
        new_message_id(), "s@origin.test", (f"{local}@{domain}",), received_at=time.time() - age
    )
    with client.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, old, BODY, spool.TRACE_TTL)
        pipe.execute()
    decision = Decision(domain=domain, tls=TlsMode.OPPORTUNISTIC)
    return {"id": old.id, "domain": domain, "recipients": [f"{local}@{domain}"],
            "decision": decision.to_json(), "attempt": attempt}  # fmt: skip


def deliver(config: Config, client: redis.Redis, jobs: list[dict[str, Any]]) -> list[Any]:
    """Run one deliver task's batch in this process, then close the sessions it parked."""
    return run_batches(Deliverer(config, client), jobs)[0]


def run_batches(deliverer: Deliverer, *batches: list[dict[str, Any]]) -> list[list[Any]]:
    """Run ``batches`` at once on one loop (one, or several side by side as a process with
    several tasks under way), then close the sessions they parked."""
    return run_quietly(deliverer, *(deliverer.run_batch(b) for b in batches))


def run_quietly(deliverer: Deliverer, *runs: Awaitable[Any]) -> list[Any]:
    """Run ``runs`` at once on one loop, then close the sessions ``deliverer`` parked."""

    async def run() -> list[Any]:
        try:
            return list(await asyncio.gather(*runs))
        finally:
            deliverer.pool.close_all()

    try:
        return asyncio.run(run())
    finally:
        # A worker's loop lives as long as the process, so a closed TLS session finishes its
        # shutdown there; this loop is gone first, leaving the socket below it to the collector.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def test_a_batch_rides_one_connection_and_is_recorded_job_by_job(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink
) -> None:
    """One lane (sessions_per_process 1): its jobs one after another over one session."""
    config = routed(tmp_path, valkey, "batch.test", sink.address_text, sessions_per_process=1)
    jobs = queue_jobs(store, "batch.test", 8)
    outcomes = deliver(config, store, jobs)
    assert all(o is not None and len(o.delivered) == 1 for o in outcomes)
    assert len(sink.messages) == 8 and sink.tls_handshakes_ok == 1, sink.summary()
    for job in jobs:  # each message final and gone, its trace complete
        assert not store.exists(spool.msg_key(job["id"]))
        kinds = [e["event"] for e in spool.read_trace(store, job["id"])]
        assert kinds[-3:] == ["attempt", "delivered", "completed"], kinds
    assert store.zcard(spool.WAITING_DELIVER) == 0
    # Each job's in-flight mark rode in the previous job's transaction and was cleared by its
    # own: none is left to claim an interruption later.
    assert store.keys(spool.in_flight_key("*", "*")) == []


def test_an_unreachable_destination_defers_the_rest_of_its_batch_without_trying(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """One connection attempt for the batch, not one timeout per message (a hung or dead host
    must not hold a worker for batch × timeout)."""
    dead = f"127.0.0.1:{free_port()}"
    config = routed(tmp_path, valkey, "dead.test", dead)
    jobs = queue_jobs(store, "dead.test", 5)
    outcomes = deliver(config, store, jobs)
    assert [len(o.attempts) for o in outcomes if o is not None] == [1, 0, 0, 0, 0]
    for job in jobs:
        trace = spool.read_trace(store, job["id"])
        deferred = [e for e in trace if e["event"] == "deferred"]
        assert deferred and deferred[0]["recipients"][job["recipients"][0]].startswith("4")
    skipped = [e for j in jobs[1:] for e in spool.read_trace(store, j["id"])]
    assert sum(e["event"] == "skipped" for e in skipped) == 4
    assert store.zcard(spool.DEFERRED) == 5 and store.zcard(spool.WAITING_DELIVER) == 0
    assert store.keys(spool.in_flight_key("*", "*")) == []


def test_an_unexpected_error_parks_one_job_and_the_batch_goes_on(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink
) -> None:
    config = routed(tmp_path, valkey, "batch.test", sink.address_text)
    jobs = queue_jobs(store, "batch.test", 3)
    jobs[1]["decision"] = {"domain": "batch.test", "tls": "no-such-mode"}  # a bug's stand-in
    outcomes = deliver(config, store, jobs)
    assert outcomes[1] is None and outcomes[0] is not None and outcomes[2] is not None
    assert len(sink.messages) == 2
    parked = [json.loads(m) for m in deferred_members(store)]
    assert [p["id"] for p in parked] == [jobs[1]["id"]]
    assert "error" in [e["event"] for e in spool.read_trace(store, jobs[1]["id"])]


# --------------------------------------------------------------------------- end to end


def settings(world: World) -> dict[str, Any]:
    return {
        "ingest": {"batch_window": "200ms"},  # wide, so concurrent sessions surely share
        "delivery": {"routes": {"many.test": world.sinks["many"].address_text}},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("batching"), {"many": Sink("starttls")}, settings) as w:
        yield w


def test_concurrent_sessions_are_classified_and_delivered_in_batches(world: World) -> None:
    ids: list[str] = []
    start = threading.Barrier(8)

    def send(i: int) -> None:
        start.wait()
        ids.append(world.send([f"u{i}@many.test"], message(f"batch {i}")))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8
    for m in ids:
        world.wait_completed(m)
    batches = [world.events(m, "classified")[0]["batch"] for m in ids]
    assert max(batches) > 1, batches
    sink = world.sinks["many"]
    assert len(sink.messages) == 8 and all(m.tls for m in sink.messages)
    with contextlib.closing(world.client()) as client:
        waiting = (spool.WAITING_POLICY, spool.WAITING_DELIVER)
        wait_until(lambda: not any(client.zcard(k) for k in waiting), 10, "empty waiting sets")


# --------------------------------------------------------------------------- retries


def defer(client: redis.Redis, jobs: list[dict[str, Any]], due: float) -> None:
    with client.pipeline(transaction=True) as pipe:
        for job in jobs:
            scheduler.stage_deferral(pipe, job, due)
        pipe.execute()


def test_due_retries_go_out_in_one_task_per_domain(
    valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """After an outage a domain's backlog comes back in batches, not a task per message."""
    a: list[dict[str, Any]] = [
        {"id": new_message_id(), "domain": "a.test", "recipients": ["x@a.test"]} for _ in range(5)
    ]
    b: list[dict[str, Any]] = [
        {"id": new_message_id(), "domain": "b.test", "recipients": ["x@b.test"]} for _ in range(2)
    ]
    later: dict[str, Any] = {"id": new_message_id(), "domain": "a.test", "recipients": ["y@a.test"]}
    defer(store, a + b, time.time() - 1)
    defer(store, [later], time.time() + 3600)
    assert scheduler.move_due(store, batch_max=3) == 7
    batches = tasks(store, queueing.DELIVER_LIST)
    assert sorted(len(batch) for batch in batches) == [2, 2, 3]
    assert sorted(j["id"] for batch in batches for j in batch) == sorted(j["id"] for j in a + b)
    assert [json.loads(m)["id"] for m in deferred_members(store)] == [later["id"]]
    assert store.zcard(spool.WAITING_DELIVER) == 7


def test_a_group_another_scheduler_took_part_of_is_left_alone(
    valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Between reading the due jobs and moving them, another scheduler took one: that group
    moves nothing (the other scheduler owns the job it took), the other groups move."""
    a = [{"id": new_message_id(), "domain": "a.test", "recipients": ["x@a.test"]} for _ in range(2)]
    b = [{"id": new_message_id(), "domain": "b.test", "recipients": ["x@b.test"]}]
    defer(store, a + b, time.time() - 1)
    members = deferred_members(store)
    taken = next(m for m in members if json.loads(m)["id"] == a[0]["id"])

    class Racing(redis.Redis):
        def eval(self, *args: Any) -> Any:  # the other scheduler wins the race just before
            store.zrem(spool.DEFERRED, taken)
            return super().eval(*args)

    racing = Racing.from_url(valkey.url)
    try:
        assert scheduler.move_due(racing) == 1
    finally:
        racing.close()
    assert [[j["id"] for j in batch] for batch in tasks(store, queueing.DELIVER_LIST)] == [
        [b[0]["id"]]
    ]
    assert [json.loads(m)["id"] for m in deferred_members(store)] == [a[1]["id"]]


def test_bodies_are_read_a_few_megabytes_at_a_time() -> None:
    mb = 1024 * 1024
    assert spool.budgeted([2 * mb] * 10, budget=8 * mb) == [range(0, 4), range(4, 8), range(8, 10)]
    assert spool.budgeted([20 * mb, 1, 1], budget=8 * mb) == [range(0, 1), range(1, 3)]
    assert spool.budgeted([0, 0, 5], budget=4) == [range(0, 2), range(2, 3)]
    assert spool.budgeted([]) == []


def test_a_batch_of_large_messages_is_not_read_at_once(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A deliver batch holds a budget of bodies, not the batch's: each read stays within it."""
    config = routed(tmp_path, valkey, "batch.test", sink.address_text)
    jobs = queue_jobs(store, "batch.test", 6)
    big = BODY + (b"x" * 998 + b"\r\n") * 300  # 300 kB in lines of 1000 octets
    for job in jobs:  # as stored by ingest: the size is in the envelope
        raw = json.loads(cast(bytes, store.hget(spool.msg_key(job["id"]), "envelope")))
        store.hset(spool.msg_key(job["id"]), mapping={
            "body": big, "envelope": json.dumps({**raw, "size": len(big)}),
        })  # fmt: skip
    reads: list[int] = []
    load = spool.load_bodies
    monkeypatch.setattr(spool, "BODY_BUDGET", 700_000)  # two of these messages

    def spy(client: Any, ids: Any) -> Any:
        reads.append(len(ids))
        return load(client, ids)

    monkeypatch.setattr(spool, "load_bodies", spy)
    outcomes = deliver(config, store, jobs)
    assert all(o is not None and len(o.delivered) == 1 for o in outcomes), outcomes
    assert reads == [2, 2, 2], reads
    assert len(sink.messages) == 6
