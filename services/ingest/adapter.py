"""The one place that touches aiosmtpd's private members: named operations over its internals.

aiosmtpd (1.4.x) has no public API for what ingest needs: to route unknown verbs to its own
error count, to answer every verb alike while draining, to read DATA itself, to hang up with
pipelined commands unread, to notice a STARTTLS handshake still in progress. This module wraps
each such use of an underscored member in a method or property of :class:`AiosmtpdAdapter`,
named for what it does, so the rest of ingest speaks only of those (and of aiosmtpd's public
API: ``smtp_*`` methods, ``push``, hooks, ``Session``, ``Envelope``).

:data:`PRIVATE_METHODS`, :data:`PRIVATE_ATTRIBUTES` and :data:`CONNECTED_ATTRIBUTES` list every
private member relied on; ``tests/test_aiosmtpd_adapter.py`` fails, naming the member, when a
new aiosmtpd (or asyncio, for :data:`STREAM_ATTRIBUTES`) no longer has one. Failure behaviour:
nothing here catches anything; a missing member raises ``AttributeError`` in the session (logged
and answered ``451 4.3.0`` by the handler's ``handle_exception``), which that test catches first.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from aiosmtpd.smtp import SMTP, Session

VerbMethod = Callable[[str | None], Awaitable[None]]

# Every private member of aiosmtpd's SMTP this module uses (checked by the adapter test).
PRIVATE_METHODS: Final = (
    "_call_handler_hook",  # run a handle_<VERB> hook (DATA, read here rather than by aiosmtpd)
    "_create_session",  # overridden: sessions are IngestSession
    "_getaddr",  # overridden: address parsing (MAIL, RCPT, VRFY) goes to parse_address
    "_reset_timeout",  # restart the command timeout while DATA lines arrive
    "_set_post_data_state",  # a new envelope after DATA
    "_strip_command_keyword",  # "FROM:" off a MAIL argument
    "_timeout_cb",  # overridden: the command timeout goes to on_timeout
)
PRIVATE_ATTRIBUTES: Final = (  # set by SMTP.__init__
    "_smtp_methods",  # the verb -> method table
    "_timeout_duration",  # the command timeout in seconds
    "_tls_protocol",  # set when STARTTLS was answered 220
    "_original_transport",  # the TCP transport under TLS, once STARTTLS began
    "_handler_coroutine",  # the task running the session's commands
)
CONNECTED_ATTRIBUTES: Final = ("_reader", "_writer")  # set once a client connected
# And asyncio.StreamReader's (see unread and stream_limit).
STREAM_ATTRIBUTES: Final = (
    "_buffer",  # the octets received and not read yet
    "_limit",  # how far readuntil looks for its separator (LimitOverrunError beyond)
)


def unread(reader: asyncio.StreamReader) -> bytearray:
    """The octets ``reader`` received and has not returned yet: its buffer itself, to look into
    before a read of a length known to be there, or to clear; never to keep over an ``await``."""
    return cast(bytearray, cast(Any, reader)._buffer)


def stream_limit(reader: asyncio.StreamReader) -> int:
    """The octets before a separator beyond which ``reader.readuntil`` raises
    ``LimitOverrunError`` (the ``limit`` it was made with)."""
    return int(cast(Any, reader)._limit)


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


class _Every:
    """A stand-in for aiosmtpd's verb → method table that answers every verb the same way."""

    def __init__(self, method: VerbMethod) -> None:
        self.method = method

    def get(self, command: str) -> VerbMethod:
        return self.method


Around = Callable[[VerbMethod, str | None], Awaitable[None]]


class _Around:
    """``method`` run by ``around(method, arg)``; its other attributes (aiosmtpd's HELP reads
    the ``@syntax`` ones) are the method's."""

    def __init__(self, method: VerbMethod, around: Around) -> None:
        self.method, self.around = method, around

    def __call__(self, arg: str | None) -> Awaitable[None]:
        return self.around(self.method, arg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.method, name)


class _Verbs(dict[str, VerbMethod]):
    """aiosmtpd's verb → method table, where an unknown verb finds ``unknown`` and every
    command runs through ``around``."""

    def __init__(
        self,
        methods: dict[str, VerbMethod],
        unknown: Callable[[str, str | None], Awaitable[None]],
        around: Around,
    ) -> None:
        super().__init__(methods)
        self.unknown, self.around = unknown, around

    def get(self, verb: str, default: object = None) -> VerbMethod:
        method = super().get(verb)
        found = method if method is not None else functools.partial(self.unknown, verb)
        return _Around(found, self.around)


class AiosmtpdAdapter(SMTP):  # type: ignore[misc]  # aiosmtpd is untyped
    """aiosmtpd's ``SMTP`` protocol with its internals behind named operations."""

    _smtp_methods: dict[str, VerbMethod] | _Every  # aiosmtpd's verb → method table

    # ----------------------------------------------------------------------- verbs

    def route_verbs(
        self, unknown: Callable[[str, str | None], Awaitable[None]], around: Around
    ) -> None:
        """Send unknown verbs to ``unknown(verb, arg)`` (aiosmtpd's own answer, a ``502`` and
        a hang-up after 5 of them, is replaced), and run every command as
        ``around(method, arg)`` (so the session knows when it is between commands)."""
        assert isinstance(self._smtp_methods, dict)
        self._smtp_methods = _Verbs(self._smtp_methods, unknown, around)

    def answer_every_verb(self, method: VerbMethod) -> None:
        """From now on every command, known or not, runs ``method(arg)``."""
        self._smtp_methods = _Every(method)

    # ----------------------------------------------------------------------- overridden hooks

    def _create_session(self) -> IngestSession:
        return IngestSession(self.loop)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return self.parse_address(arg)

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser (MAIL, RCPT, VRFY): ``(address, parameters)``."""
        return cast(tuple[str | None, str | None], super()._getaddr(arg))

    def _timeout_cb(self) -> None:
        self.on_timeout()

    def on_timeout(self) -> None:
        """No command for the timeout: aiosmtpd closes without a word."""
        super()._timeout_cb()

    def split_mail_from(self, arg: str) -> tuple[str, str | None, str | None] | None:
        """A MAIL argument as ``(path and parameters, address, parameters)``, None without
        ``FROM:``; the address found by :meth:`parse_address`."""
        rest = cast(str | None, self._strip_command_keyword("FROM:", arg))
        if rest is None:
            return None
        address, params = self._getaddr(rest)
        return rest, address, params

    # ----------------------------------------------------------------------- the connection

    @property
    def after_starttls(self) -> bool:
        """STARTTLS was answered (``connection_made`` is called again for the TLS layer)."""
        return self._original_transport is not None

    @property
    def handshaking(self) -> bool:
        """STARTTLS was answered 220 and the handshake has not completed yet."""
        return self._tls_protocol is not None and self.session.ssl is None

    @property
    def tcp_transport(self) -> asyncio.Transport:
        """The TCP transport, under any TLS."""
        return cast(asyncio.Transport, self._original_transport or self.transport)

    def write_now(self, data: bytes) -> None:
        """Write ``data`` without waiting for the buffer to drain (from a timer callback)."""
        self._writer.write(data)

    def discard_pipelined(self) -> None:
        """Drop what the client sent and was not read yet: those commands are never run."""
        unread(self._reader).clear()

    def cancel_commands(self) -> None:
        """Stop the task that runs the session's commands."""
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    # ----------------------------------------------------------------------- DATA

    @property
    def reader(self) -> asyncio.StreamReader:
        """The stream the commands and DATA lines are read from."""
        return cast(asyncio.StreamReader, self._reader)

    @property
    def timeout_seconds(self) -> float:
        return float(self._timeout_duration)

    def restart_timeout(self) -> None:
        """Restart the command timeout (progress was made)."""
        self._reset_timeout()

    async def call_hook(self, verb: str) -> Any:
        """The handler's ``handle_<verb>`` result (aiosmtpd's default reply without one)."""
        return await self._call_handler_hook(verb)

    def end_data(self) -> None:
        """The transaction is over: a fresh envelope."""
        self._set_post_data_state()
