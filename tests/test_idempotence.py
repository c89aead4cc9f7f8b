"""Work done twice must count once: two copies of a policy task running at the same time queue
one set of deliveries, and ``tlsrelay queue bounce`` takes an entry out of the deferred set only
in the transaction that records its bounce. Real Redis, the real policy service."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import queueing, spool
from services.common.config import Config
from services.common.jobs import Job
from services.common.model import Decision, Envelope
from services.deliver import queue, scheduler
from services.deliver.ledger import Ledger
from services.policy.tasks import PolicyService
from tests.test_batching import tasks
from tests.test_rescue import accepted


def config(tmp_path: Path) -> Config:
    return Config.model_validate({"hostname": "relay.test", "data_dir": str(tmp_path)})


def test_two_copies_of_a_policy_task_queue_one_set_of_deliveries(
    store: redis.Redis, valkey: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [accepted(store, "a@x.test", "b@y.test").id for _ in range(3)]
    store.delete(queueing.POLICY_LIST)
    both_read = threading.Barrier(2, timeout=20)
    read = spool.load_unclassified

    def read_then_meet(client: redis.Redis, message_ids: list[str]) -> list[Envelope]:
        loaded = read(client, message_ids)
        both_read.wait()  # each copy has seen the messages unclassified
        return loaded

    monkeypatch.setattr(spool, "load_unclassified", read_then_meet)
    errors: list[BaseException] = []

    def run(service: PolicyService) -> None:
        try:
            service.classify(ids)
        except BaseException as exc:
            errors.append(exc)

    copies = [threading.Thread(target=run, args=(PolicyService(config(tmp_path), valkey.url),))
              for _ in range(2)]  # fmt: skip
    for thread in copies:
        thread.start()
    for thread in copies:
        thread.join(30)
    assert errors == []
    jobs = sorted((j["id"], j["domain"]) for b in tasks(store, queueing.DELIVER_LIST) for j in b)
    assert jobs == sorted((i, d) for i in ids for d in ("x.test", "y.test"))
    for message_id in ids:
        events = [e["event"] for e in spool.read_trace(store, message_id)]
        assert events.count("classified") == 1, events
    assert store.zcard(spool.WAITING_POLICY) == 0


def deferred(store: redis.Redis, *recipients: str) -> tuple[Job, bytes]:
    """A message whose job waits in the deferred set; the job and its member."""
    envelope = accepted(store, *recipients)
    job = Job(envelope.id, "x.test", recipients, Decision(domain="x.test"))
    job = job.retry(list(recipients), "451 4.3.0 try later")
    with store.pipeline(transaction=True) as pipe:
        scheduler.stage_deferral(pipe, job, time.time() + 600)
        pipe.execute()
    members: list[bytes] = store.zrange(spool.DEFERRED, 0, 0)  # type: ignore[assignment]
    return job, members[0]


def test_a_bounce_that_fails_leaves_the_entry_deferred(
    store: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, member = deferred(store, "a@x.test")

    def lost_connection(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("connection lost while recording")

    with monkeypatch.context() as patched:
        patched.setattr(Ledger, "record", lost_connection)
        with pytest.raises(redis.ConnectionError):
            queue.bounce(config(tmp_path), store, job.id)
    assert store.zscore(spool.DEFERRED, member) is not None, "the entry must not be lost"

    assert queue.bounce(config(tmp_path), store, job.id) == ["a@x.test"]
    assert store.zcard(spool.DEFERRED) == 0
    # Final: the message and its per-recipient states are gone (issue #16, item 1); the trace
    # keeps the bounce.
    assert not store.exists(spool.msg_key(job.id), spool.rcpt_key(job.id))
    assert _events(store, job.id, "bounced")
    assert [e["action"] for e in _events(store, job.id, "dsn")] == ["failed"]


def test_an_entry_the_scheduler_took_is_not_bounced(store: redis.Redis, tmp_path: Path) -> None:
    job, member = deferred(store, "a@x.test")
    store.zrem(spool.DEFERRED, member)  # the scheduler moved it to the deliver queue
    assert queue.bounce(config(tmp_path), store, job.id) == []
    assert store.hgetall(spool.rcpt_key(job.id)) == {}


def test_a_bounce_never_bounces_a_recipient_already_delivered(
    store: redis.Redis, tmp_path: Path
) -> None:
    """The deferred entry still names a recipient that a later round delivered (a stale entry:
    a copy of the job ran meanwhile): only the others bounce, and the DSN names only them."""
    job, member = deferred(store, "a@x.test", "b@x.test")
    store.hset(spool.rcpt_key(job.id), "a@x.test", json.dumps({"state": "delivered"}))
    assert queue.bounce(config(tmp_path), store, job.id) == ["b@x.test"]
    assert store.zscore(spool.DEFERRED, member) is None
    (bounced,) = _events(store, job.id, "bounced")
    assert set(bounced["recipients"]) == {"b@x.test"}, bounced
    (notice,) = _events(store, job.id, "dsn")
    assert notice["action"] == "failed"
    # Every recipient final now: the message is finished.
    assert not store.exists(spool.msg_key(job.id), spool.rcpt_key(job.id))

    # All of them final already: the stale entry goes, nothing bounces, no DSN.
    job, member = deferred(store, "c@x.test")
    store.hset(spool.rcpt_key(job.id), "c@x.test", json.dumps({"state": "delivered"}))
    assert queue.bounce(config(tmp_path), store, job.id) == []
    assert store.zscore(spool.DEFERRED, member) is None
    assert not _events(store, job.id, "bounced") and not _events(store, job.id, "dsn")


def _events(store: redis.Redis, message_id: str, kind: str) -> Sequence[dict[str, Any]]:
    return [e for e in spool.read_trace(store, message_id) if e["event"] == kind]
