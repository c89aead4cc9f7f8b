"""kombu's Redis layout as services/common/broker.py relies on it (these fail loudly when a kombu
release changes it), the restore of a reserved task, and the upgrade from unprefixed keys.
Real Redis, kombu's real transport."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

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


def test_a_batch_we_reserve_ourselves_reads_and_restores_as_kombu_s_own(
    kombu: Connection, store: redis.Redis
) -> None:
    """broker.reserve (a deliver batch still in flight after its task's acknowledgement) writes
    what kombu writes for a task it took: kombu's entry shape, read back by the rescue sweep's
    parser; restore puts it on its queue, where a worker takes the same task again."""
    jobs = [{"id": "m1", "domain": "d.test", "recipients": ["r@d.test"]}]
    task = queueing.task_payload(queueing.TASK_DELIVER, [jobs], queueing.QUEUE_DELIVER)
    broker.reserve(store, "ours", task, queueing.QUEUE_DELIVER, 1000.0)
    (raw,) = store.hvals(queueing.UNACKED)
    assert json.loads(raw)[1:] == ["deliver", "deliver"]
    document = queueing.reserved(raw)
    assert document is not None
    assert queueing.task_batch(document) == (queueing.TASK_DELIVER, jobs)
    assert store.zscore(queueing.UNACKED_INDEX, "ours") == 1000.0
    assert broker.restore(store, "ours") is True
    again = take(kombu, queueing.QUEUE_DELIVER)
    assert again.payload[0] == [jobs]  # type: ignore[attr-defined]
    broker.reserve(store, "done", task, queueing.QUEUE_DELIVER, 1000.0)
    broker.unreserve(store, "done")
    assert store.hget(queueing.UNACKED, "done") is None
    assert store.zscore(queueing.UNACKED_INDEX, "done") is None


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


def test_a_failed_ack_or_requeue_frees_its_prefetch_slot(tmp_path: Path) -> None:
    # kombu's Redis QoS frees a prefetch slot only once its Redis call succeeded: an ack or a
    # requeue that failed (Redis unreachable, a Sentinel failover) held the slot for good, and a
    # worker whose every slot was so held never consumed again until the stall watchdog ended it
    # (found by `make soak-sentinel`: every policy and deliver worker stalled after the failover).
    broker.free_slots_on_failure()  # what every worker does (celeryapp.make_app)
    with EmbeddedRedis(tmp_path, appendonly=False) as server:
        options = {"global_keyprefix": queueing.KEY_PREFIX, "visibility_timeout": 3600}
        with Connection(server.url, transport_options=options) as conn:
            q = Queue("slots", Exchange("slots"), "slots")
            with conn.SimpleQueue(q) as simple:
                simple.consumer.qos(prefetch_count=2)
                simple.put("a")
                simple.put("b")
                first, second = simple.get(timeout=5), simple.get(timeout=5)
                qos = simple.channel.qos
                assert not qos.can_consume(), "both slots taken"
                server.stop(kill=True)
                with pytest.raises(redis.ConnectionError):
                    first.reject(requeue=True)
                with pytest.raises(redis.ConnectionError):
                    second.ack()
                assert qos.can_consume(), "a failed ack or requeue still holds its slot"
                assert qos.can_consume_max_estimate() == 2
