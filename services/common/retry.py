"""A task that raised is retried later, never dropped.

With ``task_acks_late``, Celery rejects a task that raised without requeueing it, and kombu then
deletes it: the work would be lost. So the policy and deliver tasks catch every exception and
call :func:`failed`, which parks the task — a new document of the same task and batch, its
``retries`` header one higher — in ``tlsrelay:retry`` (a sorted set by due time), with an
``error`` event naming the exception in each message's trace, and returns normally (the task is
acknowledged: its work is safe in the set). The deliver scheduler moves due entries back to their
queue (:func:`move_due`, one atomic script). The work stays in ``waiting:policy`` /
``waiting:deliver`` meanwhile (the queue gauges count it; the rescue sweep sees it here).

Backoff: 1, 2, 4, 8, 16 s for the first :data:`CAP` tries, so a Redis blip costs seconds; after
that the caller's ``give_up`` takes over (deliver: the jobs become ordinary deferrals, retried on
``delivery.retry_schedule`` and bounced after ``delivery.max_queue_lifetime``), or, when there
is none (policy), the task keeps coming back every :data:`SLOW` seconds. Never dropped, never
looping hot.

If parking fails too (Redis unreachable), :func:`failed` raises Celery's ``Reject(requeue=True)``
after a pause of a second: kombu puts the task back in its queue, or — if Redis cannot take even
that — the entry stays reserved and is handed back by the dead-task sweep or kombu's own restore.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery.exceptions import Reject

from services.common import queueing, spool

log = logging.getLogger("tlsrelay.retry")

RETRY = spool.PREFIX + "retry"
CAP = 5  # quick tries before ``give_up``
SLOW = 300.0  # seconds between tries after the cap when nobody takes over


def delay(retries: int) -> float:
    return float(2**retries) if retries < CAP else SLOW


def failed(
    client: redis.Redis,
    task: str,
    batch: Sequence[Any],
    retries: int,
    error: BaseException,
    give_up: Callable[[], None] | None = None,
) -> None:
    """Park a task that raised ``error`` for a later try (see the module docstring)."""
    text = f"{type(error).__name__}: {error}"[:500]
    log.error("task %s failed (try %d), retried later: %s", task, retries + 1, text)
    try:
        if retries + 1 >= CAP and give_up is not None:
            give_up()
        else:
            _park(client, task, batch, retries, text)
    except (redis.exceptions.RedisError, OSError) as exc:
        log.error("could not park the failed task %s, putting it back in its queue: %s", task, exc)
        time.sleep(1.0)  # a broken Redis must not make this a hot loop
        raise Reject(str(exc), requeue=True) from exc


def _park(client: redis.Redis, task: str, batch: Sequence[Any], retries: int, text: str) -> None:
    queue = queueing.QUEUE_POLICY if task == queueing.TASK_CLASSIFY else queueing.QUEUE_DELIVER
    doc = queueing.task_payload(task, [list(batch)], queue, retries=retries + 1)
    due = time.time() + delay(retries)
    with client.pipeline(transaction=True) as pipe:
        pipe.zadd(RETRY, {doc: due})
        for message_id in _message_ids(batch):
            event = spool.event("error", error=text, attempt=retries + 1, retry_at=round(due, 3))
            pipe.rpush(spool.trace_key(message_id), event)
            pipe.expire(spool.trace_key(message_id), spool.TRACE_TTL)  # never a key for ever
        try:
            pipe.execute()
            return
        except redis.exceptions.ResponseError:  # a trace key of the wrong type, say
            pass
    client.zadd(RETRY, {doc: due})  # the work first; its trace events could not be written


def _message_ids(batch: Sequence[Any]) -> list[str]:
    ids = {item if isinstance(item, str) else item.get("id") for item in batch
           if isinstance(item, str | dict)}  # fmt: skip
    return sorted(i for i in ids if isinstance(i, str))


# KEYS[1] = retry set; ARGV[1] = now, ARGV[2] = limit, ARGV[3] = key prefix of the lists.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local moved = 0
for _, doc in ipairs(due) do
  local ok, queue = pcall(function()
    return cjson.decode(doc)['properties']['delivery_info']['routing_key'] end)
  if ok and type(queue) == 'string' then  -- anything else stays (logged by nobody, never lost)
    redis.call('ZREM', KEYS[1], doc)
    redis.call('LPUSH', ARGV[3] .. queue, doc)
    moved = moved + 1
  end
end
return moved
"""


def move_due(client: redis.Redis, now: float, limit: int = 100) -> int:
    """Move up to ``limit`` due retries back to their queue; return how many moved."""
    moved: int = client.eval(_MOVE_DUE, 1, RETRY, now, limit, queueing.KEY_PREFIX)
    return moved


def parked(client: redis.Redis, limit: int) -> list[bytes]:
    """Up to ``limit`` parked task documents (soonest due first)."""
    docs: list[bytes] = client.zrange(RETRY, 0, limit - 1)  # type: ignore[assignment]
    return docs
