"""What certificate verification would say about a server's leaf certificate, from the leaf alone.

Opportunistic and enforced sessions do not verify the server's certificate. To answer "what
would break had this destination been ``verified``?" (``tlsrelay posture``) the deliver worker
asks :func:`verdict` once per new unverified TLS session: the leaf (DER, as the unverified
handshake gave it) is checked against the same CA store a ``verified`` delivery uses
(``delivery.ca_file``, else the system bundle) with ``cryptography``'s X.509 verification, for
the name a ``verified`` delivery would check (the MX host; a route's ``tls_name``):

=================  ===========================================================================
verdict            when
=================  ===========================================================================
``ok``             issued straight by a trusted root, valid now, names the host: verifies
``self_signed``    issuer = subject, signed by its own key, and not itself a trust anchor
``expired``        outside its validity period (whoever issued it)
``wrong_name``     no subject alternative name matches the host (RFC 6125; ``*`` as the whole
                   leftmost label only)
``unknown_issuer`` its issuer's name is a trusted root's, but that root's key did not sign it
``unknown``        undecidable from the leaf: issued by a CA that is not a trusted root (an
                   intermediate would be needed, and Python 3.11 does not expose the chain the
                   server sent), or the library's policy rejects what OpenSSL might accept
=================  ===========================================================================

Self-signed, expired and wrong name are checked first: they fail whatever the chain. The verdict
is a prediction; ``tlsrelay check`` confirms it with a real verified handshake.

Verdicts are cached per (leaf, name, CA file, hour) in the process, judged at the hour's start; the
CA store is loaded once per process and CA file. Failure: :func:`verdict` never raises — anything
unexpected (an unreadable CA file, a certificate the library cannot parse) is ``unknown`` — so a
delivery never fails because of it.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import ssl
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.x509 import verification

log = logging.getLogger("tlsrelay.deliver")

OK: Final = "ok"
SELF_SIGNED: Final = "self_signed"
EXPIRED: Final = "expired"
WRONG_NAME: Final = "wrong_name"
UNKNOWN_ISSUER: Final = "unknown_issuer"
UNKNOWN: Final = "unknown"
VERDICTS: Final = (OK, SELF_SIGNED, EXPIRED, WRONG_NAME, UNKNOWN_ISSUER, UNKNOWN)
FAILURES: Final = frozenset({SELF_SIGNED, EXPIRED, WRONG_NAME, UNKNOWN_ISSUER})


@dataclass(frozen=True)
class Roots:
    """A trust store: the roots by subject, and cryptography's ``Store`` of them."""

    by_subject: dict[bytes, tuple[x509.Certificate, ...]]
    store: verification.Store | None


def verdict(der: bytes, name: str, ca_file: str | None, now: float | None = None) -> str:
    """The verdict for leaf ``der`` at host ``name`` against ``ca_file`` (None: system CAs)."""
    now = time.time() if now is None else now
    try:
        return _cached(der, name.lower().rstrip("."), ca_file, int(now // 3600))
    except Exception:  # never into the send path
        log.debug("leaf check of %s failed", name, exc_info=True)
        return UNKNOWN


@functools.lru_cache(maxsize=1024)
def _cached(der: bytes, name: str, ca_file: str | None, hour: int) -> str:
    """Judged at the start of the hour: a certificate that expires within it is called expired
    an hour late at most."""
    return check(x509.load_der_x509_certificate(der), name, roots(ca_file), hour * 3600.0)


def check(cert: x509.Certificate, name: str, trusted: Roots, now: float) -> str:
    """The verdict (pure given the store): self-signed, expired, name, then the issuer."""
    anchors = trusted.by_subject.get(cert.issuer.public_bytes(), ())
    if cert.issuer == cert.subject and cert not in anchors and _signed_by(cert, cert):
        return SELF_SIGNED
    if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
        return EXPIRED
    if not names_host(cert, name):
        return WRONG_NAME
    if not anchors:
        return UNKNOWN  # an intermediate would be needed (or the issuer is unknown)
    if not any(_signed_by(cert, root) for root in anchors):
        return UNKNOWN_ISSUER
    return OK if _verifies(cert, name, trusted, now) else UNKNOWN


def names_host(cert: x509.Certificate, name: str) -> bool:
    """Whether a subject alternative name of ``cert`` names ``name`` (RFC 6125 §6.4: DNS names,
    ``*`` only as the whole leftmost label; an IP literal against IP SANs)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None:
        return address in sans.get_values_for_type(x509.IPAddress)
    for pattern in (n.lower().rstrip(".") for n in sans.get_values_for_type(x509.DNSName)):
        if pattern == name:
            return True
        label, _, rest = name.partition(".")
        if pattern.startswith("*.") and label and rest == pattern[2:]:
            return True
    return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError (names differ), TypeError (key type)
        return False
    return True


def _verifies(cert: x509.Certificate, name: str, trusted: Roots, now: float) -> bool:
    if trusted.store is None:
        return False
    try:
        subject: verification.Subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    # OpenSSL, which a verified delivery uses, does not hold a leaf to the Web PKI's extension
    # rules (a critical subjectAltName, say): neither does this, beyond requiring the SAN.
    lenient = verification.ExtensionPolicy.permit_all().require_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
    builder = (
        verification.PolicyBuilder()
        .store(trusted.store)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=lenient
        )
    )
    verifier = builder.time(datetime.fromtimestamp(now, UTC)).build_server_verifier(subject)
    try:
        verifier.verify(cert, [])
    except verification.VerificationError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def roots(ca_file: str | None) -> Roots:
    """The trust store of ``ca_file``, else the system bundle (OpenSSL's default CA file)."""
    path = ca_file or _system_bundle()
    certs = _load_pems(Path(path).read_bytes()) if path else []
    by_subject: dict[bytes, tuple[x509.Certificate, ...]] = {}
    for cert in certs:
        key = cert.subject.public_bytes()
        by_subject[key] = (*by_subject.get(key, ()), cert)
    return Roots(by_subject, verification.Store(certs) if certs else None)


def _load_pems(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle the library can read; one it cannot (or warns about:
    an old root with a negative serial number) is left out, not the whole bundle."""
    end = b"-----END CERTIFICATE-----"
    certs = []
    for block in data.split(end)[:-1]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                certs.append(x509.load_pem_x509_certificate(block + end))
            except ValueError:
                continue
    return certs


def _system_bundle() -> str | None:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return candidate
    return None
