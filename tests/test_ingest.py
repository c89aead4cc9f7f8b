"""The SMTP listener against a real Valkey server and real SMTP clients (stdlib smtplib)."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import trustme
from aiosmtpd.smtp import SMTP
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import eventloop, queueing
from services.common.config import Config
from services.common.redisserver import EmbeddedRedis
from services.common.values import HostPort
from services.ingest.server import IngestServer
from services.ingest.session import _SIMPLE_PATH, IngestSMTP

HOSTNAME = "mx.test.example"


# --------------------------------------------------------------------------- real parts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Valkey = EmbeddedRedis  # the server the `valkey` fixture (tests/conftest.py) yields


class RunningServer:
    """IngestServer on its own event loop (``config.event_loop``'s kind, as ``serve`` runs it) in a
    background thread."""

    def __init__(self, config: Config, redis_url: str) -> None:
        self.server = IngestServer(config, redis_url)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=lambda: eventloop.run(self._main(), config.event_loop), daemon=True
        )

    async def _main(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        try:
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self.server.stop()

    def __enter__(self) -> HostPort:
        self._thread.start()
        assert self._ready.wait(15), "server did not start"
        if self._error is not None:
            raise self._error
        return self.server.address

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stopping is not None and self._error is None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(15)
        assert not self._thread.is_alive(), "server did not stop"


def make_config(data_dir: Path, **ingest: Any) -> Config:
    return Config.model_validate(
        {
            "hostname": HOSTNAME,
            "data_dir": data_dir,
            "ingest": {"listen": HostPort("127.0.0.1", 0), **ingest},
        }
    )


def client(address: HostPort) -> smtplib.SMTP:
    return smtplib.SMTP(address.host, address.port, local_hostname="client.example", timeout=10)


def stored(store: redis.Redis, message_id: str) -> tuple[dict[str, Any], bytes]:
    doc = cast(dict[bytes, bytes], store.hgetall(f"tlsrelay:msg:{message_id}"))
    return json.loads(doc[b"envelope"]), doc[b"body"]


def policy_task_ids(store: redis.Redis) -> list[str]:
    """The message ids carried by the queued ``policy`` tasks (kombu/Celery protocol 2; each
    task's one argument is a batch of ids), oldest task first."""
    ids = []
    for raw in reversed(store.lrange(queueing.POLICY_LIST, 0, -1)):
        (batch,), _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.extend(batch)
    return ids


def queued_id(reply: tuple[int, bytes]) -> str:
    code, text = reply
    assert code == 250, reply
    assert text.startswith(b"2.0.0 Ok: queued as "), reply
    return text.rsplit(b" ", 1)[1].decode()


MESSAGE = (
    b"From: a@client.example\r\nTo: b@dest.example\r\nSubject: caf\xc3\xa9\r\n\r\n"
    b"8-bit body: \xe2\x82\xac\r\n.a line that starts with a dot\r\n"
    b"trailing spaces   \r\n\r\n"
)


# --------------------------------------------------------------------------- tests


def test_ehlo_advertises_extensions_and_replies_carry_enhanced_codes(
    tmp_path: Path, valkey: Valkey
) -> None:
    config = make_config(tmp_path, max_message_bytes=123456)
    with RunningServer(config, valkey.url) as address, client(address) as smtp:
        code, _ = smtp.ehlo()
        assert code == 250
        features = smtp.esmtp_features
        assert features["size"] == "123456"
        for name in ("8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes", "starttls"):
            assert name in features, name
        assert "help" in features and "auth" not in features
        assert smtp.noop() == (250, b"2.0.0 OK")
        assert smtp.rcpt("b@dest.example") == (503, b"5.5.1 Error: need MAIL command")
        assert smtp.docmd("AUTH", "PLAIN") == (502, b"5.5.1 AUTH not available")
        assert smtp.docmd("FROB")[0:1] == (500,)
        assert smtp.docmd("FROB")[1].startswith(b"5.5.2 ")


def test_message_is_spooled_with_received_header_and_policy_task(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    with RunningServer(make_config(tmp_path), valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@client.example", ["BODY=8BITMIME", "SIZE=500"]) == (250, b"2.1.0 Ok")
        assert smtp.rcpt("b@dest.example") == (250, b"2.1.5 Ok")
        message_id = queued_id(smtp.data(MESSAGE))

    envelope, body = stored(store, message_id)
    assert body.endswith(MESSAGE)
    received = body[: -len(MESSAGE)]
    assert received.startswith(
        b"Received: from client.example (unknown [127.0.0.1])\r\n"
        b"\tby mx.test.example (tlsrelay) with ESMTP id " + message_id.encode() + b"\r\n"
        b"\tfor <b@dest.example>; "
    ), received
    assert received.endswith(b"\r\n") and received.count(b"\r\n") == 3
    assert b"using" not in received
    assert envelope["id"] == message_id
    assert envelope["sender"] == "a@client.example"
    assert envelope["recipients"] == ["b@dest.example"]
    assert envelope["mail_options"] == ["BODY=8BITMIME"]
    assert envelope["client_address"] == "127.0.0.1"
    assert envelope["client_helo"] == "client.example"
    assert envelope["inbound_tls"] == {"version": None, "cipher": None}
    assert envelope["size"] == len(body)
    assert policy_task_ids(store) == [message_id]


def test_null_sender_and_several_recipients(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    with RunningServer(make_config(tmp_path), valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        assert smtp.docmd("MAIL", "FROM:<>") == (250, b"2.1.0 Ok")
        assert smtp.rcpt("b@dest.example")[0] == 250
        assert smtp.rcpt("c@other.example")[0] == 250
        assert smtp.docmd("RCPT", "TO:<a\x00b@dest.example>") == (
            501,
            b"5.1.3 Bad recipient address syntax",
        )
        message_id = queued_id(smtp.data(MESSAGE))
    envelope, body = stored(store, message_id)
    assert envelope["sender"] == ""
    assert envelope["recipients"] == ["b@dest.example", "c@other.example"]
    assert b"\tfor <" not in body.split(b"\r\n\r\n", 1)[0]


def test_starttls_with_configured_certificate(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert(HOSTNAME, "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    context = ssl.create_default_context()
    ca.configure_trust(context)

    config = make_config(tmp_path, tls_cert=cert, tls_key=key)
    with RunningServer(config, valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        assert smtp.starttls(context=context) == (220, b"2.0.0 Ready to start TLS")
        smtp.ehlo()
        assert "starttls" not in smtp.esmtp_features
        assert "enhancedstatuscodes" in smtp.esmtp_features
        smtp.mail("a@client.example")
        smtp.rcpt("b@dest.example")
        message_id = queued_id(smtp.data(MESSAGE))

    envelope, body = stored(store, message_id)
    assert envelope["inbound_tls"]["version"] == "TLSv1.3"
    cipher = envelope["inbound_tls"]["cipher"]
    assert cipher.startswith("TLS_")
    expected = (
        f"\tby {HOSTNAME} (tlsrelay) with ESMTPS id {message_id}\r\n"
        f"\t(using TLSv1.3 with cipher {cipher})\r\n"
        "\tfor <b@dest.example>; "
    )
    assert expected.encode() in body
    assert body.endswith(MESSAGE)


def test_self_signed_certificate_generated_once_and_used(tmp_path: Path, valkey: Valkey) -> None:
    data_dir = tmp_path / "var" / "spool"  # does not exist yet
    config = make_config(data_dir)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    with RunningServer(config, valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        assert smtp.starttls(context=context)[0] == 220
        assert smtp.sock is not None
        presented = smtp.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]

    cert_path = data_dir / "ingest-selfsigned.pem"
    key_path = data_dir / "ingest-selfsigned.key"
    assert key_path.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.public_bytes(Encoding.DER) == presented
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cn == HOSTNAME
    assert san.get_values_for_type(x509.DNSName) == [HOSTNAME]

    before = (cert_path.read_bytes(), key_path.read_bytes())
    with RunningServer(config, valkey.url):
        pass
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_size_limits(tmp_path: Path, valkey: Valkey, store: redis.Redis) -> None:
    too_big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    config = make_config(tmp_path, max_message_bytes=len(too_big) - 10)
    with RunningServer(config, valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@client.example", [f"SIZE={len(too_big)}"]) == (
            552,
            b"5.3.4 Message size exceeds fixed maximum message size",
        )
        assert smtp.mail("a@client.example")[0] == 250
        assert smtp.rcpt("b@dest.example")[0] == 250
        assert smtp.data(too_big) == (
            552,
            b"5.3.4 Message size exceeds fixed maximum message size",
        )
    assert store.keys("tlsrelay:*") == [] and store.llen(queueing.POLICY_LIST) == 0


def test_relay_denied_outside_relay_networks(tmp_path: Path, valkey: Valkey) -> None:
    config = make_config(tmp_path, relay_networks=["10.0.0.0/8", "::1/128"])
    with RunningServer(config, valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@client.example")[0] == 250
        assert smtp.rcpt("b@dest.example") == (554, b"5.7.1 Relay access denied")


def test_too_many_recipients_and_bad_sender(tmp_path: Path, valkey: Valkey) -> None:
    config = make_config(tmp_path, max_recipients=2)
    with RunningServer(config, valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        assert smtp.docmd("MAIL", "FROM:<a\x00@client.example>") == (
            501,
            b"5.1.7 Bad sender address syntax",
        )
        assert smtp.mail("a@client.example")[0] == 250
        assert smtp.rcpt("b@dest.example")[0] == 250
        assert smtp.rcpt("c@dest.example")[0] == 250
        assert smtp.rcpt("d@dest.example") == (452, b"4.5.3 Too many recipients")


def test_redis_down_answers_451_then_recovers(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    with RunningServer(make_config(tmp_path), valkey.url) as address:
        valkey.stop()
        try:
            with client(address) as smtp:
                smtp.ehlo()
                smtp.mail("a@client.example")
                smtp.rcpt("b@dest.example")
                assert smtp.data(MESSAGE) == (451, b"4.3.0 Temporary failure, try again later")
        finally:
            valkey.start()  # same port, empty (no persistence)
        with client(address) as smtp:
            smtp.ehlo()
            smtp.mail("a@client.example")
            smtp.rcpt("b@dest.example")
            message_id = queued_id(smtp.data(MESSAGE))

    assert store.keys("tlsrelay:msg:*") == [f"tlsrelay:msg:{message_id}".encode()]
    assert policy_task_ids(store) == [message_id]


# --------------------------------------------------------------------------- REQUIRETLS (RFC 8689)


def _unverified_tls() -> ssl.SSLContext:
    """Opportunistic STARTTLS as sending MTAs do it: the self-signed certificate is accepted."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_requiretls_is_advertised_only_over_tls_and_refused_in_clear(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    with RunningServer(make_config(tmp_path), valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        assert "requiretls" not in smtp.esmtp_features
        code, text = smtp.mail("a@client.example", ["REQUIRETLS"])
        assert (code, text[:7]) == (530, b"5.7.10 "), (code, text)
        assert b"REQUIRETLS" in text and b"TLS" in text[7:]
        assert smtp.docmd("MAIL FROM:<> requiretls")[:1] == (530,)
        assert smtp.docmd("MAIL FROM:<a@client.example> REQUIRETLS=yes")[0] == 501
        assert smtp.docmd("MAIL FROM:<a@client.example> REQUIRETLS=yes")[1].startswith(b"5.5.4 ")
        # The refused MAIL opened no transaction: the client may go on without REQUIRETLS.
        assert smtp.mail("a@client.example") == (250, b"2.1.0 Ok")
        assert smtp.rcpt("b@dest.example")[0] == 250
        message_id = queued_id(smtp.data(MESSAGE))

        assert smtp.starttls(context=_unverified_tls())[0] == 220
        smtp.ehlo()
        assert "requiretls" in smtp.esmtp_features
        assert "starttls" not in smtp.esmtp_features

    envelope, _body = stored(store, message_id)
    assert envelope["mail_options"] == []


def test_requiretls_over_tls_is_kept_in_mail_options(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    with RunningServer(make_config(tmp_path), valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        smtp.starttls(context=_unverified_tls())
        smtp.ehlo()
        assert smtp.docmd("MAIL FROM:<a@client.example> REQUIRETLS=x")[:1] == (501,)
        assert smtp.docmd("MAIL FROM:<a@client.example> REQUIRETLS REQUIRETLS")[:1] == (501,)
        assert smtp.mail("a@client.example", ["BODY=8BITMIME", "REQUIRETLS", "SIZE=900"]) == (
            250,
            b"2.1.0 Ok",
        )
        assert smtp.mail("a@client.example", ["REQUIRETLS"]) == (
            503,
            b"5.5.1 Error: nested MAIL command",
        )
        assert smtp.rcpt("b@dest.example")[0] == 250
        first = queued_id(smtp.data(MESSAGE))
        assert smtp.docmd("MAIL FROM:<> requiretls") == (250, b"2.1.0 Ok")  # case-insensitive
        assert smtp.rcpt("b@dest.example")[0] == 250
        second = queued_id(smtp.data(MESSAGE))

    envelope, body = stored(store, first)
    assert envelope["mail_options"] == ["BODY=8BITMIME", "REQUIRETLS"]
    assert envelope["inbound_tls"]["version"] is not None
    assert body.endswith(MESSAGE)
    envelope, _body = stored(store, second)
    assert envelope["sender"] == ""
    assert envelope["mail_options"] == ["REQUIRETLS"]
    assert sorted(policy_task_ids(store)) == sorted([first, second])


def test_requiretls_parameter_needs_ehlo(tmp_path: Path, valkey: Valkey) -> None:
    with RunningServer(make_config(tmp_path), valkey.url) as address, client(address) as smtp:
        smtp.helo()  # plain SMTP: MAIL takes no parameters at all
        code, text = smtp.docmd("MAIL FROM:<a@client.example> REQUIRETLS")
        assert (code, text[:6]) == (501, b"5.5.4 "), (code, text)


def test_tls_required_no_header_is_stored_untouched(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    message = b"From: a@client.example\r\nTLS-Required: No\r\nSubject: x\r\n\r\nbody\r\n"
    with RunningServer(make_config(tmp_path), valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        smtp.mail("a@client.example")
        smtp.rcpt("b@dest.example")
        message_id = queued_id(smtp.data(message))
    envelope, body = stored(store, message_id)
    assert body.endswith(message)
    assert b"\r\nTLS-Required: No\r\n" in body
    assert envelope["mail_options"] == []
    assert envelope["tls_required_no"] is True


# The fast path for plain "<local@domain>" addresses must agree with aiosmtpd's parser wherever
# it applies (and leave everything else to it).
_ATOM = st.text(alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~-.", min_size=1, max_size=8)
_LABEL = st.text(alphabet="abz09-.", min_size=1, max_size=8)
_PARAMS = st.sampled_from(["", " SIZE=100", " SIZE=1 BODY=8BITMIME", "  SIZE=1", " SIZE=1 ", "x"])


@settings(max_examples=400, derandomize=True, deadline=None)
@given(local=_ATOM, domain=_LABEL, params=_PARAMS, lead=st.sampled_from(["", " "]))
def test_plain_addresses_parse_as_aiosmtpd_parses_them(
    local: str, domain: str, params: str, lead: str
) -> None:
    arg = f"{lead}<{local}@{domain}>{params}"
    server = IngestSMTP.__new__(IngestSMTP)
    fast = _SIMPLE_PATH.fullmatch(arg)
    if fast is not None:
        assert server._getaddr(arg) == SMTP._getaddr(server, arg), arg


def test_the_fast_path_covers_what_clients_send() -> None:
    for arg in ("<a@b.example>", "<first.last+tag@mail.example.com> SIZE=2048 BODY=8BITMIME"):
        assert _SIMPLE_PATH.fullmatch(arg) is not None
    for arg in ("<>", '<"quoted"@b.example>', "<a@[127.0.0.1]>", "<@relay:a@b.example>"):
        assert _SIMPLE_PATH.fullmatch(arg) is None


def test_too_many_received_fields_are_refused_as_a_loop(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    """RFC 5321 §6.3: more than ingest.max_hops Received: fields (any case, folded or not) is a
    loop, refused 554 5.4.6 at the end of DATA; exactly max_hops passes."""
    hop = b"Received: from a.example\r\n\tby b.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    body = b"Subject: loop\r\n\r\nthe body may say\r\nReceived: anything\r\n"
    with (
        RunningServer(make_config(tmp_path, max_hops=3), valkey.url) as address,
        client(address) as smtp,
    ):
        smtp.ehlo()
        assert smtp.sendmail("a@client.example", "b@dest.example", hop * 3 + body) == {}
        for fourth in (hop, b"RECEIVED : from c.example\r\n"):
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("a@client.example", "b@dest.example", hop * 3 + fourth + body)
            assert (refused.value.smtp_code, refused.value.smtp_error) == (
                554,
                b"5.4.6 Too many hops",
            )
    assert len(policy_task_ids(store)) == 1  # only the first was stored
