"""Message facts: what the rules may look at, extracted once from a stored message.

Input: the :class:`~services.common.model.Envelope` and, when some rule looks at content
(``Ruleset.needs_content``), the raw message bytes. :func:`facts_from_message` is pure: it parses
with the stdlib ``email`` package (``policy.default``) only as deep as the ruleset needs — the
header block for ``subject``/``header``, the whole MIME tree for ``body``/``attachment`` — and
keeps at most ``body_scan_bytes`` (UTF-8) of decoded text: text/plain parts as they are,
text/html parts with tags stripped and entities resolved, base64 and quoted-printable decoded.

Failure: none. Malformed MIME is parsed as far as the ``email`` package manages; a part that
cannot be decoded is skipped, a header that cannot be decoded is kept as raw text.
"""

from __future__ import annotations

import contextlib
import email.policy
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from html.parser import HTMLParser
from typing import Protocol

from services.common.model import Envelope
from services.common.protocol import REQUIRETLS

TEXT_TYPES = ("text/plain", "text/html")


class Needs(Protocol):
    """How deep to look: what the rules use (``services.policy.decide.Ruleset`` answers these)."""

    @property
    def needs_content(self) -> bool: ...
    @property
    def needs_body(self) -> bool: ...
    @property
    def needs_attachments(self) -> bool: ...
    @property
    def body_scan_bytes(self) -> int: ...


@dataclass(frozen=True)
class Attachment:
    """A part with ``Content-Disposition: attachment`` or a file name."""

    filename: str  # "" when the part has none
    content_type: str  # lower-case type/subtype


@dataclass(frozen=True)
class MessageFacts:
    """What the rules may look at. Content fields are empty unless a rule needs them."""

    envelope: Envelope
    headers: tuple[tuple[str, str], ...] = ()  # (name, decoded value), in message order
    subject: str = ""
    text: str = ""  # decoded text parts, at most body_scan_bytes (UTF-8)
    attachments: tuple[Attachment, ...] = ()
    size: int = 0  # bytes (the envelope's size as accepted)
    requiretls: bool = False  # MAIL FROM carried REQUIRETLS

    def header_values(self, name: str) -> tuple[str, ...]:
        """Every value of the header ``name`` (case-insensitive)."""
        wanted = name.lower()
        return tuple(v for n, v in self.headers if n.lower() == wanted)


def facts_from_message(envelope: Envelope, raw: bytes | None, ruleset: Needs) -> MessageFacts:
    """The facts of one message; ``raw`` None (not loaded) leaves content fields empty."""
    base = MessageFacts(
        envelope=envelope,
        size=envelope.size or len(raw or b""),
        requiretls=REQUIRETLS in (o.upper() for o in envelope.mail_options),
    )
    if raw is None or not ruleset.needs_content:
        return base
    deep = ruleset.needs_body or ruleset.needs_attachments
    message = _parse(raw, headers_only=not deep)
    headers = _headers(message)
    subject = next((v for n, v in headers if n.lower() == "subject"), "")
    text = _text(message, ruleset.body_scan_bytes) if ruleset.needs_body else ""
    attachments = _attachments(message) if ruleset.needs_attachments else ()
    return MessageFacts(
        envelope=envelope,
        headers=headers,
        subject=subject,
        text=text,
        attachments=attachments,
        size=base.size,
        requiretls=base.requiretls,
    )


def _parse(raw: bytes, headers_only: bool) -> Message:
    parser = BytesHeaderParser if headers_only else BytesParser
    try:
        return parser(policy=email.policy.default).parsebytes(raw)
    except Exception:  # the email package is lenient, but a crafted message must not stop policy
        return EmailMessage()


# --------------------------------------------------------------------------- headers


def _headers(message: Message) -> tuple[tuple[str, str], ...]:
    out = []
    for name, raw in message.raw_items():
        value = str(raw)
        with contextlib.suppress(Exception):  # RFC 2047 decoding; raw text when it fails
            value = str(message.policy.header_fetch_parse(name, raw))
        out.append((name, _unfold(value)))
    return tuple(out)


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]*", " ", value).strip()


# --------------------------------------------------------------------------- text


def _text(message: Message, limit: int) -> str:
    """The text parts, decoded and joined, cut at ``limit`` bytes of UTF-8."""
    chunks: list[str] = []
    remaining = limit
    for part in _leaves(message):
        if remaining <= 0:
            break
        text = _part_text(part)
        if text is None:
            continue
        encoded = text[:remaining].encode("utf-8", "replace")[:remaining]
        remaining -= len(encoded) + 1
        chunks.append(encoded.decode("utf-8", "ignore"))
    return "\n".join(chunks)


def _leaves(message: Message) -> list[Message]:
    try:
        return [p for p in message.walk() if not p.is_multipart()]
    except Exception:
        return []


def _part_text(part: Message) -> str | None:
    """A text/plain or text/html part as text (HTML stripped); None for other or broken parts."""
    try:
        content_type = part.get_content_type()
        if content_type not in TEXT_TYPES:
            return None
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return None
        text = _decode(payload, part.get_content_charset() or "us-ascii")
        return strip_html(text) if content_type == "text/html" else text
    except Exception:
        return None


def _decode(payload: bytes, charset: str) -> str:
    try:
        return payload.decode(charset, "replace")
    except LookupError:  # unknown charset name
        return payload.decode("utf-8", "replace")


class _TextOnly(HTMLParser):
    """Collects character data; block-level tags become spaces; script/style are dropped."""

    INLINE = frozenset({"a", "b", "i", "u", "em", "strong", "span", "font", "small", "big", "code"})
    SKIP = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        if tag not in self.INLINE:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skipping > 0:
            self.skipping -= 1
        if tag not in self.INLINE:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def strip_html(html: str) -> str:
    """The text of an HTML document, whitespace runs collapsed to one space."""
    parser = _TextOnly()
    with contextlib.suppress(Exception):  # a broken document yields what was read so far
        parser.feed(html)
        parser.close()
    return re.sub(r"\s+", " ", "".join(parser.parts)).strip()


# --------------------------------------------------------------------------- attachments


def _attachments(message: Message) -> tuple[Attachment, ...]:
    found = []
    for part in _leaves(message):
        try:
            filename = part.get_filename()
            if part.get_content_disposition() == "attachment" or filename:
                found.append(Attachment(str(filename or ""), part.get_content_type().lower()))
        except Exception:  # a broken part is skipped
            continue
    return tuple(found)
