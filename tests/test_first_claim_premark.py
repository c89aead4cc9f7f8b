"""Review of 70f85ec (a lane's first claim premarked, gathered): a mark that no DATA followed
must not make a later claim report an interruption (RFC 1047) that never happened, when Redis
misbehaves before DATA. (A lane's first claim no longer premarks — the soak showed such marks
reported as interruptions after kills; these tests keep the property whatever marks early.)
Real deliver code, real Redis, a real sink."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import spool
from services.common.redisserver import EmbeddedRedis
from services.deliver import claims as claims_module
from services.deliver.batch import Deliverer
from tests.peers import Sink
from tests.test_batching import queue_jobs, routed, run_batches

DOMAIN = "premark.test"


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink("starttls").start()
    try:
        yield server
    finally:
        server.stop()


def events(client: redis.Redis, message_id: str) -> list[str]:
    return [e["event"] for e in spool.read_trace(client, message_id)]


def warmed(tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink) -> Deliverer:
    """A deliverer that has sent one message to DOMAIN: it knows the domain's last peer, so a
    lane's first claim there carries a premark."""
    config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=1)
    deliverer = Deliverer(config, spool.connect(valkey.url))
    (first,) = queue_jobs(store, DOMAIN, 1)
    run_batches(deliverer, [first])
    assert len(sink.messages) == 1
    assert deliverer.ledger._last_peers.get(DOMAIN) is not None
    return deliverer


def test_a_redis_error_before_data_leaves_no_mark_that_reports_an_interruption(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The lane claims its first job (premarked), then a Redis error before anything is sent
    (here: reading the batch's bodies) fails the task. The batch's end releases the claim but
    not the mark; the task runs again and reports "interrupted" for a message that was never
    sent (before 70f85ec the first claim wrote no mark, and nothing was reported)."""
    deliverer = warmed(tmp_path, valkey, store, sink)
    (job,) = queue_jobs(store, DOMAIN, 1)
    real = spool.load_bodies

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Redis went away while reading the bodies")

    monkeypatch.setattr(spool, "load_bodies", broken)
    with pytest.raises(redis.exceptions.ConnectionError):
        run_batches(deliverer, [job])
    monkeypatch.setattr(spool, "load_bodies", real)
    assert len(sink.messages) == 1, "nothing of the failed task was sent"
    left = store.get(spool.in_flight_key(job["id"], DOMAIN))
    run_batches(deliverer, [job])  # the task runs again
    assert len(sink.messages) == 2
    assert "interrupted" not in events(store, job["id"]), (
        f"a false RFC 1047 report: the mark {left!r} was written by a claim, no DATA followed"
    )


def test_a_claim_whose_reply_was_lost_leaves_no_mark_that_reports_an_interruption(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Redis runs the lanes' gathered claim pipeline but its reply is lost (a Redis stalled
    past socket_timeout, a connection reset by a failover; the client does not retry). The
    claim and its premark stand though the lane never got them; the task fails and runs again,
    and the premark reads as an earlier run's DATA: "interrupted" for a message never sent
    (before 70f85ec the first claim wrote no mark: only the claim was left, to expire)."""
    deliverer = warmed(tmp_path, valkey, store, sink)
    (job,) = queue_jobs(store, DOMAIN, 1)
    real = redis.client.Pipeline._execute_pipeline
    lost: list[int] = []

    def reply_lost_once(self: Any, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        replies = real(self, connection, commands, raise_on_error)  # type: ignore[no-untyped-call]
        claiming = any(args[:2] == ("EVAL", claims_module._CLAIM) for args, _ in commands)
        if claiming and not lost:
            lost.append(1)
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "_execute_pipeline", reply_lost_once)
    with pytest.raises(redis.exceptions.TimeoutError):
        run_batches(deliverer, [job])
    assert lost and len(sink.messages) == 1, "nothing of the failed task was sent"
    run_batches(deliverer, [job])  # the task runs again
    assert len(sink.messages) == 2
    assert "interrupted" not in events(store, job["id"]), "a false RFC 1047 report"


def test_gathered_claims_made_on_a_second_loop_after_the_first_closed_mid_turn(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Several event loops in one process (tests): a loop closed with a claim's group still
    scheduled leaves Gathered's pending task behind; a claim on the next loop must still go."""
    from services.deliver.ledger import Ledger
    from tests.test_batching import write_config

    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    a, b = queue_jobs(store, DOMAIN, 2)
    first = asyncio.new_event_loop()

    async def leave_one_behind() -> None:
        asyncio.get_running_loop().create_task(ledger.claim_async((a["id"], DOMAIN)))

    first.run_until_complete(leave_one_behind())  # the group is scheduled, never run
    left = asyncio.all_tasks(first)
    first.close()

    async def claim_b() -> bool:
        async with asyncio.timeout(5):
            return (await ledger.claim_async((b["id"], DOMAIN))).ours

    try:
        assert asyncio.run(claim_b()), "the claim on the second loop never went"
    finally:
        for task in left:  # no "never awaited" warning for a later test
            task.get_coro().close()


def test_a_redis_error_after_data_keeps_the_mark_of_a_premarked_first_claim(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The other side of the two tests above: DATA went out under the premark, then recording
    failed (Redis): the mark must stay, and the next run says the message may come twice."""
    deliverer = warmed(tmp_path, valkey, store, sink)
    (job,) = queue_jobs(store, DOMAIN, 1)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Redis went away while recording")

    monkeypatch.setattr(deliverer.ledger, "_record_all", broken)
    with pytest.raises(redis.exceptions.ConnectionError):
        run_batches(deliverer, [job])
    monkeypatch.undo()
    assert len(sink.messages) == 2, "DATA went out"
    assert store.get(spool.in_flight_key(job["id"], DOMAIN)) is not None, "the mark went"
    run_batches(deliverer, [job])
    assert len(sink.messages) == 3
    assert "interrupted" in events(store, job["id"]), "a possible duplicate not reported"
