"""kombu's keys live under our prefix (so tlsrelay can share a Redis database), workers publish no
``celeryev`` heartbeats, and tasks left in the lists of a release without the prefix are still
consumed after the upgrade. Real Redis, real workers started by the command line."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from services.common import queueing, spool
from services.common.model import Envelope, new_message_id
from tests.world import World, make_world, message, wait_until

LEGACY = Envelope(new_message_id(), "old@origin.test", ("legacy@tls.test",))
EVENTS: list[str] = []  # channels published to while the world runs


def listen(url: str, stop: threading.Event) -> None:
    with redis.Redis.from_url(url) as client, client.pubsub() as sub:
        sub.psubscribe("*")
        while not stop.is_set():
            found = sub.get_message(timeout=0.2)
            if found and found["type"] == "pmessage":
                EVENTS.append(found["channel"].decode(errors="replace"))


def queued_before_upgrade(world: World) -> dict[str, Any]:
    """A message accepted by the previous release: its task in the unprefixed ``policy`` list."""
    with world.client() as client, client.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, LEGACY, message("before the upgrade"), spool.TRACE_TTL, False)
        pipe.lpush(queueing.QUEUE_POLICY, queueing.classify_task([LEGACY.id]))
        pipe.execute()
    return {}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    stop = threading.Event()
    with make_world(tmp_path_factory.mktemp("keys"), config=queued_before_upgrade) as w:
        thread = threading.Thread(target=listen, args=(w.redis.url, stop), daemon=True)
        thread.start()
        yield w
        stop.set()
        thread.join()


def test_a_task_queued_by_ingest_under_the_prefix_is_consumed(world: World) -> None:
    message_id = world.send(["a@tls.test"], message("prefixed"))
    world.wait_completed(message_id)
    with world.client() as client:
        foreign = [k.decode() for k in client.keys("*") if not k.startswith(b"tlsrelay:")]
        assert foreign == [], "every key, kombu's included, is under tlsrelay:"


def test_a_task_left_in_the_unprefixed_list_by_the_old_release_is_consumed(world: World) -> None:
    world.wait_completed(LEGACY.id)
    with world.client() as client:
        assert client.llen(queueing.QUEUE_POLICY) == 0


def test_workers_publish_no_celeryev_heartbeats(world: World) -> None:
    world.send(["b@tls.test"], message("events"))
    started = time.monotonic()
    wait_until(lambda: time.monotonic() - started > 2.5, what="two heartbeat intervals")
    assert [c for c in EVENTS if "celeryev" in c] == []


def test_the_task_documents_are_what_kombu_would_store() -> None:
    doc = json.loads(queueing.classify_task(["x"]))
    assert doc["properties"]["delivery_info"] == {"exchange": "policy", "routing_key": "policy"}
