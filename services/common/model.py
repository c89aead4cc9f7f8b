"""The message model shared by every service: envelopes, TLS modes, decisions, replies.

Everything here is a plain frozen value with a JSON form (``to_json``/``from_json``), because it
crosses Celery queues and lives in Redis. No I/O here. ``from_json`` raises ``ValueError`` (or
``KeyError``) on a malformed document; callers treat that as a bug, not as mail to deliver.
"""

from __future__ import annotations

import enum
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from services.common.protocol import REQUIRETLS
from services.common.values import HostPort, Route, parse_hostport


class TlsMode(enum.IntEnum):
    """The TLS requirement for a delivery; ordered, ``max()`` gives the stricter one.

    - ``NONE``: never try STARTTLS.
    - ``OPPORTUNISTIC``: TLS when offered, certificate not checked, clear when not possible.
    - ``ENFORCED``: TLS required, certificate not checked; never clear (Postfix ``encrypt``).
    - ``VERIFIED``: as ENFORCED, and the chain and host name must verify (Postfix ``verify``).
    - ``DANE``: as ENFORCED, and the certificate must match the host's DNSSEC-validated TLSA
      records (RFC 7672; Postfix ``dane`` with usable TLSA). Never a rule's or a decision's mode:
      the deliver worker gives it to one MX host at delivery time (services/deliver/dane.py), so
      :meth:`parse` refuses it. Above VERIFIED: where DANE applies it meets a ``verified``
      requirement (RFC 8461 §2: DANE takes precedence over MTA-STS).
    """

    NONE = 0
    OPPORTUNISTIC = 1
    ENFORCED = 2
    VERIFIED = 3
    DANE = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    # Predicates, as Postfix's tls.h asks TLS_REQUIRED()/TLS_MUST_PKIX()/TLS_MUST_MATCH(): callers
    # ask these questions instead of comparing levels, so a new mode (DANE) changes this class only.
    @property
    def tries_tls(self) -> bool:
        """STARTTLS is attempted when the server offers it."""
        return self is not TlsMode.NONE

    @property
    def requires_encryption(self) -> bool:
        """The message is never sent in clear: no TLS means defer, never fall back."""
        return self >= TlsMode.ENFORCED

    @property
    def must_verify_chain(self) -> bool:
        """The server's certificate chain must verify against the trusted CAs (PKIX)."""
        return self is TlsMode.VERIFIED

    @property
    def must_match_name(self) -> bool:
        """The server's certificate must name the host (or an allowed MTA-STS/MX name)."""
        return self is TlsMode.VERIFIED

    @property
    def must_match_tlsa(self) -> bool:
        """The server's certificate must match the host's TLSA records (DANE, RFC 7672 §3)."""
        return self is TlsMode.DANE

    @property
    def authenticates(self) -> bool:
        """The server is authenticated (PKIX or DANE), not only encrypted."""
        return self.must_verify_chain or self.must_match_tlsa

    @property
    def accepts_legacy_tls(self) -> bool:
        """Any TLS beats clear: TLS 1.0 and old ciphers are accepted (Postfix may/encrypt)."""
        return self.tries_tls and not self.authenticates

    def at_least(self, floor: TlsMode) -> TlsMode:
        """The stricter of this mode and ``floor``."""
        return max(self, floor)

    @classmethod
    def parse(cls, text: str) -> TlsMode:
        """A rule's or decision's mode by name; ``dane`` is not one (see the class)."""
        mode = cls.__members__.get(text.strip().upper())
        if mode is None or mode is TlsMode.DANE:
            names = ", ".join(m.label for m in cls if m is not TlsMode.DANE)
            raise ValueError(f"unknown TLS mode {text!r}; expected one of {names}")
        return mode


def new_message_id() -> str:
    """A queue id: 12 hex digits of milliseconds then 16 random hex digits (sortable by age).

    64 random bits per millisecond: at 10 000 messages a second two ids of one millisecond are
    equal about once in 10^10 years. The spool checks anyway (``spool.IdTaken``): a message is
    never stored over another. Ids of earlier versions (8 random digits) are still recognised.
    """
    return f"{int(time.time() * 1000):012X}{secrets.token_hex(8).upper()}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MESSAGE_ID = re.compile(r"[0-9A-F]{12}(?:[0-9A-F]{16}|[0-9A-F]{8})")


def is_message_id(text: str) -> bool:
    return bool(_MESSAGE_ID.fullmatch(text))


_TLS_REQUIRED_NO = re.compile(rb"^TLS-Required:[ \t]*No[ \t]*\r?$", re.I | re.M)


def has_tls_required_no(raw: bytes) -> bool:
    """Whether the header section of ``raw`` has ``TLS-Required: No`` (RFC 8689 §5)."""
    end = raw.find(b"\r\n\r\n")
    return bool(_TLS_REQUIRED_NO.search(raw if end < 0 else raw[: end + 2]))


def domain_of(address: str) -> str:
    """The lower-cased domain of ``local@domain`` (``""`` for the null path)."""
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


@dataclass(frozen=True)
class InboundTls:
    """What TLS the inbound SMTP session used (None fields when it was in clear)."""

    version: str | None = None
    cipher: str | None = None

    @property
    def used(self) -> bool:
        return self.version is not None


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of an accepted message, as stored next to its body."""

    id: str
    sender: str  # "" is the null reverse-path
    recipients: tuple[str, ...]
    mail_options: tuple[str, ...] = ()  # e.g. BODY=8BITMIME, SMTPUTF8
    client_address: str = ""
    client_helo: str = ""
    inbound_tls: InboundTls = field(default_factory=InboundTls)
    received_at: float = 0.0
    size: int = 0
    # RFC 8689 §5: the message carries "TLS-Required: No" (noted at ingest, so policy and deliver
    # know it without reading the body). It relaxes only MTA-STS/DANE, never rules or platform.
    tls_required_no: bool = False
    # How it came in (services/ingest): the listener ("listen", "submission" or "relay"), the
    # sending tenant (authenticated, or by client network; None otherwise), the AUTH login, and
    # the verified client certificate's subject CN (else first SAN) on the relay listener.
    listener: str = "listen"
    tenant: str | None = None
    auth_user: str | None = None
    client_cert: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "mail_options": list(self.mail_options),
            "client_address": self.client_address,
            "client_helo": self.client_helo,
            "inbound_tls": {"version": self.inbound_tls.version, "cipher": self.inbound_tls.cipher},
            "received_at": self.received_at,
            "size": self.size,
            "tls_required_no": self.tls_required_no,
            "listener": self.listener,
            "tenant": self.tenant,
            "auth_user": self.auth_user,
            "client_cert": self.client_cert,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Envelope:
        tls = doc.get("inbound_tls") or {}
        return cls(
            id=doc["id"],
            sender=doc["sender"],
            recipients=tuple(doc["recipients"]),
            mail_options=tuple(doc.get("mail_options", ())),
            client_address=doc.get("client_address", ""),
            client_helo=doc.get("client_helo", ""),
            inbound_tls=InboundTls(tls.get("version"), tls.get("cipher")),
            received_at=float(doc.get("received_at", 0.0)),
            size=int(doc.get("size", 0)),
            tls_required_no=bool(doc.get("tls_required_no", False)),
            listener=doc.get("listener", "listen"),
            tenant=doc.get("tenant"),
            auth_user=doc.get("auth_user"),
            client_cert=doc.get("client_cert"),
        )

    @property
    def requiretls(self) -> bool:
        """MAIL FROM carried REQUIRETLS (RFC 8689 §4.1)."""
        return REQUIRETLS in (option.upper() for option in self.mail_options)

    @property
    def relaxes_destination_tls(self) -> bool:
        """``TLS-Required: No`` relaxes destination policies (MTA-STS, DANE) — unless the message
        was sent with REQUIRETLS: then the header is ignored (RFC 8689 §5)."""
        return self.tls_required_no and not self.requiretls

    def recipients_by_domain(self) -> dict[str, tuple[str, ...]]:
        """Recipients grouped by destination domain, in first-seen order."""
        groups: dict[str, list[str]] = {}
        for rcpt in self.recipients:
            groups.setdefault(domain_of(rcpt), []).append(rcpt)
        return {d: tuple(r) for d, r in groups.items()}


@dataclass(frozen=True)
class Decision:
    """How to deliver to one destination domain: the policy service's output."""

    domain: str
    tls: TlsMode = TlsMode.OPPORTUNISTIC
    circumstances: tuple[str, ...] = ("default",)
    # The route that replaces routes/MX (a rule's, or a tenant's platform hop): its address and
    # the certificate name expected there; :attr:`override_route` gives both as one Route. Two
    # fields because the JSON document has two ("route" as "host:port" text, "route_tls_name").
    route: HostPort | None = None
    route_tls_name: str | None = None
    tls_profile: str | None = None  # "platform": verify with the platform CA, present our cert
    reasons: tuple[str, ...] = ()  # why each circumstance matched (for traces / explain)
    # Only MX hosts matching these patterns may be used (RFC 8461 §4.1); () = any. Set at
    # delivery time by an MTA-STS policy in mode enforce (services/deliver/mtasts.py).
    mx_patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        route: object = self.route
        if isinstance(route, str):  # the document's "host:port" text (from_json, callers)
            object.__setattr__(self, "route", parse_hostport(route))

    @property
    def override_route(self) -> Route | None:
        """The route that replaces routes/MX for this domain; None when routes/MX apply."""
        return Route(self.route, self.route_tls_name) if self.route is not None else None

    def routed(self, route: Route, tls_profile: str | None = None) -> Decision:
        """This decision sent along ``route`` (a rule's or a platform hop's)."""
        profile = tls_profile if tls_profile is not None else self.tls_profile
        return replace(
            self, route=route.address, route_tls_name=route.tls_name, tls_profile=profile
        )

    def to_json(self) -> dict[str, Any]:
        doc = {
            "domain": self.domain,
            "tls": self.tls.label,
            "circumstances": list(self.circumstances),
            "route": str(self.route) if self.route is not None else None,
            "route_tls_name": self.route_tls_name,
            "tls_profile": self.tls_profile,
            "reasons": list(self.reasons),
        }
        if self.mx_patterns:
            doc["mx_patterns"] = list(self.mx_patterns)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Decision:
        return cls(
            domain=doc["domain"],
            tls=TlsMode.parse(doc["tls"]),
            circumstances=tuple(doc.get("circumstances", ("default",))),
            route=parse_hostport(doc["route"]) if doc.get("route") else None,
            route_tls_name=doc.get("route_tls_name"),
            tls_profile=doc.get("tls_profile"),
            reasons=tuple(doc.get("reasons", ())),
            mx_patterns=tuple(doc.get("mx_patterns", ())),
        )


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: code, enhanced status (RFC 3463, may be empty) and text."""

    code: int
    status: str = ""
    text: str = ""

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        parts = [str(self.code), self.status, self.text]
        return " ".join(p for p in parts if p)

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Split an enhanced status code off the front of a reply's text, when present. The
        text is a remote server's: a multi-line reply is folded into one line and control
        characters become spaces, so it cannot forge lines wherever it is written."""
        message = " ".join(_CONTROL.sub(" ", message).split())
        m = re.match(r"^([245]\.\d{1,3}\.\d{1,3})\s*(.*)$", message, re.S)
        if m:
            return cls(code, m.group(1), m.group(2).strip())
        return cls(code, "", message.strip())
