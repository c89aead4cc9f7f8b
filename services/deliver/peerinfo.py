"""What a session's connection says about its peer (services/deliver/session.py): our address,
the TLS version and cipher, the server's certificate and what it is worth — the DANE match
(:mod:`services.deliver.dane`), the leaf checks of MTA-STS testing mode
(:mod:`services.deliver.mtasts`) and of the TLS posture report (:mod:`services.deliver.leafcheck`)
— and the failures a STARTTLS may end in (a certificate verification error, bytes sent before
the handshake). Read-only: nothing here talks to the peer or raises for what it sent.
"""

from __future__ import annotations

import ssl
import time

import aiosmtplib

from services.deliver import dane, leafcheck, mtasts
from services.deliver.attempt import Attempt, TlsSettings


def dane_match(smtp: aiosmtplib.SMTP, result: Attempt, settings: TlsSettings) -> bool:
    """The server's certificate against the host's TLSA records (noted in ``result.dane``)."""
    ssl_object = smtp.get_transport_info("ssl_object")
    chain = dane.peer_chain(ssl_object) if isinstance(ssl_object, ssl.SSLObject) else []
    found = dane.check(chain, settings.tlsa, settings.tlsa_names, time.time())
    result.dane = found.text
    return found.ok


def buffered_before_tls(smtp: aiosmtplib.SMTP) -> bool:
    """Unparsed bytes left in aiosmtplib's reply buffer (its ``_buffer``, private: absent or
    empty when the library discards them itself, as 5.1 does)."""
    return bool(getattr(smtp.protocol, "_buffer", b""))


def verify_error(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def local_address(smtp: aiosmtplib.SMTP) -> str | None:
    sockname = smtp.get_transport_info("sockname")
    return str(sockname[0]) if isinstance(sockname, tuple) and sockname else None


def leaf_problem(smtp: aiosmtplib.SMTP, name: str) -> int | None:
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return mtasts.leaf_problem(der, name, time.time()) if der else None


def leaf_verdict(smtp: aiosmtplib.SMTP, name: str, ca_file: str | None) -> str | None:
    der = peer_der(smtp)
    return leafcheck.verdict(der, name, ca_file) if der else None


def peer_der(smtp: aiosmtplib.SMTP) -> bytes | None:
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    return ssl_object.getpeercert(binary_form=True)


def tls_info(smtp: aiosmtplib.SMTP) -> tuple[str | None, str | None]:
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None, None
    cipher = ssl_object.cipher()
    return ssl_object.version(), cipher[0] if cipher else None
