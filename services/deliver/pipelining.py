"""SMTP command pipelining (RFC 2920): several commands in one write, their replies read in order.

aiosmtplib reads one reply per command it sends and parses at most one reply per chunk the
network hands it, dropping what arrives while no command waits (its ``read_response`` must be
awaited once per command). Replies to a pipelined group often arrive together, or split at any
byte, so the group is run here on the session's own transport with a reader of our own:
:class:`Pipeline` lends the transport from an ``aiosmtplib.SMTP`` (``transport.set_protocol``),
writes the group, reads the replies one by one in order (:class:`ReplyReader`), and gives the
transport back when every reply was read and nothing more was said; otherwise the session is
closed (what the peer says next could not be paired with our next command).

Memory: a group or message is written to the transport 16 KiB at a time (:meth:`Pipeline.send`),
so that the TLS transport's outgoing buffer, which never shrinks while the session lives, stays
that small whatever the message's size.

Bounds against a hostile peer: a line longer than ``MAX_LINE`` or a reply longer than
``MAX_REPLY`` (RFC 5321 §4.5.3.1.5: 512 octets per reply line; we allow aiosmtplib's limits) is
:class:`Malformed`; a peer that says more than is read stops being read past ``HIGH_WATER``
bytes (TCP flow control holds it back); each reply is awaited at most the timeout given.

Failure: :class:`Disconnected` (closed before the reply was complete), :class:`Malformed` (a
line that is not an SMTP reply, or too long), ``TimeoutError``. Never anything else.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import cast

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import normalize_message_line_endings

MAX_LINE = 8192  # aiosmtplib's MAX_LINE_LENGTH (RFC 5321 §4.5.3.1.5 says 512: real servers vary)
MAX_REPLY = 4 * MAX_LINE  # a whole multi-line reply
WRITE_CHUNK = 16 * 1024  # bytes per transport write: one TLS record's data (Pipeline.send)
HIGH_WATER = 64 * 1024  # unread bytes past which the peer is no longer read from
LOW_WATER = 16 * 1024
_LINE = re.compile(rb"^(\d{3})([ -]|\r?\n)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # never on a command line (CR/LF: injection)
_PERIOD = re.compile(rb"(?m)^\.")
# A dot-atom local part @ a domain name (RFC 5322 §3.2.3 atext): quote_address gives it back
# as it is, in angle brackets; it costs 9 µs to find that out (email.utils.parseaddr), and two
# such addresses are most messages' envelope. Anything else takes quote_address's way.
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_PLAIN_ADDRESS = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\Z")


class ReplyError(Exception):
    """The reply could not be read."""


class Disconnected(ReplyError):
    pass


class Malformed(ReplyError):
    pass


@dataclass(frozen=True)
class RawReply:
    """One reply as the peer sent it: its code and its lines' text joined with newlines."""

    code: int
    text: str


class ReplyReader(asyncio.Protocol):
    """Buffers what the peer sends and hands out whole replies, in order."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self._offset = 0  # bytes of the buffer read into _lines (a reply not yet complete)
        self._lines: list[str] = []
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._wakeup: asyncio.Future[None] | None = None

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer.extend(data)
        if len(self.buffer) > HIGH_WATER and self._transport is not None and not self._paused:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def read(self, timeout: float) -> RawReply:
        """The next whole reply, waiting at most ``timeout`` seconds for it. A reply already
        buffered (a pipelined group's replies often come in one packet) is taken without a
        timer: nothing waits."""
        reply = self._parse()
        if reply is None:
            reply = await self._wait(timeout)
        if len(self.buffer) < LOW_WATER:
            self._resume()
        return reply

    async def _wait(self, timeout: float) -> RawReply:
        async with asyncio.timeout(timeout):
            while (reply := self._parse()) is None:
                if self.closed:
                    raise Disconnected("connection closed before the reply was complete")
                self._resume()  # what is buffered is read: the rest of this reply is needed
                self._wakeup = asyncio.get_running_loop().create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
        return reply

    def _resume(self) -> None:
        if self._paused and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._paused = False

    def _parse(self) -> RawReply | None:
        """One complete reply off the front of the buffer (None: not all there yet). The lines
        of a reply not yet complete are kept, so a reply trickled in is scanned once."""
        while True:
            offset = self._offset
            end = self.buffer.find(b"\n", offset, offset + MAX_LINE + 1)
            if end < 0:
                if len(self.buffer) - offset > MAX_LINE:
                    raise Malformed(f"reply line longer than {MAX_LINE} bytes")
                return None
            line = bytes(self.buffer[offset : end + 1])
            match = _LINE.match(line)
            if match is None:
                raise Malformed(f"not an SMTP reply line: {line[:100]!r}")
            self._lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            self._offset = end + 1
            if self._offset > MAX_REPLY:
                raise Malformed(f"reply longer than {MAX_REPLY} bytes")
            if match.group(2) != b"-":  # RFC 5321 §4.2.1: the last line has no hyphen
                reply = RawReply(int(match.group(1)), "\n".join(self._lines))
                del self.buffer[: self._offset]
                self._offset, self._lines = 0, []
                return reply


class Pipeline:
    """Context manager: the transport of a connected ``aiosmtplib.SMTP`` lent to a
    :class:`ReplyReader`. On leaving, the transport goes back to aiosmtplib when
    :meth:`finish` was called with nothing left unread; otherwise the session is closed."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.reader = ReplyReader()
        self._finished = False
        protocol = smtp.protocol
        transport = protocol.transport if protocol is not None else None
        if protocol is None or transport is None or transport.is_closing():
            raise Disconnected("the session is closed")
        self._protocol = protocol
        self._transport = cast(asyncio.Transport, transport)

    def __enter__(self) -> Pipeline:
        self.reader.attach(self._transport)
        self._transport.set_protocol(self.reader)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None and self._finished and not self.reader.buffer and not self.reader.closed:
            self._transport.set_protocol(self._protocol)
        else:
            hang_up(self.smtp)

    async def send(self, data: bytes) -> None:
        """Write ``data`` :data:`WRITE_CHUNK` bytes at a time. asyncio's TLS transport encrypts
        each write whole into its outgoing memory BIO before passing it on, and that buffer keeps
        its largest size as long as the session lives: one write of the whole message left every
        session holding a copy the size of the largest message it sent (1 000 sessions that sent
        100 kB each: 100 MB). The bytes on the wire are the same: OpenSSL cuts records at 16 KiB
        anyway.

        A connection lost half-way (the peer reset it) stops the writing with
        :class:`Disconnected`: asyncio logs a warning for every write to a lost connection, so
        writing on would log one per chunk left (thousands for a large message, per attempt, at
        a hostile peer's will). Between chunks the loop runs once, so that a TLS transport,
        which learns of the loss from the one below it a step later, has learnt it."""
        if self._transport.is_closing():
            raise Disconnected("the session is closed")
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            if start:
                await asyncio.sleep(0)
                if self._transport.is_closing() or self.reader.closed:
                    raise Disconnected("the connection was lost while writing")
            self._transport.write(view[start : start + WRITE_CHUNK])

    async def reply(self, timeout: float) -> RawReply:
        return await self.reader.read(timeout)

    def finish(self) -> None:
        """Every reply the group called for was read: the session may go on (unless the peer
        said more than that, or closed)."""
        self._finished = True


def hang_up(smtp: aiosmtplib.SMTP) -> None:
    """Close the session; a connection still holding bytes the peer has not taken (a message
    it stopped reading: its receive window shut) is aborted, not closed. asyncio's close waits
    for the write buffer to drain before it lets the socket go, with no time limit over plain
    TCP: a peer that never reads again would keep the connection, and the copy of the message
    in its buffer, for as long as it likes — one per attempt at its will."""
    drop_unsent(smtp.transport)
    smtp.close()


def drop_unsent(transport: asyncio.BaseTransport | None) -> None:
    """Abort ``transport`` if it still holds bytes the peer has not taken (:func:`hang_up`)."""
    if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
        transport.abort()


def envelope_commands(
    sender: str,
    options: Sequence[str],
    recipients: Sequence[str],
    encoding: str = "ascii",
    chunk: int | None = None,
) -> bytes:
    """``MAIL FROM``, one ``RCPT TO`` per recipient and ``DATA``, as one group (RFC 2920 §3.1:
    DATA may end a group; the message itself goes only after its ``354``). Addresses are
    quoted and checked as aiosmtplib does (ValueError for a control character, as it raises);
    ``encoding``: utf-8 under SMTPUTF8 (RFC 6531), else ascii. ``chunk``: ``BDAT <chunk>
    LAST`` instead of DATA (RFC 3030 §2; its data follows at once, :func:`chunk_data`)."""
    lines = [_command(encoding, "MAIL", f"FROM:{quoted(sender)}", *options)]
    lines += [_command(encoding, "RCPT", f"TO:{quoted(rcpt)}") for rcpt in recipients]
    lines.append(b"DATA\r\n" if chunk is None else b"BDAT %d LAST\r\n" % chunk)
    return b"".join(lines)


def quoted(address: str) -> str:
    """``<address>`` as aiosmtplib's ``quote_address`` gives it (and its ValueError)."""
    if _PLAIN_ADDRESS.match(address):
        return f"<{address}>"
    return quote_address(address)


def _command(encoding: str, *args: str) -> bytes:
    for arg in args:
        if _CONTROL.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return " ".join(args).encode(encoding) + b"\r\n"


def message_data(body: bytes) -> bytes:
    """The message as sent after ``354``: CRLF line ends, leading dots doubled, the final dot
    (RFC 5321 §4.5.2), exactly as aiosmtplib sends it."""
    return _PERIOD.sub(b"..", crlf(body)) + b".\r\n"


def chunk_data(body: bytes) -> bytes:
    """The message as one BDAT chunk: CRLF line ends, as after DATA, but no dot doubled and no
    final dot (RFC 3030 §2: the size says where it ends)."""
    return crlf(body)


def crlf(body: bytes) -> bytes:
    """aiosmtplib's ``normalize_message_line_endings`` (lone CR and LF become CRLF; a CRLF at
    the end), the same bytes; without its substitution at every line end when each CR and
    each LF of ``body`` is already part of a CRLF, as ingest stores messages (three counts)."""
    pairs = body.count(b"\r\n")
    if body.count(b"\r") == pairs and body.count(b"\n") == pairs:
        return body if body.endswith(b"\r\n") else body + b"\r\n"
    return normalize_message_line_endings(body)
