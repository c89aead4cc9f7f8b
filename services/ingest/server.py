"""The SMTP listeners: receive mail, store it in the Redis spool and queue it for policy.

One process runs up to three listeners (:class:`~services.ingest.access.Listener`), one socket
and one :class:`IngestHandler` each, all storing through one
:class:`services.common.spool.Committer`:

- ``listen`` (``ingest.listen``, port 25's role): mail to tenant domains from anyone, to other
  domains only from ``ingest.relay_networks`` or a tenant's ``networks``. No AUTH (``502``).
- ``submission`` (``ingest.submission``, port 587's role; only when configured): AUTH PLAIN and
  LOGIN, advertised and accepted only after STARTTLS; every message needs AUTH.
- ``relay`` (``ingest.relay``, else ``regions[region].relay``; else not started): the
  inter-region endpoint, STARTTLS with a platform-CA client certificate required.

Who may send what where is decided in :mod:`services.ingest.access` (pure); the Redis counters
(failed AUTHs per client, messages per tenant) are in :mod:`services.ingest.limits`.

Contract (these replies are relied on by clients and tests):

- EHLO advertises SIZE <ingest.max_message_bytes>, 8BITMIME, SMTPUTF8, PIPELINING,
  ENHANCEDSTATUSCODES, STARTTLS (only while the session is in clear), REQUIRETLS (RFC 8689,
  only once the session is TLS, never in clear), ``AUTH LOGIN PLAIN`` (submission, over TLS
  only) and HELP. Every reply but the greeting, the HELO/EHLO lines, 354 and 334 carries an
  RFC 3463 enhanced status code; replies aiosmtpd produces without one get a default from
  :data:`ENHANCED_DEFAULTS`.
- MAIL: ``SIZE=`` above the limit → ``552 5.3.4``; the null reverse-path ``<>`` is accepted.
  ``REQUIRETLS`` (RFC 8689 §4.1, takes no value) in clear → ``530 5.7.10``; with a value or given
  twice → ``501 5.5.4``; over TLS it is accepted and kept as ``"REQUIRETLS"`` in
  ``Envelope.mail_options`` for the policy and deliver services. A ``TLS-Required: No`` header
  (RFC 8689 §5) sets ``Envelope.tls_required_no`` and, like every header, is stored untouched.
- RCPT: more than ``ingest.max_recipients`` → ``452 4.5.3 Too many recipients``; a recipient this
  client may not send to → ``554 5.7.1 Relay access denied`` (:func:`access.may_relay`: on
  ``listen`` other than tenant domains from outside the relay and tenant networks; on ``relay``
  anything but a tenant of this region). CR, LF or NUL in an address → ``501 5.1.7`` (sender) /
  ``501 5.1.3`` (recipient).
- Submission: AUTH before STARTTLS → ``538 5.7.11 Encryption required for requested
  authentication mechanism``; MAIL before AUTH → ``530 5.7.0 Authentication required``; login
  ``user@<a domain of the tenant>``, checked with scrypt off the event loop: ``235 2.7.0
  Authentication successful`` or ``535 5.7.8 Authentication credentials invalid``. Failed AUTHs
  are counted per client address in Redis (all ingest processes): after
  ``ingest.auth_failure_limit`` within ``ingest.auth_failure_window``, AUTH → ``421 4.7.0 Too
  many authentication failures, try later`` and the connection is closed, the password unread.
  MAIL FROM outside the tenant's domains → ``553 5.7.1 Sender address not owned by the
  authenticated tenant``. Passwords and AUTH payloads are never logged.
- Relay: nothing but EHLO/STARTTLS/NOOP/QUIT in clear (``530 5.7.0 Must issue a STARTTLS
  command first``); a client without a certificate of ``platform_tls.ca`` fails the handshake
  (:func:`tlscert.platform_context`) and the connection is closed.
- Tenant rate limit: the sending tenant (authenticated on submission, by ``networks`` on
  ``listen``) with a ``rate_limit`` has its MAIL commands counted in fixed windows; over it,
  MAIL → ``451 4.7.0 Rate limit exceeded, try again later``.
- The stored envelope records ``listener``, ``tenant`` (the sending tenant), ``auth_user`` and
  ``client_cert`` (the relay client's certificate CN, else first SAN).
- DATA: the stored body is a ``Received:`` header (RFC 5321 §4.4; ``with ESMTPSA`` when
  authenticated, the client certificate's name on the relay listener) followed by the octets
  exactly as received (only SMTP dot-stuffing undone). ``250 2.0.0 Ok: queued as <ID>`` is sent
  only after the transaction that stores the message and its ``policy`` task committed
  (:class:`services.common.spool.Committer`: messages finishing within ``ingest.batch_window``
  share one transaction and one policy task). More data than the limit → ``552 5.3.4``.
- STARTTLS uses ``ingest.tls_cert``/``tls_key``, else a self-signed certificate; the relay
  listener uses ``platform_tls`` (see :mod:`services.ingest.tlscert`). Commands pipelined in
  clear after STARTTLS are discarded, never run inside the TLS session (RFC 3207 §4.2; aiosmtpd
  ≥ 1.4.6 clears its buffer, tests/test_hostile.py guards it).

Limits against hostile or broken clients (constants below, beside their RFC sections):

- ``ingest.max_connections`` open sessions *per listener* (a flood on ``listen`` cannot lock
  out ``submission`` or ``relay``): a further connection → ``421 4.7.0 Too many connections,
  try again later`` and closed, before any session; the others are served as usual.
- A command line over 512 octets with its CRLF (RFC 5321 §4.5.3.1.4; MAIL 575 for SIZE=,
  BODY=, SMTPUTF8 and REQUIRETLS; AUTH and SASL responses 12288, RFC 4954 §4) → ``500 5.5.2
  Line too long``; no line is buffered beyond 12288 octets whatever its length.
- A text line of DATA over 1000 octets with its CRLF (RFC 5321 §4.5.3.1.6, a transparency dot
  not counted) → the whole message is read, then refused ``500 5.6.0 Line too long: text lines
  are limited to 1000 octets``. Lines are not folded as Postfix does: the stored octets are
  exactly those received (DKIM signatures stay valid), and the sender learns now rather than
  from a later bounce.
- A header section over ``ingest.max_header_bytes`` → ``552 5.3.4 Header section too large``
  (at the end of DATA). The header section ends at the first empty line or at the first line
  that is neither a field nor a folded continuation: a message without a blank line or without
  any header is accepted and stored as received, and so are 8-bit headers without 8BITMIME or
  SMTPUTF8 (a relay does not repair messages; policy parses them leniently).
- No command, DATA line or TLS handshake progress for ``ingest.command_timeout`` (RFC 5321
  §4.5.3.2.7) → ``421 4.4.2 Timeout, closing connection`` and closed; a slow but steady DATA
  transfer is not cut off.
- ``ingest.max_bad_commands`` syntax errors (replies 500-509 and 555: unknown verbs, bad
  arguments, bad sequence, lines too long) → that reply, then ``421 4.7.0 Too many errors,
  closing connection`` (as Postfix's hard error limit), closed; pipelined commands after it are
  never run. aiosmtpd's own hang-up after 5 unknown verbs (``502``) is replaced by this count.
- Every DATA limit is checked while reading: after the first limit crossed nothing more is
  kept, so a session holds at most ``max_message_bytes`` plus one buffer whatever it sends
  (aiosmtpd kept an endless line whole). A session closed with a 421 that its client does not
  read is aborted after :data:`HANG_UP_GRACE` seconds, and one closed in the middle of the TLS
  handshake is ended at once (asyncio never reports it lost): neither holds a slot.
- Replies are printable ASCII of at most 512 octets (RFC 5321 §4.5.3.1.5) even where aiosmtpd
  echoes an argument; an address the stdlib parser cannot read (``<``, ``a@``) is ``553 5.1.3``.

Failure behaviour: when Redis is unreachable, fails or is too slow, DATA (and AUTH or MAIL when
they need a counter) is answered ``451 4.3.0 Temporary failure, try again later`` and the error
is logged: nothing is accepted without its checks. A commit is one MULTI/EXEC, so nothing
half-written remains and the client retries later. An unexpected exception in a command is
logged and answered ``451 4.3.0`` too (never a stack trace to the peer). If Redis committed but
the reply was lost, the client retries and the message may be delivered twice: mail is
at-least-once (RFC 5321 §6.1), never lost. :meth:`IngestServer.stop` closes every listener and
open session; a message whose 250 was not yet sent is not acknowledged. A listener that cannot
be bound, or a relay listener without ``platform_tls``, stops the start-up (none listens).

Metrics (``services.common.metrics``): each connection is counted when it closes (with whether
STARTTLS succeeded); each 4xx/5xx reply to MAIL, RCPT or DATA, and each message stored, is counted
per listener.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import email.utils
import functools
import ipaddress
import logging
import re
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar, cast

import redis.asyncio as aioredis
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from redis.exceptions import RedisError

from services.common import health, metrics, spool
from services.common.config import Config
from services.common.model import Envelope, InboundTls, has_tls_required_no, new_message_id
from services.common.tenants import Directory
from services.common.values import HostPort
from services.ingest import access, limits, tlscert
from services.ingest.access import Listener

log = logging.getLogger("tlsrelay.ingest")

# RFC 3463 enhanced status codes (with the RFC 5248 registry) for replies that aiosmtpd itself
# produces without one. Keyed by basic reply code; any other code gets "<class>.0.0".
ENHANCED_DEFAULTS: Final[dict[int, str]] = {
    221: "2.0.0",  # closing connection
    250: "2.0.0",  # other or undefined status: success
    421: "4.3.0",  # service not available: other mail system status
    451: "4.3.0",  # local error in processing
    454: "4.7.0",  # TLS not available (RFC 3207): security or policy status
    500: "5.5.2",  # syntax error, command unrecognized
    501: "5.5.4",  # syntax error in parameters: invalid command arguments
    502: "5.5.1",  # command not implemented: invalid command
    503: "5.5.1",  # bad sequence of commands: invalid command
    504: "5.5.4",  # parameter not implemented: invalid command arguments
    530: "5.7.0",  # must issue STARTTLS / authentication required: security or policy
    550: "5.0.0",  # mailbox unavailable: other undefined status
    552: "5.3.4",  # exceeded storage allocation: message too big for system
    554: "5.3.0",  # transaction failed: other or undefined mail system status
    555: "5.5.4",  # MAIL/RCPT parameters not recognized: invalid command arguments
}
_NO_ENHANCED_CODE: Final = frozenset({"334", "354"})  # AUTH challenge, DATA go-ahead
_HAS_ENHANCED_CODE = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")

# --------------------------------------------------------------------------- protocol limits
# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included. Extensions raise it
# for MAIL by their parameters: SIZE= (RFC 1870 §3: 26), BODY= (RFC 6152: 16), SMTPUTF8
# (RFC 6531: 10) and " REQUIRETLS" (RFC 8689: its 11 octets). Longer → LINE_TOO_LONG.
COMMAND_LINE_MAX: Final = 512
MAIL_LINE_MAX: Final = COMMAND_LINE_MAX + 26 + 16 + 10 + 11
# RFC 4954 §4: AUTH lines and SASL responses; 12288 octets suffice for deployed mechanisms. It is
# also the most any line is buffered before it is known to be too long (the stream limit).
AUTH_LINE_MAX: Final = 12288
# RFC 5321 §4.5.3.1.6: a text line of DATA is at most 1000 octets, CRLF included, not counting
# a dot doubled for transparency (§4.5.2). Longer lines are not folded (that would change the
# octets and break DKIM signatures): the message is read to its end and refused with
# DATA_LINE_TOO_LONG, so the sender learns at once rather than from a bounce later.
TEXT_LINE_MAX: Final = 1000
REPLY_LINE_MAX: Final = 512  # RFC 5321 §4.5.3.1.5, CRLF included
HANG_UP_GRACE = 10.0  # seconds a closed session may take to flush its last reply, then aborted

LINE_TOO_LONG = "500 5.5.2 Line too long"  # RFC 5321 §4.5.3.1.9
DATA_LINE_TOO_LONG = "500 5.6.0 Line too long: text lines are limited to 1000 octets"
HEADER_TOO_LARGE = "552 5.3.4 Header section too large"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TIMEOUT = "421 4.4.2 Timeout, closing connection"  # RFC 5321 §4.5.3.2.7
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
# RFC 5321 §4.2.1: 50z replies are syntax errors (555: MAIL/RCPT parameters, RFC 5321 §4.3.2).
_SYNTAX_ERROR = re.compile(r"^(50\d|555)[ -]")
# RFC 5322 §2.2 (and §4.5's obsolete space before the colon): a header field, or a folded line.
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t]")

# aiosmtpd texts replaced by the wording of our contract.
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
_REWRITES: Final[dict[str, str]] = {
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG,
    "552 Error: Too much mail data": TOO_BIG,
    "500 Command line too long": LINE_TOO_LONG,
}

TEMPFAIL = "451 4.3.0 Temporary failure, try again later"
ACCEPT_TIMEOUT = 30.0  # seconds for the spool transaction; the client waits 10 min (RFC 5321)
CHECK_TIMEOUT = 10.0  # seconds for a limit counter (AUTH, MAIL); RFC 5321 §4.5.3.2: 5 min

RELAY_DENIED = "554 5.7.1 Relay access denied"
# RFC 4954 §6 and the RFC 5248 registry for the submission replies.
AUTH_NOT_AVAILABLE = "502 5.5.1 AUTH not available"
AUTH_TOO_MANY_FAILURES = "421 4.7.0 Too many authentication failures, try later"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
SENDER_NOT_OWNED = "553 5.7.1 Sender address not owned by the authenticated tenant"
RATE_LIMITED = "451 4.7.0 Rate limit exceeded, try again later"
# aiosmtpd's built-in mechanisms; our handle_EHLO advertises them (submission, over TLS only).
AUTH_MECHANISMS: Final = ("LOGIN", "PLAIN")
_CHECK_ERRORS = (RedisError, OSError, TimeoutError)
_FORBIDDEN_IN_ADDRESS = re.compile("[\r\n\0]")
_NOT_PRINTABLE = re.compile(r"[^!-~]")  # anything but visible ASCII (for the Received header)
_NOT_PRINTABLE_REPLY = re.compile(r"[^ -~]")  # ... or a space (for replies)
_NOT_QUOTABLE = re.compile(r'[^ -~]|["\\()]')  # ... in a quoted name inside a comment

REQUIRETLS: Final = "REQUIRETLS"  # RFC 8689 MAIL parameter and EHLO keyword
# "<local@domain>" with a dot-atom local part and a plain domain (RFC 5321 §4.1.2), then nothing
# or parameters: what nearly every client sends. Parsed here directly; anything else (quoted
# local parts, address literals, source routes, odd spacing) goes to aiosmtpd's parser, which
# gives the same result for these (tests/test_ingest.py compares them).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>(?: ([!-~]+(?: [!-~]+)*))?"
)
REQUIRETLS_IN_CLEAR = "530 5.7.10 REQUIRETLS needs a TLS session, use STARTTLS first"
REQUIRETLS_WITH_VALUE = "501 5.5.4 REQUIRETLS takes no value"
REQUIRETLS_TWICE = "501 5.5.4 REQUIRETLS given more than once"


_F = TypeVar("_F", bound=Callable[..., Any])


def _help_syntax(text: str, extended: str | None = None) -> Callable[[_F], _F]:
    """aiosmtpd's ``@syntax`` (the HELP text of an ``smtp_*`` method), typed."""
    return cast(Callable[[_F], _F], syntax(text, extended=extended))


def _credentials_received(
    server: SMTP, session: Session, envelope: SmtpEnvelope, mechanism: str, data: Any
) -> AuthResult:
    """aiosmtpd's ``authenticator``: pass the decoded credentials on to IngestSMTP._verify."""
    return AuthResult(success=True, handled=False, auth_data=data)


def _printable(reply: str) -> str:
    """A reply line as it may go out: printable ASCII (aiosmtpd echoes arguments, which may hold
    CR, NUL or undecodable octets), at most 512 octets with the CRLF (RFC 5321 §4.5.3.1.5)."""
    return _NOT_PRINTABLE_REPLY.sub("?", reply)[: REPLY_LINE_MAX - 2]


def with_enhanced_code(reply: str) -> str:
    """``reply`` with an RFC 3463 status after the basic code, unless it has one or takes none."""
    reply = _REWRITES.get(reply, reply)
    code, sep, text = reply[:3], reply[3:4] or " ", reply[4:]
    if not code.isdigit() or code[0] not in "245" or code in _NO_ENHANCED_CODE:
        return reply
    if _HAS_ENHANCED_CODE.match(reply):
        return reply
    status = ENHANCED_DEFAULTS.get(int(code), f"{code[0]}.0.0")
    return f"{code}{sep}{status} {text}".rstrip()


class MessageReader:
    """The lines of one DATA transfer, kept within the limits (pure, no I/O).

    Feed it every line up to and including the final dot (:meth:`line`; the pieces of a line
    longer than the stream buffer through :meth:`fragment`). Dot-stuffing is undone (RFC 5321
    §4.5.2); the size counts the message as stored (RFC 1870: CRLFs, not the stuffed dots). The
    first limit crossed decides the refusal, after which nothing more is kept, so memory stays
    bounded by ``max_bytes`` whatever the client sends. The header section is the lines up to
    the first empty line or the first that is neither a field nor a folded continuation (a
    message without headers or without a blank line is accepted as it is).
    """

    def __init__(self, max_bytes: int, max_header_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes
        self.content = bytearray()
        self.refusal: str | None = None  # the reply once the final dot arrived, if not 250
        self._in_line = False  # inside a line longer than the stream buffer
        self._in_header = True
        self._size = self._header_bytes = 0

    def fragment(self, data: bytes) -> None:
        """A piece of a line too long for the stream buffer (no CRLF yet)."""
        self._in_line = True
        self._count(len(data), DATA_LINE_TOO_LONG)

    def line(self, line: bytes) -> bool:
        """One line ending in CRLF; True when it is the final dot."""
        continued, self._in_line = self._in_line, False
        if line == b".\r\n" and not continued:
            return True
        if line.startswith(b"."):
            line = line[1:]
        too_long = continued or len(line) > TEXT_LINE_MAX
        self._count(len(line), DATA_LINE_TOO_LONG if too_long else None)
        if self.refusal is None:
            self._keep(line)
        return False

    def _count(self, size: int, refusal: str | None) -> None:
        self._size += size
        self._refuse(TOO_BIG if self._size > self.max_bytes else refusal)

    def _keep(self, line: bytes) -> None:
        if self._in_header:
            if line == b"\r\n" or not _HEADER_LINE.match(line):
                self._in_header = False
            else:
                self._header_bytes += len(line)
                if self._header_bytes > self.max_header_bytes:
                    self._refuse(HEADER_TOO_LARGE)
                    return
        self.content += line

    def _refuse(self, refusal: str | None) -> None:
        if refusal is not None and self.refusal is None:
            self.refusal = refusal
            self.content = bytearray()  # nothing more is kept


class IngestSession(Session):  # type: ignore[misc]  # aiosmtpd is untyped
    """aiosmtpd's session, with who authenticated (aiosmtpd makes a new one after STARTTLS)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.tenant: str | None = None  # the authenticated tenant (submission)
        self.auth_user: str | None = None  # its login, user@domain

    # aiosmtpd sets this deprecated attribute after every AUTH and logs a warning doing so.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"


class _Every:
    """A stand-in for aiosmtpd's verb → method table that answers every verb the same way."""

    def __init__(self, method: Callable[[str | None], Awaitable[None]]) -> None:
        self.method = method

    def get(self, command: str) -> Callable[[str | None], Awaitable[None]]:
        return self.method


_Method = Callable[[str | None], Awaitable[None]]


class _Verbs(dict[str, _Method]):
    """aiosmtpd's verb → method table, where an unknown verb finds ``unknown`` (aiosmtpd's own
    answer, a ``502`` and a hang-up after 5 of them, is replaced by our error count)."""

    def __init__(
        self, methods: dict[str, _Method], unknown: Callable[[str, str | None], Awaitable[None]]
    ) -> None:
        super().__init__(methods)
        self.unknown = unknown

    def get(self, verb: str, default: object = None) -> _Method:
        method = super().get(verb)
        return method if method is not None else functools.partial(self.unknown, verb)


class IngestSMTP(SMTP):  # type: ignore[misc]  # aiosmtpd is untyped
    """aiosmtpd's protocol with enhanced status codes on its replies; AUTH when the handler
    offers it (submission), with the password checked off the event loop; and the limits
    against hostile clients (connections, line lengths, timeouts, errors, the header section)."""

    # The stream buffer: no line is held beyond this before it is known to be too long.
    line_length_limit = AUTH_LINE_MAX
    _smtp_methods: dict[str, _Method] | _Every  # aiosmtpd's verb → method table

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
        assert isinstance(self._smtp_methods, dict)
        self._smtp_methods = _Verbs(self._smtp_methods, self._unrecognized)
        self._set_command_limits()
        self._greeted = False
        self._helo_reply = False
        self._auth_answered = False  # the last SASL response was refused already (501/500)
        # The REQUIRETLS parameter(s) of the MAIL command being processed (see smtp_MAIL).
        self.mail_requiretls: tuple[str, ...] = ()
        self._counted_verb: str | None = None  # MAIL, RCPT or DATA while one is processed

    def _create_session(self) -> IngestSession:
        return IngestSession(self.loop)

    def refuse_new_commands(self) -> None:
        """Draining: the command in hand (a DATA being read, say) finishes as usual; every later
        command is answered ``421 4.3.2`` and the session closes (RFC 5321 §3.8)."""

        async def shutting_down(arg: str | None) -> None:
            await self.push(SHUTTING_DOWN)
            if self.transport is not None:
                self.transport.close()

        self._smtp_methods = _Every(shutting_down)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgraded = self._original_transport is not None  # called again after STARTTLS
        if not upgraded and len(self._connections) >= self._limits.max_connections:
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
        cast(asyncio.WriteTransport, transport).write(TOO_MANY_CONNECTIONS.encode() + b"\r\n")
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # no session was started
        self._connections.discard(self)
        tls = self.session is not None and self.session.ssl is not None
        metrics.ingest_connection(self.event_handler.listener.value, tls)
        super().connection_lost(error)

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            if self._counted_verb is not None:
                metrics.ingest_refused(self.event_handler.listener.value, status)
            reply = with_enhanced_code(status) if self._needs_code(status) else status
            await super().push(_printable(reply))
            if _SYNTAX_ERROR.match(status):
                await self._count_error()
        else:
            await super().push(status)
        self._greeted = True

    async def _count_error(self) -> None:
        """After ``max_bad_commands`` syntax errors: 421 and close, as Postfix's hard error
        limit does (RFC 5321 §3.8: a server may close with 421 at any point)."""
        self._errors += 1
        if self._errors == self._limits.max_bad_commands and self.transport is not None:
            log.info("%s: %d bad commands: closing", client_ip(self.session), self._errors)
            await super().push(TOO_MANY_ERRORS)
            self._hang_up()

    async def _unrecognized(self, verb: str, arg: str | None) -> None:
        # The verb is ASCII but may hold control characters: never echo them.
        await self.push(f'500 Error: command "{_NOT_PRINTABLE.sub("?", verb)[:20]}" not recognized')

    def _timeout_cb(self) -> None:
        """No command (or DATA line, or TLS handshake) for ``command_timeout``: 421 and close
        (aiosmtpd closes without a word)."""
        if self.transport is None or self.transport.is_closing():
            return
        log.info("%s: timeout: closing", client_ip(self.session))
        if not self._handshaking:
            self._writer.write(TIMEOUT.encode() + b"\r\n")
        self._hang_up()

    @property
    def _handshaking(self) -> bool:
        """STARTTLS was answered 220 and the handshake has not completed yet."""
        return self._tls_protocol is not None and self.session.ssl is None

    def _hang_up(self) -> None:
        """Close now: nothing more is read or executed; the reply written last is flushed, but a
        client that does not read it is cut off after HANG_UP_GRACE seconds."""
        if self.transport is None:
            return
        if self._handshaking:
            self._lost_in_handshake()
            return
        self._reader._buffer.clear()  # pipelined commands after this point are never run
        raw = self._original_transport or self.transport  # the TCP transport under any TLS
        self.transport.close()
        self.loop.call_later(HANG_UP_GRACE, raw.abort)
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def _set_command_limits(self) -> None:
        """The longest command line per verb, as aiosmtpd compares it (without the CRLF).

        An instance attribute: aiosmtpd's is shared by every session and grows with each EHLO.
        """
        default = COMMAND_LINE_MAX - 2
        self.command_size_limit = default  # a HELO session
        self.command_size_limits: dict[str, int] = collections.defaultdict(
            lambda: default, {"MAIL": MAIL_LINE_MAX - 2, "AUTH": AUTH_LINE_MAX - 2}
        )

    def _needs_code(self, status: str) -> bool:
        # RFC 2034 §3: not the greeting, not the replies to HELO/EHLO.
        return self._greeted and not (self._helo_reply and status.startswith("250"))

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

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser (MAIL, RCPT, VRFY). The stdlib parser under it raises on
        some malformed input (``<``, ``a@``, ``"``: IndexError): that is a malformed address
        too (``553 5.1.3``), not an internal error (``451`` and a stack trace per command)."""
        fast = _SIMPLE_PATH.fullmatch(arg) if arg else None
        if fast is not None:  # the common case, without the header parser's cost (~0.1 ms)
            return fast.group(1), fast.group(2) or ""
        try:
            address, rest = super()._getaddr(arg)
        except Exception:  # whatever the header parser trips over, the address is unparsable
            return None, None
        return address, rest

    @_help_syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, after taking out the REQUIRETLS parameter it does not know (555).

        The parameter is removed from the command and remembered in :attr:`mail_requiretls`
        for :meth:`IngestHandler.handle_MAIL`, which runs only once aiosmtpd's own checks (EHLO
        first, no nested MAIL, SIZE, BODY...) passed; aiosmtpd then answers as it always does.
        """
        arg, self.mail_requiretls = _take_requiretls(self, arg)
        self._counted_verb = "MAIL"
        try:
            await super().smtp_MAIL(arg)
        finally:
            self.mail_requiretls, self._counted_verb = (), None

    @_help_syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """aiosmtpd's RCPT; its 4xx/5xx replies are counted (see :meth:`push`)."""
        self._counted_verb = "RCPT"
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._counted_verb = None

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
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        message = await self._read_message()
        if message.refusal is not None:  # RFC 5321 §4.2.5: answered once the data has ended
            self._set_post_data_state()
            await self.push(message.refusal)
            return
        self.envelope.content = self.envelope.original_content = bytes(message.content)
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _read_message(self) -> MessageReader:
        """Every line up to the final dot. Lines read restart the command timeout (at most ten
        times per timeout, to keep timers off the per-line path), so a slow but steady transfer
        is not cut off while a stalled one is."""
        message = MessageReader(self.data_size_limit, self._limits.max_header_bytes)
        every = min(1.0, self._timeout_duration / 10)
        restarted = self.loop.time()
        while True:
            try:
                if message.line(await self._reader.readuntil(b"\r\n")):
                    return message
            except asyncio.LimitOverrunError as exc:  # no CRLF within the stream buffer
                message.fragment(await self._reader.read(exc.consumed))
            if self.loop.time() - restarted >= every:
                self._reset_timeout()
                restarted = self.loop.time()

    async def smtp_AUTH(self, arg: str | None) -> None:
        """RFC 4954 AUTH on submission; before an exchange, the client's failure count is read."""
        self._auth_answered = False
        if not self.event_handler.offers_auth:
            await self.push(AUTH_NOT_AVAILABLE)
            return
        session = self.session
        if session is not None and session.ssl is not None and not session.authenticated:
            refusal = await self.event_handler.refusal_before_auth(session)
            if refusal is not None:
                await self.push(refusal)
                if refusal == AUTH_TOO_MANY_FAILURES and self.transport is not None:
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
            await self.push(LINE_TOO_LONG)
            return MISSING
        if line.strip() == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            response = base64.b64decode(line.strip(), validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING
        self._auth_answered = False
        return response

    async def _read_line(self) -> bytes | None:
        """One line (to its LF), or None when it did not fit the stream buffer: then it is read
        to its end and dropped, as aiosmtpd does for a command line."""
        try:
            return bytes(await self._reader.readuntil(b"\n"))
        except asyncio.LimitOverrunError as exc:
            await self._reader.read(exc.consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return None
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)

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

    def close(self) -> None:
        """Drop the session (server shutdown)."""
        if self.transport is not None and self._handshaking:
            self._lost_in_handshake()
        elif self.transport is not None:
            self.transport.close()

    def _lost_in_handshake(self) -> None:
        """Abort a connection in the middle of the STARTTLS handshake and end its session here:
        asyncio (sslproto) never reports such a connection lost to the SMTP protocol, and
        aiosmtpd cleans up only after a handshake that failed. Without this the session would
        stay open forever, holding one of ``max_connections``."""
        self._original_transport.abort()
        self.connection_lost(None)


class IngestHandler:
    """The aiosmtpd hooks of one listener: envelope checks and storing a message in the spool."""

    def __init__(
        self,
        config: Config,
        redis: aioredis.Redis,
        listener: Listener = Listener.LISTEN,
        directory: Directory | None = None,
        committer: spool.Committer | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.committer = committer or spool.Committer(
            redis, config.trace_ttl, config.ingest.batch_window, config.ingest.batch_max
        )
        self.listener = listener
        self.directory = directory if directory is not None else Directory(config)
        self.connections: set[IngestSMTP] = set()

    @property
    def offers_auth(self) -> bool:
        return self.listener is Listener.SUBMISSION

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        extensions = [
            f"SIZE {self.config.ingest.max_message_bytes}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if session.ssl is None:
            if server.tls_context is not None:
                extensions.append("STARTTLS")
        else:
            extensions.append(REQUIRETLS)  # RFC 8689 §4: only where it can be honoured
            if self.offers_auth:  # RFC 4954 §4: no plaintext passwords over a clear channel
                extensions.append("AUTH " + " ".join(AUTH_MECHANISMS))
        lines = [server.hostname, *extensions, "HELP"]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if _FORBIDDEN_IN_ADDRESS.search(address) or _has_surrogates(address):
            return "501 5.1.7 Bad sender address syntax"
        if not address.isascii() and not envelope.smtp_utf8:
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8"
        requiretls = server.mail_requiretls if isinstance(server, IngestSMTP) else ()
        if any(option != REQUIRETLS for option in requiretls):
            return REQUIRETLS_WITH_VALUE
        if len(requiretls) > 1:
            return REQUIRETLS_TWICE
        if requiretls and session.ssl is None:
            return REQUIRETLS_IN_CLEAR
        if not access.may_send_as(self.listener, self.directory, _auth_tenant(session), address):
            return SENDER_NOT_OWNED
        refusal = await self._rate_refusal(session)
        if refusal is not None:
            return refusal
        envelope.mail_from = address  # "<>" for the null reverse-path (kept truthy for aiosmtpd)
        envelope.mail_options = [o for o in mail_options if not o.startswith("SIZE=")]
        envelope.mail_options.extend(requiretls)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if _FORBIDDEN_IN_ADDRESS.search(address) or _has_surrogates(address) or address == "<>":
            return "501 5.1.3 Bad recipient address syntax"
        if not address.isascii() and not envelope.smtp_utf8:
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8"
        if len(envelope.rcpt_tos) >= self.config.ingest.max_recipients:
            return "452 4.5.3 Too many recipients"
        if not self._may_relay(session, address):
            return RELAY_DENIED
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    def _may_relay(self, session: Session, rcpt: str) -> bool:
        """Whether this client may send mail to ``rcpt`` on this listener (see access.py)."""
        authenticated = bool(session.authenticated)
        return access.may_relay(
            self.listener, self.directory, client_ip(session), authenticated, rcpt
        )

    def _sending_tenant(self, session: Session) -> str | None:
        return access.sending_tenant(
            self.listener, self.directory, client_ip(session), _auth_tenant(session)
        )

    async def _rate_refusal(self, session: Session) -> str | None:
        """``451 4.7.0`` when the sending tenant is over its ``rate_limit`` (this MAIL counts)."""
        tenant = self._sending_tenant(session)
        limit = self.directory.tenants[tenant].rate_limit if tenant is not None else None
        if tenant is None or limit is None:
            return None
        try:
            count = await asyncio.wait_for(
                limits.count_message(self.redis, tenant, limit), CHECK_TIMEOUT
            )
        except _CHECK_ERRORS as exc:
            log.error("rate limit of tenant %s unknown, MAIL refused: %r", tenant, exc)
            return TEMPFAIL
        if count > limit.count:
            log.info("tenant %s over its rate limit %s: MAIL refused", tenant, limit)
            return RATE_LIMITED
        return None

    # ----------------------------------------------------------------------- AUTH (submission)
    # No method of a handler may be named auth_*: aiosmtpd would offer it as a mechanism.

    async def refusal_before_auth(self, session: Session) -> str | None:
        """Before an AUTH exchange: 421 once this client failed too often, 451 if unknown."""
        address = client_ip(session)
        try:
            failures = await asyncio.wait_for(
                limits.auth_failures(self.redis, address), CHECK_TIMEOUT
            )
        except _CHECK_ERRORS as exc:
            log.error("AUTH from %s refused, failure count unknown: %r", address, exc)
            return TEMPFAIL
        if failures >= self.config.ingest.auth_failure_limit:
            log.warning("AUTH from %s refused: %d failures in the window", address, failures)
            return AUTH_TOO_MANY_FAILURES
        return None

    async def authenticate(self, session: Session, login: bytes, password: bytes) -> str | None:
        """Check a login (scrypt, in a worker thread); None when it is valid, else the reply.

        On success the session records the tenant and login; a failure is counted in Redis.
        """
        username = login.decode("utf-8", errors="replace")
        secret = password.decode("utf-8", errors="replace")
        loop = asyncio.get_running_loop()
        tenant = await loop.run_in_executor(None, self.directory.authenticate, username, secret)
        address = client_ip(session)
        if tenant is not None:
            session.tenant, session.auth_user = tenant, username
            log.info("%s authenticated as %s (tenant %s)", address, username, tenant)
            return None
        try:
            failures = await asyncio.wait_for(
                limits.record_auth_failure(
                    self.redis, address, self.config.ingest.auth_failure_window
                ),
                CHECK_TIMEOUT,
            )
        except _CHECK_ERRORS as exc:
            log.error("AUTH failure from %s not counted: %r", address, exc)
            return TEMPFAIL
        log.info("AUTH failed from %s (%d in the window)", address, failures)  # no login, ever
        return AUTH_INVALID

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        stored = self._envelope(session, envelope)
        body = received_header(stored, self.config.hostname, _protocol(session, envelope))
        body += _raw_content(envelope)
        stored = dataclasses.replace(
            stored, size=len(body), tls_required_no=has_tls_required_no(body)
        )
        try:
            await asyncio.wait_for(self.committer.accept(stored, body), ACCEPT_TIMEOUT)
        except (RedisError, OSError, TimeoutError) as exc:
            log.error(
                "%s: not queued, spool unavailable: %s: %s", stored.id, type(exc).__name__, exc
            )
            return TEMPFAIL
        log.info("%s: queued from %s, %d bytes", stored.id, stored.client_address, stored.size)
        metrics.ingest_accepted(self.listener.value, stored.size)
        return f"250 2.0.0 Ok: queued as {stored.id}"

    def _envelope(self, session: Session, envelope: SmtpEnvelope) -> Envelope:
        sender = envelope.mail_from or ""
        return Envelope(
            id=new_message_id(),
            sender="" if sender == "<>" else sender,
            recipients=tuple(envelope.rcpt_tos),
            mail_options=tuple(envelope.mail_options),
            client_address=client_ip(session),
            client_helo=session.host_name or "",
            inbound_tls=inbound_tls(session),
            received_at=time.time(),
            listener=self.listener.value,
            tenant=self._sending_tenant(session),
            auth_user=session.auth_user if isinstance(session, IngestSession) else None,
            client_cert=client_certificate(session),
        )

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # a failed handshake; aiosmtpd closes the session
            log.info("STARTTLS handshake failed: %r", error.__cause__)
        else:
            log.error("SMTP session error", exc_info=error)
        return "451 4.3.0 Internal error, try again later"


# --------------------------------------------------------------------------- helpers


def _auth_tenant(session: Session) -> str | None:
    return session.tenant if isinstance(session, IngestSession) else None


def client_ip(session: Session) -> str:
    """The peer's IP address as text (IPv4-mapped IPv6 unmapped, zone id dropped)."""
    peer: Any = session.peer
    host = str(peer[0]) if isinstance(peer, tuple | list) and peer else str(peer or "")
    host = host.partition("%")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def inbound_tls(session: Session) -> InboundTls:
    """The TLS version and cipher of the session, or an empty InboundTls when in clear."""
    ssl_object = (session.ssl or {}).get("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return InboundTls()
    cipher = ssl_object.cipher()
    return InboundTls(ssl_object.version(), cipher[0] if cipher else None)


def client_certificate(session: Session) -> str | None:
    """The verified client certificate's subject CN, else its first subjectAltName value."""
    ssl_object = (session.ssl or {}).get("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    cert: Any = ssl_object.getpeercert()  # empty unless a certificate was requested and verified
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    for _kind, value in cert.get("subjectAltName", ()):
        return str(value)
    return None


def received_header(envelope: Envelope, hostname: str, protocol: str) -> bytes:
    """The ``Received:`` trace field (RFC 5321 §4.4) for ``envelope``, CRLF-terminated."""
    helo = _NOT_PRINTABLE.sub("?", envelope.client_helo) or "unknown"
    ip = envelope.client_address
    literal = f"IPv6:{ip}" if ":" in ip else ip  # RFC 5321 §4.1.3 address literal
    clauses = [
        f"from {helo} (unknown [{literal}])",
        f"by {hostname} (tlsrelay) with {protocol} id {envelope.id}",
    ]
    tls = envelope.inbound_tls
    if tls.used:
        clauses.append(f"(using {tls.version} with cipher {tls.cipher})")
    if envelope.client_cert is not None:
        name = _NOT_QUOTABLE.sub("?", envelope.client_cert)
        clauses.append(f'(client certificate "{name}" verified by the platform CA)')
    if len(envelope.recipients) == 1:
        clauses.append(f"for <{envelope.recipients[0]}>")
    date = email.utils.formatdate(envelope.received_at, localtime=True)
    text = "Received: " + "\r\n\t".join(clauses) + f"; {date}\r\n"
    return text.encode("utf-8")


def _protocol(session: Session, envelope: SmtpEnvelope) -> str:
    """The ``with`` keyword: RFC 3848 (ESMTP, ESMTPS, ESMTPSA...), RFC 6531 (UTF8SMTP...)."""
    base = "ESMTP" if session.extended_smtp else "SMTP"
    if envelope.smtp_utf8:
        base = "UTF8SMTP"
    return base + ("S" if session.ssl is not None else "") + ("A" if session.authenticated else "")


def _take_requiretls(server: SMTP, arg: str | None) -> tuple[str | None, tuple[str, ...]]:
    """``arg`` of a MAIL command without its REQUIRETLS parameter(s), and those parameters.

    The address is found with aiosmtpd's own parser, so the remaining command is what aiosmtpd
    would have seen but for REQUIRETLS. Anything aiosmtpd will refuse anyway (no ``FROM:``, a
    malformed address, a HELO session, which takes no parameters) is left to it unchanged.
    """
    if arg is None or server.session is None or not server.session.extended_smtp:
        return arg, ()
    if REQUIRETLS not in arg.upper():  # nearly always: no need to parse the address here
        return arg, ()
    rest = server._strip_command_keyword("FROM:", arg)
    if rest is None:
        return arg, ()
    address, params = server._getaddr(rest)
    if not address or not params:
        return arg, ()
    words = params.split()
    taken = tuple(w.upper() for w in words if w.upper().partition("=")[0] == REQUIRETLS)
    if not taken:
        return arg, ()
    kept = [w for w in words if w.upper().partition("=")[0] != REQUIRETLS]
    path = rest[: len(rest) - len(params)].rstrip()
    return " ".join(["FROM:" + path, *kept]), taken


def _raw_content(envelope: SmtpEnvelope) -> bytes:
    content = envelope.original_content
    if content is None:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
    return bytes(content)


def _has_surrogates(text: str) -> bool:
    """True when ``text`` came from bytes that were not valid UTF-8 (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --------------------------------------------------------------------------- the server


class IngestServer:
    """Every configured listener (see :func:`access.listener_addresses`), sharing one Redis client.

    ``start()`` binds them all (or none: a failure releases what was bound); ``stop()`` releases
    everything.
    """

    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.redis_url = redis_url
        self._servers: list[asyncio.Server] = []
        self._handlers: list[IngestHandler] = []
        self._redis: aioredis.Redis | None = None
        self._addresses: dict[Listener, HostPort] = {}

    @property
    def addresses(self) -> dict[Listener, HostPort]:
        """Each listener's endpoint actually bound (the real port when the configuration says 0)."""
        if not self._addresses:
            raise RuntimeError("IngestServer is not started")
        return dict(self._addresses)

    @property
    def address(self) -> HostPort:
        """The ``listen`` listener's endpoint."""
        return self.addresses[Listener.LISTEN]

    async def start(self) -> None:
        self._addresses = {}
        endpoints = access.listener_addresses(self.config)
        public = tlscert.server_context(self.config)
        contexts = {Listener.LISTEN: public, Listener.SUBMISSION: public}
        if Listener.RELAY in endpoints:
            contexts[Listener.RELAY] = tlscert.platform_context(self.config)
        self._redis = spool.connect_async(self.redis_url)
        directory = Directory(self.config)
        ingest = self.config.ingest
        # One group commit for all listeners: their messages share transactions.
        committer = spool.Committer(
            self._redis, self.config.trace_ttl, ingest.batch_window, ingest.batch_max,
            sessions=lambda: sum(len(h.connections) for h in self._handlers),
        )  # fmt: skip
        metrics.prime_ingest(listener.value for listener in endpoints)
        try:
            for listener, endpoint in endpoints.items():
                handler = IngestHandler(self.config, self._redis, listener, directory, committer)
                self._handlers.append(handler)
                self._addresses[listener] = await self._listen(
                    handler, contexts[listener], endpoint
                )
        except BaseException:
            await self.stop()
            self._addresses = {}
            raise

    async def _listen(
        self, handler: IngestHandler, tls_context: ssl.SSLContext, endpoint: HostPort
    ) -> HostPort:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: self._protocol(handler, tls_context, loop), endpoint.host, endpoint.port
        )
        self._servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        return HostPort(host, port)

    def _protocol(
        self, handler: IngestHandler, tls_context: ssl.SSLContext, loop: asyncio.AbstractEventLoop
    ) -> IngestSMTP:
        return IngestSMTP(
            handler,
            data_size_limit=self.config.ingest.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.config.hostname,
            ident="ESMTP tlsrelay",
            tls_context=tls_context,
            # RFC 3207 §4: the relay endpoint takes nothing but EHLO/STARTTLS/NOOP/QUIT in clear.
            require_starttls=handler.listener is Listener.RELAY,
            # RFC 4954: submission takes mail only after AUTH, and AUTH only over TLS (538).
            auth_required=handler.offers_auth,
            auth_require_tls=True,
            timeout=self.config.ingest.command_timeout,
            loop=loop,
        )

    async def drain(self, grace: float) -> None:
        """SIGTERM: stop accepting (readiness fails first), let sessions finish for ``grace``
        seconds, then answer ``421`` to their next command; close what is left 10 s later."""
        health.INGEST.ready = False
        for server in self._servers:
            server.close()
        sessions = set().union(*(h.connections for h in self._handlers))
        await _wait_gone(sessions, grace)
        for session in sessions:
            session.refuse_new_commands()
        await _wait_gone(sessions, 10.0)

    async def stop(self) -> None:
        servers, handlers, redis = self._servers, self._handlers, self._redis
        self._servers, self._handlers, self._redis = [], [], None
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()
        for handler in handlers:
            await _close_sessions(handler.connections)
        if redis is not None:
            await redis.aclose()


async def _wait_gone(sessions: set[IngestSMTP], timeout: float) -> None:
    """Wait until every session in ``sessions`` has disconnected, or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while any(s.transport is not None for s in sessions) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _beat() -> None:
    """Liveness: prove the event loop runs (``/live`` turns 503 if this stops)."""
    while True:
        health.INGEST.beat = time.monotonic()
        await asyncio.sleep(1)


async def _close_sessions(connections: set[IngestSMTP], timeout: float = 5.0) -> None:
    """Close every open session and wait (bounded) until their connections are gone."""
    for connection in list(connections):
        connection.close()
    deadline = time.monotonic() + timeout
    while connections and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # let the cancelled session tasks finish


def serve(config: Config, redis_url: str) -> None:
    """Run every configured listener until SIGTERM or SIGINT, then stop them all cleanly."""
    asyncio.run(_serve(config, redis_url))


async def _serve(config: Config, redis_url: str) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = IngestServer(config, redis_url)
    await server.start()
    beat = asyncio.create_task(_beat())
    health.INGEST.ready = True
    try:
        for listener, address in server.addresses.items():
            print(f"ingest listening on smtp://{address} ({listener})", flush=True)
        if config.metrics.ingest is not None:  # served by the CLI before the listeners started
            print(f"ingest metrics on http://{config.metrics.ingest}/metrics", flush=True)
        await stopping.wait()
        log.info("draining: no new connections; sessions get %ss", config.ingest.drain_grace)
        await server.drain(config.ingest.drain_grace)
    finally:
        beat.cancel()
        await server.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
