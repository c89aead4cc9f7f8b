"""The SMTP protocol of the test sinks: what a sink answers, and what it records.

:class:`SinkSMTP` is a real aiosmtpd ``SMTP`` protocol with per-kind STARTTLS behaviour
(``"starttls"`` upgrades, ``"plain"`` refuses with ``502 5.5.1``, ``"broken"`` answers ``220`` and
then writes :data:`BROKEN_TLS_GARBAGE`), extra EHLO keywords, and RFC 8689 REQUIRETLS accepted as
a MAIL parameter when the sink advertises it (``555 5.5.4`` otherwise). :class:`SinkHandler` holds
the aiosmtpd hooks. Both run in the sink's thread and report every event to their
:class:`SinkHost` (the :class:`tests.peers.Sink` that started them): connections, STARTTLS
attempts and handshakes, each MAIL command (:class:`MailCommand`) and each DATA transaction
(:class:`Message`); replies to RCPT and DATA are the host's to script.

Failure: an exception inside a session is recorded on the host and answered ``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

__all__ = [
    "BROKEN_TLS_GARBAGE",
    "REQUIRETLS",
    "MailCommand",
    "Message",
    "SinkHost",
    "SinkSMTP",
    "is_positive",
    "keyword_of",
]

#: Bytes the "broken" sink sends instead of a TLS ServerHello (not a TLS record).
BROKEN_TLS_GARBAGE = b"this is not a TLS ServerHello\r\n" * 4

_EHLO_KEEP = ("SIZE", "8BITMIME", "SMTPUTF8")
REQUIRETLS = "REQUIRETLS"  # RFC 8689 EHLO keyword and MAIL parameter


@dataclasses.dataclass(frozen=True)
class Message:
    """One DATA transaction received by a sink."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # raw bytes after dot-unstuffing (envelope.original_content)
    tls: str | None  # None in clear, else e.g. "TLSv1.3"
    cipher: str | None  # cipher name, e.g. "TLS_AES_256_GCM_SHA384"
    peer: Any  # client address as given by the socket (host, port[, ...])
    mail_options: list[str]
    rcpt_options: list[str]
    smtp_utf8: bool
    helo: str | None  # EHLO/HELO name the client sent
    connection: int  # 1-based ordinal of the connection on this sink
    reply: str  # reply the sink sent for the DATA command


class MailCommand(NamedTuple):
    """One MAIL command a sink received, whatever it answered (also when no DATA followed).

    A plain tuple ``(mail_from, options, tls)``, so it compares equal to one.
    """

    mail_from: str  # the reverse-path ("<>" for the null one), or the raw argument if unparsable
    options: list[str]  # MAIL parameters as sent, upper-cased (aiosmtpd's view), in order
    tls: str | None  # None in clear, else e.g. "TLSv1.3"


def is_positive(reply: str) -> bool:
    """Whether an SMTP reply is a success (2xx)."""
    return reply[:1] == "2"


def keyword_of(text: str) -> str:
    """The keyword of an EHLO line or of a MAIL parameter (``KEY`` of ``KEY=value``), upper."""
    return text.split(" ", 1)[0].partition("=")[0].upper()


class SinkHost(Protocol):
    """What the protocol needs from its sink: its settings, and where to record (thread-safe)."""

    kind: str
    extensions: tuple[str, ...]
    data_delay: float  # seconds before the reply to the final dot
    mail_delay: float  # seconds before the reply to MAIL
    starttls_delay: float  # seconds before the reply to STARTTLS

    def delay_for(self, msg: Message) -> float: ...
    def busy(self, step: int) -> None: ...
    def mail_busy(self, step: int) -> None: ...
    def starttls_busy(self, step: int) -> None: ...

    def advertises(self, keyword: str) -> bool: ...
    def on_connect(self, proto: SinkSMTP) -> int: ...
    def greeting(self, conn_no: int) -> str | None: ...
    def on_disconnect(self, proto: SinkSMTP) -> None: ...
    def bump(self, counter: str) -> None: ...
    def record(self, msg: Message) -> None: ...
    def record_mail(self, command: MailCommand) -> None: ...
    def record_error(self, text: str) -> None: ...
    def rcpt_reply(self, address: str) -> str | None: ...
    def data_reply(self, msg: Message) -> str | None: ...


class SinkSMTP(SMTP):  # type: ignore[misc]  # aiosmtpd is untyped
    """aiosmtpd protocol with per-kind STARTTLS behaviour and recording."""

    def __init__(self, sink: SinkHost, **kwargs: Any) -> None:
        self._sink = sink
        self.conn_no = 0
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        # Set while a MAIL command is processed, for SinkHandler.handle_MAIL: the parameters
        # as sent, and the REQUIRETLS ones taken out before aiosmtpd (which refuses them) saw it.
        self.mail_options: list[str] = []
        self.mail_requiretls: list[str] = []
        self._chunks: list[bytes] = []  # BDAT chunks of the transaction so far (RFC 3030)
        super().__init__(SinkHandler(sink), **kwargs)

    # connection bookkeeping -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        is_tls_upgrade = self._original_transport is not None
        if not is_tls_upgrade:
            self.conn_no = self._sink.on_connect(self)
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        """A greeting the host scripts (e.g. ``421 4.7.0 Too many connections``) ends the
        session at once; otherwise aiosmtpd's own session."""
        refusal = self._sink.greeting(self.conn_no)
        if refusal is not None:
            await self.push(refusal)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._sink.on_disconnect(self)

    def abort(self) -> None:
        """Drop the connection (and the clear one below TLS) without a goodbye."""
        for transport in (self.transport, self._original_transport):
            if isinstance(transport, asyncio.Transport) and not transport.is_closing():
                transport.abort()

    async def push(self, status: str | bytes) -> None:
        # aiosmtpd answers unknown MAIL/RCPT parameters with a bare 555; add the RFC 3463 code.
        if isinstance(status, str) and status.startswith("555 ") and not status[4:5].isdigit():
            status = "555 5.5.4 " + status[4:]
        await super().push(status)

    # commands ---------------------------------------------------------------
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._tls_protocol is None:
            self._sink.bump("cleartext_transactions")
        self._chunks = []  # a new transaction (RFC 3030 §2: RSET, then MAIL, drops chunks)
        mail_from, path, options = self._parse_mail(arg)
        self._sink.record_mail(MailCommand(mail_from, list(options), self.tls_version))
        requiretls = [o for o in options if keyword_of(o) == REQUIRETLS]
        if requiretls and self._sink.advertises(REQUIRETLS) and path is not None:
            # aiosmtpd does not know REQUIRETLS (555): hand it the command without it.
            kept = [o for o in options if keyword_of(o) != REQUIRETLS]
            arg = " ".join(["FROM:" + path, *kept])
        else:
            requiretls = []
        self.mail_options, self.mail_requiretls = options, requiretls
        try:
            await super().smtp_MAIL(arg)
        finally:
            self.mail_options, self.mail_requiretls = [], []

    def _parse_mail(self, arg: str | None) -> tuple[str, str | None, list[str]]:
        """``(mail_from, path, options)`` of a MAIL argument, parsed the way aiosmtpd does.

        ``path`` is the reverse-path as written (None when aiosmtpd will refuse the command
        anyway); ``options`` are the parameters, upper-cased.
        """
        rest = self._strip_command_keyword("FROM:", arg or "")
        if rest is None:
            return arg or "", None, []
        address, params = self._getaddr(rest)
        if not address or params is None:
            return rest, None, []
        path = rest[: len(rest) - len(params)].rstrip()
        return address, path, params.upper().split()

    async def smtp_DATA(self, arg: str) -> None:
        self._sink.bump("data_commands")
        await super().smtp_DATA(arg)

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 ``BDAT <size> [LAST]``, served only by a sink that advertises CHUNKING
        (else ``500``, as aiosmtpd answers a command it does not know). The chunk is read
        whole whatever the state (§2), then answered: ``503`` without MAIL, ``554 5.5.1``
        without an accepted recipient, ``250`` for a chunk before the last, and for the last
        the DATA hook's reply (recorded as a message, as after DATA)."""
        if not self._sink.advertises("CHUNKING"):
            await self.push('500 Error: command "BDAT" not recognized')
            return
        self._sink.bump("bdat_commands")
        words = (arg or "").split()
        last = len(words) == 2 and words[1].upper() == "LAST"
        if not words or not words[0].isdigit() or len(words) > 2 or (len(words) == 2 and not last):
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        chunk = await self._reader.readexactly(int(words[0]))
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self.envelope.rcpt_tos:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        self._chunks.append(chunk)
        if not last:
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        self.envelope.original_content = self.envelope.content = b"".join(self._chunks)
        self._chunks = []
        reply = await self.event_handler.handle_DATA(self, self.session, self.envelope)
        self._set_post_data_state()
        await self.push(reply)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        self._sink.bump("starttls_attempts")
        kind = self._sink.kind
        if kind == "plain":
            await self.push("502 5.5.1 STARTTLS not supported")
            return
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 TLS already active")
            return
        if kind == "broken":
            await self._broken_starttls()
            return
        await held(self._sink.starttls_delay, self._sink.starttls_busy)
        try:
            await super().smtp_STARTTLS(arg)
        except Exception:
            self._sink.bump("tls_handshakes_failed")
            raise
        assert self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        self.tls_version = ssl_object.version()
        cipher = ssl_object.cipher()
        self.tls_cipher = cipher[0] if cipher else None
        self._sink.bump("tls_handshakes_ok")

    async def _broken_starttls(self) -> None:
        await self.push("220 2.0.0 Ready to start TLS")
        # Consume the ClientHello first so that closing does not turn into a TCP RST
        # that could race the garbage; then answer with something that is not TLS.
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(self._reader.read(65536), timeout=5)
        assert isinstance(self.transport, asyncio.Transport)
        self.transport.write(BROKEN_TLS_GARBAGE)
        self.transport.close()
        self._sink.bump("tls_handshakes_failed")


async def held(delay: float, busy: Callable[[int], None]) -> None:
    """A reply held ``delay`` seconds (none: at once), counted in ``busy`` while it waits
    (+1, then -1), without blocking the sink's other sessions."""
    if not delay:
        return
    busy(1)
    try:
        await asyncio.sleep(delay)
    finally:
        busy(-1)


class SinkHandler:
    """aiosmtpd handler hooks: EHLO capabilities, reply scripting, recording."""

    def __init__(self, sink: SinkHost) -> None:
        self._sink = sink

    async def handle_EHLO(
        self,
        server: SinkSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        caps = [r for r in responses[1:-1] if r[4:].split(" ")[0].upper() in _EHLO_KEEP]
        caps.append("250-PIPELINING")
        if self._sink.kind in ("starttls", "broken") and server._tls_protocol is None:
            caps.append("250-STARTTLS")
        caps.extend(f"250-{extension}" for extension in self._sink.extensions)
        return [responses[0], *caps, "250 HELP"]

    async def handle_MAIL(
        self,
        server: SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # Reached only once aiosmtpd accepted the command (minus a REQUIRETLS it cannot parse).
        if server.mail_requiretls and server.mail_requiretls != [REQUIRETLS]:
            return "501 5.5.4 REQUIRETLS takes no value and is given once"
        envelope.mail_from = address
        envelope.mail_options.extend(server.mail_options)  # as sent, REQUIRETLS included
        await held(self._sink.mail_delay, self._sink.mail_busy)
        return "250 OK"  # aiosmtpd's own reply without a hook

    async def handle_RCPT(
        self,
        server: SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._sink.rcpt_reply(address)
        if reply is None or is_positive(reply):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return reply or "250 2.1.5 OK"
        return reply

    async def handle_exception(self, error: Exception) -> str:
        # A failed STARTTLS handshake is an expected event in these tests: record it
        # instead of letting aiosmtpd log a traceback (the connection is closed anyway).
        if isinstance(error, TLSSetupException) and error.__cause__ is not None:
            error = error.__cause__
        self._sink.record_error(f"{type(error).__name__}: {error}")
        return f"451 4.3.0 sink error: {type(error).__name__}"

    async def handle_DATA(self, server: SinkSMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        if raw is None:
            content = envelope.content or b""
            raw = (
                content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content
            )
        msg = Message(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(raw),
            tls=server.tls_version,
            cipher=server.tls_cipher,
            peer=session.peer,
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            smtp_utf8=bool(envelope.smtp_utf8),
            helo=session.host_name,
            connection=server.conn_no,
            reply="",
        )
        delay = self._sink.delay_for(msg)
        self._sink.busy(1)
        try:
            if delay:
                await asyncio.sleep(delay)
        finally:
            self._sink.busy(-1)
        reply = self._sink.data_reply(msg) or "250 2.0.0 OK queued"
        self._sink.record(dataclasses.replace(msg, reply=reply))
        return reply
