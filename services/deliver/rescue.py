"""Re-queue work whose Celery task was lost, so nothing accepted waits forever.

kombu's Redis transport takes a task off its queue list (``BRPOP``) before it records it as
reserved (the ``unacked`` hash), and moves a reserved task back to the list in two steps when it
restores it: a worker's main process killed in between loses the task (``make soak`` found about
one main-process SIGKILL in ten doing so). The spool still names the work — ``waiting:policy``
(messages not yet classified) and ``waiting:deliver`` (jobs not yet recorded), both written in
the transactions that queue and consume it — so :func:`sweep` finds the members older than
``grace`` that no task refers to (not in the ``policy`` or ``deliver`` list, not reserved, not
parked for a retry) and queues a new task for them. (A deferred job is never in
``waiting:deliver``: the transaction that defers it removes it, and the scheduler's script adds
it back as it queues its task; so the deferred set, which can hold hundreds of thousands of
entries, is not read.) A member must be found so in two sweeps in a row (at
least ``interval`` apart) before it is re-queued, so a task caught between two of kombu's steps
is never doubled; a doubled task would do no harm anyway for ``policy`` (classification is
idempotent) and little for ``deliver`` (final recipients are never sent again).

Dead workers' tasks: a worker's main process killed (OOM, a node lost) leaves the tasks it took
in kombu's ``unacked`` hash, which kombu hands out again only after ``celery.visibility_timeout``
(30 minutes). Every worker beats in Redis naming the tasks it holds (services/common/
liveness.py); :func:`reclaim`, every few seconds, hands back to their queue the reserved tasks
taken more than ``liveness.TTL`` ago that no live worker holds — again only when two passes in a
row (at least ``interval`` apart) found them so, so a task acknowledged between the two reads of
one pass is never doubled. A killed worker's tasks are back in their queue about 25 s after its
death; the tasks of live workers are never touched.

One sweeper at a time across all deliver pods (a Redis lock); the suspects of the last sweep
are kept in Redis, so it does not matter which pod sweeps next. Cost while nothing is old: two
``ZRANGEBYSCORE ... LIMIT``. With old members (a backlog, retried jobs, or lost tasks) it reads
at most :data:`LIMIT` entries of each place a task can be — the oldest end of each queue list,
the reserved tasks, the retry set — whatever the backlog: when one of them holds more, the sweep
cannot tell lost from queued for that queue and leaves its members alone until it is shorter
(``bench/backlog.py`` measures a sweep with 200 000 deferred entries). Redis errors propagate
to the caller (the scheduler thread logs them and tries again).
"""

from __future__ import annotations

import json
import logging

import redis

from services.common import broker, liveness, queueing, retry, spool
from services.common.jobs import Job, job_key
from services.common.model import Decision, Envelope

log = logging.getLogger("tlsrelay.rescue")

LOCK = spool.PREFIX + "rescue:lock"
SUSPECTS = spool.PREFIX + "rescue:suspects"
RECLAIM_LOCK = spool.PREFIX + "reclaim:lock"
RECLAIM_SUSPECTS = spool.PREFIX + "reclaim:suspects"
LIMIT = 1000  # members looked at per sweep and queue


def sweep(client: redis.Redis, now: float, grace: float, interval: float, batch_max: int) -> int:
    """One sweep (if no other process holds the lock); return how many were re-queued."""
    if not client.set(LOCK, "1", nx=True, px=max(1, int(interval * 900))):  # 0.9 × interval
        return 0
    old_policy = _old(client, spool.WAITING_POLICY, now - grace)
    old_deliver = _old(client, spool.WAITING_DELIVER, now - grace)
    if not old_policy and not old_deliver:
        client.delete(SUSPECTS)
        return 0
    policy_refs, deliver_refs = _referenced(client)
    orphans: set[str] = set()
    if policy_refs is not None:
        orphans |= {f"p {m}" for m in old_policy if m not in policy_refs}
    if deliver_refs is not None:
        orphans |= {f"d {m}" for m in old_deliver if m not in deliver_refs}
    confirmed = _confirmed(client, SUSPECTS, orphans, interval)
    if not confirmed:
        return 0
    ids = sorted(m[2:] for m in confirmed if m.startswith("p "))
    jobs = sorted(m[2:] for m in confirmed if m.startswith("d "))
    requeued = _requeue_policy(client, ids) + _requeue_deliver(client, jobs, batch_max)
    log.warning("re-queued %d messages/jobs whose task was lost: %s", requeued, sorted(confirmed))
    return requeued


def _confirmed(client: redis.Redis, key: str, orphans: set[str], interval: float) -> set[str]:
    """The orphans an earlier pass suspected too (two passes in a row agree: never act on what
    may be between two steps of kombu's); the rest are kept in ``key`` as the next pass's
    suspects, expiring after three intervals."""
    previous = {m.decode() for m in client.smembers(key)}  # type: ignore[union-attr]
    confirmed = orphans & previous
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        if orphans - confirmed:
            pipe.sadd(key, *(orphans - confirmed))
            pipe.expire(key, max(1, int(interval * 3)))
        pipe.execute()
    return confirmed


def reclaim(client: redis.Redis, now: float, interval: float) -> int:
    """One pass handing back dead workers' reserved tasks (if no other process holds the lock);
    return how many went back to their queue. Cost: the reserved tasks taken before
    ``now - liveness.TTL`` (bounded by ``LIMIT``; as many as the workers hold, not the backlog)
    and one read of the live workers' beats."""
    if not client.set(RECLAIM_LOCK, "1", nx=True, px=max(1, int(interval * 900))):
        return 0
    old = broker.reserved_at(client, now - liveness.TTL, LIMIT)
    held = liveness.holders(client)  # also drops dead workers from the registry
    orphans = {tag for tag, _ in old if tag not in held}
    confirmed = _confirmed(client, RECLAIM_SUSPECTS, orphans, interval)
    restored = [tag for tag in sorted(confirmed) if broker.restore(client, tag)]
    if restored:
        log.warning("handed back %d tasks of dead workers: %s", len(restored), restored)
    return len(restored)


def _old(client: redis.Redis, key: str, before: float) -> set[str]:
    members: list[bytes] = client.zrangebyscore(  # type: ignore[assignment]
        key, "-inf", before, start=0, num=LIMIT
    )
    return {m.decode() for m in members}


def _referenced(client: redis.Redis) -> tuple[set[str] | None, set[str] | None]:
    """Message ids in ``policy`` tasks; ``"id domain"`` of jobs in ``deliver`` tasks — queued,
    reserved by a worker, or parked for a retry. None for a queue when a place holds more than
    ``LIMIT`` entries (not read whole: cannot tell)."""
    with client.pipeline(transaction=False) as pipe:
        for key in (queueing.POLICY_LIST, queueing.DELIVER_LIST):
            pipe.llen(key)
            pipe.lrange(key, -LIMIT, -1)  # the oldest end: old work is there
        pipe.hlen(queueing.UNACKED)
        pipe.hrandfield(queueing.UNACKED, LIMIT, withvalues=True)  # all of them when <= LIMIT
        pipe.zcard(retry.RETRY)
        pipe.zrange(retry.RETRY, 0, LIMIT - 1)
        n_policy, policy_list, n_deliver, deliver_list, n_unacked, unacked, n_retry, retried = (
            pipe.execute()
        )
    complete = n_unacked <= LIMIT and n_retry <= LIMIT
    raws = [*policy_list, *deliver_list, *retried]
    raws += [doc for doc in map(queueing.reserved, unacked[1::2]) if doc is not None]
    policy: set[str] = set()
    deliver: set[str] = set()
    for found in map(queueing.task_batch, raws):
        if found is None:
            continue
        name, batch = found
        if name == queueing.TASK_CLASSIFY:
            policy.update(i for i in batch if isinstance(i, str))
        elif name == queueing.TASK_DELIVER:
            deliver.update(spool.waiting_job(*job_key(d)) for d in batch if _is_job(d))
    return (
        policy if complete and n_policy <= LIMIT else None,
        deliver if complete and n_deliver <= LIMIT else None,
    )


def _is_job(doc: object) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("id"), str) and "domain" in doc


def _requeue_policy(client: redis.Redis, ids: list[str]) -> int:
    if not ids:
        return 0
    with client.pipeline(transaction=True) as pipe:
        for message_id in ids:
            pipe.rpush(spool.trace_key(message_id), spool.event("requeued", queue="policy"))
            pipe.expire(spool.trace_key(message_id), spool.TRACE_TTL)
        pipe.lpush(queueing.POLICY_LIST, queueing.classify_task(ids))
        pipe.execute()
    return len(ids)


def _requeue_deliver(client: redis.Redis, members: list[str], batch_max: int) -> int:
    """Rebuild each lost job from the spool (recipients of its domain, its decision); a
    message already gone just leaves the waiting set."""
    jobs, gone = [], []
    for member in members:
        message_id, domain = member.split(" ", 1)
        job = _job(client, message_id, domain)
        if job is None:
            gone.append(member)
        else:
            jobs.append(job)
    with client.pipeline(transaction=True) as pipe:
        if gone:
            pipe.zrem(spool.WAITING_DELIVER, *gone)
        for job in jobs:
            event = spool.event("requeued", queue="deliver", domain=job.domain)
            pipe.rpush(spool.trace_key(job.id), event)
            pipe.expire(spool.trace_key(job.id), spool.TRACE_TTL)
        for chunk in queueing.domain_batches(jobs, batch_max, lambda j: j.domain):
            pipe.lpush(queueing.DELIVER_LIST, queueing.deliver_task([j.to_json() for j in chunk]))
        pipe.execute()
    return len(jobs)


def _job(client: redis.Redis, message_id: str, domain: str) -> Job | None:
    """The job, one attempt after the last that deferred any of its recipients (a copy of an
    attempt that was recorded skips what it deferred: the lost task was its retry)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hmget(spool.msg_key(message_id), ["envelope", "decisions"])
        pipe.hgetall(spool.rcpt_key(message_id))
        (raw_envelope, raw_decisions), rcpts = pipe.execute()
    if raw_envelope is None or raw_decisions is None:
        return None
    envelope = Envelope.from_json(json.loads(raw_envelope))
    decisions = [Decision.from_json(d) for d in json.loads(raw_decisions)]
    decision = next((d for d in decisions if d.domain == domain), None)
    recipients = envelope.recipients_by_domain().get(domain)
    if decision is None or not recipients:
        return None
    _, deferred = spool.recipient_states(rcpts)
    attempt = 1 + max((deferred.get(r, 0) for r in recipients), default=0)
    return Job(message_id, domain, recipients, decision, attempt=attempt)
