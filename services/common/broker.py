"""kombu's Redis layout, touched directly: the one module that knows it (CONVENTIONS: a private
API of a library is touched in one file only; ``tests/test_broker.py`` fails when kombu changes).

What kombu's Redis transport keeps, all under our ``global_keyprefix`` (``queueing.KEY_PREFIX``):

- the queue lists (``tlsrelay:policy``, ``tlsrelay:deliver``): ``LPUSH`` by producers, ``BRPOP``
  from the right by workers;
- ``unacked``: delivery tag → JSON ``[message, exchange, routing key]`` of each task a worker
  took and has not acknowledged; ``unacked_index``: delivery tag → when it was taken. kombu
  itself moves an entry back to its queue after ``visibility_timeout``.

:func:`restore` hands one reserved task back to its queue (the right end: it is taken next),
atomically, so it races safely with kombu's own restore and with the worker's ack (whoever
removes the entry first wins; the other does nothing).

:func:`reserve` and :func:`unreserve` add and remove an entry of our own in ``unacked``: a
deliver task acknowledged while its jobs are still in flight (``delivery.tasks_per_process``)
stays reserved this way until they are recorded, so a dead pool process's batch is handed back
like any reserved task of a dead worker (``services/deliver/rescue.py``).

:func:`free_slots_on_failure` mends kombu's QoS so that an ack or a requeue that fails (Redis
unreachable, a failover) does not keep the task's prefetch slot forever: kept slots stop a worker
from consuming.

:func:`migrate_legacy` is the upgrade from releases without the prefix: tasks still in the old
lists ``policy`` / ``deliver`` move to the prefixed ones (oldest still first), and entries of the
old ``unacked`` hash older than the visibility timeout (their worker, of the old release, is gone
or would have restored them itself by then) are restored into the prefixed lists. Only tlsrelay's
own task documents are moved: another program's list of the same name is left alone. Redis errors
propagate.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from services.common import queueing

LEGACY_LISTS = {queueing.POLICY_LIST: queueing.QUEUE_POLICY,
                queueing.DELIVER_LIST: queueing.QUEUE_DELIVER}  # fmt: skip
LEGACY_UNACKED, LEGACY_UNACKED_INDEX = "unacked", "unacked_index"
OURS = '"task": "tlsrelay.'  # in the headers of every task document we build

# KEYS[1] = unacked, KEYS[2] = unacked_index; ARGV[1] = tag, ARGV[2] = key prefix of the lists.
# The entry's task goes to the right end of its queue's list, with kombu's "redelivered" mark.
_RESTORE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not raw then return 0 end
local ok, entry = pcall(cjson.decode, raw)
if not ok or type(entry) ~= 'table' or type(entry[1]) ~= 'table' then return -1 end
local message = entry[1]
if type(message['headers']) == 'table' then message['headers']['redelivered'] = true end
redis.call('RPUSH', ARGV[2] .. tostring(entry[3]), cjson.encode(message))
return 1
"""

# KEYS[1] = old list, KEYS[2] = new list; ARGV[1] = most to move, ARGV[2] = marker of ours.
# From the old list's left (newest) to the new list's right end: the oldest ends up rightmost.
_MOVE_LIST = """
local moved = 0
while moved < tonumber(ARGV[1]) do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head or not string.find(head, ARGV[2], 1, true) then break end
  redis.call('RPUSH', KEYS[2], redis.call('LPOP', KEYS[1]))
  moved = moved + 1
end
return moved
"""


def restore(client: redis.Redis, tag: str, unacked: str = queueing.UNACKED,
            index: str = queueing.UNACKED_INDEX) -> bool:  # fmt: skip
    """Move reserved task ``tag`` back to its queue; False when it was no longer reserved (acked
    or restored by someone else). An entry that is not a task document is dropped from the
    hash (kombu would fail on it too) and logged by the caller through the False."""
    done: int = client.eval(_RESTORE, 2, unacked, index, tag, queueing.KEY_PREFIX)
    return done == 1


def reserve(client: redis.Redis, tag: str, task: str, queue: str, now: float) -> None:
    """Record ``task`` (a task document, :func:`queueing.task_payload`) as reserved under
    ``tag``, taken at ``now``, as kombu records a task a worker took: :func:`restore` (or
    kombu's own restore, after the visibility timeout) puts it back on ``queue``'s list. The
    document is embedded as it is (it is JSON already): a batch's jobs are not encoded again."""
    entry = f"[{task}, {json.dumps(queue)}, {json.dumps(queue)}]"
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(queueing.UNACKED, tag, entry)
        pipe.zadd(queueing.UNACKED_INDEX, {tag: now})
        pipe.execute()


def unreserve(client: redis.Redis, tag: str) -> None:
    """The work reserved under ``tag`` is done: its entry goes (as kombu's ack removes one)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.hdel(queueing.UNACKED, tag)
        pipe.zrem(queueing.UNACKED_INDEX, tag)
        pipe.execute()


def migrate_legacy(client: redis.Redis, now: float, visibility_timeout: float,
                   limit: int = 1000) -> int:  # fmt: skip
    """Move up to ``limit`` tasks per list out of the unprefixed keys; return how many moved."""
    moved = 0
    for new, old in LEGACY_LISTS.items():
        if client.llen(old):
            moved += int(client.eval(_MOVE_LIST, 2, old, new, limit, OURS))
    tags: list[bytes] = client.zrangebyscore(  # type: ignore[assignment]
        LEGACY_UNACKED_INDEX, "-inf", now - visibility_timeout, start=0, num=limit
    )
    for tag in tags:
        raw = client.hget(LEGACY_UNACKED, tag)
        if raw is not None and OURS.encode() not in raw:
            continue  # another program's task: not ours to move
        moved += restore(client, tag.decode(), LEGACY_UNACKED, LEGACY_UNACKED_INDEX)
    return moved


def reserved_at(client: redis.Redis, before: float, limit: int) -> list[tuple[str, float]]:
    """(delivery tag, when taken) of up to ``limit`` reserved tasks taken before ``before``,
    oldest first: ``ZRANGEBYSCORE`` on the index, bounded."""
    found: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
        queueing.UNACKED_INDEX, "-inf", before, start=0, num=limit, withscores=True
    )
    return [(tag.decode(), score) for tag, score in found]


def free_slots_on_failure() -> None:
    """Make kombu's Redis QoS free a task's prefetch slot even when its ack or reject fails.

    kombu frees the slot (``virtual.QoS.ack``: the tag leaves ``_delivered``) only after the
    Redis call succeeded. An ack or requeue that fails — Redis unreachable, a Sentinel failover
    under way — kept the slot for the life of the channel; once every slot (``concurrency`` ×
    ``worker_prefetch_multiplier``) was kept, ``can_consume()`` stayed false and the worker never
    issued another ``BRPOP``: it lived, beat and did nothing until the stall watchdog ended it
    (``celery.stall_after``; found by ``make soak-sentinel``). With this, the failure is still
    raised (Celery logs "Couldn't ack/reject"); the task stays in ``unacked`` in Redis (or, after
    a failover, wherever the new master's copy left it), and comes back through the dead-worker
    hand-back or kombu's visibility timeout — never lost, never holding a slot. Idempotent."""
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual

    qos = kombu_redis.QoS
    if getattr(qos, "_tlsrelay_frees_slots", False):
        return
    ack, reject = qos.ack, qos.reject

    def ack_freeing(self: Any, delivery_tag: Any) -> None:
        try:
            ack(self, delivery_tag)
        except BaseException:
            virtual.QoS.ack(self, delivery_tag)
            raise

    def reject_freeing(self: Any, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            reject(self, delivery_tag, requeue=requeue)
        except BaseException:
            virtual.QoS.ack(self, delivery_tag)
            raise

    qos.ack, qos.reject = ack_freeing, reject_freeing
    qos._tlsrelay_frees_slots = True
