"""CHUNKING (RFC 3030) in the delivery client: with PIPELINING, the message joins the group as
``BDAT <size> LAST`` — one round trip per message instead of two.

Against the scripted raw peer of ``tests/test_smtp_pipelining.py``, which holds its replies to
MAIL and RCPT until the chunk has arrived whole: a client that waited for any reply before
sending the message would never get one, so a pass proves the envelope and the message went
together. Every recipient must fare as it does over DATA one command at a time, and the peer
must get the message's bytes exactly (CRLF line ends, no dot doubled, no final dot). What is
new with BDAT is the RFC 1047 window: the message left with the envelope, so a reply that does
not come after that is a deferral, never the next host. Then against a real aiosmtpd sink that
offers CHUNKING (``tests/sinksmtp.py``): a whole delivery through the deliver service, and
``delivery.chunking: off``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from services.common.model import Envelope, TlsMode
from services.common.redisserver import EmbeddedRedis
from services.deliver.attempt import Attempt, Peer, Timeouts, TlsSettings
from services.deliver.pool import ConnectionPool
from services.deliver.session import attempt
from services.deliver.transaction import forget_chunking
from tests.peers import Sink
from tests.test_batching import deliver as deliver_jobs
from tests.test_batching import queue_jobs, routed
from tests.test_smtp_pipelining import (
    BODY,
    RCPTS,
    REFUSED_ALL,
    SCENARIOS,
    TIMEOUTS,
    Script,
    ScriptedPeer,
    deliver,
    fates,
    verbs,
)

AS_SENT = b"Subject: pipelining\r\n\r\nline one\r\n.leading dot\r\n"  # BODY: no dot doubled
CHUNKED = Script(chunking=True)
# Scenarios of DATA that have a BDAT twin: "DATA answered 250" is a DATA-only protocol error
# (skipping 354); 250 is BDAT's right answer.
# "MAIL out of sequence" (503) is unsure with BDAT: the chunk went with the group, and a
# transaction still open may have taken it (test below).
TWINS = [n for n in SCENARIOS if n not in ("DATA answered 250", "MAIL out of sequence")]


@pytest.mark.parametrize("trickle", [False, True], ids=["together", "trickle"])
@pytest.mark.parametrize("name", TWINS)
def test_each_recipient_fares_as_it_does_over_data(name: str, trickle: bool) -> None:
    script = replace(SCENARIOS[name], trickle=trickle, chunking=True)
    (chunked,), seen = deliver(script)
    (plain,), _ = deliver(replace(script, pipelining=False, chunking=False))
    assert fates(chunked) == fates(plain)
    assert (chunked.next_host, chunked.clean) == (plain.next_host, plain.clean)
    assert verbs(seen)[-1] == b"BDAT" and b"DATA" not in verbs(seen)
    assert seen.bodies in ([AS_SENT], []), "the chunk as it is, or (MAIL refused) not read"


def test_the_envelope_and_the_message_go_in_one_write() -> None:
    (result,), seen = deliver(CHUNKED)
    assert verbs(seen) == [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"BDAT"]
    assert b"BDAT %d LAST" % len(AS_SENT) in seen.commands
    assert seen.bodies == [AS_SENT]
    assert set(fates(result).values()) == {"250 2.0.0 queued as Q1"}
    assert result.clean and result.data_sent and not result.desync


def test_chunking_needs_pipelining_and_can_be_turned_off() -> None:
    """A peer with CHUNKING but without PIPELINING, and ``delivery.chunking: off``: DATA."""
    (alone,), alone_seen = deliver(replace(CHUNKED, pipelining=False))
    off = replace(TIMEOUTS, chunking=False)
    (turned_off,), off_seen = deliver(CHUNKED, timeouts=off)
    for result, seen in ((alone, alone_seen), (turned_off, off_seen)):
        assert verbs(seen)[-1] == b"DATA" and b"BDAT" not in verbs(seen)
        assert set(fates(result).values()) == {"250 2.0.0 queued as Q1"}
        assert seen.bodies == [BODY.replace(b"\r\n.", b"\r\n..")]


@pytest.mark.parametrize(
    "after", [0, 1, 2, 4], ids=["none", "MAIL's", "MAIL's, r0's", "all but BDAT's"]
)
def test_a_reply_lost_after_the_chunk_went_defers_never_the_next_host(after: int) -> None:
    """The peer closes after reading the chunk, having answered ``after`` commands: it may have
    queued the message (a pipelining server answers a group once it has done all of it), so
    whoever has no reply of their own is deferred 4.4.2 (RFC 1047), and the next host does not
    get the message in this round."""
    (result,), seen = deliver(replace(CHUNKED, close_after=after))
    assert seen.bodies == [AS_SENT]
    assert result.data_sent and not result.next_host
    assert set(fates(result)) == set(RCPTS)
    assert {(r.code, r.status) for r in result.replies.values()} == {(451, "4.4.2")}


def test_every_recipient_refused_the_chunk_is_refused_and_the_session_goes_on() -> None:
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    results, seen = deliver(replace(REFUSED_ALL, chunking=True), pool=pool, times=2)
    assert [set(fates(r).values()) for r in results] == [{"550 5.1.1 no such user"}] * 2
    assert [r.reused for r in results] == [False, True] and seen.connections == 1
    first_bdat = next(i for i, c in enumerate(seen.commands) if c.startswith(b"BDAT"))
    second = [c[:4] for c in seen.commands[first_bdat + 1 :]]
    assert second == [b"RSET", b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"BDAT"], seen.commands


@pytest.mark.parametrize("how", ["closed at RSET", "421 to RSET, then closed"])
def test_a_parked_session_gone_before_the_group_gives_way_to_a_fresh_one(how: str) -> None:
    """The RSET leading a parked session's group got no reply, or a refusal and then nothing:
    the session was dropped while parked (an idle timeout), so nothing was taken — the same
    round goes on a fresh session at once, not deferred."""
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    refused = replace(REFUSED_ALL, chunking=True)
    said = b"" if how == "closed at RSET" else b"421 4.4.2 idle too long\r\n"
    results, seen = deliver(replace(refused, rset_close=said), pool=pool, times=2)
    assert seen.connections == 2, "the round ran on a new session"
    assert not results[1].next_host and fates(results[1]) == fates(results[0])
    assert set(fates(results[1]).values()) == {"550 5.1.1 no such user"}


def test_a_reused_session_carries_the_next_message_in_one_write() -> None:
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    results, seen = deliver(replace(CHUNKED, tls=True), pool=pool, times=3)
    assert [r.reused for r in results] == [False, True, True] and seen.connections == 1
    assert seen.bodies == [AS_SENT] * 3
    assert all(set(fates(r).values()) == {"250 2.0.0 queued as Q1"} for r in results)


@pytest.mark.parametrize(
    "reply", [b"354 go ahead\r\n", b"250 2.0.0 done\r\n250 2.0.0 again\r\n", b"hello\r\n"]
)
def test_a_peer_out_of_step_after_the_chunk_is_never_a_delivery(reply: bytes) -> None:
    """``354`` to BDAT, a reply too many, a line that is no reply: the session is closed;
    only an exact ``250`` delivers (the second case's first reply is one, the extra closes)."""
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    first, extra = reply.split(b"\r\n", 1)
    script = replace(CHUNKED, final=first + b"\r\n", extra=extra)
    results, seen = deliver(script, pool=pool, times=2)
    assert seen.connections == 2, "never reused"
    for result in results:
        codes = {(r.code, r.status) for r in result.replies.values()}
        if first.startswith(b"250"):
            assert codes == {(250, "2.0.0")}
        else:
            assert codes == {(451, "4.5.0")} and result.desync


def test_a_delivery_through_the_deliver_service_to_a_sink_offering_chunking(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Three jobs over the deliver service's lanes to a real aiosmtpd sink with CHUNKING and
    STARTTLS: every message arrives whole and over TLS, by BDAT; with ``chunking: off`` by DATA."""
    for setting, verb in (("on", "BDAT"), ("off", "DATA")):
        with Sink("starttls", extensions=("CHUNKING",)) as sink:
            config = routed(tmp_path, valkey, "c.test", sink.address_text, chunking=setting)
            jobs = queue_jobs(store, "c.test", 3)
            outcomes = deliver_jobs(config, store, jobs)
            messages = sink.wait_messages(3)
        assert all(o is not None and len(o.delivered) == 1 for o in outcomes), outcomes
        assert {m.tls for m in messages} == {"TLSv1.3"}
        assert (sink.bdat_commands, sink.data_commands) == ((3, 0) if verb == "BDAT" else (0, 3))
        assert all(m.data.endswith(b"\r\n") and b"\r\n.\r\n" not in m.data for m in messages)


def test_timeouts_default_to_chunking() -> None:
    assert Timeouts("relay.test").chunking


def test_a_server_answering_the_group_once_the_message_is_checked_gets_the_data_timeout() -> None:
    """A pipelining server answers the group once it has done all of it: its reply to MAIL comes
    after the chunk was read and checked (a content filter), as the reply to DATA's final dot
    does. That wait is the data timeout's (RFC 5321 §4.5.3.2.6), not the command timeout's: a
    deferral there would send the message again at every retry, the server having queued it each
    time (review finding)."""
    timeouts = replace(TIMEOUTS, command=0.3, data=10)
    (result,), seen = deliver(replace(CHUNKED, delay=1.0), timeouts=timeouts)
    assert seen.bodies == [AS_SENT]
    assert set(fates(result).values()) == {"250 2.0.0 queued as Q1"}
    assert result.clean and not result.next_host


def test_a_parked_session_slow_to_answer_its_group_is_not_sent_the_message_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A parked session whose group (RSET leading) gets no reply in time is still open: the
    server may be checking the message it read and queue it. So the round is deferred (RFC
    1047), never carried at once on a fresh session, which would deliver a second copy at once
    (review finding: a timeout was taken for a session dropped while parked)."""
    monkeypatch.setattr("services.deliver.pool.RECHECK_AFTER", 0.0)  # every reuse: RSET first
    timeouts = replace(TIMEOUTS, command=0.3, data=0.8)
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    script = replace(CHUNKED, delay=4.0, delay_from=1)  # the second message is slow to check
    results, seen = deliver(script, pool=pool, times=2, timeouts=timeouts)
    assert [r.reused for r in results] == [False, True]
    assert seen.connections == 1, "no fresh session: the server may be queuing the message"
    assert seen.bodies == [AS_SENT] * 2
    second = results[1]
    assert second.data_sent and not second.next_host
    assert {(r.code, r.status) for r in second.replies.values()} == {(451, "4.4.2")}


def _open_sockets_to(port: int) -> list[socket.socket]:
    found = []
    for thing in gc.get_objects():
        if (
            isinstance(thing, socket.socket)
            and thing.family in (socket.AF_INET, socket.AF_INET6)
            and thing.fileno() != -1
        ):
            with contextlib.suppress(OSError):
                if thing.getpeername()[1] == port and thing.getsockname()[1] != port:
                    found.append(thing)
    return found


@pytest.mark.parametrize(
    "script",
    [CHUNKED, Script(), Script(pipelining=False)],
    ids=["BDAT", "pipelined DATA", "DATA one command at a time"],
)
def test_a_peer_that_stops_reading_the_message_leaves_no_connection_behind(
    script: Script,
) -> None:
    """A peer that reads the commands, then nothing more (its receive window shut): the message
    is still in our transport's buffer when the reply times out. Closing the session must drop
    the connection and that copy of the message; a close that waits for the buffer to drain
    would keep both for as long as the peer keeps the connection open — forever, for a hostile
    one, one message's size per attempt (review finding: memory and descriptors at a peer's
    will; BDAT sends the message without waiting for a 354)."""
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 24_000  # 24 MB: beyond the buffers
    timeouts = replace(TIMEOUTS, data=1.0)  # the reply after the message (BDAT: every reply)
    envelope = Envelope(id="0123456789ab-big", sender="s@origin.test", recipients=tuple(RCPTS))

    async def run(peer: ScriptedPeer) -> tuple[Attempt, list[socket.socket]]:
        where = Peer("scripted.test", "127.0.0.1", peer.port, "localhost")
        result = await attempt(
            where, envelope, RCPTS, body, TlsSettings(mode=TlsMode.NONE), timeouts
        )
        deadline = time.monotonic() + 5
        while (left := _open_sockets_to(peer.port)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return result, left

    with ScriptedPeer(replace(script, stall=True)) as peer:
        result, left = asyncio.run(run(peer))
    assert {(r.code, r.status) for r in result.replies.values()} == {(451, "4.4.2")}
    assert left == [], "the connection outlived the session, holding the message"


def test_mail_out_of_sequence_after_the_chunk_went_defers_never_the_next_host() -> None:
    """``503`` to MAIL: the server holds a transaction still open, which took our RCPTs and the
    chunk that went with them — it may deliver the message. Unsure (RFC 1047): deferred 4.5.0
    and the session closed, never the next host in the same round (review finding: a second
    copy there, at once)."""
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    script = replace(SCENARIOS["MAIL out of sequence"], chunking=True)
    results, seen = deliver(script, pool=pool, times=2)
    for result in results:
        assert result.data_sent and not result.next_host and result.desync
        assert {(r.code, r.status) for r in result.replies.values()} == {(451, "4.5.0")}
    assert seen.connections == 2, "never reused"


def test_a_peer_that_offers_chunking_but_does_not_understand_bdat() -> None:
    """``500`` to BDAT after accepted recipients: the server did not take BDAT, and read the
    chunk as commands (an SMTP-smuggling-shaped fault: whatever it says next answers the
    message's lines). The message was never judged: a protocol error, deferred 4.5.0 and the
    session closed — not a bounce for every recipient — and DATA to that peer from then on
    (review finding: the recipients were bounced with the 500, the next message too)."""
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    try:
        results, seen = deliver(replace(CHUNKED, bdat_unknown=True), pool=pool, times=2)
    finally:
        forget_chunking()
    first, second = results
    assert {(r.code, r.status) for r in first.replies.values()} == {(451, "4.5.0")}
    assert first.desync and not first.next_host
    assert set(fates(second).values()) == {"250 2.0.0 queued as Q1"}, fates(second)
    assert verbs(seen)[-1] == b"DATA" and seen.connections == 2
    assert seen.bodies == [BODY.replace(b"\r\n.", b"\r\n..")]
