"""Self-tests for the SMTP sinks in tests/peers.py (stdlib smtplib as the client)."""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
from pathlib import Path

import pytest

from tests.peers import Sink

MSG = b"Subject: hi\r\n\r\nline one\r\n.leading dot\r\n"
SIZE = f"SIZE={len(MSG)}"  # what smtplib's sendmail() adds when the server offers SIZE


def _client_ctx(sink: Sink, tmp_path: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=sink.write_ca_pem(tmp_path / "ca.pem"))
    return ctx


def _ehlo_caps(client: smtplib.SMTP) -> set[str]:
    code, _ = client.ehlo("client.test")
    assert code == 250
    return {k.upper() for k in client.esmtp_features}


def test_starttls_sink_receives_over_tls(tmp_path: Path) -> None:
    with Sink("starttls") as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            caps = _ehlo_caps(client)
            assert {"starttls", "8bitmime", "smtputf8", "pipelining", "size"} <= {
                c.lower() for c in caps
            }
            assert "AUTH" not in caps
            client.starttls(context=_client_ctx(sink, tmp_path))
            caps = _ehlo_caps(client)
            assert "STARTTLS" not in caps
            refused = client.sendmail(
                "a@example.org", ["b@example.net", "c@example.net"], MSG, ["BODY=8BITMIME"]
            )
            assert refused == {}
        (msg,) = sink.wait_messages(1)
        assert msg.tls in ("TLSv1.2", "TLSv1.3")
        assert msg.cipher
        assert msg.mail_from == "a@example.org"
        assert msg.rcpt_tos == ["b@example.net", "c@example.net"]
        assert msg.data == b"Subject: hi\r\n\r\nline one\r\n.leading dot\r\n"
        assert "BODY=8BITMIME" in msg.mail_options
        assert msg.peer[0] == "127.0.0.1"
        assert msg.helo == "client.test"
        assert msg.connection == 1
        assert sink.starttls_attempts == 1
        assert sink.tls_handshakes_ok == 1
        assert sink.cleartext_transactions == 0
        assert sink.connections == 1


def test_plain_sink_records_clear_and_refuses_starttls() -> None:
    with Sink("plain") as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            caps = _ehlo_caps(client)
            assert "STARTTLS" not in caps
            assert {"8BITMIME", "SMTPUTF8", "PIPELINING", "SIZE"} <= caps
            assert client.docmd("STARTTLS") == (502, b"5.5.1 STARTTLS not supported")
            client.sendmail("a@example.org", ["b@example.net"], MSG)
        (msg,) = sink.wait_messages(1)
        assert msg.tls is None
        assert msg.cipher is None
        assert sink.cleartext_transactions == 1
        assert sink.starttls_attempts == 1
        assert sink.tls_handshakes_ok == 0


def test_broken_sink_fails_handshake_then_accepts_clear(tmp_path: Path) -> None:
    with Sink("broken") as sink:
        client = smtplib.SMTP("127.0.0.1", sink.port, timeout=5)
        try:
            assert "STARTTLS" in _ehlo_caps(client)
            with pytest.raises((ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected)):
                client.starttls(context=_client_ctx(sink, tmp_path))
        finally:
            client.close()
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.ehlo("client.test")
            client.sendmail("a@example.org", ["b@example.net"], MSG)
        (msg,) = sink.wait_messages(1)
        assert msg.tls is None
        assert msg.connection == 2
        assert sink.starttls_attempts == 1
        assert sink.tls_handshakes_ok == 0
        assert sink.tls_handshakes_failed == 1
        assert sink.cleartext_transactions == 1
        sink.wait_for(lambda: sink.closed_connections == 2)


def test_selfsigned_cert_is_rejected_by_verifying_client(tmp_path: Path) -> None:
    with Sink("starttls", cert="selfsigned") as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.ehlo("client.test")
            with pytest.raises(ssl.SSLCertVerificationError):
                client.starttls(context=_client_ctx(sink, tmp_path))
        sink.wait_for(lambda: sink.tls_handshakes_failed == 1)
        assert "CERTIFICATE" in sink.errors[0].upper() or "CA" in sink.errors[0]
        # An unverifying client still gets TLS with the self-signed cert.
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.ehlo("client.test")
            client.starttls(context=ssl._create_unverified_context())
            client.sendmail("a@example.org", ["b@example.net"], MSG)
        assert sink.wait_messages(1)[0].tls is not None
        assert sink.cleartext_transactions == 0


def test_cert_names_mismatch(tmp_path: Path) -> None:
    with Sink("starttls", cert_names=["other.example"]) as sink:
        ctx = _client_ctx(sink, tmp_path)
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.ehlo("client.test")
            with pytest.raises(ssl.SSLCertVerificationError):
                client.starttls(context=ctx)


def test_scripted_replies() -> None:
    replies = {"Nobody@example.net": "550 5.1.1 no such user", "later@example.net": "451 4.3.0 x"}
    with Sink("plain", rcpt_replies=replies, data_reply="452 4.3.1 full") as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.ehlo("client.test")
            client.mail("a@example.org")
            assert client.rcpt("nobody@example.net") == (550, b"5.1.1 no such user")
            assert client.rcpt("later@example.net") == (451, b"4.3.0 x")
            assert client.rcpt("ok@example.net")[0] == 250
            assert client.data(MSG) == (452, b"4.3.1 full")
        sink.wait_for(lambda: len(sink.rejected) == 1)
        (rej,) = sink.rejected
        assert rej.rcpt_tos == ["ok@example.net"]
        assert sink.messages == []

    def rcpt(addr: str) -> str | None:
        return "550 5.1.1 no such user" if addr.startswith("bad") else None

    with Sink("plain", rcpt_replies=rcpt) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            refused = client.sendmail("a@example.org", ["bad@x.test", "good@x.test"], MSG)
            assert refused == {"bad@x.test": (550, b"5.1.1 no such user")}
        assert sink.wait_messages(1)[0].rcpt_tos == ["good@x.test"]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_sink_on_ipv6_loopback(tmp_path: Path) -> None:
    with Sink("starttls", host="::1") as sink:
        assert "::1" in sink.cert_names
        with smtplib.SMTP("::1", sink.port, timeout=5) as client:
            client.ehlo("client.test")
            client.starttls(context=_client_ctx(sink, tmp_path))
            client.sendmail("a@example.org", ["b@example.net"], MSG)
        (msg,) = sink.wait_messages(1)
        assert msg.peer[0] == "::1"
        assert msg.tls is not None


def test_other_loopback_address_and_wait_timeout() -> None:
    with Sink("plain", host="127.0.0.3") as sink:
        with smtplib.SMTP("127.0.0.3", sink.port, timeout=5) as client:
            client.sendmail("a@example.org", ["b@example.net"], MSG)
        assert sink.wait_messages(1)[0].rcpt_tos == ["b@example.net"]
        with pytest.raises(AssertionError, match="2 accepted message"):
            sink.wait_messages(2, timeout=0.05)


def test_stop_with_idle_client_is_clean() -> None:
    before = threading.active_count()
    sink = Sink("starttls").start()
    client = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
    try:
        assert client.recv(1024).startswith(b"220 ")
        sink.stop()
        assert client.recv(1024) == b""
    finally:
        client.close()
    sink.stop()  # idempotent
    assert threading.active_count() == before


def test_restart_rebinds_same_port_and_bind_error_surfaces() -> None:
    sink = Sink("plain").start()
    port = sink.port
    with pytest.raises(OSError):
        Sink("plain", port=port).start()
    sink.stop()
    with sink:
        assert sink.port == port
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            client.sendmail("a@example.org", ["b@example.net"], MSG)
        sink.wait_messages(1)


def test_extensions_requiretls_accepted_and_recorded(tmp_path: Path) -> None:
    with Sink("starttls", extensions=("REQUIRETLS", "DSN")) as sink:
        assert sink.advertises("requiretls") and not Sink("plain").advertises("REQUIRETLS")
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            caps = _ehlo_caps(client)
            assert {"REQUIRETLS", "DSN", "STARTTLS"} <= caps
            client.starttls(context=_client_ctx(sink, tmp_path))
            assert {"REQUIRETLS", "DSN"} <= _ehlo_caps(client)
            assert client.docmd("MAIL FROM:<a@example.org> REQUIRETLS=x")[0] == 501
            assert client.docmd("MAIL FROM:<a@example.org> REQUIRETLS REQUIRETLS")[0] == 501
            refused = client.sendmail(
                "a@example.org", ["b@example.net"], MSG, ["BODY=8BITMIME", "requiretls"]
            )
            assert refused == {}
            assert client.docmd("MAIL FROM:<> REQUIRETLS")[0] == 250  # no DATA follows
            assert client.docmd("MAIL FROM:<c@example.org>") == (
                503,
                b"Error: nested MAIL command",
            )
        (msg,) = sink.wait_messages(1)
        sent = [SIZE, "BODY=8BITMIME", "REQUIRETLS"]
        assert msg.mail_options == sent
        assert msg.tls is not None
        sink.wait_for(lambda: sink.closed_connections == 1)
        tls = msg.tls
        assert sink.mail_commands == [
            ("a@example.org", ["REQUIRETLS=X"], tls),
            ("a@example.org", ["REQUIRETLS", "REQUIRETLS"], tls),
            ("a@example.org", sent, tls),
            ("<>", ["REQUIRETLS"], tls),
            ("c@example.org", [], tls),
        ]
        assert sink.mail_commands[2].options == sent
        assert sink.mail_commands[2].mail_from == "a@example.org"


def test_requiretls_in_clear_is_accepted_when_advertised() -> None:
    # A peer that (wrongly) offers REQUIRETLS in clear: tests see tls=None in the record.
    with Sink("plain", extensions=["REQUIRETLS"]) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            assert "REQUIRETLS" in _ehlo_caps(client)
            client.sendmail("a@example.org", ["b@example.net"], MSG, ["REQUIRETLS"])
        (msg,) = sink.wait_messages(1)
        assert msg.tls is None and msg.mail_options == [SIZE, "REQUIRETLS"]
        assert sink.mail_commands == [("a@example.org", [SIZE, "REQUIRETLS"], None)]


def test_requiretls_refused_when_not_advertised(tmp_path: Path) -> None:
    with Sink("starttls") as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.ehlo("client.test")
            client.starttls(context=_client_ctx(sink, tmp_path))
            assert "REQUIRETLS" not in _ehlo_caps(client)
            code, text = client.docmd("MAIL FROM:<a@example.org> REQUIRETLS")
            assert (code, text[:6]) == (555, b"5.5.4 "), (code, text)
            code, text = client.docmd("MAIL FROM:<a@example.org> FROB")
            assert (code, text[:6]) == (555, b"5.5.4 "), (code, text)
            # Nothing was opened: a MAIL without the parameter goes through.
            client.sendmail("a@example.org", ["b@example.net"], MSG)
        (msg,) = sink.wait_messages(1)
        assert msg.mail_options == [SIZE]
        commands = sink.mail_commands
        assert [c.options for c in commands] == [["REQUIRETLS"], ["FROB"], [SIZE]]
        assert all(c.tls == msg.tls for c in commands)


def test_mail_commands_recorded_before_ehlo_and_unparsable() -> None:
    with Sink("plain") as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            assert client.docmd("MAIL FROM:<a@example.org>")[0] == 503  # no EHLO yet
            client.ehlo("client.test")
            assert client.docmd("MAIL TO:<a@example.org>")[0] == 501
            assert client.docmd("MAIL FROM:<a@example.org> SIZE=10")[0] == 250
            assert client.rset()[0] == 250
        sink.wait_for(lambda: len(sink.mail_commands) == 3)
        assert sink.mail_commands == [
            ("a@example.org", [], None),
            ("TO:<a@example.org>", [], None),
            ("a@example.org", ["SIZE=10"], None),
        ]
        assert sink.messages == []


def test_extensions_validation() -> None:
    with pytest.raises(TypeError):
        Sink("plain", extensions="REQUIRETLS")
    with pytest.raises(ValueError):
        Sink("plain", extensions=["REQUIRETLS\r\n250-X"])
