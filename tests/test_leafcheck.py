"""The leaf-only verification verdicts (services/deliver/leafcheck.py), one certificate per row,
against a trust store holding one test CA."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from services.deliver import leafcheck
from tests.certs import selfsigned_cert_pem

NOW = time.time()
PAST = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=60)
CA = trustme.CA(organization_name="leafcheck test CA")


def der(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def issued(ca: trustme.CA, *names: str, **kwargs: datetime.datetime) -> bytes:
    return der(ca.issue_cert(*names, **kwargs).cert_chain_pems[0].bytes())


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("leaf") / "ca.pem"
    CA.cert_pem.write_to_path(str(path))
    return str(path)


def impostor(name: str) -> bytes:
    """A leaf naming the test CA as its issuer, signed by another key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.load_pem_x509_certificate(CA.cert_pem.bytes()).subject
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


ROWS = [
    ("ok", lambda: issued(CA, "mx.a.test"), "mx.a.test", leafcheck.OK),
    ("wildcard", lambda: issued(CA, "*.a.test"), "mx.a.test", leafcheck.OK),
    ("ip", lambda: issued(CA, "192.0.2.7"), "192.0.2.7", leafcheck.OK),
    ("wrong name", lambda: issued(CA, "mx.b.test"), "mx.a.test", leafcheck.WRONG_NAME),
    ("deep wildcard", lambda: issued(CA, "*.a.test"), "x.mx.a.test", leafcheck.WRONG_NAME),
    (
        "expired",
        lambda: issued(
            CA, "mx.a.test", not_before=PAST.replace(year=PAST.year - 1), not_after=PAST
        ),
        "mx.a.test",
        leafcheck.EXPIRED,
    ),
    (
        "self-signed",
        lambda: der(selfsigned_cert_pem(["mx.a.test"])[0]),
        "mx.a.test",
        leafcheck.SELF_SIGNED,
    ),
    ("untrusted CA", lambda: issued(trustme.CA(), "mx.a.test"), "mx.a.test", leafcheck.UNKNOWN),
    (
        "intermediate",
        lambda: issued(CA.create_child_ca(), "mx.a.test"),
        "mx.a.test",
        leafcheck.UNKNOWN,
    ),
    (
        "same name, other key",
        lambda: impostor("mx.a.test"),
        "mx.a.test",
        leafcheck.UNKNOWN_ISSUER,
    ),
]


@pytest.mark.parametrize(("what", "make", "name", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_verdict(ca_file: str, what: str, make: object, name: str, expected: str) -> None:
    assert callable(make)
    assert leafcheck.verdict(make(), name, ca_file, NOW) == expected


def test_never_raises(ca_file: str, tmp_path: Path) -> None:
    assert leafcheck.verdict(b"not a certificate", "mx.a.test", ca_file) == leafcheck.UNKNOWN
    missing = str(tmp_path / "missing.pem")
    assert leafcheck.verdict(issued(CA, "mx.a.test"), "mx.a.test", missing) == leafcheck.UNKNOWN
