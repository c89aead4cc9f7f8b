"""Connection reuse: open SMTP sessions kept per worker process, per destination and TLS profile.

After a transaction, the session is parked here instead of being closed (unless it failed or
the peer answered out of step); the next delivery to the same key takes it, checks it with
``RSET`` (anything but 250 — a server that timed us out, a dead socket — discards it) and skips
the connect, EHLO and TLS handshake. Only a session whose last transaction ended with a 250 to
the final dot (``clean``) and that was parked less than ``RECHECK_AFTER`` ago (the next message
of the same batch) skips the RSET — after a refused DATA, refused recipients or a refused sender
the server may still hold the transaction (Postfix does), and RSET ends it. If it died
meanwhile, MAIL fails before anything was sent and the delivery is retried once on a fresh
session (``services.deliver.session.attempt``). Postfix does the same with
``smtp_connection_cache`` and ``smtp_tls_connection_reuse``.

The key is (address, port, TLS mode, CA file, client certificate, expected certificate name):
an enforced or verified delivery can only ever take a session that was negotiated for exactly
that requirement, never a clear one. A session is used for at most ``max_messages``
transactions and kept idle at most ``idle_timeout`` seconds (checked when the pool is used:
between tasks the worker's event loop does not run, so nothing times out in the background).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiosmtplib

from services.deliver.tls import Outcome

RECHECK_AFTER = 2.0  # seconds parked after which a session is checked with RSET before use


@dataclass(frozen=True)
class PoolKey:
    address: str
    port: int
    mode: int  # TlsMode value
    ca_file: str | None
    client_cert: tuple[str, str] | None
    tls_name: str
    tlsa: tuple[str, ...] = ()  # DANE: the records the session was authenticated against


@dataclass
class Pooled:
    """A parked session and what it negotiated (copied into the attempts that reuse it)."""

    smtp: aiosmtplib.SMTP
    outcome: Outcome | None
    tls_version: str | None
    cipher: str | None
    uses: int = 1
    parked_at: float = field(default_factory=time.monotonic)
    # The last transaction ended with a 250 to the final dot: the server is between
    # transactions, and a session parked a moment ago can take the next MAIL without RSET.
    clean: bool = False
    leaf_verdict: str | None = None  # services.deliver.leafcheck's, for the attempts reusing it


class ConnectionPool:
    def __init__(self, max_messages: int, idle_timeout: float) -> None:
        self.max_messages = max_messages
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, list[Pooled]] = {}
        self.handshakes = 0  # sessions opened (for tests and benchmarks)
        self.reuses = 0

    @property
    def enabled(self) -> bool:
        return self.max_messages > 1

    def take(self, key: PoolKey) -> Pooled | None:
        """An idle session for ``key`` that is neither too old nor used up, if any."""
        sessions = self._idle.get(key, [])
        while sessions:
            pooled = sessions.pop()
            if self._fresh(pooled):
                self.reuses += 1
                return pooled
            pooled.smtp.close()
        return None

    def give(self, key: PoolKey, pooled: Pooled) -> bool:
        """Park a session after a transaction; False (caller closes it) when it is spent."""
        if not self.enabled or pooled.uses >= self.max_messages or not pooled.smtp.is_connected:
            return False
        pooled.parked_at = time.monotonic()
        self._idle.setdefault(key, []).append(pooled)
        return True

    def expire(self) -> None:
        """Close sessions idle for too long (called before each delivery)."""
        for sessions in self._idle.values():
            for pooled in [p for p in sessions if not self._fresh(p)]:
                sessions.remove(pooled)
                pooled.smtp.close()

    def close_all(self) -> None:
        for sessions in self._idle.values():
            for pooled in sessions:
                pooled.smtp.close()
        self._idle.clear()

    @staticmethod
    def needs_check(pooled: Pooled) -> bool:
        """Whether to send RSET before reusing ``pooled`` (see the module docstring)."""
        return not pooled.clean or time.monotonic() - pooled.parked_at >= RECHECK_AFTER

    def _fresh(self, pooled: Pooled) -> bool:
        idle = time.monotonic() - pooled.parked_at
        return (
            pooled.smtp.is_connected
            and idle < self.idle_timeout
            and pooled.uses < self.max_messages
        )
