"""The server certificates for inbound STARTTLS.

Contract: :func:`server_context` returns the ``ssl.SSLContext`` the ``listen`` and
``submission`` listeners offer with STARTTLS. With ``ingest.tls_cert``/``ingest.tls_key``
configured it loads that pair. Without them it uses a self-signed certificate (CN and SAN =
``config.hostname``) that :func:`ensure_self_signed` generates once into
``<data_dir>/ingest-selfsigned.pem`` and ``ingest-selfsigned.key`` (key mode 0600, ``data_dir``
created when missing) and reuses on every later start, as long as both files exist, still name
the host name and have more than 30 days left (``RENEW_BEFORE``); otherwise it generates a new
pair, valid for one year (``VALIDITY``). Each listener's context carries its TLS profile
(``ingest.tls_profiles``, :mod:`services.ingest.tlsprofile`).

Sending MTAs do not verify certificates when they upgrade opportunistically (RFC 7435), so a
self-signed certificate still gives encryption; a configured, CA-issued pair gives more.

:func:`platform_context` is the ``relay`` listener's (inter-region) context: this region's
certificate ``platform_tls.cert``/``key``, and a client certificate is *required* and verified
against ``platform_tls.ca`` (``ssl.CERT_REQUIRED``): a client without one, or with one from
another CA, fails the handshake.

:func:`selfsigned_cert_pem` is the one self-signed certificate maker of the project (ingest, the
test sinks and the benchmark sink use it): RSA-2048, SHA-256, valid from five minutes ago for a year
(or ``valid_for``), CN = the first name when it is a host name of at most 64 characters, one SAN per
name (a ``str`` is a DNS name, an ``ipaddress`` object an IP address), not a CA.

Failure: an unreadable, malformed or mismatched pair (or CA file) raises :class:`ConfigError`
naming the files, before anything listens; so does a relay listener without ``platform_tls``.
A failure to write into ``data_dir`` raises ``OSError``; no names raise ``ValueError``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from services.common.config import Config, ConfigError
from services.ingest.tlsprofile import ProfileName, apply_profile

CERT_NAME = "ingest-selfsigned.pem"
KEY_NAME = "ingest-selfsigned.key"
VALIDITY = datetime.timedelta(days=365)  # a generated certificate's lifetime ...
RENEW_BEFORE = datetime.timedelta(days=30)  # ... renewed at a start-up with less than this left
_CN_MAX = 64  # RFC 5280 ub-common-name

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def server_context(config: Config, profile: ProfileName) -> ssl.SSLContext:
    """The STARTTLS server context: the configured pair, else the self-signed one."""
    cert, key = config.ingest.tls_cert, config.ingest.tls_key
    if cert is None or key is None:
        cert, key = ensure_self_signed(config.data_dir, config.hostname)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # no client certificates
    apply_profile(context, profile)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ingest.tls_cert/tls_key: cannot load {cert} / {key}: {exc}") from None
    return context


def platform_context(config: Config, profile: ProfileName = "modern") -> ssl.SSLContext:
    """The relay listener's context: our platform certificate, client certificates required."""
    platform = config.platform_tls
    if platform is None:
        raise ConfigError(
            "ingest.relay: the inter-region endpoint needs platform_tls (ca, cert, key)"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no session
    apply_profile(context, profile)
    try:
        context.load_cert_chain(platform.cert, platform.key)
        context.load_verify_locations(cafile=platform.ca)
    except (OSError, ssl.SSLError) as exc:
        files = f"{platform.cert} / {platform.key} / {platform.ca}"
        raise ConfigError(f"platform_tls: cannot load {files}: {exc}") from None
    return context


def ensure_self_signed(data_dir: Path, hostname: str) -> tuple[Path, Path]:
    """Return ``(cert, key)`` under ``data_dir``, generating them first when not reusable."""
    cert_path, key_path = data_dir / CERT_NAME, data_dir / KEY_NAME
    if key_path.is_file() and _reusable(cert_path, hostname):
        return cert_path, key_path
    data_dir.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = selfsigned_cert_pem([hostname])
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert_pem, 0o644)
    return cert_path, key_path


def _reusable(cert_path: Path, hostname: str) -> bool:
    """True when ``cert_path`` holds a certificate for ``hostname`` with more than
    ``RENEW_BEFORE`` left."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    renew_at = datetime.datetime.now(datetime.UTC) + RENEW_BEFORE
    return (
        hostname in names.get_values_for_type(x509.DNSName) and cert.not_valid_after_utc > renew_at
    )


def selfsigned_cert_pem(
    names: Sequence[str | IpAddress], valid_for: datetime.timedelta = VALIDITY
) -> tuple[bytes, bytes]:
    """A fresh self-signed certificate for ``names``, valid for ``valid_for`` from now:
    ``(cert_pem, key_pem)``, key in PKCS#8."""
    if not names:
        raise ValueError("a certificate needs at least one name")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert = _certificate(key, names, valid_for)
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _certificate(
    key: rsa.RSAPrivateKey, names: Sequence[str | IpAddress], valid_for: datetime.timedelta
) -> x509.Certificate:
    first = names[0]
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, first)] if isinstance(first, str) else []
    name = x509.Name(attributes if len(str(first)) <= _CN_MAX else [])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + valid_for)
        .add_extension(x509.SubjectAlternativeName(_sans(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _sans(names: Sequence[str | IpAddress]) -> list[x509.GeneralName]:
    return [x509.DNSName(n) if isinstance(n, str) else x509.IPAddress(n) for n in names]


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, so a crash never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode is reduced by the umask; make it exact
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
