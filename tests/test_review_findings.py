"""Findings of a review of traffic shaping, PIPELINING, DANE and the background QUIT: each test
shows one finding against real Redis and real (hostile) SMTP peers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import spool
from services.common.config import Config
from services.common.model import Decision, Envelope, TlsMode
from services.common.redisserver import EmbeddedRedis
from services.deliver import mx, shaping, sites
from services.deliver.attempt import Attempt, Hooks, Peer, Timeouts, TlsSettings
from services.deliver.batch import Deliverer
from services.deliver.delivery import Outcome
from services.deliver.plan import Planner
from services.deliver.pool import ConnectionPool
from services.deliver.session import attempt
from services.deliver.shaping import Lease, Shaper
from tests.badpeers import BadPeer
from tests.dnsserver import LocalDns
from tests.peers import Sink
from tests.test_batching import queue_jobs, write_config

ENVELOPE = Envelope(id="0123456789ab-review", sender="s@origin.test", recipients=("r@x.test",))
BODY = b"Subject: review\r\n\r\nbody\r\n"


WRITERS: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}  # each peer connection's handler


def _serving(writer: asyncio.StreamWriter) -> None:
    task = asyncio.current_task()
    assert task is not None
    WRITERS[writer] = task


async def _close_peers() -> None:
    """Close the peer's side of every connection and wait (bounded) for each handler to end,
    so that asyncio.run finds no handler still pending."""
    for writer in WRITERS:
        writer.close()
    if WRITERS:
        await asyncio.wait(WRITERS.values(), timeout=10)
    WRITERS.clear()


async def _refuse_mail_then_hang_at_quit(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Greets, answers EHLO, defers MAIL with 451 (the client's next host), and never answers
    QUIT: a destination that holds the client's goodbye."""
    _serving(writer)
    writer.write(b"220 hostile.test ESMTP\r\n")
    with contextlib.suppress(ConnectionError):
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-hostile.test\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                writer.write(b"451 4.3.0 try again later\r\n")
            elif verb == b"QUIT":
                await reader.read()  # never answered
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()


def _site(connections: int = 1) -> sites.Site:
    spec = {"name": "h", "match": ["x.test"], "connections": connections}
    config = Config.model_validate({"delivery": {"shaping": {"sites": [spec]}}})
    return sites.site_of(config, "x.test", [("mx.x.test", 25, "mx")])


def test_a_job_timeout_during_a_failed_sessions_quit_leaks_its_lease(store: redis.Redis) -> None:
    """session._attempt: the session failed before its transaction (451 to MAIL: next host) and
    its QUIT is awaited inside the round; when ``delivery.job_timeout`` falls during that QUIT
    the CancelledError leaves the ``finally`` block before ``gate.give_back(lease)``: the lease
    is neither the round's spare (released by ``gate.close()``) nor released, so the process
    renews it every second for as long as it lives. A site with ``connections: 1`` is then shut
    for every worker: each job there is throttled until its queue lifetime ends and it bounces."""

    async def run() -> Shaper:
        server = await asyncio.start_server(_refuse_mail_then_hang_at_quit, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        shaper = Shaper(Config(), store)
        gate = shaper.gate(_site())
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # delivery.job_timeout
                    await attempt(
                        Peer("mx.x.test", "127.0.0.1", port, "mx.x.test"),
                        ENVELOPE,
                        ["r@x.test"],
                        BODY,
                        TlsSettings(mode=TlsMode.NONE),
                        Timeouts("relay.test", connect=5, command=10, greeting=10, data=10),
                        Hooks(),
                        ConnectionPool(10, 60, shaper.release),
                        gate,
                    )
        finally:
            gate.close()  # the round is over (sending.Sending._send)
            server.close()
            await _close_peers()
        return shaper

    shaper = asyncio.run(run())
    shaper.tick()  # drops what was released
    held: list[Lease] = list(shaper.held.values())
    leases = store.zcard(spool.site_key("leases", "h"))
    assert held == [] and leases == 0, f"lease leaked: held {held}, {leases} in Redis"


def _rcpt_252(pipelining: bool) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """Answers RCPT with ``252`` (a VRFY reply, not one RCPT may give: RFC 5321 §4.3.2); counts
    DATA commands in ``DATA_SEEN``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _serving(writer)
        writer.write(b"220 odd.test ESMTP\r\n")
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    extra = b"250-PIPELINING\r\n" if pipelining else b""
                    writer.write(b"250-odd.test\r\n" + extra + b"250 8BITMIME\r\n")
                elif verb == b"RCPT":
                    writer.write(b"252 2.1.5 cannot verify, will attempt delivery\r\n")
                elif verb == b"DATA":
                    DATA_SEEN.append(line)
                    writer.write(b"554 5.5.1 no valid recipients\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()

    return serve


DATA_SEEN: list[bytes] = []


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_2xx_rcpt_reply_other_than_250_251_is_never_a_delivery(pipelining: bool) -> None:
    """session._recipients / session._pipelined: a RCPT answered with a 2xx that is not 250 or
    251 is not accepted (no DATA for it; aiosmtplib refuses it too), yet its reply is recorded
    as the recipient's fate — ``Reply.is_success``: delivered. The message was never sent."""

    async def run() -> Attempt:
        server = await asyncio.start_server(_rcpt_252(pipelining), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await attempt(
                Peer("odd.test", "127.0.0.1", port, "odd.test"),
                ENVELOPE,
                ["r@x.test"],
                BODY,
                TlsSettings(mode=TlsMode.NONE),
                Timeouts("relay.test", connect=5, command=10, greeting=10, data=10),
            )
        finally:
            server.close()
            await _close_peers()

    result = asyncio.run(run())
    outcome = Outcome()
    outcome.settle(result.replies, "odd.test")
    assert not result.data_sent
    assert "r@x.test" not in outcome.delivered, f"never sent, yet delivered: {result.replies}"
    assert "r@x.test" in outcome.deferred


def test_a_saturated_site_holds_the_worker_once_per_domain_not_once(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """shaping.Gate.lease: a round that meets a site's connection limit sleeps up to
    ``SHORT_WAIT`` (5 s) inside the worker before it is parked — and so does the next round to
    the same site from another domain (MX rollup: one task per domain), and the next, each
    time the parked jobs come back (every 5 s). A destination that holds its sessions (a
    tarpit) with mail for as many domains as there are worker processes keeps every process
    asleep in ``Gate.lease``: mail to every other destination waits behind it. Here one
    process, three domains on one saturated site: three waits, where the first one already
    showed the site full."""
    monkeypatch.setattr(shaping, "SHORT_WAIT", 1.0)
    sink = Sink("plain").start()
    try:
        domains = ["a.rollup.test", "b.rollup.test", "c.rollup.test"]
        settings = {
            "redis_url": valkey.url,
            "delivery": {
                "routes": {d: sink.address_text for d in domains},
                "shaping": {
                    "sites": [{"name": "s", "match": [sink.address_text], "connections": 1}]
                },
            },
        }
        config = write_config(tmp_path / "c.yaml", settings)
        store.zadd(spool.site_key("leases", "s"), {"tarpit-session": time.time() + 3600})
        deliverer = Deliverer(config, store)  # one worker process
        started = time.monotonic()
        for domain in domains:  # one task per domain
            assert asyncio.run(deliverer.run_batch(queue_jobs(store, domain, 1))) == [None]
        elapsed = time.monotonic() - started
        assert sink.connections == 0
        assert elapsed < 1.5, f"the worker slept {elapsed:.1f}s for one full site"
    finally:
        sink.stop()


def test_the_same_mx_host_is_one_site_whatever_a_policy_filtered(store: redis.Redis) -> None:
    """plan.Planner.plan / sites.site_of: the site is computed from ``plan.destinations``,
    the hosts the destination policies *allowed* (DANE drops a host whose TLSA lookup failed;
    MTA-STS enforce drops unlisted ones; REQUIRETLS unvalidated ones; ``TLS-Required: No`` turns
    DANE off), not from the MX hosts the domain resolves to as documented. Here a normal message
    and one with ``TLS-Required: No`` to the same domain at the same moment get two sites: each
    with its own ``connections`` limit, so the one MX host that takes both sees twice the
    configured sessions."""
    with LocalDns().start() as dns:
        dns.add("split.test", "MX", "10 mx1.split.test.")
        dns.add("split.test", "MX", "20 mx2.split.test.")
        dns.add("mx1.split.test", "A", "192.0.2.1")
        dns.add("mx2.split.test", "A", "192.0.2.2")
        dns.secure("split.test")
        dns.secure("mx1.split.test")
        dns.secure("mx2.split.test")
        dns.servfail("_25._tcp.mx1.split.test")  # a TLSA lookup that fails: mx1 left out
        config = Config.model_validate(
            {
                "delivery": {
                    "dnssec": "trust_resolver",
                    "mta_sts": False,
                    "dns_servers": [f"127.0.0.1:{dns.port}"],
                }
            }
        )
        resolver = mx.make_resolver(config.delivery.dns_servers, timeout=2)
        planner = Planner(config, store, resolver)
        decision = Decision("split.test", TlsMode.OPPORTUNISTIC)
        normal = asyncio.run(planner.plan(decision, False))
        relaxed = asyncio.run(planner.plan(decision, True))  # TLS-Required: No
    shaper = Shaper(config, store)
    one = shaper.site("split.test", normal.destinations)
    other = shaper.site("split.test", relaxed.destinations)
    assert [h.peer.host for h in normal.hops] == ["mx2.split.test"]
    assert "mx2.split.test" in [h.peer.host for h in relaxed.hops]
    assert one.id == other.id, f"mx2.split.test is in two sites: {one.hosts} and {other.hosts}"


def test_a_waiting_round_closes_one_parked_session_not_all(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """shaping.Gate.lease: a round that finds its site full and this process holding parked
    sessions there closes one (its lease goes once its QUIT is answered) and polls again 50 ms
    later — closing another parked session each time while the first QUIT is under way. A
    destination slow to answer QUIT (up to QUIT_TIMEOUT, 5 s) loses every parked session of
    the site for the one lease wanted: connection reuse is gone, each next message pays a new
    connection and handshake."""
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.5)
    peer = BadPeer("hang_at_quit").start()  # takes the message, never answers QUIT

    async def run() -> int:
        shaper = Shaper(Config(), store)
        site = _site(connections=3)
        pool = ConnectionPool(10, 60, shaper.release)
        shaper.attach(pool.leases, pool.close_one, pool.expire)  # as batch.Deliverer does
        for n in range(3):  # three sessions, parked for reuse, each with its lease
            # a distinct tls_name per session: three pool keys, nothing reused
            gate = shaper.gate(site)
            await attempt(
                Peer("mx.x.test", "127.0.0.1", peer.port, f"n{n}.x.test"),
                ENVELOPE,
                ["r@x.test"],
                BODY,
                TlsSettings(mode=TlsMode.NONE),
                Timeouts("relay.test", connect=5, command=10, greeting=10, data=10),
                Hooks(),
                pool,
                gate,
            )
            gate.close()
        assert len(pool.leases()) == 3
        got = await shaper.gate(site).lease()  # a fourth round: the site is full
        left = len(pool.leases())
        if isinstance(got, Lease):
            shaper.release(got)
        pool.close_all()
        return left

    try:
        left = asyncio.run(run())
    finally:
        peer.stop()
    assert left >= 2, f"{3 - left} parked sessions closed for one lease"
