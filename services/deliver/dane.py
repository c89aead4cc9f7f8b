"""DANE for SMTP (RFC 7672): TLSA records of DNSSEC-validated MX hosts, and matching a server's
certificate against them.

Effective only with ``delivery.dnssec: trust_resolver`` and ``delivery.dane: on``, for MX
deliveries (never routes, tenant mailboxes or the inter-region relay). Pieces, each usable alone
(``tlsrelay check``/``posture`` call :func:`domain_status` and :func:`check`):

- :class:`Tlsa` (RFC 6698 §2): one record; :attr:`Tlsa.usable` for SMTP (RFC 7672 §3.1): usage
  DANE-TA(2) or DANE-EE(3), selector 0/1, matching type 0/1/2 — PKIX-TA(0)/PKIX-EE(1) are not.
- :func:`host_status` (RFC 7672 §2.2): the ``_<port>._tcp.<host>`` TLSA RRset of one MX host
  whose address records were validated: :data:`USABLE` (validated, some usable record: TLS is
  mandatory and the certificate must match), :data:`UNUSABLE` (validated, no usable record:
  TLS mandatory, not authenticated), :data:`INSECURE` (no records, or not validated: as without
  DANE), :data:`LOOKUP_ERROR` (SERVFAIL — what a validating resolver answers for bogus data —,
  timeout: that host is not used for this attempt). :data:`NOT_APPLICABLE`: the MX RRset or the
  host's addresses were not validated, so no TLSA lookup is made.
- :func:`domain_status`: MX resolution (:func:`services.deliver.mx.resolve`) and every host's
  status, for one destination domain.
- :func:`check` (RFC 7672 §3.1, RFC 7671 §5): a server's certificate chain (DER, leaf first)
  against the records. DANE-EE(3): the leaf alone, no name or date checks. DANE-TA(2): a
  certificate of the chain (or, for a ``2 0 0`` record, the record's own certificate) matches the
  record and the leaf chains to it — checked by ``cryptography``'s path validation with that
  certificate as the only trust anchor, dates and the name (the MX host or the destination
  domain) included. A DANE-TA record that cannot be checked (the chain is not available and the
  record does not carry the full certificate) is never a match: :class:`Match` says why.
- :func:`peer_chain`: the server's chain from a TLS session. Python 3.11 has no public API for it
  (3.13 adds ``get_unverified_chain``); the private ``_sslobj.get_unverified_chain()`` of 3.10+
  is read here and nowhere else (``tests/test_dane.py`` fails loudly when it goes); without it
  only the leaf is returned, and DANE-TA then works for ``2 0 0`` records only.
- :class:`DaneRound`: what DANE meant for a round (trace, TLSRPT, metrics); the destination
  policy that puts DANE over MTA-STS (RFC 8461 §2) host by host is
  :class:`services.deliver.destination.Dane`, built from :func:`host_mode` and :func:`raised`.

Failure: nothing here raises for DNS trouble (a failed lookup is :data:`LOOKUP_ERROR`, which
defers that host, never downgrades it); :func:`check` never raises for a malformed certificate or
record (no match, and why). No path gives a host DANE applies to anything but mandatory TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import verification

from services.common.deliveryconfig import DeliveryConfig
from services.common.model import Decision, TlsMode
from services.deliver import mx

PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3  # RFC 6698 §2.1.1 certificate usages
USABLE, UNUSABLE, INSECURE, LOOKUP_ERROR, NOT_APPLICABLE = (
    "usable", "unusable", "insecure", "lookup_error", "not_applicable",
)  # fmt: skip
CIRCUMSTANCE: Final = "dane"
_DIGESTS = {1: hashlib.sha256, 2: hashlib.sha512}  # RFC 6698 §2.1.3 matching types
_ENCODING_DER: Final = 2  # _ssl.ENCODING_DER (private module: its value, checked by the tests)


# --------------------------------------------------------------------------- records (pure)


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1: DANE-TA/DANE-EE, full certificate or SPKI, exact/SHA-256/SHA-512."""
        return (
            self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) and self.mtype in (0, 1, 2)
        )

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @classmethod
    def parse(cls, text: str) -> Tlsa:
        """From presentation format (``3 1 1 <hex>``); ``ValueError`` when it is not one."""
        parts = text.split()
        if len(parts) < 4 or not all(p.isdigit() for p in parts[:3]):
            raise ValueError(f"not a TLSA record: {text[:80]!r}")
        return cls(int(parts[0]), int(parts[1]), int(parts[2]), bytes.fromhex("".join(parts[3:])))

    def matches(self, cert: x509.Certificate, der: bytes) -> bool:
        """Whether ``cert`` (``der``: its DER) is what this record names (selector, matching)."""
        if self.selector == 0:
            content = der
        else:
            content = cert.public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo
            )
        digest = _DIGESTS.get(self.mtype)
        return (digest(content).digest() if digest else content) == self.data


@dataclass(frozen=True)
class Match:
    """What :func:`check` found: the record that matched (None: none), and in words."""

    record: Tlsa | None
    text: str

    @property
    def ok(self) -> bool:
        return self.record is not None


def check(
    chain: Sequence[bytes], records: Sequence[Tlsa | str], names: Sequence[str], now: float
) -> Match:
    """The server chain (DER, leaf first) against TLSA ``records``; ``names``: what a DANE-TA
    leaf may be issued to (RFC 7672 §3.2.3: the MX host, the destination domain). Unusable
    records are skipped; a record that cannot be checked never matches."""
    tlsa = [r if isinstance(r, Tlsa) else Tlsa.parse(r) for r in records]
    usable = [r for r in tlsa if r.usable]
    if not chain:
        return Match(None, "the server sent no certificate")
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return Match(None, f"the server's certificate cannot be read: {exc}")
    notes: list[str] = []
    for record in usable:
        if record.usage == DANE_EE:
            if _safe_match(record, certs[0], chain[0]):
                return Match(record, f"the certificate matches {record} (DANE-EE)")
            continue
        found, note = _dane_ta(record, certs, chain, names, now)
        if found:
            return Match(record, note)
        if note:
            notes.append(note)
    why = "; ".join(notes) if notes else "the certificate matches none of them"
    return Match(None, f"no usable TLSA record matched: {why}")


def _safe_match(record: Tlsa, cert: x509.Certificate, der: bytes) -> bool:
    try:
        return record.matches(cert, der)
    except (ValueError, TypeError):  # an unsupported or broken public key
        return False


def _dane_ta(
    record: Tlsa,
    certs: list[x509.Certificate],
    chain: Sequence[bytes],
    names: Sequence[str],
    now: float,
) -> tuple[bool, str]:
    """One DANE-TA(2) record (RFC 7671 §5.2.2): its trust anchor, then a path to it."""
    anchor_at = next(
        (i for i in range(1, len(certs)) if _safe_match(record, certs[i], chain[i])), None
    )
    if anchor_at is not None:
        anchor, between = certs[anchor_at], certs[1:anchor_at]
    elif record.selector == 0 and record.mtype == 0:  # 2 0 0: the record is the certificate
        try:
            anchor, between = x509.load_der_x509_certificate(record.data), certs[1:]
        except ValueError:
            return False, f"{_short(record)}: its certificate cannot be read"
    elif len(certs) == 1:
        return False, f"{_short(record)}: cannot be checked (the server's chain is not known)"
    else:
        return False, ""  # no certificate of the chain is this trust anchor
    return _path(record, anchor, certs[0], between, names, now)


def _path(
    record: Tlsa,
    anchor: x509.Certificate,
    leaf: x509.Certificate,
    between: list[x509.Certificate],
    names: Sequence[str],
    now: float,
) -> tuple[bool, str]:
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    last = ""
    for name in dict.fromkeys(n.lower().rstrip(".") for n in names if n):
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store([anchor]))
            .time(when)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        )
        try:
            builder.build_server_verifier(x509.DNSName(name)).verify(leaf, between)
        except (verification.VerificationError, ValueError) as exc:
            last = f"{_short(record)}: the chain to its trust anchor fails for {name}: {exc}"
            continue
        return True, f"the chain leads to the trust anchor of {record} (DANE-TA), name {name}"
    return False, last


# DANE-TA path validation: the Web PKI profile for CA certificates (basic constraints, key usage),
# but for the server's own certificate only a subjectAltName (any criticality, the name is checked
# against it) — private CAs behind DANE-TA are not bound by the CA/Browser Forum's leaf rules.
_CA_POLICY = verification.ExtensionPolicy.webpki_defaults_ca()
_EE_POLICY = verification.ExtensionPolicy.permit_all().require_present(
    x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
)


def _short(record: Tlsa) -> str:
    text = str(record)
    return text if len(text) <= 40 else text[:37] + "..."


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The server's certificates (DER, leaf first) of a completed handshake; [] when none.

    Reads the private ``_sslobj.get_unverified_chain()`` (CPython 3.10+; public in 3.13) — in
    this one place; without it, only the leaf."""
    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        try:
            chain = getter() or []
            return [c.public_bytes(_ENCODING_DER) for c in chain]
        except (ssl.SSLError, ValueError, TypeError):
            pass
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


# --------------------------------------------------------------------------- DNS


@dataclass(frozen=True)
class HostStatus:
    """What DANE means at one MX host (RFC 7672 §2.2)."""

    host: str
    port: int
    status: str  # USABLE | UNUSABLE | INSECURE | LOOKUP_ERROR | NOT_APPLICABLE
    records: tuple[Tlsa, ...] = ()
    error: str = ""

    @property
    def applies(self) -> bool:
        """TLS is mandatory at this host (usable or unusable validated TLSA records)."""
        return self.status in (USABLE, UNUSABLE)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"host": self.host, "status": self.status}
        doc["tlsa"] = [str(r) for r in self.records]
        if self.error:
            doc["error"] = self.error
        return doc


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host.lower().rstrip('.')}"


async def host_status(resolver: dns.asyncresolver.Resolver, host: str, port: int) -> HostStatus:
    """The TLSA RRset of ``host``:``port`` looked up and judged; never raises for DNS trouble.
    AD counts only when the resolver asks for DNSSEC (:func:`services.deliver.mx.want_dnssec`)."""
    name = tlsa_name(host, port)
    try:
        answer = await resolver.resolve(name, dns.rdatatype.TLSA, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return HostStatus(host, port, INSECURE)  # no records: as without DANE (§2.2)
    except dns.exception.DNSException as exc:
        return HostStatus(host, port, LOOKUP_ERROR, error=f"DNS lookup of {name}/TLSA: {exc}")
    if not mx.is_secure(resolver, answer.response):
        return HostStatus(host, port, INSECURE)  # unsigned: as without DANE
    records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer)
    return HostStatus(host, port, USABLE if any(r.usable for r in records) else UNUSABLE, records)


async def statuses(
    resolver: dns.asyncresolver.Resolver, hosts: Sequence[mx.Destination]
) -> list[HostStatus]:
    """Each host's status, looked up concurrently: only hosts of a validated MX RRset whose own
    addresses were validated are looked up (RFC 7672 §2.2.2); the others are NOT_APPLICABLE."""

    async def one(host: mx.Destination) -> HostStatus:
        if host.source == "route" or not (host.mx_secure and host.address_secure):
            return HostStatus(host.host, host.port, NOT_APPLICABLE)
        return await host_status(resolver, host.host, host.port)

    return list(await asyncio.gather(*(one(h) for h in hosts)))


@dataclass(frozen=True)
class DomainStatus:
    """DANE at one destination domain: whether its MX RRset was validated, and per host."""

    domain: str
    mx_secure: bool
    hosts: tuple[HostStatus, ...]
    error: str = ""  # MX resolution failed


def resolver_for(config: DeliveryConfig) -> dns.asyncresolver.Resolver:
    """The resolver the deliver worker uses: ``delivery.dns_servers``, asking for DNSSEC when
    ``delivery.dnssec`` is ``trust_resolver`` (with ``none`` every status is INSECURE or
    NOT_APPLICABLE: the AD bit is not believed)."""
    resolver = mx.make_resolver(config.dns_servers, timeout=config.connect_timeout)
    if config.dnssec == "trust_resolver":
        mx.want_dnssec(resolver)
    return resolver


async def domain_status(
    domain: str, config: DeliveryConfig, resolver: dns.asyncresolver.Resolver | None = None
) -> DomainStatus:
    """MX resolution and every MX host's TLSA status, as the deliver worker would see them now
    (``resolver`` default: :func:`resolver_for`). Never raises for DNS trouble (``error`` says
    what failed)."""
    resolver = resolver or resolver_for(config)
    try:
        hosts = await mx.resolve(domain, config, resolver, route=None)
    except mx.DnsError as exc:
        return DomainStatus(domain, False, (), str(exc))
    found = await statuses(resolver, hosts)  # a domain in delivery.routes: not applicable
    return DomainStatus(domain, any(h.mx_secure for h in hosts), tuple(found))


# --------------------------------------------------------------------------- the round


@dataclass
class DaneRound:
    """What DANE meant for one delivery round (trace, TLSRPT, metrics)."""

    applies: bool  # some host of the domain has validated TLSA records (usable or not)
    why: str = ""  # when it does not apply: why
    hosts: list[HostStatus] = field(default_factory=list)

    def status_of(self, host: str) -> HostStatus | None:
        return next((h for h in self.hosts if h.host == host), None)

    def trace_fields(self, results: Sequence[tuple[str, str, str | None]]) -> dict[str, Any]:
        """``results``: (host, address, what the certificate check said) per attempt."""
        return {
            "applies": self.applies,
            "why": self.why or None,
            "hosts": [h.to_json() for h in self.hosts],
            "checks": [
                {"host": host, "address": address, "result": text}
                for host, address, text in results
                if text
            ],
        }


# --------------------------------------------------------------------------- the policy


def host_mode(status: HostStatus, tls: TlsMode) -> TlsMode:
    """The requirement at a host where DANE applies: usable records → DANE (meets and raises
    ``enforced``/``verified``, RFC 8461 §2); only unusable ones → at least ``enforced``."""
    if status.status == USABLE:
        return TlsMode.DANE
    return tls.at_least(TlsMode.ENFORCED)


def raised(decision: Decision, used: Sequence[HostStatus]) -> Decision:
    """The decision as DANE leaves it: circumstance ``dane``, at least ``enforced``."""
    if not used:
        return decision
    hosts = ", ".join(f"{h.host} ({h.status} TLSA)" for h in used)
    why = f"dane: {hosts}: TLS required (RFC 7672)"
    names = decision.circumstances if decision.circumstances != ("default",) else ()
    return replace(
        decision,
        tls=decision.tls.at_least(TlsMode.ENFORCED),
        circumstances=(*names, CIRCUMSTANCE),
        reasons=(*decision.reasons, why),
    )
