"""Redis must never evict: the start-up check of ``maxmemory-policy``.

The spool keeps accepted mail in Redis and nowhere else, so a Redis that evicts keys when it
reaches ``maxmemory`` drops mail that was answered ``250``: ``allkeys-*`` policies evict message
bodies and queues, ``volatile-*`` ones the keys that carry a TTL (delivery claims, in-flight
marks, traces, shaping leases). Only ``noeviction`` is safe: a full Redis then refuses writes,
and ingest answers ``451 4.3.0`` instead of losing anything.

:func:`check` runs at the start of every service that uses Redis (``tlsrelay ingest``,
``policy``, ``deliver`` and ``run``, see ``services/cli.py``):

- ``maxmemory-policy`` other than ``noeviction`` → :class:`EvictingRedis`, whose text names the
  setting (the command prints it and exits 1 before it serves anything);
- ``CONFIG GET`` not permitted (managed Redis services often rename or forbid ``CONFIG``; an ACL
  user without ``+config``) → one warning in the log, and the service starts: the operator must
  make sure of the policy;
- Redis unreachable → one warning, and the service starts (it answers ``451``/retries until
  Redis is back); the policy is checked again at the next start.

It also refuses a Redis older than 7.0 (:class:`OldRedis`, from ``INFO server``'s
``redis_version``; Valkey reports the Redis version it is compatible with): the delivery claim
uses ``SET … NX GET`` (services/deliver/claims.py), which older servers refuse — every delivery
would fail and be retried for ever. A version that cannot be read is let through.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger("tlsrelay.redis")

REQUIRED = "noeviction"


MIN_VERSION = (7, 0)  # SET with NX and GET together (Redis 7.0)


class UnfitRedis(Exception):
    """Redis cannot be used; ``str()`` is the operator-facing message."""


class EvictingRedis(UnfitRedis):
    """Redis is configured to evict keys."""


class OldRedis(UnfitRedis):
    """Redis is older than :data:`MIN_VERSION`."""


def check(client: redis.Redis) -> str | None:
    """Raise :class:`EvictingRedis` unless Redis's ``maxmemory-policy`` is ``noeviction``, and
    :class:`OldRedis` for a Redis older than 7.0.
    Returns the policy read, or None when it could not be read (a warning was logged)."""
    try:
        reply: dict[object, object] = client.config_get("maxmemory-policy")  # type: ignore[assignment]
    except redis.exceptions.ResponseError as exc:  # NOPERM, or CONFIG renamed/disabled
        log.warning(
            "redis: cannot read maxmemory-policy (%s); tlsrelay needs noeviction: make sure "
            "of it, an evicting Redis loses accepted mail",
            exc,
        )
        return None
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning(
            "redis: not reachable to check maxmemory-policy (%s); checked at next start", exc
        )
        return None
    _check_version(client)
    policy = _text(reply.get("maxmemory-policy") or reply.get(b"maxmemory-policy"))
    if policy != REQUIRED:
        raise EvictingRedis(
            f"redis: maxmemory-policy is {policy}; tlsrelay needs {REQUIRED} (an evicting "
            "Redis drops accepted mail: allkeys-* evicts message bodies and queues, volatile-* "
            "the keys with a TTL). Set 'maxmemory-policy noeviction' in the Redis configuration"
        )
    return policy


def _check_version(client: redis.Redis) -> None:
    try:
        info: dict[str, object] = client.info("server")
    except (redis.exceptions.RedisError, OSError):
        return
    version = _text(info.get("redis_version", ""))
    if not version_ok(version):
        raise OldRedis(
            f"redis: version {version}; tlsrelay needs Redis {'.'.join(map(str, MIN_VERSION))} "
            "or later (or Valkey): delivery claims use SET with NX and GET together"
        )


def version_ok(version: str) -> bool:
    """Whether ``redis_version`` is at least :data:`MIN_VERSION` (an unreadable one passes)."""
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return True
    return len(parts) < 2 or parts >= MIN_VERSION


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
