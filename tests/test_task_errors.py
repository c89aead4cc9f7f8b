"""A task that raises (here: a Redis key of the wrong type, ``WRONGTYPE``) is retried with
backoff — its error in the trace — and never dropped: once the cause is gone the message is
delivered. Real Redis, real workers, a real SMTP sink."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import queueing, retry, spool
from services.common.config import Config
from services.common.redisserver import EmbeddedRedis
from services.deliver import queue, scheduler
from tests.world import World, make_world, message, wait_until


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("errors")) as w:
        yield w


def test_a_deliver_task_that_raises_is_retried_not_dropped(world: World) -> None:
    world.stop_service("deliver")
    message_id = world.send(["a@tls.test"], message("wrong type"))
    wait_until(lambda: world.events(message_id, "classified"), what="classified")
    with world.client() as client:
        client.set(spool.rcpt_key(message_id), "not a hash")  # every read of it raises
        world.start_service("deliver")

        def errors() -> list[dict[str, Any]]:
            return world.events(message_id, "error")

        def failed_twice() -> bool:
            return len(errors()) >= 2

        wait_until(failed_twice, timeout=30, what="a failure and a retry")
        first, second = errors()[:2]
        assert "WRONGTYPE" in first["error"] and (first["attempt"], second["attempt"]) == (1, 2)
        assert second["at"] - first["at"] >= retry.delay(0) * 0.9, "backoff, not a hot loop"
        client.delete(spool.rcpt_key(message_id))  # the cause is gone
    world.wait_completed(message_id, timeout=30)
    assert len(errors()) <= retry.CAP
    assert any(b"wrong type" in m.data for m in world.sinks["tls"].messages)


def test_a_bad_entry_in_the_retry_set_does_not_block_the_others(store: redis.Redis) -> None:
    good = queueing.task_payload(queueing.TASK_CLASSIFY, [["id1"]], queueing.QUEUE_POLICY, None, 1)
    store.zadd(retry.RETRY, {"not json": 1, good: 2})
    assert retry.move_due(store, now=10) == 1
    assert store.lrange(queueing.POLICY_LIST, 0, -1) == [good.encode()]
    assert store.zrange(retry.RETRY, 0, -1) == [b"not json"], "kept, never dropped"


def test_a_bad_entry_in_the_deferred_set_does_not_block_the_others(store: redis.Redis) -> None:
    job = {"id": "0190a1b2c3d4e5f60718293a4b5c6d7e", "domain": "d1.test", "rcpts": ["a@d1.test"]}
    good = json.dumps(job, sort_keys=True)
    store.zadd(spool.DEFERRED, {"not json": 1, '["a list"]': 2, '{"id": "x"}': 3, good: 4})
    assert scheduler.move_due(store, now=10) == 1
    assert store.zscore(spool.DEFERRED, good) is None, "the good job moved"
    assert store.llen(queueing.DELIVER_LIST) == 1
    kept: dict[bytes, float] = dict(store.zrange(spool.DEFERRED, 0, -1, withscores=True))  # type: ignore[arg-type]
    assert set(kept) == {b"not json", b'["a list"]', b'{"id": "x"}'}, "kept, never dropped"
    assert all(score == 10 + scheduler.UNREADABLE_RECHECK for score in kept.values())
    assert scheduler.move_due(store, now=11) == 0, "not due again at once"


def test_the_scheduler_thread_survives_an_unexpected_error(
    valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception in a round (not only a Redis error) is logged; the next round runs."""
    rounds: list[int] = []
    real = retry.move_due

    def flaky(client: redis.Redis, now: float, limit: int = 100) -> int:
        rounds.append(1)
        if len(rounds) == 1:
            raise ValueError("a bug in one round")
        return real(client, now, limit)

    monkeypatch.setattr(retry, "move_due", flaky)
    thread = scheduler.SchedulerThread(valkey.url, interval=0.01, rescue_interval=3600)
    thread.start()
    try:
        wait_until(lambda: len(rounds) >= 3, timeout=10, what="rounds after the error")
        assert thread.is_alive()
    finally:
        thread.stop()
        thread.join(timeout=10)


def test_queue_commands_step_over_a_bad_entry_in_the_deferred_set(
    store: redis.Redis, tmp_path: Path
) -> None:
    """``tlsrelay queue`` (list, retry, resume, sites, bounce) reads the whole deferred set: an
    entry that is not a job document is left where it is (the scheduler keeps it), not a crash."""
    config = Config.model_validate({"hostname": "relay.test"})
    bad = {"not json": 1.0, '["a list"]': 2.0, '{"id": "x", "domain": "d.test"}': 3.0}
    store.zadd(spool.DEFERRED, bad)
    assert queue.deferred(store) == []
    assert queue.retry(store) == 1  # the one with an id and a domain: made due, as it was
    assert queue.resume(store, "d.test") == (False, 0)
    assert queue.sites(config, store) == []
    assert queue.bounce(config, store, "x") == []
    assert store.zcard(spool.DEFERRED) == 3, "kept, never dropped"
