"""Connection reuse: open SMTP sessions kept per worker process, per destination and TLS profile.

After a transaction, the session is parked here instead of being closed (unless it failed or
the peer answered out of step); the next delivery to the same key takes it, checks it with
``RSET`` (anything but 250 — a server that timed us out, a dead socket — discards it) and skips
the connect, EHLO and TLS handshake. Only a session whose last transaction ended with a 250 to
the final dot (``clean``) and that was parked less than ``RECHECK_AFTER`` ago (the next message
of the same batch) skips the RSET — after a refused DATA, refused recipients or a refused sender
the server may still hold the transaction (Postfix does), and RSET ends it. If it died
meanwhile, MAIL fails before anything was sent and the delivery is retried once on a fresh
session (``services.deliver.session.attempt``). With PIPELINING the RSET leads the next
transaction's group instead of costing a round trip of its own. Postfix does the same with
``smtp_connection_cache`` and ``smtp_tls_connection_reuse``.

The key is (address, port, TLS mode, CA file, client certificate, expected certificate name):
an enforced or verified delivery can only ever take a session that was negotiated for exactly
that requirement, never a clear one. A session is used for at most ``max_messages``
transactions (its site's ``messages_per_connection``: ``Pooled.max_uses``) and kept idle at
most ``idle_timeout`` seconds (checked when the pool is used and at every shaping tick: the
worker's event loop runs between tasks, services/deliver/tasks.py).

**Successor sessions** (issue #20: the p99 at a distance). The message that found its session
spent used to open the next one itself: connect, greeting, EHLO, STARTTLS, handshake, EHLO —
about five round trips (250 ms at 40 ms), for about 1 % of messages at the default of 100, and
so the whole p99 at a distance. When a session is parked with a twentieth of its transactions
left (:meth:`ConnectionPool.successor_due`: exactly then, so once per session, and only where a
session may carry at least :data:`MIN_USES`), the delivery that parked it opens a successor in
the background (``services.deliver.session._successor``, :meth:`ConnectionPool.open_successor`)
and parks it beside it, unused (``uses`` 0, clean). It is opened by the same code with the same
TLS settings as that delivery's session, under the same key, so it holds exactly the same TLS
requirement; it is parked only when its TLS outcome is that session's (else closed, and the next
delivery opens its own as before). Its lease is taken like any other — connection limit,
connection rate, the site's line — but with no wait and without raising the site's ``waiting``
flag: at a full site, or while a round of any process waits for a connection there (its flag
stands), there is simply no successor. It is never an attempt: nothing is sent, nothing
recorded but a greeting that asks the site to slow down (the back-off, as an attempt's would);
a failure closes it and gives its lease back; its TLS session is TLSRPT's with its first
transaction (``Attempt.opened_ahead``). Parked, it is expired, closed for
another worker's waiting round and closed at shutdown like any parked session; one still opening
is cancelled when the pool closes (:meth:`ConnectionPool.close_all`), and is the first to go for
a round waiting for its site (:meth:`ConnectionPool.close_one`).

Traffic shaping (services/deliver/shaping.py): a parked session keeps the connection lease it
was opened with (``Pooled.lease``); whenever the pool closes a session, ``release`` is told, so
the lease goes with it. The site is part of the key: a session never carries another site's mail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiosmtplib

from services.deliver.tls import Outcome

if TYPE_CHECKING:
    from services.deliver.shaping import Lease

RECHECK_AFTER = 2.0  # seconds parked after which a session is checked with RSET before use
MIN_USES = 20  # transactions per session below which no successor is opened ahead of time
SPARE_SHARE = 20  # a successor opens when 1/SPARE_SHARE of a session's transactions are left
QUIT_TIMEOUT = 5.0  # seconds a dropped session's QUIT may take before it is cut


@dataclass(frozen=True)
class PoolKey:
    address: str
    port: int
    mode: int  # TlsMode value
    ca_file: str | None
    client_cert: tuple[str, str] | None
    tls_name: str
    tlsa: tuple[str, ...] = ()  # DANE: the records the session was authenticated against
    tlsa_names: tuple[str, ...] = ()  # DANE-TA: the names its certificate was checked for
    site: str = ""  # the shaping site's id (services/deliver/shaping.py)


@dataclass
class Pooled:
    """A parked session and what it negotiated (copied into the attempts that reuse it)."""

    smtp: aiosmtplib.SMTP
    outcome: Outcome | None
    tls_version: str | None
    cipher: str | None
    uses: int = 1  # transactions run on it (0: a successor not used yet)
    parked_at: float = field(default_factory=time.monotonic)
    # The last transaction ended with a 250 to the final dot: the server is between
    # transactions, and a session parked a moment ago can take the next MAIL without RSET.
    clean: bool = False
    lease: Lease | None = None  # its connection lease (traffic shaping)
    max_uses: int | None = None  # transactions per session at its site (None: the pool's)
    leaf_verdict: str | None = None  # services.deliver.leafcheck's, for the attempts reusing it
    # A successor's (uses 0) new TLS session, for its first transaction's attempt (TLSRPT):
    # the leaf check of MTA-STS testing mode, our address, the DANE match.
    verify_code: int | None = None
    local_address: str | None = None
    dane: str | None = None


class ConnectionPool:
    def __init__(
        self,
        max_messages: int,
        idle_timeout: float,
        release: Callable[[Lease], None] = lambda lease: None,
    ) -> None:
        self.max_messages = max_messages
        self.idle_timeout = idle_timeout
        self.release = release  # told of every closed session's lease
        self._closing: set[asyncio.Task[None]] = set()  # sessions being closed (QUIT)
        self._opening: dict[asyncio.Task[None], str] = {}  # successors being opened → site
        self._idle: dict[PoolKey, list[Pooled]] = {}
        self.handshakes = 0  # sessions opened (for tests and benchmarks)
        self.reuses = 0

    @property
    def enabled(self) -> bool:
        return self.max_messages > 1

    def take(self, key: PoolKey) -> Pooled | None:
        """An idle session for ``key`` that is neither too old nor used up, if any: the one
        parked last, but a successor only when no session that has carried mail is left (it
        waits for the session it follows to run out, not the other way round)."""
        sessions = self._idle.get(key, [])
        while sessions:
            last = len(sessions) - 1
            pooled = sessions.pop(next((i for i in range(last, -1, -1) if sessions[i].uses), last))
            if self._fresh(pooled):
                self.reuses += 1
                return pooled
            self.drop(pooled)
        return None

    def has(self, key: PoolKey) -> bool:
        """Whether an idle session for ``key`` that :meth:`take` would hand out is parked."""
        return any(self._fresh(pooled) for pooled in self._idle.get(key, []))

    def give(self, key: PoolKey, pooled: Pooled) -> bool:
        """Park a session after a transaction; False (caller closes it) when it is spent."""
        if pooled.uses >= self._max(pooled) or not pooled.smtp.is_connected:
            return False
        pooled.parked_at = time.monotonic()
        self._idle.setdefault(key, []).append(pooled)
        return True

    def expire(self) -> None:
        """Close sessions idle for too long (called before each delivery)."""
        for sessions in self._idle.values():
            for pooled in [p for p in sessions if not self._fresh(p)]:
                sessions.remove(pooled)
                self.drop(pooled)

    def successor_due(self, pooled: Pooled) -> bool:
        """Whether parking ``pooled`` (just given back) calls for its successor: it has exactly
        a twentieth of its transactions left, and may carry at least :data:`MIN_USES`."""
        limit = self._max(pooled)
        return limit >= MIN_USES and pooled.uses == limit - limit // SPARE_SHARE

    def open_successor(self, opening: Coroutine[Any, Any, None], site: str = "") -> None:
        """Run ``opening`` (a successor being opened and parked, to ``site``) on the running
        loop; it is cancelled by :meth:`close_all`, or by :meth:`close_one` for a round waiting
        for its site, if still running."""
        task = asyncio.get_running_loop().create_task(opening)
        self._opening[task] = site
        task.add_done_callback(lambda done: self._opening.pop(done, None))

    @property
    def opening(self) -> int:
        """How many successors are being opened now."""
        return len(self._opening)

    def close_all(self) -> None:
        for task in list(self._opening):  # its own cleanup closes the session and the lease
            task.cancel()
        for sessions in self._idle.values():
            for pooled in sessions:
                self.drop(pooled)
        self._idle.clear()

    async def closed(self) -> None:
        """Wait for the successors being opened and the sessions being closed (each QUIT
        bounded by :data:`QUIT_TIMEOUT`)."""
        while waiting := set(self._opening) | self._closing:
            await asyncio.gather(*waiting, return_exceptions=True)

    def drop(self, pooled: Pooled) -> None:
        """Close a session taken from (or leaving) the pool; its lease goes with it — once the
        session is really closed (QUIT answered, or failed), so that the destination never
        sees the next session of that lease open beside this one."""
        lease, pooled.lease = pooled.lease, None
        if lease is None:
            pooled.smtp.close()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tests, shutdown): close at once
            pooled.smtp.close()
            self.release(lease)
            return
        task = loop.create_task(self._quit(pooled.smtp, lease))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit(self, smtp: aiosmtplib.SMTP, lease: Lease) -> None:
        try:
            if smtp.is_connected:
                await asyncio.wait_for(smtp.quit(), timeout=QUIT_TIMEOUT)
        except Exception:  # dead, slow or confused: closed below all the same
            pass
        finally:
            smtp.close()
            self.release(lease)

    def leases(self) -> list[Lease]:
        """The leases of the parked sessions."""
        return [p.lease for s in self._idle.values() for p in s if p.lease is not None]

    def close_one(self, site: str) -> int:
        """Close the longest-parked session of ``site`` (another worker waits for its lease);
        return how many were closed (0 or 1). A successor still opening there goes first: it
        carries nothing, and a slow destination may hold it (and its lease) for minutes; its
        cancellation hangs up and gives the lease back at once."""
        for task, of in self._opening.items():
            if of == site and not task.done() and not task.cancelling():
                task.cancel()
                return 1
        parked = [(p.parked_at, key, p) for key, s in self._idle.items() if key.site == site
                  for p in s]  # fmt: skip
        if not parked:
            return 0
        _, key, pooled = min(parked, key=lambda item: item[0])
        self._idle[key].remove(pooled)
        self.drop(pooled)
        return 1

    def _max(self, pooled: Pooled) -> int:
        return pooled.max_uses if pooled.max_uses is not None else self.max_messages

    @staticmethod
    def needs_check(pooled: Pooled) -> bool:
        """Whether to send RSET before reusing ``pooled`` (see the module docstring)."""
        return not pooled.clean or time.monotonic() - pooled.parked_at >= RECHECK_AFTER

    def _fresh(self, pooled: Pooled) -> bool:
        idle = time.monotonic() - pooled.parked_at
        lost = pooled.lease is not None and pooled.lease.lost  # expired: others may have it
        return (
            pooled.smtp.is_connected
            and idle < self.idle_timeout
            and pooled.uses < self._max(pooled)
            and not lost
        )
