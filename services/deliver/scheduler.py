"""The deferred queue: jobs waiting in ``tlsrelay:deferred`` (a sorted set by due time) go back
onto the ``deliver`` queue when due.

Deferred jobs live in our own Redis structure, not in Celery countdowns/ETAs: with the Redis
transport a task delayed past ``visibility_timeout`` is handed out again (celery#7009, #2599,
kombu#337). ``move_due`` is safe to run in every deliver pod at once: one Lua script removes due
members and pushes their task atomically (one task per destination domain, up to
``delivery.batch_max`` jobs, moved only if all of them are still there), so a job is claimed by
exactly one caller and is never lost between the two steps. Restarts lose nothing: the sorted
set is the state. An entry that is not a job document (corruption, a hand edit) is kept but made
due again only an hour later, so it never blocks the jobs behind it.

Beside it, ``tlsrelay:deferred:since`` indexes the deferred *messages* by acceptance time (member
message id, score the time in its id), so the age of the oldest deferred message is one
``ZRANGE`` (the ``tlsrelay_queue_oldest_age_seconds`` gauge) rather than a scan of the set.
:func:`stage_deferral` writes both in the caller's transaction (``ZADD NX`` for the index: a
message stays at its first entry); :func:`stage_completion` drops a message from the index when
its last recipient is final. A message with something deferred once stays indexed until then;
if it disappears otherwise, :func:`prune_deferred_index` (run with the rescue sweep) drops it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis

from services.common import broker, liveness, queueing, retry, spool
from services.common.jobs import Job, job_key
from services.common.model import is_message_id
from services.deliver import rescue, sites

log = logging.getLogger("tlsrelay.scheduler")
UNREADABLE_RECHECK = 3600  # s: a corrupt entry of the deferred set is looked at again after this


def message_time(message_id: str) -> float | None:
    """When a message was accepted, from its id (12 hex digits of milliseconds since the epoch,
    see ``model.new_message_id``); None for anything that is not a message id."""
    return int(message_id[:12], 16) / 1000 if is_message_id(message_id) else None


def stage_deferral(pipe: redis.client.Pipeline, job: Job | Mapping[str, Any], due: float) -> None:
    """Buffer into ``pipe`` (the caller's transaction): ``job`` waits in the deferred set until
    ``due``, and its message is in the index of deferred messages. The member is the job's
    document with sorted keys, so the same job is the same member (services/common/jobs.py).
    A document that could not be read as a :class:`Job` is parked as it is, never dropped."""
    doc = job.to_json() if isinstance(job, Job) else job
    message_id, _ = job_key(doc)
    pipe.zadd(spool.DEFERRED, {json.dumps(doc, sort_keys=True): due})
    accepted = message_time(message_id)
    if accepted is not None:
        pipe.zadd(spool.DEFERRED_SINCE, {message_id: accepted}, nx=True)


def stage_completion(pipe: redis.client.Pipeline, message_id: str) -> None:
    """Buffer into ``pipe``: the message is final, out of the index of deferred messages."""
    pipe.zrem(spool.DEFERRED_SINCE, message_id)


def prune_deferred_index(client: redis.Redis) -> int:
    """Drop the oldest entries of the deferred index whose message is gone, up to the first that
    still exists (a few pages at most per call); return how many were dropped. The queue gauge
    skips such entries when it reads; this keeps the index from growing with them."""
    dropped = 0
    for _ in range(spool.DEFERRED_SINCE_PAGES):
        head = spool.deferred_since_page(client, 0)
        if not head:
            break
        alive = spool.messages_exist(client, [member for member, _ in head])
        gone = [member for (member, _), exists in zip(head, alive, strict=True) if not exists]
        if gone:
            dropped += int(client.zrem(spool.DEFERRED_SINCE, *gone))
        if any(alive):
            break
    return dropped


# KEYS[1] = deferred zset, KEYS[2] = deliver list, KEYS[3] = waiting:deliver zset.
# ARGV: groups, each: n, the group's task, then per job: member, waiting member, acceptance time.
# A group moves only if every member is still there (another scheduler may have taken one since
# the caller read them): then all its members leave the deferred set and its one task is pushed.
_MOVE_DUE = """
local i, moved = 1, 0
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local all = true
  for j = 0, n - 1 do
    if not redis.call('ZSCORE', KEYS[1], ARGV[i + 2 + 3 * j]) then
      all = false
      break
    end
  end
  if all then
    for j = 0, n - 1 do
      local at = i + 2 + 3 * j
      redis.call('ZREM', KEYS[1], ARGV[at])
      redis.call('ZADD', KEYS[3], ARGV[at + 2], ARGV[at + 1])
    end
    redis.call('LPUSH', KEYS[2], ARGV[i + 1])
    moved = moved + n
  end
  i = i + 2 + 3 * n
end
return moved
"""


def move_due(
    client: redis.Redis, now: float | None = None, limit: int = 500, batch_max: int = 50
) -> int:
    """Move up to ``limit`` due jobs to the ``deliver`` queue, one task per destination domain
    with up to ``batch_max`` jobs (after an outage, a domain's backlog goes out in batches over
    reused connections, not one Celery task per message); return how many moved. The documents
    move as they are: only their (message id, domain) is read here."""
    now = time.time() if now is None else now
    members: list[bytes] = client.zrangebyscore(  # type: ignore[assignment]
        spool.DEFERRED, "-inf", now, start=0, num=limit
    )
    if not members:
        return 0
    readable: list[tuple[bytes, dict[str, Any]]] = []
    unreadable: dict[bytes, float] = {}
    for member in members:
        try:
            doc = json.loads(member)
            job_key(doc)
        except (ValueError, TypeError, KeyError, IndexError):
            unreadable[member] = now + UNREADABLE_RECHECK
        else:
            readable.append((member, doc))
    if unreadable:
        # Kept, never dropped, but out of the way: due again in an hour, so a corrupt entry
        # neither blocks the jobs behind it nor disappears (logged here, hourly).
        client.zadd(spool.DEFERRED, unreadable, xx=True)
        log.error(
            "deferred set: %d unreadable entries (not a job document), looked at again in %ds: %r",
            len(unreadable), UNREADABLE_RECHECK, [m[:200] for m in unreadable][:5],
        )  # fmt: skip
    args: list[bytes | str | float] = []
    for chunk in queueing.domain_batches(readable, batch_max, lambda pair: job_key(pair[1])[1]):
        args += [len(chunk), queueing.deliver_task([doc for _, doc in chunk])]
        for member, doc in chunk:
            message_id, domain = job_key(doc)
            accepted = message_time(message_id) or now
            args += [member, spool.waiting_job(message_id, domain), accepted]
    moved: int = client.eval(
        _MOVE_DUE, 3, spool.DEFERRED, queueing.DELIVER_LIST, spool.WAITING_DELIVER, *args
    )
    return moved


class SchedulerThread(threading.Thread):
    """Runs ``move_due`` every ``interval`` seconds; :func:`rescue.reclaim` (dead workers'
    tasks) every ``liveness.INTERVAL``; every ``rescue_interval`` the housekeeping:
    :func:`rescue.sweep`, :func:`prune_deferred_index`, :func:`sites.prune_sites` and
    :func:`broker.migrate_legacy` (tasks an older release left in kombu's unprefixed keys; also
    once at start). Survives Redis outages and any other error: a failed round is logged and the
    next one tries again."""

    def __init__(
        self,
        redis_url: str,
        interval: float,
        batch_max: int = 50,
        rescue_interval: float = 30.0,
        visibility_timeout: float = 1800.0,
    ) -> None:
        super().__init__(name="tlsrelay-scheduler", daemon=True)
        self.redis_url = redis_url
        self.interval = interval
        self.batch_max = batch_max
        self.rescue_interval = rescue_interval  # see services/deliver/rescue.py
        self.visibility_timeout = visibility_timeout
        self._stopped = threading.Event()

    def run(self) -> None:
        client = spool.connect(self.redis_url)
        next_housekeeping = next_reclaim = time.monotonic()
        while not self._stopped.is_set():
            try:
                while move_due(client, batch_max=self.batch_max) > 0:
                    pass
                retry.move_due(client, time.time())
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + liveness.INTERVAL
                    rescue.reclaim(client, time.time(), liveness.INTERVAL)
                if time.monotonic() >= next_housekeeping:
                    next_housekeeping = time.monotonic() + self.rescue_interval
                    self.housekeeping(client, time.time())
            except redis.exceptions.RedisError as exc:
                log.warning("scheduler: Redis unavailable: %s", exc)
            except Exception:
                # Anything else (a bug, a corrupt entry no reader expected) must not end the
                # thread: without it nothing deferred would ever be sent again from this pod.
                log.exception("scheduler: round failed; the next round tries again")
            self._stopped.wait(self.interval)
        client.close()

    def housekeeping(self, client: redis.Redis, now: float) -> None:
        moved = broker.migrate_legacy(client, now, self.visibility_timeout)
        if moved:
            log.warning("moved %d tasks out of an older release's unprefixed queue keys", moved)
        grace = 2 * self.rescue_interval
        rescue.sweep(client, now, grace, self.rescue_interval, self.batch_max)
        prune_deferred_index(client)
        sites.prune_sites(client, now)

    def stop(self) -> None:
        self._stopped.set()
