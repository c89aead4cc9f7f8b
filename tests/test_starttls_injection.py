"""Client-side STARTTLS response injection (RFC 3207 §4.2; the CVE-2011-0411 class, reversed).

A hostile destination answers our ``STARTTLS`` with ``220`` *and*, in the same packet, replies
to commands we have not sent yet: a fake EHLO capability list, fake ``250`` replies to MAIL and
RCPT, a fake ``354`` and a fake ``250 queued`` for DATA. Then it completes a real TLS handshake
and runs a real session over TLS. Whatever was buffered before the handshake is not from the TLS
peer and must never be read as a reply: the delivery must be decided by the real post-TLS
replies (the client says EHLO again after TLS), so a real ``451`` defers and a real ``550``
bounces even though the injected bytes said ``250``.

The peer is a raw asyncio server (loopback, real TLS with the test CA); the client is the deliver
service's own session code (:func:`services.deliver.session.attempt`) in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtplib.protocol import SMTPProtocol

from services.common.model import Envelope, Reply, TlsMode
from services.deliver.attempt import Attempt, Peer, Timeouts, TlsSettings
from services.deliver.session import attempt
from services.deliver.tls import Outcome
from tests.certs import default_ca

#: Replies to commands not yet sent, pipelined after the 220 to STARTTLS (one write).
INJECTED = (
    b"250-injected.test\r\n250-PIPELINING\r\n250 SIZE 1\r\n"  # a fake EHLO answer
    b"250 2.1.0 injected sender ok\r\n"  # MAIL
    b"250 2.1.5 injected recipient ok\r\n"  # RCPT
    b"354 injected go ahead\r\n"  # DATA
    b"250 2.0.0 injected queued as FAKE\r\n"  # the final dot
)
REAL_RCPT_OK = b"250 2.1.5 real recipient ok"


@dataclass
class Seen:
    """What the hostile peer received, per connection."""

    clear: list[bytes] = field(default_factory=list)  # command lines before TLS
    tls: list[bytes] = field(default_factory=list)  # command lines over TLS
    bodies: list[bytes] = field(default_factory=list)  # messages received over TLS
    handshakes: int = 0
    closed: int = 0  # connections over (the client's end is closed too)


class InjectingPeer:
    """Offers STARTTLS, answers it with ``220`` + :data:`INJECTED` in one write, then does a real
    TLS handshake and a real session whose replies say ``real``. ``data_reply`` is its real
    answer to the final dot (``rcpt_reply`` to RCPT)."""

    def __init__(
        self, data_reply: bytes, rcpt_reply: bytes = b"250 2.1.5 real recipient ok"
    ) -> None:
        self.data_reply = data_reply
        self.rcpt_reply = rcpt_reply
        self.seen = Seen()
        self.port = 0
        self.errors: list[str] = []
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        default_ca().issue_cert("localhost", "127.0.0.1").configure_cert(self._context)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="injecting-peer", daemon=True)

    def __enter__(self) -> InjectingPeer:
        self._thread.start()
        assert self._ready.wait(10), "peer did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 hostile.test ESMTP\r\n")
            await self._clear(reader, writer)
            await writer.start_tls(self._context)  # the bytes above are already on the wire
            self.seen.handshakes += 1
            await self._over_tls(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            self.seen.closed += 1

    async def _clear(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            self.seen.clear.append(line.rstrip())
            verb = line[:8].upper().strip()
            if verb.startswith((b"EHLO", b"HELO")):
                writer.write(b"250-hostile.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS":
                writer.write(b"220 2.0.0 ready\r\n" + INJECTED)  # one write: one segment
                await writer.drain()
                return
            else:
                writer.write(b"530 5.7.0 STARTTLS first\r\n")
            await writer.drain()
        raise ConnectionError("client left before STARTTLS")

    async def _over_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            self.seen.tls.append(line.rstrip())
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-hostile.test real\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                writer.write(b"250 2.1.0 real sender ok\r\n")
            elif verb == b"RCPT":
                writer.write(self.rcpt_reply + b"\r\n")
            elif verb == b"DATA":
                writer.write(b"354 real go ahead\r\n")
                await writer.drain()
                self.seen.bodies.append(await _read_data(reader))
                writer.write(self.data_reply + b"\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 real bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 2.0.0 real ok\r\n")
            await writer.drain()


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while (line := await reader.readline()) and line != b".\r\n":
        lines.append(line)
    return b"".join(lines)


def deliver(peer: InjectingPeer, mode: TlsMode = TlsMode.OPPORTUNISTIC) -> Attempt:
    envelope = Envelope(id="0123456789ab-inject", sender="s@origin.test", recipients=("r@x.test",))
    body = b"Subject: injection\r\n\r\nreal body\r\n"

    async def run() -> Attempt:
        result = await attempt(
            Peer("hostile.test", "127.0.0.1", peer.port, "localhost"),
            envelope,
            ["r@x.test"],
            body,
            TlsSettings(mode=mode),
            Timeouts("relay.test", connect=5, command=10, greeting=10, data=10),
        )
        # Let the client's TLS shutdown finish on this loop before asyncio.run closes it.
        deadline = time.monotonic() + 10
        while peer.seen.closed < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for _ in range(5):
            await asyncio.sleep(0)
        return result

    return asyncio.run(run())


@pytest.fixture
def accepting() -> Iterator[InjectingPeer]:
    with InjectingPeer(b"250 2.0.0 real queued as REAL") as peer:
        yield peer


def assert_real_session_over_tls(peer: InjectingPeer, result: Attempt) -> None:
    """The client ignored the injected bytes: it said EHLO again over TLS and sent every
    command there, answered by the real replies only."""
    assert result.outcome is Outcome.TLS and result.tls_version is not None
    assert peer.seen.handshakes == 1
    assert peer.seen.clear == [b"EHLO relay.test", b"STARTTLS"]
    verbs = [line[:4].upper() for line in peer.seen.tls]
    assert verbs[:3] == [b"EHLO", b"MAIL", b"RCPT"], peer.seen.tls


def test_injected_replies_are_not_taken_for_the_real_ones(accepting: InjectingPeer) -> None:
    result = deliver(accepting)
    assert_real_session_over_tls(accepting, result)
    assert result.replies == {"r@x.test": Reply(250, "2.0.0", "real queued as REAL")}
    assert accepting.seen.bodies == [b"Subject: injection\r\n\r\nreal body\r\n"]


@pytest.mark.parametrize("mode", [TlsMode.OPPORTUNISTIC, TlsMode.ENFORCED])
def test_a_real_temporary_refusal_defers_despite_an_injected_250(mode: TlsMode) -> None:
    with InjectingPeer(b"451 4.3.0 real try later") as peer:
        result = deliver(peer, mode)
    assert_real_session_over_tls(peer, result)
    (reply,) = result.replies.values()
    assert (reply.code, reply.text) == (451, "real try later"), "an injected 250 was believed"
    assert not reply.is_success


def test_a_real_recipient_refusal_bounces_despite_an_injected_250() -> None:
    with InjectingPeer(b"250 2.0.0 real queued", rcpt_reply=b"550 5.1.1 real no such user") as peer:
        result = deliver(peer)
    assert_real_session_over_tls(peer, result)
    assert result.replies == {"r@x.test": Reply(550, "5.1.1", "real no such user")}
    # The peer pipelines (DATA goes in the group, RFC 2920) and answers DATA 354 although it
    # refused the only recipient: the message is not sent, the session is closed.
    assert not any(peer.seen.bodies), "the message must not be sent when every RCPT was refused"
    assert result.data_sent is False


def test_pre_tls_bytes_a_library_kept_fail_the_session_safely(
    accepting: InjectingPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: an aiosmtplib that did not discard the injected bytes (simulated by
    putting them back after its upgrade) must not get them read as replies: the session counts
    as a failed handshake, and required TLS moves on to the next host without sending."""
    original = SMTPProtocol.start_tls

    async def keeps_pre_tls_bytes(self: SMTPProtocol, *args: Any, **kwargs: Any) -> Any:
        response = await original(self, *args, **kwargs)
        self._buffer.extend(INJECTED)
        return response

    monkeypatch.setattr(SMTPProtocol, "start_tls", keeps_pre_tls_bytes)
    result = deliver(accepting, TlsMode.ENFORCED)
    assert result.outcome is Outcome.HANDSHAKE_FAILED
    assert result.next_host and result.error is not None and result.error.status == "4.7.10"
    assert result.replies == {} and not result.data_sent
    assert accepting.seen.tls == [] and accepting.seen.bodies == []
