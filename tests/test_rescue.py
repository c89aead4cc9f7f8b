"""Lost Celery tasks (kombu takes a task off the list before it records it as reserved; a worker
killed in between loses it): the rescue sweep finds work no task refers to and queues it again —
only after two sweeps in a row, and never work that a task still holds. Real Redis."""

from __future__ import annotations

import json
import time
from typing import cast

import redis

from services.common import queueing, spool
from services.common.model import Decision, Envelope, new_message_id
from services.deliver import rescue, scheduler
from tests.test_batching import BODY, tasks

GRACE, INTERVAL = 60.0, 30.0


def accepted(client: redis.Redis, *recipients: str) -> Envelope:
    """A message stored with its policy task, as ingest leaves it."""
    envelope = Envelope(
        new_message_id(), "s@origin.test", recipients, received_at=time.time() - 3600
    )
    with client.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, BODY, spool.TRACE_TTL)
        pipe.execute()
    client.zadd(spool.WAITING_POLICY, {envelope.id: envelope.received_at})  # accepted long ago
    return envelope


def classified(client: redis.Redis, envelope: Envelope) -> None:
    """Its deliver jobs queued, as the policy worker leaves them."""
    decisions = [Decision(domain=d) for d in envelope.recipients_by_domain()]
    spool.record_classifications(client, [(envelope, decisions)])
    for d in decisions:
        member = spool.waiting_job(envelope.id, d.domain)
        client.zadd(spool.WAITING_DELIVER, {member: envelope.received_at})


def sweep(client: redis.Redis, now: float) -> int:
    client.delete(rescue.LOCK)  # each call is a later sweep
    return rescue.sweep(client, now, GRACE, INTERVAL, batch_max=50)


def test_nothing_is_touched_while_every_task_is_there(store: redis.Redis) -> None:
    waiting = accepted(store, "a@x.test")
    done = accepted(store, "b@y.test")
    classified(store, done)
    now = time.time()
    assert sweep(store, now) == 0 and sweep(store, now + 40) == 0
    assert [len(b) for b in tasks(store, queueing.POLICY_LIST)] == [1, 1]
    assert [[j["id"] for j in b] for b in tasks(store, queueing.DELIVER_LIST)] == [[done.id]]
    assert waiting.id in tasks(store, queueing.POLICY_LIST)[0]


def test_a_lost_policy_task_is_queued_again_after_two_sweeps(store: redis.Redis) -> None:
    envelope = accepted(store, "a@x.test")
    store.rpop(queueing.POLICY_LIST)  # a worker took it and died before reserving it
    now = time.time()
    assert sweep(store, now) == 0, "one sweep only suspects"
    assert sweep(store, now + 40) == 1
    assert tasks(store, queueing.POLICY_LIST) == [[envelope.id]]
    assert spool.read_trace(store, envelope.id)[-1]["event"] == "requeued"


def test_a_lost_deliver_task_is_rebuilt_from_the_spool(store: redis.Redis) -> None:
    envelope = accepted(store, "a@x.test", "b@x.test", "c@y.test")
    classified(store, envelope)
    store.delete(queueing.POLICY_LIST, queueing.DELIVER_LIST)  # both deliver tasks lost
    now = time.time()
    sweep(store, now)
    assert sweep(store, now + 40) == 2
    jobs = sorted((j for b in tasks(store, queueing.DELIVER_LIST) for j in b), key=str)
    assert {(j["domain"], tuple(j["recipients"])) for j in jobs} == {
        ("x.test", ("a@x.test", "b@x.test")),
        ("y.test", ("c@y.test",)),
    }
    assert all(Decision.from_json(j["decision"]).domain == j["domain"] for j in jobs)


def test_work_reserved_by_a_worker_or_deferred_is_not_doubled(store: redis.Redis) -> None:
    reserved = accepted(store, "a@x.test")
    raw = cast(bytes, store.rpop(queueing.POLICY_LIST))  # taken and recorded as reserved (unacked)
    store.hset(queueing.UNACKED, "tag", json.dumps([json.loads(raw), "policy", "policy"]))
    deferred = accepted(store, "b@y.test")
    store.lpop(queueing.POLICY_LIST)  # its policy task ran
    classified(store, deferred)
    job = tasks(store, queueing.DELIVER_LIST)[0][0]
    store.delete(queueing.DELIVER_LIST)
    with store.pipeline(transaction=True) as pipe:
        scheduler.stage_deferral(pipe, job, time.time() + 3600)
        pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(job["id"], job["domain"]))
        pipe.execute()
    now = time.time()
    assert sweep(store, now) == 0 and sweep(store, now + 40) == 0
    assert tasks(store, queueing.POLICY_LIST) == [], f"{reserved.id} was queued twice"
    assert tasks(store, queueing.DELIVER_LIST) == []


def test_a_task_seen_again_between_sweeps_is_not_queued_twice(store: redis.Redis) -> None:
    """Caught between two of kombu's steps in the first sweep, back in the list by the next."""
    envelope = accepted(store, "a@x.test")
    raw = cast(bytes, store.rpop(queueing.POLICY_LIST))
    now = time.time()
    sweep(store, now)
    store.lpush(queueing.POLICY_LIST, raw)
    assert sweep(store, now + 40) == 0
    assert tasks(store, queueing.POLICY_LIST) == [[envelope.id]]


def test_a_lost_job_of_a_message_already_gone_just_leaves_the_waiting_set(
    store: redis.Redis,
) -> None:
    envelope = accepted(store, "a@x.test")
    classified(store, envelope)
    store.delete(queueing.POLICY_LIST, queueing.DELIVER_LIST, spool.msg_key(envelope.id))
    now = time.time()
    sweep(store, now)
    assert sweep(store, now + 40) == 0
    assert store.zcard(spool.WAITING_DELIVER) == 0 and tasks(store, queueing.DELIVER_LIST) == []


def test_one_sweeper_at_a_time(store: redis.Redis) -> None:
    accepted(store, "a@x.test")
    store.rpop(queueing.POLICY_LIST)
    now = time.time()
    sweep(store, now)
    store.delete(rescue.LOCK)
    assert rescue.sweep(store, now + 40, GRACE, INTERVAL, 50) == 1
    assert rescue.sweep(store, now + 41, GRACE, INTERVAL, 50) == 0, "the lock is held"


def test_a_sweep_reads_no_more_with_a_large_deferred_set(store: redis.Redis) -> None:
    """A retried job waits with its old acceptance time: the sweep looks, but its cost must not
    grow with the deferred set (it used to read all of it on every sweep)."""
    envelope = accepted(store, "a@x.test")
    classified(store, envelope)  # its job queued, old: the sweep looks at the queues
    store.delete(queueing.POLICY_LIST)
    with store.pipeline(transaction=False) as pipe:
        for i in range(20000):
            pipe.zadd(spool.DEFERRED, {json.dumps({"id": f"m{i}", "domain": "d" * 200}): i})
        pipe.execute()
    with redis.Redis(connection_pool=store.connection_pool) as client:
        client.delete(rescue.LOCK)
        before = int(client.client_info()["tot-net-out"])
        assert rescue.sweep(client, time.time(), GRACE, INTERVAL, 50) == 0
        sent = int(client.client_info()["tot-net-out"]) - before
    assert sent < 100_000, f"a sweep read {sent} bytes"


def test_a_queue_longer_than_the_sweep_reads_is_left_alone(store: redis.Redis) -> None:
    envelope = accepted(store, "a@x.test")
    store.rpop(queueing.POLICY_LIST)  # its task is lost ...
    for _ in range(rescue.LIMIT + 1):  # ... but the queue is too long to tell
        store.lpush(queueing.POLICY_LIST, queueing.classify_task(["other"]))
    now = time.time()
    assert sweep(store, now) == 0 and sweep(store, now + 40) == 0
    store.ltrim(queueing.POLICY_LIST, 0, 0)
    sweep(store, now + 80)
    assert sweep(store, now + 120) == 1 and envelope.id in tasks(store, queueing.POLICY_LIST)[-1]
