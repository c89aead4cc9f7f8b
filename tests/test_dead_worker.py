"""A deliver worker's main process SIGKILLed while it holds tasks (an OOM kill, a node lost): the
tasks it had taken come back from kombu's ``unacked`` hash within a minute — not after
``celery.visibility_timeout`` (30 minutes, left at its default here) — and every message is
delivered; the reserved tasks of live workers are never handed out twice. Real Redis, real
workers, a real slow SMTP sink."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from services.common import liveness, queueing
from services.deliver import rescue
from tests.peers import Sink
from tests.sinksmtp import Message
from tests.world import World, make_world, message, wait_until

ARRIVED = threading.Event()
RELEASE = threading.Event()


def hold_first(msg: Message) -> str | None:
    """The destination is slow: the first final dot is answered only after the kill."""
    if not ARRIVED.is_set():
        ARRIVED.set()
        RELEASE.wait(30)
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    def settings(world: World) -> dict[str, Any]:
        return {"delivery": {"routes": {"slow.test": world.sinks["slow"].address_text}}}

    sinks = {"slow": Sink("starttls", data_reply=hold_first)}
    with make_world(tmp_path_factory.mktemp("dead"), sinks, settings) as w:
        yield w


def test_a_killed_workers_tasks_are_delivered_within_a_minute(world: World) -> None:
    ids = [world.send([f"r{i}@slow.test"], message(f"dead worker {i}")) for i in range(4)]
    assert ARRIVED.wait(30), "no delivery reached the destination"
    with world.client() as client:
        wait_until(lambda: client.hlen(queueing.UNACKED) >= 1, what="tasks reserved")
        world.stop_service("deliver", kill=True)  # the worker and its pool, no goodbye
        assert client.hlen(queueing.UNACKED) >= 1, "the dead worker's tasks wait in unacked"
    RELEASE.set()
    killed = time.monotonic()
    world.start_service("deliver")
    for message_id in ids:
        world.wait_completed(message_id, timeout=max(1.0, 60 - (time.monotonic() - killed)))
    received = b"".join(m.data for m in world.sinks["slow"].messages)
    assert all(f"dead worker {i}".encode() in received for i in range(4))


def reserve(client: redis.Redis, tag: str, taken: float) -> None:
    """A task a worker took at ``taken``, as kombu records it."""
    doc = json.loads(queueing.classify_task([tag]))
    client.hset(queueing.UNACKED, tag, json.dumps([doc, "policy", "policy"]))
    client.zadd(queueing.UNACKED_INDEX, {tag: taken})


def reclaim(client: redis.Redis, now: float) -> int:
    client.delete(rescue.RECLAIM_LOCK)  # each call is a later pass
    return rescue.reclaim(client, now, liveness.INTERVAL)


def test_only_tasks_no_live_worker_holds_are_handed_back(store: redis.Redis) -> None:
    now = time.time()
    liveness.beat(store, "live", held=["held"])
    reserve(store, "held", now - 600)  # a long delivery of a live worker
    reserve(store, "orphan", now - 600)  # its worker stopped beating
    reserve(store, "fresh", now - 1)  # just taken: maybe not in a beat yet
    assert reclaim(store, now) == 0, "one pass only suspects"
    assert reclaim(store, now + 5) == 1
    assert sorted(store.hkeys(queueing.UNACKED)) == [b"fresh", b"held"]
    (raw,) = store.lrange(queueing.POLICY_LIST, 0, -1)
    assert queueing.task_batch(raw) == (queueing.TASK_CLASSIFY, ["orphan"])
    assert liveness.alive(store, "live") and not liveness.alive(store, "gone")


def test_a_task_acknowledged_between_two_passes_is_not_handed_back(store: redis.Redis) -> None:
    now = time.time()
    reserve(store, "done", now - 600)
    assert reclaim(store, now) == 0
    store.hdel(queueing.UNACKED, "done")  # acked, as kombu does
    store.zrem(queueing.UNACKED_INDEX, "done")
    assert reclaim(store, now + 5) == 0 and store.llen(queueing.POLICY_LIST) == 0


def test_dead_workers_leave_the_registry(store: redis.Redis) -> None:
    liveness.beat(store, "gone", ttl=0.05)
    liveness.beat(store, "live")
    wait_until(lambda: not liveness.alive(store, "gone"), what="the beat to expire")
    reclaim(store, time.time())  # nothing reserved: the pass still tidies the registry
    assert store.smembers(liveness.REGISTRY) == {b"live"}
