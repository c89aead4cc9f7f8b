"""A deliver process's TLS sessions read 4 KiB at a time, not asyncio's 256 KiB (issue #20).

asyncio's ``SSLProtocol`` allocates a receive buffer of ``max_size`` bytes per connection for its
whole life; with ``delivery.sessions_per_process`` sessions open that was 256 KiB each (1 000
sessions: 250 MB). :func:`services.deliver.tlscontext.bound_read_buffers` (called when a deliver
process starts delivering) lowers it; a delivery over STARTTLS must work exactly as before, and
the session it parks must hold the small buffer. Real STARTTLS sink, the deliver's session code.
"""

from __future__ import annotations

import asyncio
from asyncio import sslproto

import pytest

from services.common.model import Envelope, TlsMode
from services.deliver.pool import ConnectionPool
from services.deliver.session import Peer, Timeouts, TlsSettings, _close_and_wait, attempt
from services.deliver.tlscontext import READ_BUFFER, bound_read_buffers
from tests.peers import Sink

BODY = b"Subject: buffers\r\n\r\n" + b"x" * 76 + b"\r\n"


@pytest.fixture
def asyncio_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's own size for the test, whatever ran before; restored after it."""
    monkeypatch.setattr(sslproto.SSLProtocol, "max_size", 256 * 1024)


@pytest.mark.usefixtures("asyncio_default")
def test_a_deliver_session_over_tls_holds_a_4_kib_read_buffer() -> None:
    bound_read_buffers()
    assert sslproto.SSLProtocol.max_size == READ_BUFFER == 4 * 1024
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    envelope = Envelope(id="B1", sender="s@relay.test", recipients=("r@dest.test",), size=len(BODY))
    with Sink("starttls") as sink:
        peer = Peer("mx.dest.test", sink.host, sink.port, "mx.dest.test")

        async def deliver() -> int:
            result = await attempt(
                peer, envelope, ["r@dest.test"], BODY, TlsSettings(TlsMode.OPPORTUNISTIC),
                Timeouts("relay.test", connect=5, command=10, greeting=10, data=10), pool=pool,
            )  # fmt: skip
            assert result.tls_version is not None and result.replies["r@dest.test"].code == 250
            (parked,) = [p for sessions in pool._idle.values() for p in sessions]
            protocol = getattr(parked.smtp.transport, "_ssl_protocol", None)  # asyncio's own
            held = len(getattr(protocol, "_ssl_buffer", b""))
            await _close_and_wait(parked.smtp)
            return held

        assert asyncio.run(deliver()) == READ_BUFFER
    assert len(sink.messages) == 1 and sink.messages[0].tls


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
