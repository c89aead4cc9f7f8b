"""One SMTP session of an ingest listener: aiosmtpd's protocol with our replies and limits.

:class:`IngestSMTP` adds to aiosmtpd (through :class:`~services.ingest.adapter.AiosmtpdAdapter`,
never its private members directly): RFC 3463 enhanced status codes on every reply that takes
one; replies made printable and short; REQUIRETLS taken out of MAIL for the handler; DATA read
by :class:`~services.ingest.message.MessageReader`; the AUTH exchange with the credentials
checked by the handler; and the limits against hostile clients (connections per listener,
command line lengths, timeouts, bad commands), each beside the RFC section that sets it. The
envelope checks and storing are the handler's (:mod:`services.ingest.handler`).

Failure behaviour: a client over a limit gets the limit's reply (:mod:`services.ingest.replies`)
and, for the 421 ones, the connection closed with nothing more read or run; a client that does
not read that last reply is aborted after :data:`HANG_UP_GRACE` seconds, and one lost in the
middle of the TLS handshake is ended at once. Exceptions in commands reach the handler's
``handle_exception`` (aiosmtpd's rule): logged, answered ``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import re
import ssl
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from services.common import metrics
from services.common.protocol import REQUIRETLS
from services.ingest import replies
from services.ingest.adapter import AiosmtpdAdapter, stream_limit, unread
from services.ingest.handler import IngestHandler
from services.ingest.message import MessageReader, client_ip

log = logging.getLogger("tlsrelay.ingest")

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included. Extensions raise it
# for MAIL by their parameters: SIZE= (RFC 1870 §3: 26), BODY= (RFC 6152: 16), SMTPUTF8
# (RFC 6531: 10) and " REQUIRETLS" (RFC 8689: its 11 octets). Longer → LINE_TOO_LONG.
COMMAND_LINE_MAX: Final = 512
MAIL_LINE_MAX: Final = COMMAND_LINE_MAX + 26 + 16 + 10 + 11
# RFC 4954 §4: AUTH lines and SASL responses; 12288 octets suffice for deployed mechanisms. It is
# also the most any line is buffered before it is known to be too long (the stream limit).
AUTH_LINE_MAX: Final = 12288
HANG_UP_GRACE = 10.0  # seconds a closed session may take to flush its last reply, then aborted

# "<local@domain>" with a dot-atom local part and a plain domain (RFC 5321 §4.1.2), then nothing
# or parameters: what nearly every client sends. Parsed here directly; anything else (quoted
# local parts, address literals, source routes, odd spacing) goes to aiosmtpd's parser, which
# gives the same result for these (tests/test_ingest.py compares them).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>(?: ([!-~]+(?: [!-~]+)*))?"
)

_F = TypeVar("_F", bound=Callable[..., Any])


def _help_syntax(text: str, extended: str | None = None) -> Callable[[_F], _F]:
    """aiosmtpd's ``@syntax`` (the HELP text of an ``smtp_*`` method), typed."""
    return cast(Callable[[_F], _F], syntax(text, extended=extended))


def _credentials_received(
    server: SMTP, session: Session, envelope: SmtpEnvelope, mechanism: str, data: Any
) -> AuthResult:
    """aiosmtpd's ``authenticator``: pass the decoded credentials on to IngestSMTP._verify."""
    return AuthResult(success=True, handled=False, auth_data=data)


class IngestSMTP(AiosmtpdAdapter):
    """aiosmtpd's protocol with enhanced status codes on its replies; AUTH when the handler
    offers it (submission), with the password checked off the event loop; and the limits
    against hostile clients (connections, line lengths, timeouts, errors, the header section)."""

    # The stream buffer: no line is held beyond this before it is known to be too long.
    line_length_limit = AUTH_LINE_MAX

    def __init__(
        self,
        handler: IngestHandler,
        *,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        **kwargs: Any,
    ) -> None:
        # aiosmtpd's credentials check is synchronous: it only hands the parsed credentials back
        # (see _verify). Its constructor logs a warning, per connection, for a context that
        # requires client certificates: the relay listener means it, so the context is set after.
        super().__init__(handler, authenticator=_credentials_received, **kwargs)
        self.tls_context = tls_context
        self.require_starttls = tls_context is not None and require_starttls
        self.event_handler: IngestHandler = handler
        self._connections = handler.connections
        self._limits = handler.config.ingest
        self._refused = False  # over max_connections: never served
        self._errors = 0  # syntax errors answered so far (max_bad_commands)
        self._in_command = False  # a command is being run (its replies may be incomplete)
        self._draining = False  # the server is stopping: close once between transactions
        self.route_verbs(self._unrecognized, self._command)
        self._set_command_limits()
        self._greeted = False
        self._helo_reply = False
        self._auth_answered = False  # the last SASL response was refused already (501/500)
        # The REQUIRETLS parameter(s) of the MAIL command being processed (see smtp_MAIL).
        self.mail_requiretls: tuple[str, ...] = ()
        self._counted_verb: str | None = None  # MAIL, RCPT or DATA while one is processed

    @property
    def in_transaction(self) -> bool:
        """A MAIL was accepted and the transaction has not ended (RCPT, DATA, its commit)."""
        envelope = self.envelope
        return envelope is not None and envelope.mail_from is not None

    def drain(self) -> None:
        """SIGTERM: a session between transactions is answered ``421 4.3.2`` and closed now (a
        pooled connection must not hold the shutdown); one in a transaction finishes it (the
        ``250`` after DATA included), then gets the same. A command being run completes first."""
        self._draining = True
        if not self._in_command and not self.in_transaction:
            self._shut_down_now()

    async def _command(self, method: Callable[[str | None], Any], arg: str | None) -> None:
        """Every command runs here: once it is done, a draining session out of its transaction
        is closed."""
        self._in_command = True
        try:
            await method(arg)
        finally:
            self._in_command = False
        if self._draining and not self.in_transaction:
            self._shut_down_now()

    def _shut_down_now(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # QUIT, or closed already
        if not self.handshaking:
            self.write_now(replies.SHUTTING_DOWN.encode() + b"\r\n")
        self._hang_up()

    def refuse_new_commands(self) -> None:
        """Draining: the command in hand (a DATA being read, say) finishes as usual; every later
        command is answered ``421 4.3.2`` and the session closes (RFC 5321 §3.8)."""

        async def shutting_down(arg: str | None) -> None:
            await self.push(replies.SHUTTING_DOWN)
            if self.transport is not None:
                self.transport.close()

        self.answer_every_verb(shutting_down)

    # ----------------------------------------------------------------------- connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again after STARTTLS, for the TLS layer: that is the same session.
        if not self.after_starttls and len(self._connections) >= self._limits.max_connections:
            self._refuse_connection(transport)
            return
        self._connections.add(self)
        super().connection_made(transport)

    def _refuse_connection(self, transport: asyncio.BaseTransport) -> None:
        """Over ``max_connections`` on this listener: 421 and close, before any session."""
        self._refused = True
        log.warning(
            "%s: %d sessions open on %s: connection refused",
            transport.get_extra_info("peername"),
            len(self._connections),
            self.event_handler.listener.value,
        )
        message = replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
        cast(asyncio.WriteTransport, transport).write(message)
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # no session was started
        self._connections.discard(self)
        tls = self.session is not None and self.session.ssl is not None
        metrics.ingest_connection(self.event_handler.listener.value, tls)
        super().connection_lost(error)

    def eof_received(self) -> bool:
        """The client closed its side of the connection. aiosmtpd stops the session (its
        coroutine is cancelled) but would leave the connection half-open until the idle timeout,
        holding one of ``max_connections`` and counted as a session that may still join a group
        commit. SMTP has nothing to say to a client that sent FIN: close it now (RFC 5321 §3.8)."""
        if not self._refused:
            super().eof_received()
        return False

    def close(self) -> None:
        """Drop the session (server shutdown)."""
        if self.transport is not None and self.handshaking:
            self._lost_in_handshake()
        elif self.transport is not None:
            self.transport.close()

    def _lost_in_handshake(self) -> None:
        """Abort a connection in the middle of the STARTTLS handshake and end its session here:
        asyncio (sslproto) never reports such a connection lost to the SMTP protocol, and
        aiosmtpd cleans up only after a handshake that failed. Without this the session would
        stay open forever, holding one of ``max_connections``."""
        self.tcp_transport.abort()
        self.connection_lost(None)

    def _hang_up(self) -> None:
        """Close now: nothing more is read or executed; the reply written last is flushed, but a
        client that does not read it is cut off after HANG_UP_GRACE seconds."""
        if self.transport is None:
            return
        if self.handshaking:
            self._lost_in_handshake()
            return
        self.discard_pipelined()  # pipelined commands after this point are never run
        raw = self.tcp_transport
        self.transport.close()
        self.loop.call_later(HANG_UP_GRACE, raw.abort)
        self.cancel_commands()

    def on_timeout(self) -> None:
        """No command (or DATA line, or TLS handshake) for ``command_timeout``: 421 and close
        (aiosmtpd closes without a word)."""
        if self.transport is None or self.transport.is_closing():
            return
        log.info("%s: timeout: closing", client_ip(self.session))
        if not self.handshaking:
            self.write_now(replies.TIMEOUT.encode() + b"\r\n")
        self._hang_up()

    # ----------------------------------------------------------------------- replies

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            if self._counted_verb is not None:
                metrics.ingest_refused(self.event_handler.listener.value, status)
            await super().push(replies.outgoing(status, self._needs_code(status)))
            if replies.is_syntax_error(status):
                await self._count_error()
        else:
            await super().push(status)
        self._greeted = True

    def _needs_code(self, status: str) -> bool:
        # RFC 2034 §3: not the greeting, not the replies to HELO/EHLO.
        return self._greeted and not (self._helo_reply and status.startswith("250"))

    async def _count_error(self) -> None:
        """After ``max_bad_commands`` syntax errors: 421 and close, as Postfix's hard error
        limit does (RFC 5321 §3.8: a server may close with 421 at any point)."""
        self._errors += 1
        if self._errors == self._limits.max_bad_commands and self.transport is not None:
            log.info("%s: %d bad commands: closing", client_ip(self.session), self._errors)
            await super().push(replies.TOO_MANY_ERRORS)
            self._hang_up()

    async def _unrecognized(self, verb: str, arg: str | None) -> None:
        await self.push(replies.unrecognized(verb))

    # ----------------------------------------------------------------------- commands

    def _set_command_limits(self) -> None:
        """The longest command line per verb, as aiosmtpd compares it (without the CRLF).

        An instance attribute: aiosmtpd's is shared by every session and grows with each EHLO.
        """
        default = COMMAND_LINE_MAX - 2
        self.command_size_limit = default  # a HELO session
        self.command_size_limits: dict[str, int] = collections.defaultdict(
            lambda: default, {"MAIL": MAIL_LINE_MAX - 2, "AUTH": AUTH_LINE_MAX - 2}
        )

    async def smtp_HELO(self, hostname: str) -> None:
        self._helo_reply = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._helo_reply = False

    async def smtp_EHLO(self, hostname: str) -> None:
        self._helo_reply = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._helo_reply = False
            self._set_command_limits()  # aiosmtpd adds to them on every EHLO

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser (MAIL, RCPT, VRFY). The stdlib parser under it raises on
        some malformed input (``<``, ``a@``, ``"``: IndexError): that is a malformed address
        too (``553 5.1.3``), not an internal error (``451`` and a stack trace per command)."""
        fast = _SIMPLE_PATH.fullmatch(arg) if arg else None
        if fast is not None:  # the common case, without the header parser's cost (~0.1 ms)
            return fast.group(1), fast.group(2) or ""
        try:
            return super().parse_address(arg)
        except Exception:  # whatever the header parser trips over, the address is unparsable
            return None, None

    @_help_syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, after taking out the REQUIRETLS parameter it does not know (555).

        The parameter is removed from the command and remembered in :attr:`mail_requiretls`
        for :meth:`IngestHandler.handle_MAIL`, which runs only once aiosmtpd's own checks (EHLO
        first, no nested MAIL, SIZE, BODY...) passed; aiosmtpd then answers as it always does.
        """
        arg, self.mail_requiretls = self._take_requiretls(arg)
        self._counted_verb = "MAIL"
        try:
            await super().smtp_MAIL(arg)
        finally:
            self.mail_requiretls, self._counted_verb = (), None

    def _take_requiretls(self, arg: str | None) -> tuple[str | None, tuple[str, ...]]:
        """``arg`` of a MAIL command without its REQUIRETLS parameter(s), and those parameters.

        The address is found with aiosmtpd's own parser, so the remaining command is what
        aiosmtpd would have seen but for REQUIRETLS. Anything aiosmtpd will refuse anyway (no
        ``FROM:``, a malformed address, a HELO session, which takes no parameters) is left to
        it unchanged.
        """
        if arg is None or self.session is None or not self.session.extended_smtp:
            return arg, ()
        if REQUIRETLS not in arg.upper():  # nearly always: no need to parse the address here
            return arg, ()
        split = self.split_mail_from(arg)
        if split is None:
            return arg, ()
        rest, address, params = split
        if not address or not params:
            return arg, ()
        words = params.split()
        taken = tuple(w.upper() for w in words if w.upper().partition("=")[0] == REQUIRETLS)
        if not taken:
            return arg, ()
        kept = [w for w in words if w.upper().partition("=")[0] != REQUIRETLS]
        path = rest[: len(rest) - len(params)].rstrip()
        return " ".join(["FROM:" + path, *kept]), taken

    @_help_syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """aiosmtpd's RCPT; its 4xx/5xx replies are counted (see :meth:`push`)."""
        self._counted_verb = "RCPT"
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._counted_verb = None

    # ----------------------------------------------------------------------- DATA

    @_help_syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """aiosmtpd's DATA, with the message read by :class:`MessageReader` (line, size and
        header limits, bounded memory); its 4xx/5xx replies are counted (see :meth:`push`)."""
        self._counted_verb = "DATA"
        try:
            await self._data(arg)
        finally:
            self._counted_verb = None

    async def _data(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push(replies.DATA_SYNTAX)
            return
        await self.push(replies.START_DATA)
        message = await self._read_message()
        if message.refusal is not None:  # RFC 5321 §4.2.5: answered once the data has ended
            self.end_data()
            await self.push(message.refusal)
            return
        self.envelope.content = self.envelope.original_content = bytes(message.content)
        status = await self.call_hook("DATA")
        self.end_data()
        await self.push(status)

    async def _read_message(self) -> MessageReader:
        """Every line up to the final dot (:func:`read_data`). Lines read restart the command
        timeout (at most ten times per timeout, to keep timers off the per-line path), so a slow
        but steady transfer is not cut off while a stalled one is."""
        message = MessageReader(
            self.data_size_limit,
            self._limits.max_header_bytes,
            self._limits.max_hops,
            stream_limit=stream_limit(self.reader),
        )
        every = min(1.0, self.timeout_seconds / 10)
        await read_data(self.reader, message, self.restart_timeout, every)
        return message

    # ----------------------------------------------------------------------- AUTH (submission)

    async def smtp_AUTH(self, arg: str | None) -> None:
        """RFC 4954 AUTH on submission; before an exchange, the client's failure count is read."""
        self._auth_answered = False
        if not self.event_handler.offers_auth:
            await self.push(replies.AUTH_NOT_AVAILABLE)
            return
        session = self.session
        if session is not None and session.ssl is not None and not session.authenticated:
            refusal = await self.event_handler.refusal_before_auth(session)
            if refusal is not None:
                await self.push(refusal)
                if refusal == replies.AUTH_TOO_MANY_FAILURES and self.transport is not None:
                    self.transport.close()  # RFC 5321 §3.8: 421, then close
                return
        await super().smtp_AUTH(arg)

    # aiosmtpd's mechanisms decode the exchange (challenges, base64, PLAIN's NUL-separated
    # fields); _verify then checks the credentials they return.
    async def auth_PLAIN(self, _: object, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: object, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(_, args))

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> Any:
        """aiosmtpd's SASL challenge (RFC 4954 §4): the decoded response, or MISSING once it was
        refused: ``*`` → ``501 5.7.0``, bad base64 → ``501 5.5.2``, longer than AUTH_LINE_MAX
        → LINE_TOO_LONG (the whole line read and dropped; aiosmtpd answered 451 and read the
        rest as commands). Responses are never logged, whatever ``log_client_response`` says.
        """
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(data) if encode_to_b64 else data))
        line = await self._read_line()
        self._auth_answered = True  # until the response is known to be good
        if line is None:
            await self.push(replies.LINE_TOO_LONG)
            return MISSING
        if line.strip() == b"*":
            await self.push(replies.AUTH_ABORTED)
            return MISSING
        try:
            response = base64.b64decode(line.strip(), validate=True)
        except binascii.Error:
            await self.push(replies.AUTH_BAD_BASE64)
            return MISSING
        self._auth_answered = False
        return response

    async def _read_line(self) -> bytes | None:
        """One line (to its LF), or None when it did not fit the stream buffer: then it is read
        to its end and dropped, as aiosmtpd does for a command line."""
        reader = self.reader
        try:
            return bytes(await reader.readuntil(b"\n"))
        except asyncio.LimitOverrunError as exc:
            await reader.read(exc.consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                return None
            except asyncio.LimitOverrunError as exc:
                await reader.read(exc.consumed)

    async def _verify(self, parsed: AuthResult) -> AuthResult:
        credentials = parsed.auth_data
        if not parsed.success and self._auth_answered:
            return AuthResult(success=False, handled=True)  # answered: no 535 after the 501
        if not parsed.success or not isinstance(credentials, LoginPassword):
            return parsed  # malformed: aiosmtpd has answered (501) or answers 535
        refusal = await self.event_handler.authenticate(
            self.session, credentials.login, credentials.password
        )
        if refusal is not None:
            return AuthResult(success=False, handled=False, message=refusal)
        return AuthResult(success=True, auth_data=self.session.auth_user)


async def read_data(
    reader: asyncio.StreamReader,
    message: MessageReader,
    restart_timeout: Callable[[], None],
    every: float,
) -> None:
    """Every line of a DATA transfer from ``reader`` into ``message``, up to and including the
    final dot and not an octet further: what follows is the client's next command.

    The whole lines the stream already holds are taken in one read and handed over together
    (:meth:`MessageReader.lines`: the 32 lines of a 2 KB message at once); only when it holds
    none is the next line awaited, with ``readuntil`` as before (:meth:`~MessageReader.line`,
    :meth:`~MessageReader.fragment`). The lines, fragments and refusal are those of reading line
    by line, and no more is held than the stream buffer and ``message`` hold. After each read
    that ended a line or a fragment, ``restart_timeout()`` is called if ``every`` seconds passed
    since it last was; a partial line never calls it. Raises what the reads raise
    (``IncompleteReadError`` when the stream ends before the final dot).
    """
    loop = asyncio.get_running_loop()
    restarted = loop.time()
    while True:
        whole = message.whole_lines(unread(reader))
        if whole:  # all there: this read returns at once
            if message.lines(await reader.readexactly(whole)):
                return
        else:
            try:
                if message.line(await reader.readuntil(b"\r\n")):
                    return
            except asyncio.LimitOverrunError as exc:  # no CRLF within the stream buffer
                message.fragment(await reader.read(exc.consumed))
        if loop.time() - restarted >= every:
            restart_timeout()
            restarted = loop.time()
