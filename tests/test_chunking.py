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

from dataclasses import replace
from pathlib import Path

import pytest
import redis

from services.common.redisserver import EmbeddedRedis
from services.deliver.attempt import Timeouts
from services.deliver.pool import ConnectionPool
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
    deliver,
    fates,
    verbs,
)

AS_SENT = b"Subject: pipelining\r\n\r\nline one\r\n.leading dot\r\n"  # BODY: no dot doubled
CHUNKED = Script(chunking=True)
# Scenarios of DATA that have a BDAT twin: "DATA answered 250" is a DATA-only protocol error
# (skipping 354); 250 is BDAT's right answer.
TWINS = [name for name in SCENARIOS if name != "DATA answered 250"]


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
