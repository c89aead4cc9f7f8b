"""What ingest records of a message: the DATA lines within the limits, and the trace it adds.

- :class:`MessageReader` keeps the lines of one DATA transfer within the size, line, header and
  hop limits, with memory bounded by the size limit whatever the client sends: one line at a
  time, or every whole line the stream holds at once (the same result, for less CPU).
- :func:`received_header` writes the ``Received:`` trace field (RFC 5321 §4.4) from the facts
  of the session: :func:`client_ip`, :func:`inbound_tls`, :func:`client_certificate`,
  :func:`with_keyword` (the RFC 3848 ``with`` keyword).

Pure, no I/O. Nothing here raises on hostile input: a DATA transfer over a limit gets a
:attr:`MessageReader.refusal` (one of :mod:`services.ingest.replies`), non-printable text in a
trace field is replaced by ``?``, an unreadable peer address is kept as the text it was.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import ipaddress
import re
import ssl
from typing import Any, Final

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session

from services.common.model import Envelope, InboundTls
from services.common.values import ip_address
from services.ingest.replies import (
    DATA_LINE_TOO_LONG,
    HEADER_TOO_LARGE,
    TOO_BIG,
    TOO_MANY_HOPS,
)

# RFC 5321 §4.5.3.1.6: a text line of DATA is at most 1000 octets, CRLF included, not counting
# a dot doubled for transparency (§4.5.2). Longer lines are not folded (that would change the
# octets and break DKIM signatures): the message is read to its end and refused with
# DATA_LINE_TOO_LONG, so the sender learns at once rather than from a bounce later.
TEXT_LINE_MAX: Final = 1000
# RFC 5322 §2.2 (and §4.5's obsolete space before the colon): a header field, or a folded line.
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t]")
_RECEIVED_FIELD = re.compile(rb"received[ \t]*:", re.IGNORECASE)  # RFC 5322 §3.6.7: a hop
# The same over many lines: the lines matching _HEADER_LINE that start a text (each to its CRLF:
# a bare CR or LF ends nothing), and a Received field after the first line.
_HEADER_LINES = re.compile(
    rb"(?:(?:[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t])[^\r]*(?:\r(?!\n)[^\r]*)*\r\n)*"
)
_NEXT_RECEIVED_FIELD = re.compile(rb"\r\nreceived[ \t]*:", re.IGNORECASE)
_NOT_PRINTABLE = re.compile(r"[^!-~]")  # anything but visible ASCII (for the Received header)
_NOT_QUOTABLE = re.compile(r'[^ -~]|["\\()]')  # ... in a quoted name inside a comment


class MessageReader:
    """The lines of one DATA transfer, kept within the limits (pure, no I/O).

    Feed it every line up to and including the final dot: one at a time as a StreamReader's
    ``readuntil`` of CRLF returns them (:meth:`line`; the pieces of a line longer than the stream
    buffer, ``stream_limit``, through :meth:`fragment`), or the whole lines the stream already
    holds at once (:meth:`whole_lines` says how many octets, :meth:`lines` takes them), which
    ends in the same content and refusal. Dot-stuffing is undone (RFC 5321
    §4.5.2); the size counts the message as stored (RFC 1870: CRLFs, not the stuffed dots). The
    first limit crossed decides the refusal, after which nothing more is kept, so memory stays
    bounded by ``max_bytes`` whatever the client sends. The header section is the lines up to
    the first empty line or the first that is neither a field nor a folded continuation (a
    message without headers or without a blank line is accepted as it is). More than
    ``max_hops`` ``Received:`` fields in it is a mail loop (RFC 5321 §6.3): TOO_MANY_HOPS.
    """

    def __init__(
        self, max_bytes: int, max_header_bytes: int, max_hops: int, *, stream_limit: int
    ) -> None:
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes
        self.max_hops = max_hops
        self.stream_limit = stream_limit  # the reader's limit: a longer line comes in fragments
        # The longest line (without CRLF and its stuffed dot) that :meth:`lines` takes without
        # looking closer: within TEXT_LINE_MAX, and no fragment even with a stuffed dot.
        self._plain_line_max = min(TEXT_LINE_MAX - 2, stream_limit - 1)
        self._hops = 0
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

    def whole_lines(self, unread: bytes | bytearray) -> int:
        """How many octets at the start of ``unread`` (what the stream holds and has not returned
        yet) :meth:`lines` takes: the whole lines there, up to and including the final dot when
        it is among them, never an octet past it (the client's next command). 0 when no line
        ends there, or inside a line longer than the stream buffer (its end goes to :meth:`line`).
        """
        if self._in_line:
            return 0
        if unread.startswith(b".\r\n"):
            return 3
        end = unread.find(b"\r\n.\r\n")  # a CRLF is always a line end: they never overlap
        if end >= 0:
            return end + 5
        last = unread.rfind(b"\r\n")
        return last + 2 if last >= 0 else 0

    def lines(self, data: bytes) -> bool:
        """The octets :meth:`whole_lines` counted: the same as :meth:`line` (and
        :meth:`fragment`, for a line longer than the stream buffer, as ``readuntil`` would have
        split it) on each line in turn, in a few passes over the whole; True when the last line
        is the final dot."""
        final = data == b".\r\n" or data.endswith(b"\r\n.\r\n")
        body = data[:-3] if final else data
        if body and self.refusal is None:  # once refused, the rest only has to be read
            self._bulk(body)
        return final

    def _bulk(self, body: bytes) -> None:
        """Whole lines, none of them the final dot, from the start of a line."""
        # RFC 5321 §4.5.2, the first line and the others. A CRLF is neither made nor unmade:
        # the dots taken out follow an LF.
        text = body.replace(b"\r\n.", b"\r\n")
        if body.startswith(b"."):
            text = text[1:]
        longest = max(map(len, text.split(b"\r\n")))  # without CRLF, and without a dot
        if longest > self._plain_line_max or self._size + len(text) > self.max_bytes:
            for line in body.split(b"\r\n")[:-1]:  # a limit may be crossed: find where
                self._as_read(line)
            return
        self._size += len(text)
        if self._in_header and not self._header(text):
            return
        self.content += text

    def _as_read(self, line: bytes) -> None:
        """A line (without CRLF) as ``readuntil`` hands it over: beyond the stream limit, that
        much as a fragment, then the CRLF alone."""
        if len(line) > self.stream_limit:
            self.fragment(line)
            self.line(b"\r\n")
        else:
            self.line(line + b"\r\n")

    def _header(self, text: bytes) -> bool:
        """:meth:`_keep`'s header accounting, on lines (dots unstuffed) within every other
        limit; False when that refused them."""
        match = _HEADER_LINES.match(text)
        end = match.end() if match is not None else 0  # the header lines text starts with
        hops = self._hops + (_RECEIVED_FIELD.match(text, 0, end) is not None)
        hops += len(_NEXT_RECEIVED_FIELD.findall(text, 0, end))
        if self._header_bytes + end > self.max_header_bytes or hops > self.max_hops:
            for line in text[:end].split(b"\r\n")[:-1]:  # a limit is crossed: find which
                self._keep(line + b"\r\n")
            return False
        self._header_bytes += end
        self._hops = hops
        self._in_header = end == len(text)
        return True

    def _count(self, size: int, refusal: str | None) -> None:
        self._size += size
        self._refuse(TOO_BIG if self._size > self.max_bytes else refusal)

    def _keep(self, line: bytes) -> None:
        if self._in_header:
            if line == b"\r\n" or not _HEADER_LINE.match(line):
                self._in_header = False
            else:
                self._header_bytes += len(line)
                self._hops += _RECEIVED_FIELD.match(line) is not None
                if self._header_bytes > self.max_header_bytes:
                    self._refuse(HEADER_TOO_LARGE)
                    return
                if self._hops > self.max_hops:
                    self._refuse(TOO_MANY_HOPS)
                    return
        self.content += line

    def _refuse(self, refusal: str | None) -> None:
        if refusal is not None and self.refusal is None:
            self.refusal = refusal
            self.content = bytearray()  # nothing more is kept


def raw_content(envelope: SmtpEnvelope) -> bytes:
    """The message octets as received (only dot-stuffing undone)."""
    content = envelope.original_content
    if content is None:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
    return bytes(content)


# --------------------------------------------------------------------------- the trace


def client_ip(session: Session) -> str:
    """The peer's IP address as text (IPv4-mapped IPv6 unmapped, zone id dropped); worked out
    once per session (asked at each command), kept on the session with the peer it is for."""
    peer: Any = session.peer
    cached: tuple[Any, str] | None = getattr(session, "_tlsrelay_client_ip", None)
    if cached is not None and cached[0] is peer:
        return cached[1]
    text = _client_ip(peer)
    with contextlib.suppress(AttributeError):  # a session that takes no attributes: not kept
        session._tlsrelay_client_ip = (peer, text)
    return text


def _client_ip(peer: Any) -> str:
    host = str(peer[0]) if isinstance(peer, tuple | list) and peer else str(peer or "")
    host = host.partition("%")[0]
    address = ip_address(host)
    if address is None:
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


def with_keyword(session: Session, envelope: SmtpEnvelope) -> str:
    """The ``with`` keyword: RFC 3848 (ESMTP, ESMTPS, ESMTPSA...), RFC 6531 (UTF8SMTP...)."""
    base = "ESMTP" if session.extended_smtp else "SMTP"
    if envelope.smtp_utf8:
        base = "UTF8SMTP"
    return base + ("S" if session.ssl is not None else "") + ("A" if session.authenticated else "")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 date-time of a second, local time (the same second: the same text)."""
    return email.utils.formatdate(second, localtime=True)


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
    date = _date(int(envelope.received_at))
    text = "Received: " + "\r\n\t".join(clauses) + f"; {date}\r\n"
    return text.encode("utf-8")
