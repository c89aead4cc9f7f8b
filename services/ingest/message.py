"""What ingest records of a message: the DATA lines within the limits, and the trace it adds.

- :class:`MessageReader` keeps the lines of one DATA transfer within the size, line, header and
  hop limits, with memory bounded by the size limit whatever the client sends.
- :func:`received_header` writes the ``Received:`` trace field (RFC 5321 §4.4) from the facts
  of the session: :func:`client_ip`, :func:`inbound_tls`, :func:`client_certificate`,
  :func:`with_keyword` (the RFC 3848 ``with`` keyword).

Pure, no I/O. Nothing here raises on hostile input: a DATA transfer over a limit gets a
:attr:`MessageReader.refusal` (one of :mod:`services.ingest.replies`), non-printable text in a
trace field is replaced by ``?``, an unreadable peer address is kept as the text it was.
"""

from __future__ import annotations

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
_NOT_PRINTABLE = re.compile(r"[^!-~]")  # anything but visible ASCII (for the Received header)
_NOT_QUOTABLE = re.compile(r'[^ -~]|["\\()]')  # ... in a quoted name inside a comment


class MessageReader:
    """The lines of one DATA transfer, kept within the limits (pure, no I/O).

    Feed it every line up to and including the final dot (:meth:`line`; the pieces of a line
    longer than the stream buffer through :meth:`fragment`). Dot-stuffing is undone (RFC 5321
    §4.5.2); the size counts the message as stored (RFC 1870: CRLFs, not the stuffed dots). The
    first limit crossed decides the refusal, after which nothing more is kept, so memory stays
    bounded by ``max_bytes`` whatever the client sends. The header section is the lines up to
    the first empty line or the first that is neither a field nor a folded continuation (a
    message without headers or without a blank line is accepted as it is). More than
    ``max_hops`` ``Received:`` fields in it is a mail loop (RFC 5321 §6.3): TOO_MANY_HOPS.
    """

    def __init__(self, max_bytes: int, max_header_bytes: int, max_hops: int) -> None:
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes
        self.max_hops = max_hops
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
    """The peer's IP address as text (IPv4-mapped IPv6 unmapped, zone id dropped)."""
    peer: Any = session.peer
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
