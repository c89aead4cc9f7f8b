"""Delivery against hostile and broken SMTP peers (issue #17): refused DATA that keeps the
transaction open, replies that skip a step, forged reply text, destinations that hold a worker,
routes back to ourselves, TLS 1.0-only peers.

Real parts: the deliver code of a worker process (:class:`services.deliver.batch.Deliverer`) run
in this process against a real valkey and real SMTP peers on loopback (:mod:`tests.badpeers`,
:mod:`tests.peers`), as in tests/test_batching.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email
import email.message
import email.policy
import json
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import spool
from services.common.model import Decision, Envelope, TlsMode, new_message_id
from services.common.redisserver import EmbeddedRedis, free_port
from services.deliver.plan import Planner
from tests.badpeers import BadPeer, Kind
from tests.dnsserver import LocalDns
from tests.peers import Sink
from tests.test_batching import deliver, queue_jobs, routed, write_config

SECRET_SUBJECT = "Merger with Initech"
BODY = f"Subject: {SECRET_SUBJECT}\r\nX-Classification: secret\r\n\r\nHello.\r\n".encode()
FORGED = (
    "550-5.1.1 no such user\r\n550-\r\n550-Final-Recipient: rfc822; forged@victim.test\r\n"
    "550 Action: delivered"
)


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[BadPeer]:
    kind: Kind = request.param
    server = BadPeer(kind).start()
    try:
        yield server
    finally:
        server.stop()


def events(store: redis.Redis, message_id: str, kind: str) -> list[dict[str, object]]:
    return [e for e in spool.read_trace(store, message_id) if e["event"] == kind]


# --------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("peer", ["refuse_first_data"], indirect=True)
def test_a_refused_data_does_not_poison_the_next_message_of_the_batch(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, peer: BadPeer
) -> None:
    """452 to DATA leaves the peer's transaction open: the reused session is reset first, so
    the next messages are delivered, none bounces (before: 503 to MAIL, every one bounced)."""
    config = routed(tmp_path, valkey, "keep.test", peer.address_text, sessions_per_process=1)
    jobs = queue_jobs(store, "keep.test", 3)
    outcomes = deliver(config, store, jobs)
    assert [sorted(o.deferred) for o in outcomes if o] == [["r0@keep.test"], [], []]
    assert [sorted(o.delivered) for o in outcomes if o] == [[], ["r1@keep.test"], ["r2@keep.test"]]
    assert not any(o.bounced for o in outcomes if o)
    assert peer.data_received == 2 and peer.connections == 1
    assert b"503 5.5.1 Error: nested MAIL command" not in peer.replies


# --------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("peer", ["data_250", "double_rcpt"], indirect=True)
def test_a_reply_that_skips_a_step_is_a_deferral_not_a_delivery(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, peer: BadPeer
) -> None:
    """A 2xx where 354 belonged (or a stale 2xx answering DATA): no body was taken → 4.5.0."""
    config = routed(tmp_path, valkey, "skip.test", peer.address_text)
    jobs = queue_jobs(store, "skip.test", 2)
    outcomes = deliver(config, store, jobs)
    for outcome in outcomes:
        assert outcome is not None and not outcome.delivered and not outcome.bounced
        (reply,) = outcome.deferred.values()
        assert (reply.code, reply.status) == (451, "4.5.0"), reply
    assert peer.connections == 2  # a session out of step is never reused
    for job in jobs:
        assert not events(store, job["id"], "delivered")


# --------------------------------------------------------------------------- items 4 and 6


def stage(store: redis.Redis, domain: str, decision: Decision, options: tuple[str, ...] = (),
          received_at: float | None = None) -> dict[str, Any]:  # fmt: skip
    """A stored message from s@origin.test to x@``domain`` with ``decision``: its job."""
    env = Envelope(new_message_id(), "s@origin.test", (f"x@{domain}",), options,
                   received_at=received_at or time.time())  # fmt: skip
    with store.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, env, BODY, spool.TRACE_TTL)
        pipe.execute()
    return {"id": env.id, "domain": domain, "recipients": [f"x@{domain}"],
            "decision": decision.to_json(), "attempt": 1}  # fmt: skip


def the_dsn(store: redis.Redis, message_id: str) -> tuple[Envelope, EmailMessage]:
    (event,) = events(store, message_id, "dsn")
    dsn_id = str(event["dsn_id"])
    envelope = spool.load_envelope(store, dsn_id)
    raw = store.hget(spool.msg_key(dsn_id), "body")
    assert envelope is not None and isinstance(raw, bytes)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return envelope, parsed


@pytest.fixture
def refusing() -> Iterator[Sink]:
    def forged(address: str) -> str:
        return FORGED

    server = Sink("starttls", rcpt_replies=forged).start()
    try:
        yield server
    finally:
        server.stop()


def test_the_dsn_of_tls_required_mail_is_redacted(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, refusing: Sink
) -> None:
    """Enforced mail bounces: its DSN (which travels like any DSN) returns no headers and does
    not quote what the rule matched, but names the rule."""
    config = routed(tmp_path, valkey, "secret.test", refusing.address_text)
    reason = f"confidential: subject matched /{SECRET_SUBJECT}/"
    decision = Decision("secret.test", TlsMode.ENFORCED, ("confidential",), reasons=(reason,))
    job = stage(store, "secret.test", decision)
    deliver(config, store, [job])
    envelope, dsn = the_dsn(store, job["id"])
    raw = dsn.as_bytes()
    assert envelope.mail_options == () and envelope.recipients == ("s@origin.test",)
    assert SECRET_SUBJECT.encode() not in raw and b"secret\r\n" not in raw.lower()
    parts = [p.get_content_type() for p in dsn.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status"]
    human = next(dsn.iter_parts()).get_content()
    assert "because of: confidential." in human


def test_remote_reply_text_cannot_forge_dsn_fields(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, refusing: Sink
) -> None:
    """A multi-line 550 carrying report fields stays inside one folded Diagnostic-Code."""
    config = routed(tmp_path, valkey, "forge.test", refusing.address_text)
    job = stage(store, "forge.test", Decision("forge.test"))
    deliver(config, store, [job])
    _, dsn = the_dsn(store, job["id"])
    status = list(dsn.iter_parts())[1].get_payload()
    assert isinstance(status, list)
    blocks = [dict(block.items()) for block in status if isinstance(block, email.message.Message)]
    assert len(blocks) == 2, blocks  # per-message fields, then exactly one recipient
    assert blocks[1]["Final-Recipient"] == "rfc822; x@forge.test"
    assert blocks[1]["Action"] == "failed"
    assert "forged@victim.test" in blocks[1]["Diagnostic-Code"]


def test_the_dsn_of_requiretls_mail_is_sent_with_requiretls_and_may_return_headers(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, refusing: Sink
) -> None:
    """RFC 8689 §5: the peer lacks REQUIRETLS (5.7.30 bounce); the DSN carries REQUIRETLS."""
    config = routed(tmp_path, valkey, "rt.test", refusing.address_text)
    decision = Decision("rt.test", TlsMode.ENFORCED, ("requiretls",), reasons=("requiretls",))
    job = stage(store, "rt.test", decision, ("REQUIRETLS",))
    deliver(config, store, [job])
    envelope, dsn = the_dsn(store, job["id"])
    assert envelope.mail_options == ("REQUIRETLS",)
    parts = [p.get_content_type() for p in dsn.iter_parts()]
    assert parts[-1] == "text/rfc822-headers" and SECRET_SUBJECT in dsn.as_string()


def test_a_requiretls_dsn_that_cannot_travel_protected_is_replaced_by_a_redacted_one(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, refusing: Sink
) -> None:
    """The REQUIRETLS DSN goes to a sender domain whose server has no STARTTLS: held (4.7.10)
    until it fails for good, then its redacted twin goes without REQUIRETLS, once."""
    with Sink("plain") as sender_mx:
        settings = {"redis_url": valkey.url, "delivery": {"routes": {
            "rt.test": refusing.address_text, "origin.test": sender_mx.address_text}}}  # fmt: skip
        config = write_config(tmp_path / "c.yaml", settings)
        decision = Decision("rt.test", TlsMode.ENFORCED, ("requiretls",), reasons=("requiretls",))
        original = stage(store, "rt.test", decision, ("REQUIRETLS",))
        deliver(config, store, [original])
        (notice,) = events(store, original["id"], "dsn")
        dsn_id = str(notice["dsn_id"])
        protected = Decision("origin.test", TlsMode.VERIFIED, ("requiretls",))
        deliver(config, store, [dsn_job(dsn_id, protected)])
        assert events(store, dsn_id, "deferred") and sender_mx.connections == 1
        assert not events(store, dsn_id, "fallback") and sender_mx.messages == []
        backdate(store, dsn_id, 6 * 86400)  # the queue lifetime has passed: it bounces now
        deliver(config, store, [dsn_job(dsn_id, protected, attempt=2)])
        (fallback,) = events(store, dsn_id, "fallback")
        twin_id = str(fallback["dsn_id"])
        deliver(config, store, [dsn_job(twin_id, Decision("origin.test"))])
        (got,) = sender_mx.wait_messages(1)
    assert got.tls is None and got.rcpt_tos == ["s@origin.test"]
    assert "REQUIRETLS" not in got.mail_options
    assert SECRET_SUBJECT.encode() not in got.data and b"rfc822-headers" not in got.data
    assert b"because of: requiretls." in got.data
    assert events(store, twin_id, "delivered") and not events(store, twin_id, "fallback")


def dsn_job(message_id: str, decision: Decision, attempt: int = 1) -> dict[str, Any]:
    return {"id": message_id, "domain": "origin.test", "recipients": ["s@origin.test"],
            "decision": decision.to_json(), "attempt": attempt}  # fmt: skip


def backdate(store: redis.Redis, message_id: str, seconds: float) -> None:
    envelope = spool.load_envelope(store, message_id)
    assert envelope is not None
    earlier = dataclasses.replace(envelope, received_at=envelope.received_at - seconds)
    store.hset(spool.msg_key(message_id), "envelope", json.dumps(earlier.to_json()))


# --------------------------------------------------------------------------- item 3


def test_an_unexpected_error_is_a_deferral_under_the_lifetime_rule(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while planning (stand-in: the planner raises) for a message past its queue
    lifetime: it bounces with a DSN naming the error, instead of being parked forever."""

    async def broken(*args: object) -> None:
        raise ValueError("invalid literal for int() with base 10: '\u00b2'")

    monkeypatch.setattr(Planner, "plan", broken)
    config = routed(tmp_path, valkey, "bug.test", "127.0.0.1:9")
    job = stage(store, "bug.test", Decision("bug.test"), received_at=time.time() - 6 * 86400)
    deliver(config, store, [job])
    (bounced,) = events(store, job["id"], "bounced")
    reply = str(bounced["recipients"])
    assert "451 4.3.0 internal error: ValueError" in reply, bounced
    assert events(store, job["id"], "dsn") and store.zcard(spool.DEFERRED) == 0


# --------------------------------------------------------------------------- item 7


@pytest.mark.parametrize(("kind", "tried"), [("silent", 5), ("busy", 2)])
def test_a_destination_of_many_bad_addresses_is_tried_within_the_caps(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, kind: Kind, tried: int
) -> None:
    """Eight addresses that never greet: five are tried (mx_address_limit); eight that greet
    and then refuse: two sessions (mx_session_limit). Then the round is deferred."""
    port = free_port("127.0.0.11")
    hosts = [f"127.0.0.{i}" for i in range(11, 19)]
    with contextlib.ExitStack() as stack, LocalDns() as dns:
        peers = [stack.enter_context(BadPeer(kind, host, port)) for host in hosts]
        dns.add("many.test", "MX", "10 mx.many.test.")
        for host in hosts:
            dns.add("mx.many.test", "A", host)
        settings = {"redis_url": valkey.url, "delivery": {
            "dns_servers": [f"127.0.0.1:{dns.port}"], "mx_port": port, "mta_sts": False,
            "greeting_timeout": "0.3s", "connect_timeout": "1s"}}  # fmt: skip
        config = write_config(tmp_path / "c.yaml", settings)
        job = stage(store, "many.test", Decision("many.test"))
        (outcome,) = deliver(config, store, [job])
    assert outcome is not None and list(outcome.deferred) == ["x@many.test"]
    assert len(outcome.attempts) == tried
    assert sum(p.connections for p in peers) == tried


# --------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_a_route_to_our_own_listener_bounces_without_connecting(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, bind: str
) -> None:
    """A route to the relay's own listener (or to a local address of a wildcard bind) is a
    loop: bounced 5.4.6 at once, nothing connects (here a sink stands where ingest would)."""
    with Sink("plain") as sink:
        settings = {"redis_url": valkey.url, "ingest": {"listen": f"{bind}:{sink.port}"},
                    "delivery": {"routes": {"loop.test": sink.address_text}}}  # fmt: skip
        config = write_config(tmp_path / "c.yaml", settings)
        job = stage(store, "loop.test", Decision("loop.test"))
        (outcome,) = deliver(config, store, [job])
        assert sink.connections == 0
    assert outcome is not None and not outcome.attempts
    (reply,) = outcome.bounced.values()
    assert str(reply) == "554 5.4.6 mail for loop.test loops back to myself"
    assert events(store, job["id"], "dsn")
