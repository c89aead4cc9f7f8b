"""A deliver process's TLS sessions read 4 KiB at a time, not asyncio's 256 KiB, and write a
message 16 KiB at a time, not whole (issue #20: many sessions open in one process).

asyncio's ``SSLProtocol`` allocates a receive buffer of ``max_size`` bytes per connection for its
whole life; with ``delivery.sessions_per_process`` sessions open that was 256 KiB each (1 000
sessions: 250 MB). :func:`services.deliver.tlscontext.bound_read_buffers` (called when a deliver
process starts delivering) lowers it; a delivery over STARTTLS must work exactly as before, and
the session it parks must hold the small buffer. A pipelined group or message goes to the
transport in writes of at most 16 KiB (asyncio's TLS transport keeps a buffer as large as the
largest write for the session's life), the same bytes in the same order. Real STARTTLS sink,
the deliver's session code.

Ingest's inbound STARTTLS sessions (aiosmtpd builds asyncio's ``SSLProtocol`` itself) read 16 KiB
at a time (``services.ingest.server.READ_BUFFER``, set by ``serve``): a long EHLO and a message
of 100 kB in lines of 998 octets arrive whole over TLS, and the session holds the small buffer.
Real ingest server, Valkey and client.
"""

from __future__ import annotations

import asyncio
from asyncio import sslproto
from pathlib import Path

import aiosmtplib
import pytest
import redis

from services.common import tlsbuffers
from services.common.model import Envelope, TlsMode
from services.common.redisserver import EmbeddedRedis
from services.deliver import pipelining, session
from services.deliver.attempt import Peer, Timeouts, TlsSettings
from services.deliver.pool import ConnectionPool
from services.deliver.session import _close_and_wait, attempt
from services.deliver.tlscontext import READ_BUFFER, bound_read_buffers
from services.ingest import server as ingest_server
from tests.peers import Sink
from tests.test_batching import deliver, queue_jobs, routed
from tests.test_ingest import RunningServer, _unverified_tls, client, make_config, queued_id, stored

BODY = b"Subject: buffers\r\n\r\n" + b"x" * 76 + b"\r\n"
BIG = b"Subject: big\r\n\r\n" + b"".join(b"%07d" % n + b"y" * 69 + b"\r\n" for n in range(1300))


@pytest.fixture
def asyncio_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's own size for the test, whatever ran before; restored after it."""
    monkeypatch.setattr(sslproto.SSLProtocol, "max_size", 256 * 1024)


async def delivered_and_parked(sink: Sink, body: bytes) -> aiosmtplib.SMTP:
    """One message to ``sink`` over opportunistic STARTTLS, delivered (250); the session it
    parked, still open."""
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    envelope = Envelope(id="B1", sender="s@relay.test", recipients=("r@dest.test",), size=len(body))
    peer = Peer("mx.dest.test", sink.host, sink.port, "mx.dest.test")
    result = await attempt(
        peer, envelope, ["r@dest.test"], body, TlsSettings(TlsMode.OPPORTUNISTIC),
        Timeouts("relay.test", connect=5, command=10, greeting=10, data=10), pool=pool,
    )  # fmt: skip
    assert result.tls_version is not None and result.replies["r@dest.test"].code == 250
    (parked,) = [p for sessions in pool._idle.values() for p in sessions]
    return parked.smtp


@pytest.mark.usefixtures("asyncio_default")
@pytest.mark.parametrize("body", [BODY, BIG], ids=["small", "100kB"])
def test_a_deliver_session_over_tls_holds_a_4_kib_read_buffer(body: bytes) -> None:
    bound_read_buffers()
    assert sslproto.SSLProtocol.max_size == READ_BUFFER == 4 * 1024
    with Sink("starttls") as sink:

        async def deliver() -> int:
            parked = await delivered_and_parked(sink, body)
            protocol = getattr(parked.transport, "_ssl_protocol", None)  # asyncio's own
            held = len(getattr(protocol, "_ssl_buffer", b""))
            await _close_and_wait(parked)
            return held

        assert asyncio.run(deliver()) == READ_BUFFER
    assert len(sink.messages) == 1 and sink.messages[0].tls
    assert sink.messages[0].data.endswith(body.split(b"\r\n\r\n", 1)[1])


@pytest.mark.usefixtures("asyncio_default")
def test_bounding_is_idempotent_and_never_raises_a_smaller_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound_read_buffers()
    bound_read_buffers()
    assert sslproto.SSLProtocol.max_size == READ_BUFFER
    monkeypatch.setattr(sslproto.SSLProtocol, "max_size", 1024)
    bound_read_buffers()
    assert sslproto.SSLProtocol.max_size == 1024


class _Recorder:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append(bytes(data))


@pytest.mark.parametrize("size", [0, 1, 16 * 1024, 16 * 1024 + 1, 100_003])
def test_a_pipelined_write_goes_out_in_chunks_of_at_most_16_kib(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    pipe = pipelining.Pipeline.__new__(pipelining.Pipeline)
    recorder = _Recorder()
    pipe._transport = recorder  # type: ignore[assignment]
    pipe.reader = pipelining.ReplyReader()
    asyncio.run(pipe.send(data))
    assert b"".join(recorder.writes) == data
    assert all(0 < len(w) <= pipelining.WRITE_CHUNK == 16 * 1024 for w in recorder.writes)
    assert len(recorder.writes) == -(-size // pipelining.WRITE_CHUNK)


MANY = tuple(f"X-EXTENSION-{n:02d} " + "a" * 100 for n in range(60))  # an EHLO reply of ~7 kB
LONG = ("X-LONG " + "b" * 8000,)  # one line near aiosmtplib's limit of 8 KiB


@pytest.mark.usefixtures("asyncio_default")
@pytest.mark.parametrize("extensions", [MANY, LONG], ids=["60-extensions", "8-KiB-line"])
def test_a_reply_larger_than_the_read_buffer_arrives_whole_over_tls(
    extensions: tuple[str, ...],
) -> None:
    """The EHLO after STARTTLS spans several 4 KiB reads: read whole, the delivery goes on."""
    bound_read_buffers()
    with Sink("starttls", extensions=extensions) as sink:

        async def deliver() -> None:
            parked = await delivered_and_parked(sink, BODY)
            assert parked.supports_extension(extensions[0].split()[0].lower())
            await _close_and_wait(parked)

        asyncio.run(deliver())
    assert len(sink.messages) == 1 and sink.messages[0].tls


HELO = "h" * 200 + ".client.example"  # a long EHLO argument, after STARTTLS
INBOUND = b"Subject: inbound\r\n\r\n" + b"".join(
    b"%06d" % n + b"z" * 992 + b"\r\n" for n in range(100)
)  # 100 lines of 998 octets, ~100 kB: many TLS records, each more than one 4 KiB read


@pytest.mark.usefixtures("asyncio_default")
def test_an_inbound_tls_session_holds_16_kib_and_reads_a_message_whole(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    tlsbuffers.bound_read_buffers(ingest_server.READ_BUFFER)  # as serve() does
    assert sslproto.SSLProtocol.max_size == ingest_server.READ_BUFFER == 16 * 1024
    running = RunningServer(make_config(tmp_path), valkey.url)
    with running as address, client(address) as smtp:
        smtp.ehlo()
        assert smtp.starttls(context=_unverified_tls())[0] == 220
        assert smtp.ehlo(HELO)[0] == 250
        held = [
            len(getattr(getattr(c, "_tls_protocol", None), "_ssl_buffer", b""))
            for h in running.server._handlers
            for c in h.connections
        ]
        assert held == [ingest_server.READ_BUFFER]
        assert smtp.mail("a@client.example") == (250, b"2.1.0 Ok")
        assert smtp.rcpt("b@dest.example")[0] == 250
        message_id = queued_id(smtp.data(INBOUND))
    envelope, body = stored(store, message_id)
    assert envelope["inbound_tls"]["version"] is not None
    assert body.endswith(INBOUND)
    assert HELO.encode() in body  # in the Received field


def test_a_process_runs_at_most_its_bound_of_tls_handshakes_at_once(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six lanes open six STARTTLS sessions at once to a sink slow to answer STARTTLS; with the
    process's bound at 2, at most two STARTTLS commands wait at the sink at any time (six
    without the bound), and every message still arrives over TLS."""
    monkeypatch.setattr(session, "HANDSHAKES", 2)
    with Sink("starttls", starttls_delay=0.3) as sink:
        config = routed(tmp_path, valkey, "h.test", sink.address_text, sessions_per_process=6)
        outcomes = deliver(config, store, queue_jobs(store, "h.test", 6))
        messages = sink.wait_messages(6)
    assert all(o is not None and len(o.delivered) == 1 for o in outcomes), outcomes
    assert {m.tls for m in messages} == {"TLSv1.3"}
    assert sink.starttls_busy_peak == 2, sink.starttls_busy_peak
