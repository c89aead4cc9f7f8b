"""Inbound TLS per listener, through `python -m services.cli ingest` and real handshakes:
`listen` permissive (TLS 1.0 and CBC suites: opportunistic, RFC 7435), `submission` Mozilla
intermediate (TLS 1.2 AEAD with forward secrecy, TLS 1.3), `relay` TLS 1.3 only;
`ingest.tls_profiles` overrides them; a generated certificate near its end is renewed."""

from __future__ import annotations

import datetime
import smtplib
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from services.common.redisserver import EmbeddedRedis, free_port
from services.ingest import tlscert
from tests.world import port_open, wait_until

V = ssl.TLSVersion


def client_context(
    version: ssl.TLSVersion, ciphers: str = "DEFAULT", cert: trustme.LeafCert | None = None
) -> ssl.SSLContext:
    """A client speaking exactly ``version`` (TLS 1.0 needs @SECLEVEL=0 with OpenSSL 3)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():  # Python deprecates TLSv1/TLSv1_1: on purpose here
        warnings.filterwarnings("ignore", "ssl.TLSVersion.TLSv1", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    if cert is not None:
        cert.configure_cert(context)
    return context


def handshake(port: int, context: ssl.SSLContext) -> tuple[str, bytes]:
    """STARTTLS on ``port``: the version and the server's certificate (DER); SSLError if refused."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as session:
        session.starttls(context=context)
        tls = session.sock
        assert isinstance(tls, ssl.SSLSocket)
        version, der = tls.version(), tls.getpeercert(binary_form=True)
        assert version is not None and der is not None
        return version, der


def refused(port: int, context: ssl.SSLContext) -> bool:
    try:
        handshake(port, context)
    except ssl.SSLError:
        return True
    return False


class Ingest:
    def __init__(self, root: Path, valkey: EmbeddedRedis, extra: str = "") -> None:
        self.ca = trustme.CA()
        self.peer = self.ca.issue_cert("peer.platform.test")
        server = self.ca.issue_cert("relay.test")
        self.ca.cert_pem.write_to_path(str(root / "ca.pem"))
        server.private_key_and_cert_chain_pem.write_to_path(str(root / "relay.pem"))
        self.ports = {name: free_port() for name in ("listen", "submission", "relay")}
        (root / "tlsrelay.yaml").write_text(
            f"hostname: relay.test\nredis_url: {valkey.url}\ndata_dir: ./var\n"
            "metrics: {ingest: null}\nplatform_tls: {ca: ca.pem, cert: relay.pem, key: relay.pem}\n"
            "ingest:\n" + "".join(f"  {n}: 127.0.0.1:{p}\n" for n, p in self.ports.items()) + extra
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "ingest", "--config", "tlsrelay.yaml"],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        wait_until(lambda: self._up() or self.proc.poll() is not None, 60, "ingest to listen")
        assert self.proc.poll() is None, "ingest exited"

    def _up(self) -> bool:
        return all(port_open("127.0.0.1", port) for port in self.ports.values())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory, valkey: EmbeddedRedis) -> Iterator[Ingest]:
    root = tmp_path_factory.mktemp("profiles")
    (root / "var").mkdir()  # a certificate for the host name with 10 days left: renewed
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10)
    old = trustme.CA().issue_cert("relay.test", not_after=soon)
    old.cert_chain_pems[0].write_to_path(str(root / "var" / tlscert.CERT_NAME))
    old.private_key_pem.write_to_path(str(root / "var" / tlscert.KEY_NAME))
    running = Ingest(root, valkey)
    yield running
    running.stop()


def test_listen_takes_tls_1_0_and_cbc_submission_does_not(ingest: Ingest) -> None:
    listen, submission = ingest.ports["listen"], ingest.ports["submission"]
    assert handshake(listen, client_context(V.TLSv1))[0] == "TLSv1"
    assert handshake(listen, client_context(V.TLSv1_1))[0] == "TLSv1.1"
    assert refused(submission, client_context(V.TLSv1))
    assert refused(submission, client_context(V.TLSv1_1))
    cbc = "ECDHE-RSA-AES128-SHA"  # CBC under TLS 1.2: the LUCKY13 finding, accepted on port 25
    assert handshake(listen, client_context(V.TLSv1_2, cbc))[0] == "TLSv1.2"
    assert refused(submission, client_context(V.TLSv1_2, cbc))
    assert handshake(submission, client_context(V.TLSv1_2))[0] == "TLSv1.2"
    assert handshake(submission, client_context(V.TLSv1_3))[0] == "TLSv1.3"


def test_relay_is_tls_1_3_only(ingest: Ingest) -> None:
    relay = ingest.ports["relay"]
    assert refused(relay, client_context(V.TLSv1_2, cert=ingest.peer))
    assert handshake(relay, client_context(V.TLSv1_3, cert=ingest.peer))[0] == "TLSv1.3"


def test_a_generated_certificate_near_its_end_is_renewed_for_a_year(ingest: Ingest) -> None:
    der = handshake(ingest.ports["listen"], client_context(V.TLSv1_3))[1]
    left = x509.load_der_x509_certificate(der).not_valid_after_utc - datetime.datetime.now(
        datetime.UTC
    )
    assert datetime.timedelta(days=360) < left <= datetime.timedelta(days=365)


def test_tls_profiles_override_a_listener(tmp_path: Path, valkey: EmbeddedRedis) -> None:
    running = Ingest(tmp_path, valkey, "  tls_profiles: {listen: intermediate, relay: modern}\n")
    try:
        assert refused(running.ports["listen"], client_context(V.TLSv1))
        assert handshake(running.ports["listen"], client_context(V.TLSv1_2))[0] == "TLSv1.2"
    finally:
        running.stop()
