"""DANE (RFC 7672): TLSA records and certificate matching as tables, the TLSA lookup against a
real DNS server that answers with or without the AD bit, and the server chain from a real TLS
handshake (the one private API it reads)."""

from __future__ import annotations

import _ssl
import asyncio
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import dns.asyncresolver
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.common.deliveryconfig import DeliveryConfig
from services.common.values import HostPort
from services.deliver import dane, mx
from services.deliver.dane import Tlsa, check
from tests.dnsserver import LocalDns


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def spki(cert_der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(organization_name="DANE test TA")


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> bytes:
    return der(ca.issue_cert("mx.a.test").cert_chain_pems[0].bytes())


@pytest.fixture(scope="module")
def ca_der(ca: trustme.CA) -> bytes:
    return der(ca.cert_pem.bytes())


def expiry(cert_der: bytes) -> float:
    return x509.load_der_x509_certificate(cert_der).not_valid_after_utc.timestamp()


# --------------------------------------------------------------------------- records

USABLE = [
    ("3 1 1 00", True),
    ("3 0 2 00", True),
    ("2 0 0 00", True),
    ("2 1 1 00", True),
    ("1 1 1 00", False),  # PKIX-EE: unusable for SMTP (RFC 7672 §3.1.3)
    ("0 0 1 00", False),  # PKIX-TA
    ("3 2 1 00", False),  # unknown selector
    ("3 1 3 00", False),  # unknown matching type
]


@pytest.mark.parametrize(("text", "usable"), USABLE)
def test_usable_records(text: str, usable: bool) -> None:
    assert Tlsa.parse(text).usable is usable


def test_record_text_round_trips() -> None:
    record = Tlsa.parse("3 1 1 AB CD")
    assert (record.usage, record.selector, record.mtype, record.data) == (3, 1, 1, b"\xab\xcd")
    assert str(record) == "3 1 1 abcd" and Tlsa.parse(str(record)) == record
    with pytest.raises(ValueError, match="not a TLSA record"):
        Tlsa.parse("3 1")


# --------------------------------------------------------------------------- matching


def ee_records(leaf: bytes) -> dict[str, str]:
    key = spki(leaf)
    return {
        "3 0 0": f"3 0 0 {leaf.hex()}",
        "3 0 1": f"3 0 1 {hashlib.sha256(leaf).hexdigest()}",
        "3 1 1": f"3 1 1 {hashlib.sha256(key).hexdigest()}",
        "3 1 2": f"3 1 2 {hashlib.sha512(key).hexdigest()}",
        "3 1 0": f"3 1 0 {key.hex()}",
    }


@pytest.mark.parametrize("kind", ["3 0 0", "3 0 1", "3 1 1", "3 1 2", "3 1 0"])
def test_dane_ee_matches_the_leaf_by_every_selector_and_matching_type(
    leaf: bytes, kind: str
) -> None:
    found = check([leaf], [ee_records(leaf)[kind]], ["mx.a.test"], time.time())
    assert found.ok and str(found.record).startswith(kind), found


def test_dane_ee_checks_neither_name_nor_dates(leaf: bytes) -> None:
    """RFC 7672 §3.1.1: with DANE-EE the key is what is authenticated, not the name or dates."""
    later = expiry(leaf) + 86400  # after the certificate expired
    found = check([leaf], [ee_records(leaf)["3 1 1"]], ["other.test"], later)
    assert found.ok, found


def test_a_mismatching_record_is_no_match(leaf: bytes) -> None:
    found = check([leaf], ["3 1 1 " + "00" * 32], ["mx.a.test"], time.time())
    assert not found.ok and "no usable TLSA record matched" in found.text


def test_unusable_records_never_match(leaf: bytes) -> None:
    """PKIX-EE(1) naming exactly this certificate is still not a DANE match (§3.1.3)."""
    record = ee_records(leaf)["3 1 1"].replace("3", "1", 1)
    assert not check([leaf], [record], ["mx.a.test"], time.time()).ok


def test_no_certificate_or_garbage_is_no_match() -> None:
    assert not check([], ["3 1 1 00"], ["a.test"], time.time()).ok
    found = check([b"not a certificate"], ["3 1 1 00"], ["a.test"], time.time())
    assert not found.ok and "cannot be read" in found.text


def ta_record(kind: str, ca_der: bytes) -> str:
    data = {"0 0": ca_der, "0 1": hashlib.sha256(ca_der).digest(),
            "1 1": hashlib.sha256(spki(ca_der)).digest()}[kind]  # fmt: skip
    return f"2 {kind} {data.hex()}"


@pytest.mark.parametrize("kind", ["0 0", "0 1", "1 1"])
def test_dane_ta_with_the_anchor_in_the_chain(leaf: bytes, ca_der: bytes, kind: str) -> None:
    found = check([leaf, ca_der], [ta_record(kind, ca_der)], ["mx.a.test"], time.time())
    assert found.ok and "DANE-TA" in found.text, found


def test_dane_ta_checks_the_name_against_mx_host_and_domain(leaf: bytes, ca_der: bytes) -> None:
    record = ta_record("0 1", ca_der)
    assert not check([leaf, ca_der], [record], ["mx.b.test", "b.test"], time.time()).ok
    found = check([leaf, ca_der], [record], ["other.test", "mx.a.test"], time.time())
    assert found.ok and "mx.a.test" in found.text


def test_dane_ta_checks_dates(leaf: bytes, ca_der: bytes) -> None:
    later = expiry(leaf) + 86400
    assert check([leaf, ca_der], [ta_record("0 1", ca_der)], ["mx.a.test"], time.time()).ok
    assert not check([leaf, ca_der], [ta_record("0 1", ca_der)], ["mx.a.test"], later).ok


def test_dane_ta_2_0_0_works_from_the_record_when_the_chain_is_only_the_leaf(
    leaf: bytes, ca_der: bytes
) -> None:
    assert check([leaf], [ta_record("0 0", ca_der)], ["mx.a.test"], time.time()).ok


def test_dane_ta_that_cannot_be_checked_is_never_a_match(leaf: bytes, ca_der: bytes) -> None:
    """Only the leaf is known and the record holds a digest: say so, never match."""
    found = check([leaf], [ta_record("1 1", ca_der)], ["mx.a.test"], time.time())
    assert not found.ok and "cannot be checked" in found.text, found


def test_dane_ta_of_another_authority_is_no_match(leaf: bytes, ca_der: bytes) -> None:
    other = der(trustme.CA().cert_pem.bytes())
    assert not check([leaf, ca_der], [ta_record("0 0", other)], ["mx.a.test"], time.time()).ok


# --------------------------------------------------------------------------- the chain


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[tuple[int, bytes, bytes]]:
    """A TLS server whose chain is leaf ← intermediate (not the root): (port, leaf, child)."""
    child = ca.create_child_ca()
    issued = child.issue_cert("mx.chain.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    issued.configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port, der(issued.cert_chain_pems[0].bytes()), der(child.cert_pem.bytes())
    listener.close()
    thread.join(timeout=5)


def test_peer_chain_reads_the_servers_whole_chain(tls_server: tuple[int, bytes, bytes]) -> None:
    """The private CPython API read in services/deliver/dane.py: this fails loudly when a Python
    release drops or changes it (then DANE-TA works only for ``2 0 0`` records)."""
    assert hasattr(getattr(_ssl, "_SSLSocket"), "get_unverified_chain")  # noqa: B009
    assert dane._ENCODING_DER == _ssl.ENCODING_DER
    port, leaf, child = tls_server
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # as at a DANE host
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="mx.chain.test") as tls,
    ):
        chain = dane.peer_chain(tls)
        tls.sendall(b"x")
    assert chain == [leaf, child]


# --------------------------------------------------------------------------- DNS


@pytest.fixture(scope="module")
def dns_server() -> Iterator[LocalDns]:
    with LocalDns() as server:
        yield server


def resolver(server: LocalDns, dnssec: bool) -> dns.asyncresolver.Resolver:
    found = mx.make_resolver([HostPort("127.0.0.1", server.port)], 3.0)
    if dnssec:
        mx.want_dnssec(found)
    return found


def status(server: LocalDns, host: str, dnssec: bool = True) -> dane.HostStatus:
    return asyncio.run(dane.host_status(resolver(server, dnssec), host, 25))


def test_host_status_from_the_tlsa_rrset(dns_server: LocalDns) -> None:
    d = dns_server
    d.add("_25._tcp.usable.test", "TLSA", "3 1 1 " + "ab" * 32)
    d.add("_25._tcp.usable.test", "TLSA", "1 1 1 " + "cd" * 32)
    d.add("_25._tcp.unusable.test", "TLSA", "1 1 1 " + "cd" * 32)
    d.add("_25._tcp.unsigned.test", "TLSA", "3 1 1 " + "ab" * 32)
    d.servfail("_25._tcp.bogus.test")
    for name in ("usable", "unusable", "bogus", "none"):
        d.secure(f"_25._tcp.{name}.test")
    found = status(d, "usable.test")
    assert found.status == dane.USABLE and [str(r)[:5] for r in found.records] == ["3 1 1", "1 1 1"]
    assert status(d, "unusable.test").status == dane.UNUSABLE
    assert status(d, "unsigned.test").status == dane.INSECURE  # no AD: as without DANE
    assert status(d, "none.test").status == dane.INSECURE  # NXDOMAIN: as without DANE
    failed = status(d, "bogus.test")
    assert failed.status == dane.LOOKUP_ERROR and "_25._tcp.bogus.test" in failed.error
    # Without DNSSEC asked for (delivery.dnssec: none) the AD bit is not believed.
    assert status(d, "usable.test", dnssec=False).status == dane.INSECURE


def test_queries_set_do_only_when_dnssec_is_trusted(dns_server: LocalDns) -> None:
    before = dns_server.do_queries
    status(dns_server, "usable.test", dnssec=False)
    assert dns_server.do_queries == before
    status(dns_server, "usable.test", dnssec=True)
    assert dns_server.do_queries == before + 1


def test_domain_status_for_posture(dns_server: LocalDns) -> None:
    """What ``tlsrelay check``/``posture`` will call: MX hosts, their DANE status and records."""
    d = dns_server
    d.add("posture.test", "MX", "10 mx1.posture.test.")
    d.add("posture.test", "MX", "20 mx2.posture.test.")
    d.add("mx1.posture.test", "A", "192.0.2.1")
    d.add("mx2.posture.test", "A", "192.0.2.2")
    d.add("_25._tcp.mx1.posture.test", "TLSA", "3 1 1 " + "ab" * 32)
    for name in ("posture.test", "mx1.posture.test", "_25._tcp.mx1.posture.test"):
        d.secure(name)  # mx2's address records are not signed: no TLSA lookup for it
    servers = (HostPort("127.0.0.1", d.port),)
    config = DeliveryConfig(dnssec="trust_resolver", dns_servers=servers)
    found = asyncio.run(dane.domain_status("posture.test", config))
    assert found.mx_secure and not found.error
    assert [(h.host, h.status) for h in found.hosts] == [
        ("mx1.posture.test", dane.USABLE),
        ("mx2.posture.test", dane.NOT_APPLICABLE),
    ]
    assert [str(r)[:6] for r in found.hosts[0].records] == ["3 1 1 "]
    unvalidated = asyncio.run(
        dane.domain_status("posture.test", DeliveryConfig(dns_servers=servers))
    )
    assert not unvalidated.mx_secure  # dnssec: none — the AD bit is not believed
    missing = asyncio.run(dane.domain_status("nowhere.test", config, resolver(d, True)))
    assert missing.hosts == () and "does not exist" in missing.error
