"""Tenants at ingest: no open relay, authenticated submission, the mutual-TLS relay endpoint and
per-tenant rate limits — against a real Valkey, real TLS (trustme CAs) and stdlib smtplib."""

from __future__ import annotations

import base64
import logging
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from services.common import listeners, queueing
from services.common.config import Config, ConfigError, RegionConfig
from services.common.listeners import Listener
from services.common.passwords import hash_password
from services.common.tenants import Directory
from services.common.values import HostPort
from services.ingest import access
from tests.test_ingest import (
    MESSAGE,
    RunningServer,
    Valkey,
    _free_port,
    queued_id,
    stored,
)

HOSTNAME = "mx.eu.test.example"
LOCAL = "127.0.0.1"
PASSWORD = "correct horse battery staple"

# Replies of the contract (services/ingest/server.py), as smtplib returns them.
RELAY_DENIED = (554, b"5.7.1 Relay access denied")
ENCRYPTION_REQUIRED = (538, b"5.7.11 Encryption required for requested authentication mechanism")
AUTH_REQUIRED = (530, b"5.7.0 Authentication required")
AUTH_OK = (235, b"2.7.0 Authentication successful")
AUTH_INVALID = (535, b"5.7.8 Authentication credentials invalid")
TOO_MANY_FAILURES = (421, b"4.7.0 Too many authentication failures, try later")
NOT_OWNED = (553, b"5.7.1 Sender address not owned by the authenticated tenant")
STARTTLS_FIRST = (530, b"5.7.0 Must issue a STARTTLS command first")
RATE_LIMITED = (451, b"4.7.0 Rate limit exceeded, try again later")
TEMPFAIL = (451, b"4.3.0 Temporary failure, try again later")
MAIL_OK = (250, b"2.1.0 Ok")
LINE_TOO_LONG = (500, b"5.5.2 Line too long")
RCPT_OK = (250, b"2.1.5 Ok")


# --------------------------------------------------------------------------- the small world


@dataclass(frozen=True)
class Pki:
    """The platform CA (this region's server certificate, the other region's client one) and an
    unrelated CA issuing a look-alike client certificate."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    platform: trustme.CA
    peer: trustme.LeafCert  # region "us", as a client of our relay endpoint
    stranger: trustme.LeafCert  # same name, another CA

    def client_context(self, leaf: trustme.LeafCert | None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.platform.configure_trust(context)
        if leaf is not None:
            leaf.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    platform, other = trustme.CA(), trustme.CA()
    server = platform.issue_cert(LOCAL, "relay.eu.platform.test")
    files = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    platform.cert_pem.write_to_path(files[0])
    server.cert_chain_pems[0].write_to_path(files[1])
    server.private_key_pem.write_to_path(files[2])
    peer = platform.issue_cert("relay.us.platform.test", common_name="relay.us.platform.test")
    stranger = other.issue_cert("relay.us.platform.test", common_name="relay.us.platform.test")
    return Pki(*files, platform, peer, stranger)


@pytest.fixture(scope="module")
def users() -> dict[str, str]:
    return {"alice": hash_password(PASSWORD)}


def tenant_config(
    data_dir: Path, pki: Pki, users: dict[str, str], *, tenants: dict[str, Any] | None = None,
    **ingest: Any,
) -> Config:  # fmt: skip
    """Region "eu" (ours) with tenant acme; region "us" with tenant globex; every listener."""
    return Config.model_validate(
        {
            "hostname": HOSTNAME,
            "data_dir": data_dir,
            "region": "eu",
            "regions": {"us": {"relay": "127.0.0.1:1", "tls_name": "relay.us.platform.test"}},
            "platform_tls": {"ca": pki.ca_file, "cert": pki.cert_file, "key": pki.key_file},
            "ingest": {
                "listen": HostPort(LOCAL, 0),
                "submission": HostPort(LOCAL, 0),
                "relay": HostPort(LOCAL, 0),
                "relay_networks": ["10.0.0.0/8"],  # 127.0.0.1 is outside: no open relay
                **ingest,
            },
            "tenants": {
                "acme": {
                    "region": "eu",
                    "domains": ["acme.test", "acme-mail.test"],
                    "mailbox": "127.0.0.1:2601",
                    "users": users,
                },
                "globex": {
                    "region": "us",
                    "domains": ["globex.test"],
                    "mailbox": "127.0.0.1:2602",
                    "users": {"bob": users["alice"]},
                },
                **(tenants or {}),
            },
        }
    )


def networks_tenant(**extra: Any) -> dict[str, Any]:
    """A tenant whose network holds the test client: it may relay without AUTH."""
    return {
        "initech": {
            "region": "eu",
            "domains": ["initech.test"],
            "mailbox": "127.0.0.1:2603",
            "networks": ["127.0.0.0/8"],
            **extra,
        }
    }


def connect(address: HostPort) -> smtplib.SMTP:
    return smtplib.SMTP(address.host, address.port, local_hostname="client.example", timeout=10)


def unverified() -> ssl.SSLContext:
    """Submission clients here accept the listener's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def starttls(smtp: smtplib.SMTP, context: ssl.SSLContext) -> None:
    smtp.ehlo()
    assert smtp.starttls(context=context)[0] == 220
    smtp.ehlo()


def plain(login: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


def header_of(body: bytes) -> bytes:
    return body.split(b"\r\n\r\n", 1)[0]


# --------------------------------------------------------------------------- which listeners


def test_listener_addresses_follow_the_configuration(
    tmp_path: Path, pki: Pki, users: dict[str, str]
) -> None:
    config = tenant_config(tmp_path, pki, users)
    assert list(listeners.listener_addresses(config)) == list(Listener)

    bare = config.model_copy(
        update={"ingest": config.ingest.model_copy(update={"submission": None, "relay": None})}
    )
    assert list(listeners.listener_addresses(bare)) == [Listener.LISTEN]  # "eu" not in regions

    regional = bare.model_copy(
        update={"regions": {"eu": RegionConfig(relay=HostPort("127.0.0.2", 2526))}}
    )
    assert listeners.listener_addresses(regional)[Listener.RELAY] == HostPort("127.0.0.2", 2526)


def test_relay_listener_without_platform_tls_stops_the_start(
    tmp_path: Path, valkey: Valkey
) -> None:
    config = Config.model_validate(
        {
            "hostname": HOSTNAME,
            "data_dir": tmp_path,
            "ingest": {"listen": HostPort(LOCAL, 0), "relay": HostPort(LOCAL, 0)},
        }
    )
    refused = pytest.raises(ConfigError, match=r"^ingest\.relay: .* needs platform_tls")
    with refused, RunningServer(config, valkey.url):
        pass


def test_access_decisions_table(tmp_path: Path, pki: Pki, users: dict[str, str]) -> None:
    config = tenant_config(tmp_path, pki, users, tenants=networks_tenant())
    directory = Directory(config)
    L, S, R = Listener.LISTEN, Listener.SUBMISSION, Listener.RELAY
    rows = [  # listener, client, authenticated, recipient, may relay
        (L, "192.0.2.1", False, "a@acme.test", True),
        (L, "192.0.2.1", False, "b@globex.test", True),
        (L, "192.0.2.1", False, "x@external.example", False),
        (L, "10.1.2.3", False, "x@external.example", True),  # relay_networks
        (L, "127.0.0.1", False, "x@external.example", True),  # initech's network
        (L, "not an ip", False, "x@external.example", False),
        (S, "192.0.2.1", False, "a@acme.test", False),
        (S, "192.0.2.1", True, "x@external.example", True),
        (R, "192.0.2.1", False, "a@acme.test", True),
        (R, "192.0.2.1", False, "b@globex.test", False),  # another region's tenant
        (R, "10.1.2.3", False, "x@external.example", False),
    ]
    for listener, client, authenticated, rcpt, expected in rows:
        got = access.may_relay(listener, directory, client, authenticated, rcpt)
        assert got is expected, (listener, client, authenticated, rcpt)
    assert access.sending_tenant(L, directory, "127.0.0.1", None) == "initech"
    assert access.sending_tenant(L, directory, "192.0.2.1", None) is None
    assert access.sending_tenant(S, directory, "127.0.0.1", "acme") == "acme"
    assert access.sending_tenant(R, directory, "127.0.0.1", None) is None
    assert access.may_send_as(S, directory, "acme", "a@acme-mail.test")
    assert not access.may_send_as(S, directory, "acme", "b@globex.test")
    assert not access.may_send_as(S, directory, "acme", "<>")
    assert access.may_send_as(L, directory, None, "b@globex.test")


# --------------------------------------------------------------------------- listen: no open relay


def test_listen_takes_mail_for_tenants_from_anyone_but_is_no_open_relay(
    tmp_path: Path, valkey: Valkey, store: redis.Redis, pki: Pki, users: dict[str, str]
) -> None:
    config = tenant_config(tmp_path, pki, users)
    with RunningServer(config, valkey.url) as address, connect(address) as smtp:
        smtp.ehlo()
        assert "auth" not in smtp.esmtp_features
        assert smtp.docmd("AUTH", plain("alice@acme.test", PASSWORD)) == (
            502,
            b"5.5.1 AUTH not available",
        )
        assert smtp.mail("someone@outside.example") == MAIL_OK
        assert smtp.rcpt("x@external.example") == RELAY_DENIED
        assert smtp.rcpt("alice@ACME.test") == RCPT_OK
        assert smtp.rcpt("bob@globex.test") == RCPT_OK  # a tenant of another region too
        message_id = queued_id(smtp.data(MESSAGE))

    envelope, _body = stored(store, message_id)
    assert envelope["recipients"] == ["alice@ACME.test", "bob@globex.test"]
    assert envelope["listener"] == "listen"
    assert (envelope["tenant"], envelope["auth_user"], envelope["client_cert"]) == (None,) * 3


def test_listen_relays_for_a_tenant_network_as_that_tenant(
    tmp_path: Path, valkey: Valkey, store: redis.Redis, pki: Pki, users: dict[str, str]
) -> None:
    config = tenant_config(tmp_path, pki, users, tenants=networks_tenant())
    with RunningServer(config, valkey.url) as address, connect(address) as smtp:
        smtp.ehlo()
        assert smtp.mail("printer@initech.test") == MAIL_OK
        assert smtp.rcpt("x@external.example") == RCPT_OK
        message_id = queued_id(smtp.data(MESSAGE))
    envelope, _body = stored(store, message_id)
    assert (envelope["listener"], envelope["tenant"]) == ("listen", "initech")


# --------------------------------------------------------------------------- submission


def test_submission_needs_starttls_then_auth_and_own_sender_domains(
    tmp_path: Path, valkey: Valkey, store: redis.Redis, pki: Pki, users: dict[str, str]
) -> None:
    config = tenant_config(tmp_path, pki, users)
    running = RunningServer(config, valkey.url)
    with running:
        address = running.server.addresses[Listener.SUBMISSION]
        with connect(address) as smtp:
            smtp.ehlo()
            assert "starttls" in smtp.esmtp_features
            assert "auth" not in smtp.esmtp_features  # never offered in clear
            assert smtp.docmd("AUTH", plain("alice@acme.test", PASSWORD)) == ENCRYPTION_REQUIRED
            assert smtp.mail("alice@acme.test") == AUTH_REQUIRED

            starttls(smtp, unverified())
            assert smtp.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
            assert smtp.mail("alice@acme.test") == AUTH_REQUIRED
            for mechanism in ("CRAM-MD5", "REFUSAL", "LOCKOUT"):  # only LOGIN and PLAIN exist
                assert smtp.docmd("AUTH", mechanism) == (
                    504,
                    b"5.5.4 Unrecognized authentication type",
                )
            assert smtp.docmd("AUTH", plain("alice@acme.test", "wrong")) == AUTH_INVALID
            assert smtp.docmd("AUTH", plain("mallory@acme.test", PASSWORD)) == AUTH_INVALID
            assert smtp.docmd("AUTH", plain("alice@globex.test", PASSWORD)) == AUTH_INVALID
            assert smtp.docmd("AUTH", plain("alice@acme.test", PASSWORD)) == AUTH_OK

            assert smtp.mail("bob@globex.test") == NOT_OWNED
            assert smtp.mail("<>") == NOT_OWNED
            assert smtp.mail("alice@acme.test") == MAIL_OK
            assert smtp.rcpt("x@external.example") == RCPT_OK  # authenticated: any domain
            first = queued_id(smtp.data(MESSAGE))

        with connect(address) as smtp:  # AUTH LOGIN, another of the tenant's domains
            starttls(smtp, unverified())
            smtp.user, smtp.password = "alice@acme.test", PASSWORD
            assert smtp.auth("LOGIN", smtp.auth_login) == AUTH_OK
            assert smtp.mail("news@acme-mail.test") == MAIL_OK
            assert smtp.rcpt("bob@globex.test") == RCPT_OK
            second = queued_id(smtp.data(MESSAGE))

    envelope, body = stored(store, first)
    assert envelope["listener"] == "submission"
    assert (envelope["tenant"], envelope["auth_user"]) == ("acme", "alice@acme.test")
    assert envelope["sender"] == "alice@acme.test"
    assert envelope["inbound_tls"]["version"] is not None
    assert f" with ESMTPSA id {first}\r\n".encode() in header_of(body)
    assert PASSWORD.encode() not in body
    envelope, _body = stored(store, second)
    assert (envelope["tenant"], envelope["auth_user"]) == ("acme", "alice@acme.test")


def test_submission_login_works_through_smtplib_login(
    tmp_path: Path, valkey: Valkey, store: redis.Redis, pki: Pki, users: dict[str, str]
) -> None:
    running = RunningServer(tenant_config(tmp_path, pki, users), valkey.url)
    with running, connect(running.server.addresses[Listener.SUBMISSION]) as smtp:
        starttls(smtp, unverified())
        assert smtp.login("alice@acme.test", PASSWORD) == AUTH_OK
        assert smtp.sendmail("alice@acme.test", ["x@external.example"], MESSAGE) == {}


def test_sasl_responses_aborted_malformed_or_too_long_get_exactly_one_reply(
    tmp_path: Path,
    valkey: Valkey,
    store: redis.Redis,
    pki: Pki,
    users: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    running = RunningServer(tenant_config(tmp_path, pki, users), valkey.url)
    with running, connect(running.server.addresses[Listener.SUBMISSION]) as smtp:
        starttls(smtp, unverified())
        for response, reply in [
            ("*", (501, b"5.7.0 Auth aborted")),  # RFC 4954 §4: the client cancels
            ("not base64!", (501, b"5.5.2 Can't decode base64")),
            ("QUFB" * 3100, LINE_TOO_LONG),  # over RFC 4954's 12288 octets
        ]:
            assert smtp.docmd("AUTH", "LOGIN")[0] == 334
            assert smtp.docmd(response) == reply
            assert smtp.noop() == (250, b"2.0.0 OK")  # no 535 followed the refusal
        # AUTH lines may be longer than other commands (RFC 4954 §4), up to 12288 octets.
        assert smtp.docmd("AUTH", plain("alice@acme.test", "p" * 8000)) == AUTH_INVALID
        assert smtp.docmd("AUTH", plain("alice@acme.test", "p" * 9500)) == LINE_TOO_LONG
        assert smtp.login("alice@acme.test", PASSWORD) == AUTH_OK
    assert "QUFBQUFB" not in caplog.text and "cHBwcHBw" not in caplog.text  # base64 of ppp...


def test_failed_auth_is_limited_per_client_until_the_window_passes(
    tmp_path: Path,
    valkey: Valkey,
    store: redis.Redis,
    pki: Pki,
    users: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # aiosmtpd's command log included
    config = tenant_config(tmp_path, pki, users, auth_failure_limit=3, auth_failure_window="5s")
    running = RunningServer(config, valkey.url)

    def login(password: str) -> tuple[int, bytes]:
        with connect(running.server.addresses[Listener.SUBMISSION]) as smtp:
            starttls(smtp, unverified())
            reply = smtp.docmd("AUTH", plain("alice@acme.test", password))
            if reply[0] == 421:  # closed by the server
                with pytest.raises(smtplib.SMTPServerDisconnected):
                    smtp.noop()
            return reply

    with running:
        for guess in ("guess-1", "guess-2", "guess-3"):
            assert login(guess) == AUTH_INVALID
        assert login("guess-4") == TOO_MANY_FAILURES
        assert login(PASSWORD) == TOO_MANY_FAILURES  # not even checked
        ttl = store.pttl("tlsrelay:authfail:127.0.0.1")
        assert 0 < ttl <= 5000, ttl
        wait_for(lambda: login(PASSWORD) == AUTH_OK, 10, "the failure window to pass")

    payload = plain("alice@acme.test", PASSWORD).split()[1]
    assert "AUTH failed from 127.0.0.1" in caplog.text
    for secret in (PASSWORD, "guess-1", payload):
        assert secret not in caplog.text


# --------------------------------------------------------------------------- relay endpoint


def test_relay_endpoint_takes_mail_for_this_region_from_platform_clients(
    tmp_path: Path, valkey: Valkey, store: redis.Redis, pki: Pki, users: dict[str, str]
) -> None:
    running = RunningServer(tenant_config(tmp_path, pki, users), valkey.url)
    with running, connect(running.server.addresses[Listener.RELAY]) as smtp:
        smtp.ehlo()
        assert "starttls" in smtp.esmtp_features
        assert smtp.mail("bob@globex.test") == STARTTLS_FIRST
        assert smtp.rcpt("alice@acme.test") == STARTTLS_FIRST
        assert smtp.docmd("DATA") == STARTTLS_FIRST
        assert smtp.noop()[0] == 250

        starttls(smtp, pki.client_context(pki.peer))
        assert "auth" not in smtp.esmtp_features
        assert smtp.mail("bob@globex.test") == MAIL_OK
        assert smtp.rcpt("bob@globex.test") == RELAY_DENIED  # a tenant of region "us"
        assert smtp.rcpt("x@external.example") == RELAY_DENIED
        assert smtp.rcpt("alice@acme.test") == RCPT_OK
        message_id = queued_id(smtp.data(MESSAGE))

    envelope, body = stored(store, message_id)
    assert envelope["listener"] == "relay"
    assert envelope["client_cert"] == "relay.us.platform.test"
    assert (envelope["tenant"], envelope["auth_user"]) == (None, None)
    assert envelope["recipients"] == ["alice@acme.test"]
    header = header_of(body)
    assert f" with ESMTPS id {message_id}\r\n".encode() in header
    assert b'(client certificate "relay.us.platform.test" verified by the platform CA)' in header


@pytest.mark.parametrize("certificate", ["none", "another CA"])
def test_relay_endpoint_refuses_clients_without_a_platform_certificate(
    tmp_path: Path,
    valkey: Valkey,
    store: redis.Redis,
    pki: Pki,
    users: dict[str, str],
    certificate: str,
) -> None:
    leaf = None if certificate == "none" else pki.stranger
    running = RunningServer(tenant_config(tmp_path, pki, users), valkey.url)
    with running, connect(running.server.addresses[Listener.RELAY]) as smtp:
        smtp.ehlo()
        # TLS 1.3: the client's handshake may finish before the server refuses its certificate;
        # then the refusal (an alert, a closed connection) arrives with the first reply.
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            smtp.starttls(context=pki.client_context(leaf))
            smtp.ehlo()
            smtp.sendmail("bob@globex.test", ["alice@acme.test"], MESSAGE)
    assert store.keys("tlsrelay:msg:*") == [] and store.llen(queueing.POLICY_LIST) == 0


# --------------------------------------------------------------------------- rate limit


def test_tenant_rate_limit_per_fixed_window(
    tmp_path: Path, valkey: Valkey, store: redis.Redis, pki: Pki, users: dict[str, str]
) -> None:
    config = tenant_config(tmp_path, pki, users, tenants=networks_tenant(rate_limit="2/5s"))
    # Fixed windows start at multiples of 5 s: begin early in one, so the three fit in it.
    wait_for(lambda: time.time() % 5 < 2, 5, "the start of a rate window")
    with RunningServer(config, valkey.url) as address, connect(address) as smtp:
        smtp.ehlo()
        for _ in range(2):
            assert smtp.mail("printer@initech.test") == MAIL_OK
            assert smtp.rcpt("x@external.example") == RCPT_OK
            queued_id(smtp.data(MESSAGE))
        assert smtp.mail("printer@initech.test") == RATE_LIMITED
        wait_for(lambda: smtp.mail("printer@initech.test") == MAIL_OK, 10, "the next window")
        assert smtp.rcpt("x@external.example") == RCPT_OK
        message_id = queued_id(smtp.data(MESSAGE))
    assert stored(store, message_id)[0]["tenant"] == "initech"


def test_redis_errors_in_checks_answer_451_and_accept_nothing(
    tmp_path: Path, valkey: Valkey, store: redis.Redis, pki: Pki, users: dict[str, str]
) -> None:
    config = tenant_config(tmp_path, pki, users, tenants=networks_tenant(rate_limit="100/m"))
    running = RunningServer(config, valkey.url)
    with running:
        valkey.stop()
        try:
            with connect(running.server.address) as smtp:
                smtp.ehlo()
                assert smtp.mail("printer@initech.test") == TEMPFAIL
            with connect(running.server.addresses[Listener.SUBMISSION]) as smtp:
                starttls(smtp, unverified())
                assert smtp.docmd("AUTH", plain("alice@acme.test", PASSWORD)) == TEMPFAIL
                assert smtp.mail("alice@acme.test") == AUTH_REQUIRED
        finally:
            valkey.start()
    assert store.keys("*") == []


# --------------------------------------------------------------------------- serve


def test_serve_prints_every_listener_and_stops_on_sigterm(
    tmp_path: Path, valkey: Valkey, pki: Pki, users: dict[str, str]
) -> None:
    ports = {listener: _free_port() for listener in Listener}
    config = tmp_path / "tlsrelay.yaml"
    config.write_text(
        f"hostname: {HOSTNAME}\ndata_dir: ./var\nregion: eu\n"
        f"regions:\n  eu:\n    relay: 127.0.0.1:{ports[Listener.RELAY]}\n"
        f"platform_tls: {{ca: {pki.ca_file}, cert: {pki.cert_file}, key: {pki.key_file}}}\n"
        f"ingest:\n  listen: 127.0.0.1:{ports[Listener.LISTEN]}\n"
        f"  submission: 127.0.0.1:{ports[Listener.SUBMISSION]}\n"
        "tenants:\n  acme: {domains: [acme.test], mailbox: '127.0.0.1:2601'}\n"
        f"metrics:\n  ingest: 127.0.0.1:{_free_port()}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "ingest", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "TLSRELAY_REDIS_URL": valkey.url},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().decode().strip() for _ in Listener]
        with connect(HostPort(LOCAL, ports[Listener.RELAY])) as smtp:
            smtp.ehlo()
            assert smtp.mail("a@acme.test") == STARTTLS_FIRST
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert lines == [
        f"ingest listening on smtp://127.0.0.1:{ports[listener]} ({listener})"
        for listener in Listener
    ]
