"""kombu's Redis layout as services/common/broker.py relies on it (these fail loudly when a kombu
release changes it), the restore of a reserved task, and the upgrade from unprefixed keys.
Real Redis, kombu's real transport."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from services.common import broker, queueing
from services.common.redisserver import EmbeddedRedis


@pytest.fixture
def kombu(valkey: EmbeddedRedis, store: redis.Redis) -> Iterator[Connection]:
    options = {"global_keyprefix": queueing.KEY_PREFIX, "visibility_timeout": 3600}
    with Connection(valkey.url, transport_options=options) as conn:
        yield conn


def take(conn: Connection, queue: str) -> object:
    """Reserve one task of ``queue`` as a worker does (not acknowledged)."""
    q = Queue(queue, Exchange(queue), queue)
    with conn.SimpleQueue(q) as simple:
        return simple.get(timeout=5)


def test_kombu_names_its_keys_as_we_read_them() -> None:
    channel = kombu_redis.Channel
    assert (channel.unacked_key, channel.unacked_index_key) == ("unacked", "unacked_index")
    assert "global_keyprefix" in channel.from_transport_options


def test_a_reserved_task_is_kept_under_the_prefix_and_restored_to_its_queue(
    kombu: Connection, store: redis.Redis
) -> None:
    store.lpush(queueing.POLICY_LIST, queueing.classify_task(["id1"]))
    message = take(kombu, queueing.QUEUE_POLICY)
    tag = message.delivery_tag  # type: ignore[attr-defined]
    assert store.llen(queueing.POLICY_LIST) == 0
    (raw,) = store.hvals(queueing.UNACKED)
    entry = json.loads(raw)
    assert entry[1:] == ["policy", "policy"] and queueing.task_batch(json.dumps(entry[0]))
    assert store.zscore(queueing.UNACKED_INDEX, tag) == pytest.approx(time.time(), abs=5)
    assert broker.restore(store, tag) is True
    assert broker.restore(store, tag) is False, "only once"
    assert store.hlen(queueing.UNACKED) == 0 and store.zcard(queueing.UNACKED_INDEX) == 0
    again = take(kombu, queueing.QUEUE_POLICY)
    assert again.payload == message.payload  # type: ignore[attr-defined]


def test_the_upgrade_moves_our_tasks_out_of_the_unprefixed_keys(store: redis.Redis) -> None:
    now = time.time()
    old, new = queueing.classify_task(["old"]), queueing.classify_task(["new"])
    store.lpush("policy", old, new)  # the previous release's list, oldest on the right
    store.lpush("deliver", "another program's item")
    doc = json.loads(queueing.deliver_task([{"id": "x", "domain": "d"}]))
    for tag, taken in (("long-ago", now - 7200), ("just-now", now)):
        store.hset("unacked", tag, json.dumps([doc, "deliver", "deliver"]))
        store.zadd("unacked_index", {tag: taken})
    assert broker.migrate_legacy(store, now, visibility_timeout=3600) == 3
    assert store.lrange(queueing.POLICY_LIST, 0, -1) == [new.encode(), old.encode()]
    assert store.lrange("deliver", 0, -1) == [b"another program's item"]
    assert [queueing.task_batch(t) for t in store.lrange(queueing.DELIVER_LIST, 0, -1)] == [
        (queueing.TASK_DELIVER, [{"id": "x", "domain": "d"}])
    ]
    assert store.hkeys("unacked") == [b"just-now"], "a live old worker's task is left to it"
