"""A task that raises (here: a Redis key of the wrong type, ``WRONGTYPE``) is retried with
backoff — its error in the trace — and never dropped: once the cause is gone the message is
delivered. Real Redis, real workers, a real SMTP sink."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from services.common import queueing, retry, spool
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
