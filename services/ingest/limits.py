"""Counters in Redis shared by every ingest process: failed AUTHs per client, messages per tenant.

Keys (under the spool's ``tlsrelay:`` prefix):

- ``authfail:{ip}``: failed AUTH exchanges of one client address. The first failure creates it
  with a TTL of ``ingest.auth_failure_window``; later failures only count, so the window is fixed
  from the first failure and the address is unblocked when the key expires.
- ``rate:{tenant}:{n}``: messages (MAIL commands) of one tenant in fixed window ``n`` =
  ``floor(unix time / window)``, expiring one window after its last use.

Every write is one ``MULTI``/``EXEC``, so a key never exists without its TTL. Functions raise
``redis.exceptions.RedisError``, ``OSError`` (or ``TimeoutError`` through the caller's
deadline); the ingest server answers ``451 4.3.0`` then and accepts nothing unchecked.
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis

from services.common.spool import PREFIX
from services.common.values import RateLimit


def auth_failure_key(client_address: str) -> str:
    return f"{PREFIX}authfail:{client_address}"


def rate_key(tenant: str, window_index: int) -> str:
    return f"{PREFIX}rate:{tenant}:{window_index}"


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


async def auth_failures(client: aioredis.Redis, client_address: str) -> int:
    """How many AUTH exchanges of this client failed in its current window."""
    value = await client.get(auth_failure_key(client_address))
    return int(value or 0)


async def record_auth_failure(client: aioredis.Redis, client_address: str, window: float) -> int:
    """Count one failed AUTH (starting a window of ``window`` seconds); the new count."""
    key = auth_failure_key(client_address)
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(key, 0, px=_milliseconds(window), nx=True)
        pipe.incr(key)
        _created, count = await pipe.execute()
    return int(count)


async def count_message(
    client: aioredis.Redis, tenant: str, limit: RateLimit, now: float | None = None
) -> int:
    """Count one message of ``tenant`` in the current fixed window; the count so far in it."""
    now = time.time() if now is None else now
    window = max(limit.window, 0.001)  # the config allows "n/0s"; treat it as 1 ms
    key = rate_key(tenant, int(now // window))
    async with client.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.pexpire(key, _milliseconds(window))
        count, _expiring = await pipe.execute()
    return int(count)
