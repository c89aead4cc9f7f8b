"""Certificates for the test peers: the shared test CA and self-signed certificates.

:func:`default_ca` is the process-wide ``trustme.CA`` that issues the certificates of the sinks
(and that tests write out as ``ca.pem`` for the relay to trust). :func:`selfsigned_cert_pem`
makes a certificate that is *not* from that CA, through the relay's own maker
(:func:`services.ingest.tlscert.selfsigned_cert_pem`); names that are IP literals become IP
SANs. :func:`server_context` builds a TLS server context from either (a legacy one, TLS 1.0 or
1.1 at most, when asked; an expired one, when asked).

Failure: ``ssl.SSLError`` from an unusable certificate, ``ValueError`` for no names.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import ssl
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import trustme

from services.ingest import tlscert

__all__ = ["default_ca", "selfsigned_cert_pem", "server_context"]


@functools.cache
def default_ca() -> trustme.CA:
    """Process-wide test CA shared by all sinks unless one is passed explicitly."""
    return trustme.CA(organization_name="tlsrelay test CA")


def selfsigned_cert_pem(names: Iterable[str]) -> tuple[bytes, bytes]:
    """A self-signed (not CA-issued) certificate for *names*: ``(cert_pem, key_pem)``."""
    return tlscert.selfsigned_cert_pem([_san(name) for name in names])


def _san(name: str) -> str | tlscert.IpAddress:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return name


def server_context(
    names: Iterable[str],
    issuer: trustme.CA | None,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
    expired: bool = False,
) -> ssl.SSLContext:
    """A server context for *names*: issued by *issuer*, or self-signed when it is None;
    ``expired``: the issued certificate's validity ended a month ago."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if max_version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        _legacy(ctx, min_version or ssl.TLSVersion.TLSv1, max_version)
    else:
        if min_version is not None:
            ctx.minimum_version = min_version
        if max_version is not None:
            ctx.maximum_version = max_version
    if issuer is None:
        _load_pem(ctx, *selfsigned_cert_pem(names))
    elif expired:
        ended = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        start = ended - datetime.timedelta(days=90)
        issuer.issue_cert(*names, not_before=start, not_after=ended).configure_cert(ctx)
    else:
        issuer.issue_cert(*names).configure_cert(ctx)
    return ctx


def _legacy(ctx: ssl.SSLContext, low: ssl.TLSVersion, high: ssl.TLSVersion) -> None:
    """A legacy peer (TLS 1.0/1.1, RFC 8996) is meant: OpenSSL 3 speaks those only at security
    level 0, and Python warns on their constants, silenced for these two lines."""
    ctx.set_ciphers("@SECLEVEL=0:ALL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"ssl\.TLSVersion\.TLSv1", DeprecationWarning)
        ctx.minimum_version, ctx.maximum_version = low, high


def _load_pem(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """load_cert_chain() reads files: hand it both PEMs through a private temporary file."""
    with tempfile.TemporaryDirectory(prefix="sink-cert-") as tmp:
        path = Path(tmp) / "pair.pem"
        path.write_bytes(key_pem + cert_pem)
        ctx.load_cert_chain(path)
