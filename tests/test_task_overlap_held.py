"""Tasks side by side: a job one batch of a process holds longer than a claim's TTL, or holds
without working on it, is never dropped by another batch of the process — handed back instead
(the copy held may be stale); a failed batch's retry keeps every job; a copy that is not a job
never parks (and so releases the claim and in-flight mark of) a job a lane is sending. Found by
a second review of the change, each test failing before its fix."""

from __future__ import annotations

import asyncio
import gc
import json
import warnings
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import redis

from services.common import queueing, spool
from services.common.config import Config
from services.common.redisserver import EmbeddedRedis
from services.deliver.batch import Deliverer
from tests.peers import Sink
from tests.test_batching import queue_jobs, routed

DOMAIN = "overlap.test"


async def a_claimed_j_ahead(store: redis.Redis, j: dict[str, Any]) -> None:
    """Until A's recording of X claimed J ahead (then A holds J, past its start window)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not store.exists(spool.claim_key(j["id"], DOMAIN)):
        assert loop.time() < deadline, "A never claimed J ahead"
        await asyncio.sleep(0.01)


def run_quietly(deliverer: Deliverer, *runs: Awaitable[Any]) -> None:
    """Run ``runs`` at once on one loop, then close the sessions they parked (and collect
    what the closed loop left: see tests/test_batching.py, run_batches)."""

    async def run() -> None:
        try:
            await asyncio.gather(*runs)
        finally:
            deliverer.pool.close_all()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        asyncio.run(run())
        gc.collect()


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
    [J(retry, attempt 2)] waits a TTL for J, then drops it as "A's". A hands back its stale
    copy, which finds nothing to send: the retry is gone, nothing sent."""
    slow = {"r0@overlap.test": 0.6, "r1@overlap.test": 3.5}
    with Sink("starttls", slow_for=lambda m: max(slow.get(r, 0.0) for r in m.rcpt_tos)) as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=2,
            tasks_per_process=2, job_timeout=4,
        )  # fmt: skip
        x, y, j = queue_jobs(store, DOMAIN, 3)
        (rcpt,) = j["recipients"]
        store.hset(spool.rcpt_key(j["id"]), rcpt,
                   json.dumps({"state": spool.DEFERRED_STATE, "attempt": 1}))  # fmt: skip
        retry_copy = {**j, "attempt": 2}
        deliverer = Deliverer(config, store)

        async def later(docs: list[dict[str, Any]]) -> Any:
            await a_claimed_j_ahead(store, j)
            return await deliverer.run_batch(docs)

        run_quietly(deliverer, deliverer.run_batch([x, y, j]), later([retry_copy]))
        handed = rerun_handed_back(config, store)  # what was handed back, as the next tasks
        attempts = [d.get("attempt") for d in handed if d["id"] == j["id"]]
        arrived = [r for m in sink.messages for r in m.rcpt_tos]
    deferred = store.zrange(spool.DEFERRED, 0, -1)
    assert rcpt in arrived or deferred, (arrived, attempts, deferred)


def test_a_failed_batch_keeps_a_retry_another_batch_holds_for_a_stale_copy(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """As above, but batch B fails at once (a document whose state cannot be read): its
    _run_or_park drops J (held by A, which left its stale copy at the window) from the retry
    task — a plain retry (retries < CAP) releases no claim, so nothing called for dropping it.
    A hands back the stale copy: the retry is gone."""
    from services.common import retry
    from services.deliver.tasks import DeliverService

    slow = {"r0@overlap.test": 0.6, "r1@overlap.test": 3.5}
    with Sink("starttls", slow_for=lambda m: max(slow.get(r, 0.0) for r in m.rcpt_tos)) as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=2,
            tasks_per_process=2, job_timeout=4,
        )  # fmt: skip
        x, y, j, bad = queue_jobs(store, DOMAIN, 4)
        (rcpt,) = j["recipients"]
        store.hset(spool.rcpt_key(j["id"]), rcpt,
                   json.dumps({"state": spool.DEFERRED_STATE, "attempt": 1}))  # fmt: skip
        store.delete(spool.rcpt_key(bad["id"]))
        store.set(spool.rcpt_key(bad["id"]), "not a hash")  # B's state read fails: WRONGTYPE
        retry_copy = {**j, "attempt": 2}
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
    mode, say a newer writer's). Lane 2 parks the copy: _park_doc's Holders.take is True (the
    same batch holds J), so ledger.park releases J's claim and deletes its in-flight mark while
    lane 1 is in DATA: another process's copy of J could claim it and send it again."""
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
