"""The deferred queue: jobs waiting in ``tlsrelay:deferred`` (a sorted set by due time) go back
onto the ``deliver`` queue when due.

Deferred jobs live in our own Redis structure, not in Celery countdowns/ETAs: with the Redis
transport a task delayed past ``visibility_timeout`` is handed out again (celery#7009, #2599,
kombu#337). ``move_due`` is safe to run in every deliver pod at once: one Lua script removes each
due member and pushes its task atomically, so a job is claimed by exactly one caller and is never
lost between the two steps. Restarts lose nothing: the sorted set is the state.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis

from services.common import queueing, spool

log = logging.getLogger("tlsrelay.scheduler")

# KEYS[1] = deferred zset, KEYS[2] = deliver list; ARGV = member1, task1, member2, task2, ...
_MOVE_DUE = """
local moved = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
"""


def move_due(client: redis.Redis, now: float | None = None, limit: int = 500) -> int:
    """Move up to ``limit`` due jobs to the ``deliver`` queue; return how many moved."""
    now = time.time() if now is None else now
    members: list[bytes] = client.zrangebyscore(  # type: ignore[assignment]
        spool.DEFERRED, "-inf", now, start=0, num=limit
    )
    if not members:
        return 0
    args: list[bytes | str] = []
    for member in members:
        args += [member, queueing.deliver_task(json.loads(member))]
    moved: int = client.eval(_MOVE_DUE, 2, spool.DEFERRED, queueing.QUEUE_DELIVER, *args)
    return moved


class SchedulerThread(threading.Thread):
    """Runs ``move_due`` every ``interval`` seconds until ``stop()``; survives Redis outages."""

    def __init__(self, redis_url: str, interval: float) -> None:
        super().__init__(name="tlsrelay-scheduler", daemon=True)
        self.redis_url = redis_url
        self.interval = interval
        self._stopped = threading.Event()

    def run(self) -> None:
        client = spool.connect(self.redis_url)
        while not self._stopped.is_set():
            try:
                while move_due(client) > 0:
                    pass
            except redis.exceptions.RedisError as exc:
                log.warning("scheduler: Redis unavailable: %s", exc)
            self._stopped.wait(self.interval)
        client.close()

    def stop(self) -> None:
        self._stopped.set()
