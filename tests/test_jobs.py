"""The delivery job document (services/common/jobs.py): what is already stored must still be found.

Deferred-set members are matched as strings (``ZADD`` de-duplicates, ``ZREM`` removes by bytes),
so a job read and written again must give back the very bytes the code before ``Job`` stored.
The literals below were written by that code (a policy task's job, and the member a deferred
round left in ``tlsrelay:deferred``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from services.common import queueing, spool
from services.common.config import Config
from services.common.jobs import Job, job_key
from services.common.model import Decision, Envelope, TlsMode
from services.deliver import scheduler
from services.deliver import tasks as deliver_tasks
from services.policy import tasks as policy_tasks

# The job of a ``deliver`` task, as the policy task queued it (its keys in insertion order).
TASK_JOB = (
    '{"id": "0190A1B2C3D4E5F60718", "domain": "dead.test", "recipients": ["a@dead.test", '
    '"b@dead.test"], "decision": {"domain": "dead.test", "tls": "enforced", "circumstances": '
    '["tls-partners"], "route": null, "route_tls_name": null, "tls_profile": null, "reasons": '
    '["tls-partners: rule says so"]}, "attempt": 1}'
)
# The deferred-set member the first round of that job left when the destination was down.
DEFERRED_MEMBER = (
    '{"attempt": 2, "decision": {"circumstances": ["tls-partners"], "domain": "dead.test", '
    '"reasons": ["tls-partners: rule says so"], "route": null, "route_tls_name": null, "tls": '
    '"enforced", "tls_profile": null}, "domain": "dead.test", "id": "0190A1B2C3D4E5F60718", '
    '"last_error": "421 4.4.1 connect failed: ConnectionRefusedError: [Errno 111] Connect call '
    'failed (\'127.0.0.1\', 56599)", "recipients": ["a@dead.test", "b@dead.test"]}'
)


def test_a_stored_job_reads_and_writes_back_to_the_same_bytes() -> None:
    task_job = Job.from_json(json.loads(TASK_JOB))
    assert json.dumps(task_job.to_json()) == TASK_JOB
    member = Job.from_json(json.loads(DEFERRED_MEMBER))
    assert json.dumps(member.to_json(), sort_keys=True) == DEFERRED_MEMBER
    assert (member.attempt, member.recipients) == (2, ("a@dead.test", "b@dead.test"))
    assert member.decision.tls is TlsMode.ENFORCED and task_job.last_error is None


def test_a_retry_of_the_stored_job_is_the_member_the_old_code_wrote() -> None:
    job = Job.from_json(json.loads(TASK_JOB))
    last = json.loads(DEFERRED_MEMBER)["last_error"]
    retry = job.retry(job.recipients, last)
    assert json.dumps(retry.to_json(), sort_keys=True) == DEFERRED_MEMBER


def test_an_old_member_is_found_removed_and_not_doubled(store: redis.Redis) -> None:
    """After an upgrade: the new code's deferral of the same job is the same member (one entry),
    and removing the job as the new code writes it removes the old entry."""
    store.zadd(spool.DEFERRED, {DEFERRED_MEMBER: 100.0})
    job = Job.from_json(json.loads(DEFERRED_MEMBER))
    with store.pipeline(transaction=True) as pipe:
        scheduler.stage_deferral(pipe, job, 200.0)
        pipe.execute()
    assert store.zrange(spool.DEFERRED, 0, -1, withscores=True) == [
        (DEFERRED_MEMBER.encode(), 200.0)
    ]
    assert store.zrem(spool.DEFERRED, json.dumps(job.to_json(), sort_keys=True)) == 1


def test_policy_queues_the_job_documents_it_always_queued(store: redis.Redis) -> None:
    envelope = Envelope("0190A1B2C3D4E5F60718", "s@origin.test", ("a@dead.test", "b@dead.test"))
    decision = Decision(
        "dead.test", TlsMode.ENFORCED, ("tls-partners",), reasons=("tls-partners: rule says so",)
    )
    with store.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, b"Subject: x\r\n\r\nx\r\n", 60, enqueue=False)
        pipe.execute()
    spool.record_classifications(store, [(envelope, [decision])])
    found = queueing.task_batch(store.lpop(queueing.DELIVER_LIST))  # type: ignore[arg-type]
    assert found == (queueing.TASK_DELIVER, [json.loads(TASK_JOB)])
    assert job_key(json.loads(TASK_JOB)) == ("0190A1B2C3D4E5F60718", "dead.test")


def test_a_message_gone_before_its_classification_is_recorded_leaves_nothing(
    store: redis.Redis,
) -> None:
    # Its hash gone between the policy worker's read and its write (deleted by an operator, or
    # — seen in `make soak-sentinel` — read from a master that the sentinel had just replaced,
    # written to the new one): the write must not create a msg:{id} holding only decisions (no
    # envelope, no TTL: never delivered, never removed) nor queue jobs for it.
    envelope = Envelope("0190A1B2C3D4E5F60719", "s@origin.test", ("a@gone.test",))
    store.zadd(spool.WAITING_POLICY, {envelope.id: 1.0})
    decided = [(envelope, [Decision("gone.test")])]
    done = spool.record_classifications(store, decided, message_ids=[envelope.id])
    assert done == []
    assert not store.exists(spool.msg_key(envelope.id)), "a message hash with only decisions"
    assert store.llen(queueing.DELIVER_LIST) == 0 and store.zcard(spool.WAITING_DELIVER) == 0
    assert store.zcard(spool.WAITING_POLICY) == 0, "its policy work is over all the same"


@pytest.fixture
def app() -> Iterator[Celery]:
    """A Celery app to register the real task wrappers on (their worker hooks removed again
    afterwards: no worker starts in this process)."""
    saved = [(signal, list(signal.receivers)) for signal in (worker_ready, worker_shutdown)]
    try:
        yield Celery("jobs-test", set_as_current=False)
    finally:
        for signal, receivers in saved:
            signal.receivers[:] = receivers


class Recorder:
    def __init__(self) -> None:
        self.config = Config()
        self.redis_url = "redis://127.0.0.1:1/0"  # never connected: the scheduler is not started
        self.batches: list[list[Any]] = []

    def deliver(self, jobs: list[Any], retries: int = 0) -> None:
        self.batches.append(jobs)

    def classify(self, message_ids: list[str]) -> None:
        self.batches.append(message_ids)


def test_old_task_payloads_are_still_accepted(app: Celery) -> None:
    """Tasks queued before tasks carried batches: one job, one message id."""
    deliver, classify = Recorder(), Recorder()
    deliver_tasks.register(app, deliver)  # type: ignore[arg-type]
    policy_tasks.register(app, classify)  # type: ignore[arg-type]
    job = json.loads(TASK_JOB)
    app.tasks[queueing.TASK_DELIVER](job)
    app.tasks[queueing.TASK_DELIVER]([job, job])
    app.tasks[queueing.TASK_CLASSIFY]("0190A1B2C3D4E5F60718")
    assert deliver.batches == [[job], [job, job]]
    assert classify.batches == [["0190A1B2C3D4E5F60718"]]
