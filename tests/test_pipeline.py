"""End to end: client → ingest → policy → deliver → real SMTP sinks, over real Redis and Celery.

Assertions are on what the destination peers saw (TLS or not, bytes received), cross-checked
with the relay's own trace.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import Sink
from tests.sinksmtp import Message
from tests.world import World, make_world, message


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # One connection per delivery here, as issue 2 specified it (reuse: tests/test_reuse.py).
    no_reuse = {"delivery": {"reuse_max_messages": 1}}
    with make_world(tmp_path_factory.mktemp("world"), config=lambda w: no_reuse) as w:
        yield w


def arrived(sink: Sink, subject: str, timeout: float = 30.0) -> Message:
    """The one message with this subject at this sink (waits for it)."""
    needle = f"Subject: {subject}\r\n".encode()
    sink.wait_for(lambda: any(needle in m.data for m in sink.messages), timeout, subject)
    found = [m for m in sink.messages if needle in m.data]
    assert len(found) == 1, f"{subject!r} arrived {len(found)} times"
    return found[0]


def assert_exact_apart_from_received(received: bytes, sent: bytes) -> None:
    """Byte-exact apart from one prepended Received: header (which may be folded)."""
    assert received.endswith(sent)
    added = received[: -len(sent)]
    assert added.startswith(b"Received: from client.test ")
    assert b"by relay.test (tlsrelay)" in added
    lines = added.split(b"\r\n")[:-1]
    assert all(line[:1] in (b" ", b"\t") for line in lines[1:]), added  # one header only


def test_starttls_destination_receives_over_tls(world: World) -> None:
    data = message("to tls")
    message_id = world.send(["alice@tls.test"], data)
    got = arrived(world.sinks["tls"], "to tls")
    assert got.tls in ("TLSv1.2", "TLSv1.3")
    assert got.mail_from == "sender@origin.test"
    assert got.rcpt_tos == ["alice@tls.test"]
    assert_exact_apart_from_received(got.data, data)
    trace = world.wait_completed(message_id)
    (attempt,) = [e for e in trace if e["event"] == "attempt"]
    assert attempt["tls_outcome"] == "tls"
    assert attempt["tls_version"] == got.tls
    assert attempt["replies"]["alice@tls.test"].startswith("250")


def test_destination_without_starttls_receives_in_clear(world: World) -> None:
    data = message("to plain")
    message_id = world.send(["bob@plain.test"], data)
    got = arrived(world.sinks["plain"], "to plain")
    assert got.tls is None
    assert_exact_apart_from_received(got.data, data)
    world.wait_completed(message_id)
    (attempt,) = world.events(message_id, "attempt")
    assert attempt["tls_outcome"] == "not_offered"


def test_broken_handshake_falls_back_then_is_remembered(world: World) -> None:
    sink = world.sinks["broken"]
    before = sink.starttls_attempts
    first = world.send(["carol@broken.test"], message("broken one"))
    got = arrived(sink, "broken one")
    assert got.tls is None
    assert sink.starttls_attempts == before + 1
    trace = world.wait_completed(first)
    outcomes = [e["tls_outcome"] for e in trace if e["event"] == "attempt"]
    assert outcomes == ["handshake_failed"]

    second = world.send(["dave@broken.test"], message("broken two"))
    assert arrived(sink, "broken two").tls is None
    assert sink.starttls_attempts == before + 1, "the second delivery must skip the handshake"
    trace = world.wait_completed(second)
    outcomes = [e["tls_outcome"] for e in trace if e["event"] == "attempt"]
    assert outcomes == ["remembered_broken"]


def test_three_domains_each_receive_once(world: World) -> None:
    rcpts = ["x@d1.test", "y@d2.test", "z@d3.test"]
    data = message("three domains")
    message_id = world.send(rcpts, data)
    for sink_name, rcpt in zip(("tls", "plain", "other"), rcpts, strict=True):
        got = arrived(world.sinks[sink_name], "three domains")
        assert got.rcpt_tos == [rcpt]
        assert_exact_apart_from_received(got.data, data)
    trace = world.wait_completed(message_id)
    delivered = [r for e in trace if e["event"] == "delivered" for r in e["recipients"]]
    assert sorted(delivered) == sorted(rcpts)
    with world.client() as client:
        assert not client.exists(f"tlsrelay:msg:{message_id}"), "body kept after all final"


def test_two_recipients_same_domain_one_transaction(world: World) -> None:
    world.send(["a1@tls.test", "a2@tls.test"], message("two rcpts"))
    got = arrived(world.sinks["tls"], "two rcpts")
    assert got.rcpt_tos == ["a1@tls.test", "a2@tls.test"]


def test_mx_preference_falls_back_to_second_mx(world: World) -> None:
    message_id = world.send(["erin@mx.test"], message("via mx"))
    got = arrived(world.sinks["mx"], "via mx")
    assert got.tls is not None
    trace = world.wait_completed(message_id)
    hosts = [
        (e["host"], e["address"], e["error"] is None) for e in trace if e["event"] == "attempt"
    ]
    assert hosts[0][:2] == ("mx1.mx.test", "127.0.0.2") and not hosts[0][2]
    assert hosts[-1] == ("mx2.mx.test", "127.0.0.3", True)


def test_implicit_mx_from_a_record(world: World) -> None:
    message_id = world.send(["frank@implicit.test"], message("implicit mx"))
    arrived(world.sinks["mx"], "implicit mx")
    trace = world.wait_completed(message_id)
    (attempt,) = [e for e in trace if e["event"] == "attempt"]
    assert attempt["host"] == "implicit.test"


def test_unreachable_destination_is_deferred_and_retried(world: World, tmp_path: Path) -> None:
    """A 4xx at RCPT is retried (schedule 1s) and delivered once; accepted ones never again."""
    sink = world.sinks["other"]
    calls = {"n": 0}

    def flaky(address: str) -> str | None:
        if address == "later@d3.test":
            calls["n"] += 1
            return "451 4.3.0 try again later" if calls["n"] == 1 else None
        return None

    sink._rcpt_replies = flaky  # the sink's scripted replies (see tests/peers.py)
    try:
        message_id = world.send(["now@d3.test", "later@d3.test"], message("flaky rcpt"))
        sink.wait_for(lambda: len([m for m in sink.messages if b"flaky rcpt" in m.data]) == 2)
        trace = world.wait_completed(message_id)
    finally:
        sink._rcpt_replies = None
    rcpts = [m.rcpt_tos for m in sink.messages if b"flaky rcpt" in m.data]
    assert rcpts == [["now@d3.test"], ["later@d3.test"]]
    kinds = [e["event"] for e in trace]
    assert "deferred" in kinds and kinds[-1] == "completed"
