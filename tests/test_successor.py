"""Successor sessions (services/deliver/pool.py, "Successor sessions"; issue #20, the p99 at a
distance): a session parked with a twentieth of its transactions left has its successor opened
beside it, so the message after its last one does not wait for a connection and a TLS handshake.

Real Redis (the ``store`` fixture), real STARTTLS sinks on loopback (tests/peers.py), the
deliverer's own session code and traffic shaping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import cast

import aiosmtplib
import pytest
import redis

from services.common import spool
from services.common.config import Config
from services.common.model import Envelope, TlsMode
from services.deliver import observe, session, sites
from services.deliver.attempt import Attempt, Hooks, Peer, Timeouts, TlsSettings
from services.deliver.pool import ConnectionPool, Pooled
from services.deliver.session import attempt
from services.deliver.shaping import Lease, Shaper
from services.deliver.sites import Site
from services.deliver.tls import Outcome
from tests.peers import Sink

DOMAIN = "successor.test"
BODY = b"Subject: x\r\n\r\nx\r\n"
TIMEOUTS = Timeouts("relay.test", connect=5, command=10, greeting=10, data=10)
OPPORTUNISTIC = TlsSettings(mode=TlsMode.OPPORTUNISTIC)


def site_for(port: int, per_connection: int = 20, connections: int = 5) -> Site:
    spec = {
        "name": "successor", "match": [DOMAIN], "connections": connections,
        "messages_per_connection": per_connection,
    }  # fmt: skip
    config = Config.model_validate({"delivery": {"shaping": {"sites": [spec]}}})
    return sites.site_of(config, DOMAIN, [(f"mx.{DOMAIN}", port, "mx")])


class Relay:
    """One deliver process's pool and shaper, as batch.Deliverer wires them."""

    def __init__(self, store: redis.Redis, site: Site, port: int) -> None:
        self.shaper = Shaper(Config(), store)
        self.pool = ConnectionPool(100, 60, self.shaper.release)
        self.shaper.attach(self.pool.leases, self.pool.close_one, self.pool.expire)
        self.site = site
        self.peer = Peer(f"mx.{DOMAIN}", "127.0.0.1", port, "localhost")

    async def wind_down(self, sink: Sink) -> None:
        """Close every session and wait until the sink has seen each one end (a TLS session's
        shutdown finishes after QUIT: the test's loop must not end before)."""
        self.pool.close_all()
        await asyncio.gather(self.pool.closed(), session.closed())
        await until(lambda: sink.open_connections == 0, sink.summary)

    async def past_the_successor(self, sink: Sink, meanwhile: Callable[[], None]) -> list[Attempt]:
        """21 messages one after another, 20 a session: after the 19th the successor's opening
        is under way; once it has ended (parked, or given up), ``meanwhile`` looks; then the
        20th and 21st go, and every session is closed."""
        try:
            results = [await self.send(n) for n in range(19)]
            assert self.pool.opening == 1  # its look for a lease is under way
            await until(lambda: self.pool.opening == 0, sink.summary)
            meanwhile()
            return [*results, await self.send(19), await self.send(20)]
        finally:
            await self.wind_down(sink)

    async def send(self, n: int) -> Attempt:
        gate = self.shaper.gate(self.site)
        envelope = Envelope(id=f"0123456789ab-s{n}", sender="s@o.test", recipients=())
        try:
            return await attempt(
                self.peer, envelope, [f"r{n}@{DOMAIN}"], BODY, OPPORTUNISTIC, TIMEOUTS,
                Hooks(), self.pool, gate,
            )  # fmt: skip
        finally:
            gate.close()


def ok(result: Attempt) -> bool:
    """Its one recipient taken (250)."""
    return [reply.code for reply in result.replies.values()] == [250]


async def until(
    condition: Callable[[], bool], what: Callable[[], object], limit: float = 10.0
) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.01)


def test_a_successor_is_due_once_with_a_twentieth_of_the_transactions_left() -> None:
    pool = ConnectionPool(100, 60)

    def due(limit: int | None) -> list[int]:
        nobody = cast(aiosmtplib.SMTP, None)  # successor_due reads the counts alone
        parked = [Pooled(nobody, None, None, None, uses=n, max_uses=limit) for n in range(101)]
        return [p.uses for p in parked if pool.successor_due(p)]

    assert due(None) == [95]  # the pool's own limit
    assert due(20) == [19]
    # Below 20 transactions a session: none (an unused successor would cost a connection for
    # a handful of messages).
    assert due(19) == []


def test_the_successor_is_ready_before_its_session_s_last_message(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 messages a session: after the 19th, the successor is opened (TLS and all) and parked
    beside it; the 20th still goes over the first session (the successor waits for it to run
    out), the 21st over the successor without a handshake of its own. Two connections, two
    handshakes, 21 attempts counted: opening the successor is not an attempt."""
    counted: list[Attempt] = []
    monkeypatch.setattr(observe, "attempt", lambda result, seconds: counted.append(result))
    with Sink("starttls") as sink:
        relay = Relay(store, site_for(sink.port), sink.port)

        async def run() -> list[Attempt]:
            try:
                results = [await relay.send(n) for n in range(19)]
                await until(lambda: len(relay.pool.leases()) == 2, sink.summary)
                assert sink.stats()["tls_handshakes_ok"] == 2, sink.summary()
                assert len(sink.messages) == 19, sink.summary()
                results.append(await relay.send(19))
                results.append(await relay.send(20))
                return results
            finally:
                await relay.wind_down(sink)

        results = asyncio.run(run())
    assert all(ok(r) for r in results), results
    assert [r.reused for r in results] == [False] + [True] * 20
    assert all(r.outcome is Outcome.TLS for r in results), [r.outcome for r in results]
    stats = sink.stats()
    assert (stats["connections"], stats["tls_handshakes_ok"]) == (2, 2), sink.summary()
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == sorted(
        f"r{n}@{DOMAIN}" for n in range(21)
    )
    assert len(counted) == 21


def test_at_a_full_site_there_is_no_successor_and_no_waiting_flag(store: redis.Redis) -> None:
    """One connection at the site: the successor gets no lease and is not opened; its look
    does not raise the site's waiting flag (other processes would close their parked sessions
    for a connection nobody waits for). The 21st message opens the next session itself."""
    with Sink("starttls") as sink:
        relay = Relay(store, site_for(sink.port, connections=1), sink.port)
        waiting = spool.site_key("waiting", relay.site.id)

        def meanwhile() -> None:
            assert not store.exists(waiting)
            assert sink.stats()["connections"] == 1, sink.summary()

        results = asyncio.run(relay.past_the_successor(sink, meanwhile))
    assert all(ok(r) for r in results), results
    assert [r.reused for r in results] == [False] + [True] * 19 + [False]
    assert sink.stats()["connections"] == 2, sink.summary()


def test_a_successor_the_destination_refuses_gives_its_lease_back(store: redis.Redis) -> None:
    """The destination answers the successor's connection with 421: it is closed, its lease
    given back, nothing recorded; the messages go on over the sessions delivery opens."""
    refuse = {2}
    with Sink("starttls", greeting=lambda n: "421 4.7.0 Busy" if n in refuse else None) as sink:
        relay = Relay(store, site_for(sink.port), sink.port)

        def meanwhile() -> None:
            assert sink.stats()["connections"] == 2, sink.summary()
            assert list(relay.shaper.held.values()) == relay.pool.leases()  # one: the session's

        results = asyncio.run(relay.past_the_successor(sink, meanwhile))
    assert all(ok(r) for r in results), results
    assert [r.reused for r in results] == [False] + [True] * 19 + [False]
    assert len(sink.messages) == 21, sink.summary()


def test_a_successor_still_opening_when_the_pool_closes_is_cut_and_its_lease_goes(
    store: redis.Redis,
) -> None:
    """A destination that accepts the connection and never greets: closing the pool (the
    worker stops) cancels the successor, hangs up its socket and releases its lease."""
    accepted: list[asyncio.StreamReader] = []

    async def run() -> tuple[int, bool]:
        gone = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(reader)
            await reader.read()  # until the client hangs up
            writer.close()
            await writer.wait_closed()
            gone.set()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        relay = Relay(store, site_for(port), port)
        gate = relay.shaper.gate(relay.site)
        async with server:
            # A greeting timeout far beyond the test's bound: the successor must be cut by
            # close_all, not end by itself when the greeting times out.
            patient = replace(TIMEOUTS, greeting=300)
            opening = session._successor(
                relay.pool, relay.peer, OPPORTUNISTIC, patient, gate, Outcome.TLS, 20
            )
            relay.pool.open_successor(opening)
            await until(lambda: bool(accepted) and bool(relay.shaper.held), lambda: accepted)
            relay.pool.close_all()
            await asyncio.wait_for(relay.pool.closed(), 5)
            assert relay.pool.opening == 0
            await asyncio.wait_for(gone.wait(), 10)
            # released: to be dropped from Redis with the next tick or lease
            return len(relay.shaper.held), any(isinstance(d, Lease) for d in relay.shaper._dropped)

    held, dropped = asyncio.run(run())
    assert held == 0 and dropped, (held, dropped)


@pytest.mark.parametrize(
    ("predecessor", "connections", "parked"),
    [(Outcome.TLS, 1, 0), (Outcome.HANDSHAKE_FAILED, 2, 1)],
)
def test_a_successor_reconnects_in_clear_only_to_follow_a_session_that_did(
    store: redis.Redis, predecessor: Outcome, connections: int, parked: int
) -> None:
    """The destination's handshake fails (opportunistic TLS: the table says reconnect in
    clear). A successor of a TLS session gives up there — a clear connection would be thrown
    away, its outcome not its predecessor's — and gives its lease back; the successor of a
    session that itself fell back to clear reconnects and is parked, as a delivery would."""
    with Sink("broken") as sink:
        relay = Relay(store, site_for(sink.port), sink.port)
        gate = relay.shaper.gate(relay.site)

        async def run() -> int:
            try:
                relay.pool.open_successor(
                    session._successor(
                        relay.pool, relay.peer, OPPORTUNISTIC, TIMEOUTS, gate, predecessor, 20
                    )
                )
                await relay.pool.closed()  # the opening ended, parked or not
                return len(relay.pool.leases())
            finally:
                await relay.wind_down(sink)

        assert asyncio.run(run()) == parked
        assert sink.stats()["connections"] == connections, sink.summary()
    assert not relay.shaper.held  # the lease went with the session, or at once
