"""Review of successor sessions (services/deliver/pool.py, "Successor sessions"): what a
successor must keep of the contracts a session opened by an attempt keeps — TLSRPT counts its
TLS session, it never takes a connection another process waits for, and a destination that
tells it to slow down is heard.

Real Redis (the ``store`` fixture), real STARTTLS sinks on loopback (tests/peers.py), the
deliverer's own session code and traffic shaping.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import cast

import aiosmtplib
import pytest
import redis

from services.common import spool
from services.common.config import Config
from services.common.model import Envelope, TlsMode
from services.deliver import mtasts, observe, tlsrpt
from services.deliver.attempt import Attempt, Hooks, Peer, Timeouts, TlsSettings
from services.deliver.pool import ConnectionPool, Pooled, PoolKey
from services.deliver.session import attempt
from services.deliver.shaping import Lease, Shaper, Throttle
from tests.peers import Sink
from tests.test_successor import BODY, DOMAIN, TIMEOUTS, Relay, ok, site_for, until

# MTA-STS testing mode: the session does not verify; the leaf is checked afterwards.
TESTING = TlsSettings(mode=TlsMode.OPPORTUNISTIC, check_leaf=True)


async def send(
    relay: Relay, n: int, settings: TlsSettings, timeouts: Timeouts = TIMEOUTS
) -> Attempt:
    gate = relay.shaper.gate(relay.site)
    envelope = Envelope(id=f"0123456789ab-r{n}", sender="s@o.test", recipients=())
    try:
        return await attempt(
            relay.peer, envelope, [f"r{n}@{DOMAIN}"], BODY, settings, timeouts, Hooks(),
            relay.pool, gate,
        )  # fmt: skip
    finally:
        gate.close()


def test_tlsrpt_counts_the_tls_session_of_a_successor(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MTA-STS testing mode, a certificate whose name does not match the MX host: every new
    TLS session is a ``certificate-host-mismatch`` failure for TLSRPT (RFC 8460 counts
    sessions). 21 messages at 20 a session are two TLS sessions at the destination; before the
    change the 21st message opened the second itself and TLSRPT counted both. The successor
    opens it instead and its first message rides it as ``reused``: the leaf check it made was
    dropped, and TLSRPT counted one session — with steady traffic every session after the first
    is a successor, so the failure was never reported again."""
    monkeypatch.setattr(observe, "attempt", lambda result, seconds: None)
    with Sink("starttls") as sink:
        relay = Relay(store, site_for(sink.port), sink.port)
        relay.peer = Peer(f"mx.{DOMAIN}", "127.0.0.1", sink.port, f"mx.{DOMAIN}")

        async def run() -> list[Attempt]:
            try:
                results = [await send(relay, n, TESTING) for n in range(19)]
                await until(lambda: len(relay.pool.leases()) == 2, sink.summary)
                results += [await send(relay, 19, TESTING), await send(relay, 20, TESTING)]
                return results
            finally:
                await relay.wind_down(sink)

        results = asyncio.run(run())
    assert all(ok(r) for r in results), results
    assert sink.stats()["tls_handshakes_ok"] == 2, sink.summary()
    assert results[0].verify_code == mtasts.HOSTNAME_MISMATCH
    found = tlsrpt.tally(tlsrpt.StsRound(DOMAIN), results)
    tallied = found["none"]
    assert tallied.successes == 0
    failures = {detail[0]: n for detail, n in tallied.failures.items()}
    assert failures == {"certificate-host-mismatch": 2}, tallied.failures
    # the sending-mta-ip of each failed session is known (RFC 8460 §4.4)
    assert all(detail[1] == "127.0.0.1" for detail in tallied.failures), tallied.failures


def test_a_successor_does_not_take_the_connection_another_process_waits_for(
    store: redis.Redis,
) -> None:
    """A site of one connection: process B's round waits for it (the site's ``waiting`` flag
    stands). The connection comes free; process A's successor look (``waits=False``) must not
    take it — a successor is opened for a connection nobody needs yet, B's message waits for
    one now. Before the fix the look took it (no line at the site: the flag was not read), B's
    round met a full site again, and A's tick then closed a parked session of A's for B."""
    site = site_for(2525, connections=1)
    a, b = Shaper(Config(), store), Shaper(Config(), store)

    async def run() -> tuple[Lease | Throttle, Lease | Throttle, Lease | Throttle]:
        held = await a.take(site)  # A's session
        assert isinstance(held, Lease)
        waiting = await b.take(site)  # B's round: the site is full, it waits (flag set)
        assert isinstance(waiting, Throttle)
        assert store.exists(spool.site_key("waiting", site.id))
        a.release(held)  # A's session closes
        a.tick()  # its lease leaves Redis: the connection is free
        successor = await a.take(site, waits=False)
        again = await b.take(site)
        return held, successor, again

    _, successor, again = asyncio.run(run())
    assert isinstance(successor, Throttle), successor
    assert isinstance(again, Lease), again


def test_a_successor_refused_with_421_steps_the_site_back(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination answers the successor's connection with ``421 4.7.0 Too many
    connections``: a round that met that greeting steps the site's connection limit down for
    every worker (delivery.backoff); the successor's must too, else every session of every
    worker asks again for the connection the destination just refused (and a destination
    counting such refusals blocks the relay)."""
    monkeypatch.setattr(observe, "attempt", lambda result, seconds: None)
    busy = "421 4.7.0 Too many connections from your address"
    with Sink("starttls", greeting=lambda n: busy if n == 2 else None) as sink:
        relay = Relay(store, site_for(sink.port), sink.port)

        async def run() -> list[Attempt]:
            try:
                results = [await send(relay, n, TESTING) for n in range(19)]
                await until(lambda: relay.pool.opening == 0, sink.summary)
                assert sink.stats()["connections"] == 2, sink.summary()
                return results
            finally:
                await relay.wind_down(sink)

        results = asyncio.run(run())
    assert all(ok(r) for r in results), results
    steps = store.hget(spool.site_key("backoff", relay.site.id), "steps")
    assert steps is not None and int(steps) == 1, steps


class _Open:
    """An open session as far as the pool looks at one (ConnectionPool reads is_connected)."""

    is_connected = True

    def close(self) -> None:
        self.is_connected = False


def test_take_hands_out_the_session_that_carried_mail_before_its_successor() -> None:
    """The successor is parked after the session it follows (its handshake ends after that
    session's transaction): taken last-parked-first, it would carry the mail while the old
    session waits with its last transactions — test_successor's message counts do not tell the
    two apart, this does."""
    pool = ConnectionPool(20, 60)
    key = PoolKey("127.0.0.1", 25, int(TlsMode.OPPORTUNISTIC), None, None, "localhost")
    old = Pooled(cast(aiosmtplib.SMTP, _Open()), None, None, None, uses=19, max_uses=20)
    new = Pooled(cast(aiosmtplib.SMTP, _Open()), None, None, None, uses=0, max_uses=20)
    assert pool.give(key, old) and pool.give(key, new)
    assert pool.take(key) is old
    assert pool.take(key) is new


def test_a_successor_stuck_opening_yields_its_connection_to_a_waiting_round(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site of two connections; A's session has one transaction left and its successor hangs
    in STARTTLS (a tarpit: the reply may take the whole command timeout, 5 minutes by default).
    Process B's round waits for a connection: A's tick closes one of A's sessions for it. The
    successor, which carries nothing and may hold its lease for minutes, is the one to go — not
    the parked session with a message left (A's next message would then find no session, and
    the site full of B's and A's own stuck successor). Before the fix the tick could only close
    parked sessions: it closed the parent."""
    monkeypatch.setattr(observe, "attempt", lambda result, seconds: None)
    patient = replace(TIMEOUTS, command=300)
    with Sink("starttls") as sink:
        relay = Relay(store, site_for(sink.port, connections=2), sink.port)
        other = Shaper(Config(), store)

        async def run() -> list[Attempt]:
            try:
                results = [await send(relay, 0, TESTING, patient)]
                sink.starttls_delay = 300  # from now on: the successor's STARTTLS hangs
                results += [await send(relay, n, TESTING, patient) for n in range(1, 19)]
                await until(lambda: sink.starttls_busy_peak == 1, sink.summary)
                (parent,) = relay.pool.leases()
                (successor,) = [lease for lease in relay.shaper.held.values() if lease != parent]
                assert isinstance(await other.take(relay.site), Throttle)  # B waits
                relay.shaper.tick()  # A sees B waiting: one of its sessions goes
                await until(lambda: relay.pool.opening == 0, sink.summary)
                assert relay.pool.leases() == [parent], "the parked session was closed"
                # the successor's lease is given back (it leaves Redis with A's next call)
                assert list(relay.shaper.held.values()) == [parent]
                assert any(lease is successor for lease in relay.shaper._dropped)
                results.append(await send(relay, 19, TESTING, patient))  # on the parent
                return results
            finally:
                sink.starttls_delay = 0
                other.close()
                await relay.wind_down(sink)

        results = asyncio.run(run())
    assert all(ok(r) for r in results), results
    assert results[-1].reused, results[-1]
