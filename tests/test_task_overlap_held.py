"""Tasks side by side: a job one batch of a process holds longer than a claim's TTL, or holds
without working on it, is never dropped by another batch of the process — handed back instead
(the copy held may be stale); a failed batch's retry keeps every job; a copy that is not a job
never parks (and so releases the claim and in-flight mark of) a job a lane is sending. Found by
a second review of the change, each test failing before its fix."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from services.common import queueing, retry, spool
from services.common.config import Config
from services.common.redisserver import EmbeddedRedis
from services.deliver import batch as batch_module
from services.deliver.batch import Deliverer
from services.deliver.tasks import DeliverService
from tests.peers import Sink
from tests.sinksmtp import Message
from tests.test_batching import queue_jobs, routed, run_batches, run_quietly

DOMAIN = "overlap.test"


async def a_claimed_j_ahead(store: redis.Redis, j: dict[str, Any]) -> None:
    """Until A's recording of X claimed J ahead (then A holds J, past its start window)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not store.exists(spool.claim_key(j["id"], DOMAIN)):
        assert loop.time() < deadline, "A never claimed J ahead"
        await asyncio.sleep(0.01)


def x_then_y_slowly(message: Message) -> float:
    """X (r0) is answered after 0.6 s, past A's start window; Y (r1) after 3.5 s, longer than a
    claim's TTL (2 s with job_timeout 4 s)."""
    slow = {"r0@overlap.test": 0.6, "r1@overlap.test": 3.5}
    return max(slow.get(r, 0.0) for r in message.rcpt_tos)


def two_lanes(tmp_path: Path, valkey: EmbeddedRedis, sink: Sink) -> Config:
    """Two lanes, two batches side by side, a start window of 0.4 s."""
    return routed(
        tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=2,
        tasks_per_process=2, job_timeout=4,
    )  # fmt: skip


def deferred_with_retry(store: redis.Redis, j: dict[str, Any]) -> dict[str, Any]:
    """J's recipient deferred by its attempt 1 (so a copy of attempt 1 is stale: nothing to
    send); the document of its retry, attempt 2."""
    (rcpt,) = j["recipients"]
    state = {"state": spool.DEFERRED_STATE, "attempt": 1}
    store.hset(spool.rcpt_key(j["id"]), rcpt, json.dumps(state))
    return {**j, "attempt": 2}


def rerun_handed_back(config: Config, store: redis.Redis) -> list[dict[str, Any]]:
    """Run what was handed back (the deliver queue), one task after another, as the next tasks
    would; return its documents."""
    handed = [queueing.task_batch(raw) for raw in store.lrange(queueing.DELIVER_LIST, 0, -1)]
    batches = [got[1] for got in handed if got]
    deliverer = Deliverer(config, store)

    async def in_turn() -> None:
        for docs in batches:
            await deliverer.run_batch(docs)

    run_quietly(deliverer, in_turn())
    return [doc for docs in batches for doc in docs]


def test_a_retry_is_not_dropped_for_a_stale_copy_left_at_the_window(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Batch A = [X, Y, J(stale, attempt 1)]: lane 1 sends X, its recording claims J ahead
    (Holders: A), then the start window is over: J is left (handed back at A's end), but A
    holds J until its end — lane 2 still sends Y, longer than a claim's TTL. Batch B =
    [J(retry, attempt 2)] waits a TTL for J, then must hand its copy back, not drop it as
    "A's": A's stale copy finds nothing to send, so only the retry delivers (or defers) J."""
    with Sink("starttls", slow_for=x_then_y_slowly) as sink:
        config = two_lanes(tmp_path, valkey, sink)
        x, y, j = queue_jobs(store, DOMAIN, 3)
        retry_copy = deferred_with_retry(store, j)
        deliverer = Deliverer(config, store)

        async def later(docs: list[dict[str, Any]]) -> Any:
            await a_claimed_j_ahead(store, j)
            return await deliverer.run_batch(docs)

        run_quietly(deliverer, deliverer.run_batch([x, y, j]), later([retry_copy]))
        handed = rerun_handed_back(config, store)  # what was handed back, as the next tasks
        attempts = [d.get("attempt") for d in handed if d["id"] == j["id"]]
        arrived = [r for m in sink.messages for r in m.rcpt_tos]
    deferred = store.zrange(spool.DEFERRED, 0, -1)
    (rcpt,) = j["recipients"]
    assert rcpt in arrived or deferred, (arrived, attempts, deferred)


def test_a_failed_batch_keeps_a_retry_another_batch_holds_for_a_stale_copy(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """As above, but batch B fails at once (a document whose state cannot be read): its retry
    task must keep J although A holds it (a plain retry, retries < CAP, releases no claim);
    A hands back only the stale copy, so without J in B's retry the retry would be gone."""

    with Sink("starttls", slow_for=x_then_y_slowly) as sink:
        config = two_lanes(tmp_path, valkey, sink)
        x, y, j, bad = queue_jobs(store, DOMAIN, 4)
        retry_copy = deferred_with_retry(store, j)
        store.delete(spool.rcpt_key(bad["id"]))
        store.set(spool.rcpt_key(bad["id"]), "not a hash")  # B's state read fails: WRONGTYPE
        deliverer = Deliverer(config, store)
        service = DeliverService(config, valkey.url)

        async def later() -> Any:
            await a_claimed_j_ahead(store, j)
            return await service._run_or_park(deliverer, [retry_copy, bad], 0)

        run_quietly(deliverer, deliverer.run_batch([x, y, j]), later())
    copies = []
    for raw in [*store.lrange(queueing.DELIVER_LIST, 0, -1), *store.zrange(retry.RETRY, 0, -1)]:
        got = queueing.task_batch(raw)
        copies += [d for d in (got[1] if got else []) if d["id"] == j["id"]]
    assert any(d.get("attempt") == 2 for d in copies), copies


def test_a_non_job_copy_does_not_release_the_claim_of_its_own_batch_s_lane(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """One batch: J (sent slowly by lane 1) and a copy of J that is not a job (an unknown TLS
    mode, say a newer writer's). Lane 2 must not park the copy while lane 1 is in DATA: the
    park would release J's claim and delete its in-flight mark, and another process's copy of J
    could then claim it and send it again. The copy is handed back (or parked once J is free)."""
    (j,) = queue_jobs(store, DOMAIN, 1)
    broken = {**j, "decision": {**j["decision"], "tls": "no-such-mode"}}
    claim, mark = spool.claim_key(j["id"], DOMAIN), spool.in_flight_key(j["id"], DOMAIN)
    seen: list[tuple[bool, bool, bool, bool]] = []
    with Sink("starttls", slow_for=lambda m: 1.5) as sink:
        config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=2)
        deliverer = Deliverer(config, store)
        park = deliverer.ledger.park

        def watched(doc: Any, keep_mark: bool = False) -> None:
            before = bool(store.exists(claim)), bool(store.exists(mark))
            park(doc, keep_mark)
            seen.append((*before, bool(store.exists(claim)), bool(store.exists(mark))))

        deliverer.ledger.park = watched  # type: ignore[method-assign,assignment]

        run_quietly(deliverer, deliverer.run_batch([j, broken]))
        arrived = [r for m in sink.messages for r in m.rcpt_tos]
    # Parked while lane 1 held J's claim and mark (in DATA): both must stay.
    assert all(s[:2] == s[2:] for s in seen), (seen, arrived)
    queued = [queueing.task_batch(raw) for raw in store.lrange(queueing.DELIVER_LIST, 0, -1)]
    assert seen or any(got and broken in got[1] for got in queued), "the copy: parked or queued"


def test_a_job_is_waited_for_once_whoever_holds_it(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another batch of this process held job J for a whole claim TTL, and once it let go
    another process holds J's claim: the batch does not wait a second TTL for it (a task ends
    within delivery.task_budget, which counts ONE wait for a job someone else holds). It
    leaves J to its owner without looking again; J stays stored. The other batch's hold is
    a TTL moved on the batch's clock, not waited."""
    with Sink("starttls") as sink:
        config = routed(tmp_path, valkey, DOMAIN, sink.address_text, job_timeout=4)
        (j,) = queue_jobs(store, DOMAIN, 1)
        deliverer = Deliverer(config, store)
        ttl = deliverer.ledger.claims.ttl
        store.set(spool.claim_key(j["id"], DOMAIN), "another-process", px=60_000)
        moved = [0.0]
        clock = SimpleNamespace(monotonic=lambda: time.monotonic() + moved[0], time=time.time)
        monkeypatch.setattr(batch_module, "time", clock)
        real_wait, real_claim = deliverer.holders.wait, deliverer.ledger.claim_async
        looks: list[tuple[str, str]] = []

        async def held_a_ttl(key: tuple[str, str], holder: object, timeout: float) -> bool:
            moved[0] += timeout  # another batch of this process held J that long
            return await real_wait(key, holder, timeout)

        async def claim(key: tuple[str, str], *args: Any) -> Any:
            looks.append(key)
            return await real_claim(key, *args)

        monkeypatch.setattr(deliverer.holders, "wait", held_a_ttl)
        monkeypatch.setattr(deliverer.ledger, "claim_async", claim)
        (results,) = run_batches(deliverer, [j])
        assert results == [None] and sink.messages == []
        assert looks == [(j["id"], DOMAIN)], f"{len(looks)} looks at J in a second {ttl} s wait"
        assert store.get(spool.claim_key(j["id"], DOMAIN)) == b"another-process"
        assert store.exists(spool.msg_key(j["id"]))
        queued = [queueing.task_batch(raw) for raw in store.lrange(queueing.DELIVER_LIST, 0, -1)]
        assert [d for got in queued if got for d in got[1]] == [j], "handed back, not dropped"


def test_a_retry_is_not_dropped_for_another_process_s_stale_copy_left_at_its_window(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """As test_a_retry_is_not_dropped_for_a_stale_copy_left_at_the_window, but A is ANOTHER
    process (its own Deliverer: its own claim token). A's recording of X claims J ahead, its
    window ends, and A holds J's claim (refreshed) until its end, past a claim's TTL (Y), then
    hands back its stale copy (attempt 1). B (the retry, attempt 2) waits for the claim, finds
    it still held at its deadline and leaves J "to its owner": A's stale copy finds nothing to
    send, so the retry must not be dropped (delivered, deferred, or queued again)."""
    with Sink("starttls", slow_for=x_then_y_slowly) as sink:
        config = two_lanes(tmp_path, valkey, sink)
        x, y, j = queue_jobs(store, DOMAIN, 3)
        retry_copy = deferred_with_retry(store, j)
        a, b = Deliverer(config, store), Deliverer(config, store)  # two processes
        assert a.ledger.claims.token != b.ledger.claims.token

        async def later(docs: list[dict[str, Any]]) -> Any:
            await a_claimed_j_ahead(store, j)
            try:
                return await b.run_batch(docs)
            finally:
                b.pool.close_all()

        run_quietly(a, a.run_batch([x, y, j]), later([retry_copy]))
        queued = [queueing.task_batch(raw) for raw in store.lrange(queueing.DELIVER_LIST, 0, -1)]
        retry_queued = any(
            d["id"] == j["id"] and d.get("attempt") == 2 for got in queued if got for d in got[1]
        )
        handed = rerun_handed_back(config, store)  # what was handed back, as the next tasks
        attempts = [d.get("attempt") for d in handed if d["id"] == j["id"]]
        arrived = [r for m in sink.messages for r in m.rcpt_tos]
    deferred = store.zrange(spool.DEFERRED, 0, -1)
    (rcpt,) = j["recipients"]
    assert rcpt in arrived or deferred or retry_queued, (arrived, attempts, deferred)
