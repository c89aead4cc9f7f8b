"""Ingest against hostile and broken clients: every limit answers its exact reply, nothing
crashes the server, memory stays bounded, and the server keeps serving the others.

Real parts as in tests/test_ingest.py (valkey, IngestServer on its own loop); the client is a raw
socket (:class:`Raw`) so that over-long lines, pipelined junk and stalled transfers can be sent
as they are. Every read has a timeout.
"""

from __future__ import annotations

import contextlib
import hmac
import smtplib
import socket
import ssl
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import redis

from services.common.config import Config
from services.common.listeners import Listener
from services.common.passwords import hash_password, verify
from services.common.values import HostPort
from services.ingest import replies
from services.ingest import session as ingest_session
from services.ingest.message import MessageReader
from services.ingest.session import AUTH_LINE_MAX, COMMAND_LINE_MAX, MAIL_LINE_MAX
from tests.test_ingest import RunningServer, Valkey, client, make_config, queued_id, stored

# The replies of the contract (services/ingest/server.py), as they go over the wire.
TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections, try again later"
LINE_TOO_LONG = b"500 5.5.2 Line too long"
DATA_LINE_TOO_LONG = b"500 5.6.0 Line too long: text lines are limited to 1000 octets"
TIMEOUT = b"421 4.4.2 Timeout, closing connection"
TOO_MANY_ERRORS = b"421 4.7.0 Too many errors, closing connection"
HEADER_TOO_LARGE = b"552 5.3.4 Header section too large"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size"
TOO_MANY_RECIPIENTS = b"452 4.5.3 Too many recipients"
NOOP_OK = b"250 2.0.0 OK"
MAIL_OK = b"250 2.1.0 Ok"
RCPT_OK = b"250 2.1.5 Ok"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>"
NEED_HELO = b"503 5.5.1 Error: send HELO first"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command"
# Seconds a test waits for a session that must end (a timeout of 0.5 s, then a grace of 0.5 s)
# to free its max_connections slot: a deadline for a loaded machine, not a measure of speed.
SLOT_FREED = 30.0


# --------------------------------------------------------------------------- real parts


class Raw:
    """A raw SMTP connection: bytes out, reply lines in (CRLF stripped), reads time out."""

    def __init__(self, address: HostPort, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((address.host, address.port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), f"connection closed or line cut: {line!r}"
        return line[:-2]

    def reply(self) -> bytes:
        """One reply; its last line (multi-line replies are read through)."""
        line = self.line()
        while line[3:4] == b"-":
            line = self.line()
        return line

    def greeted(self) -> Raw:
        assert self.line().startswith(b"220 "), "no greeting"
        return self

    def ehlo(self) -> Raw:
        self.send(b"EHLO client.example\r\n")
        assert self.reply().startswith(b"250 "), "EHLO refused"
        return self

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        """True when the server closed the connection (EOF or reset) before the timeout."""
        try:
            return self.file.read() == b""
        except ConnectionResetError:
            return True


def greets(address: HostPort) -> bool:
    """Whether a new connection is greeted (not refused with 421, nor left unanswered: on a
    loaded machine the server may still be working through a flood when the connection comes)."""
    with Raw(address) as raw:
        try:
            return raw.line().startswith(b"220 ")
        except TimeoutError:
            return False


def serving(address: HostPort) -> bool:
    with Raw(address) as raw:
        raw.greeted()
        return raw.command(b"NOOP") == NOOP_OK


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def transaction(raw: Raw) -> None:
    """MAIL and RCPT, then DATA up to the go-ahead."""
    assert raw.command(b"MAIL FROM:<a@client.example>") == MAIL_OK
    assert raw.command(b"RCPT TO:<b@dest.example>") == RCPT_OK
    assert raw.command(b"DATA") == GO_AHEAD


def config(tmp_path: Path, **ingest: Any) -> Config:
    return make_config(tmp_path, **ingest)


# --------------------------------------------------------------------------- connections


def test_connections_over_the_limit_get_421_while_the_others_are_served(
    tmp_path: Path, valkey: Valkey
) -> None:
    cfg = config(tmp_path, max_connections=2, submission=HostPort("127.0.0.1", 0))
    running = RunningServer(cfg, valkey.url)
    with running as address:
        first, second = Raw(address).greeted(), Raw(address).greeted()
        with Raw(address) as third:
            assert third.line() == TOO_MANY_CONNECTIONS
            assert third.closed_by_server()
        assert first.command(b"NOOP") == NOOP_OK and second.command(b"NOOP") == NOOP_OK
        # The limit is per listener: submission still takes connections.
        assert serving(running.server.addresses[Listener.SUBMISSION])
        first.close()
        wait_for(lambda: serving(address), SLOT_FREED, "a slot to free up")
        assert second.command(b"NOOP") == NOOP_OK
        second.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_client_that_hangs_up_before_the_greeting_frees_its_slot(
    tmp_path: Path, valkey: Valkey, loop: str
) -> None:
    """A TCP probe connects and closes at once (a load balancer's or Kubernetes' check). Its end
    of file may arrive before the greeting is written (uvloop reports it so): the session must
    end then, not stay half-open until the command timeout, holding a max_connections slot and
    counted as a session that may still join a group commit."""
    cfg = config(tmp_path, max_connections=1).model_copy(update={"event_loop": loop})
    running = RunningServer(cfg, valkey.url)
    with running as address:
        for _ in range(20):
            socket.create_connection((address.host, address.port), timeout=5).close()
        wait_for(lambda: greets(address), SLOT_FREED, "the probes' slot to free up")
        assert serving(address)
        handler = running.server._handlers[0]
        wait_for(lambda: not handler.connections, SLOT_FREED, "every probe's session to end")


# --------------------------------------------------------------------------- line lengths


def test_command_lines_over_512_octets_are_refused(tmp_path: Path, valkey: Valkey) -> None:
    noop = b"NOOP " + b"x" * (COMMAND_LINE_MAX - len("NOOP ") - 2)  # 512 with the CRLF
    sender = b"MAIL FROM:<" + b"a" * 400 + b"@client.example>"
    params = b" SIZE=100 BODY=8BITMIME"
    mail = sender + params + b" " * (MAIL_LINE_MAX - len(sender + params) - 2)
    with RunningServer(config(tmp_path), valkey.url) as address, Raw(address) as raw:
        raw.greeted()
        assert raw.command(noop) == NOOP_OK
        assert raw.command(noop + b"x") == LINE_TOO_LONG
        raw.ehlo()
        for _ in range(30):  # aiosmtpd raised the MAIL limit with every EHLO
            raw.ehlo()
        assert raw.command(mail + b" ") == LINE_TOO_LONG
        assert raw.command(mail) == MAIL_OK  # RFC 1870/6152/6531/8689 extensions: 575
        assert raw.command(b"RSET") == b"250 2.0.0 OK"
        assert raw.command(b"NOOP " + b"y" * 100_000) == LINE_TOO_LONG  # beyond the stream buffer
        assert raw.command(b"NOOP") == NOOP_OK


def test_text_lines_over_1000_octets_refuse_the_message(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    longest = b"x" * 998 + b"\r\n"  # RFC 5322 §2.1.1: 998 characters and CRLF
    stuffed = b".." + b"y" * 997 + b"\r\n"  # 1001 octets on the wire, 1000 stored
    message = b"Subject: long lines\r\n\r\n" + longest + stuffed
    with RunningServer(config(tmp_path), valkey.url) as address, Raw(address) as raw:
        raw.greeted().ehlo()
        transaction(raw)
        raw.send(message + b".\r\n")
        reply = raw.reply()
        assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
        _envelope, body = stored(store, reply.rsplit(b" ", 1)[1].decode())
        assert body.endswith(b"Subject: long lines\r\n\r\n" + longest + stuffed[1:])

        for too_long in (b"z" * 999 + b"\r\n", b"z" * 200_000 + b"\r\n"):
            transaction(raw)
            raw.send(b"Subject: x\r\n\r\n" + too_long + b".\r\n")
            assert raw.reply() == DATA_LINE_TOO_LONG
        assert raw.command(b"NOOP") == NOOP_OK  # the session goes on
    assert len(store.keys("tlsrelay:msg:*")) == 1


def test_an_endless_line_in_data_keeps_memory_bounded(tmp_path: Path, valkey: Valkey) -> None:
    chunk, count = b"w" * 65536, 320  # 20 MiB without a line end
    with RunningServer(config(tmp_path), valkey.url) as address, Raw(address) as raw:
        raw.greeted().ehlo()
        transaction(raw)
        tracemalloc.start()
        try:
            for _ in range(count):
                raw.send(chunk)
            raw.send(b"\r\n.\r\n")
            assert raw.reply() == DATA_LINE_TOO_LONG
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert raw.command(b"NOOP") == NOOP_OK
    assert peak < 4 * 1024 * 1024, f"{peak} bytes held for a {len(chunk) * count}-octet line"


# --------------------------------------------------------------------------- timeouts


def test_an_idle_client_gets_421_and_is_disconnected(tmp_path: Path, valkey: Valkey) -> None:
    with RunningServer(config(tmp_path, command_timeout=0.5), valkey.url) as address:
        with Raw(address) as raw:
            raw.greeted()
            started = time.monotonic()
            assert raw.line() == TIMEOUT
            assert raw.closed_by_server()
            assert 0.4 < time.monotonic() - started < 3
        with Raw(address) as raw:  # a command without its line end does not count
            raw.greeted()
            raw.send(b"NOOP")
            assert raw.line() == TIMEOUT
            assert raw.closed_by_server()
        with Raw(address) as raw:  # nor does a transfer that stalls
            raw.greeted().ehlo()
            transaction(raw)
            raw.send(b"Subject: stalled\r\n")
            assert raw.line() == TIMEOUT
            assert raw.closed_by_server()


def test_a_slow_but_steady_transfer_is_not_cut_off(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    cfg = config(tmp_path, command_timeout=0.5)
    with RunningServer(cfg, valkey.url) as address, Raw(address) as raw:
        raw.greeted().ehlo()
        transaction(raw)
        for number in range(8):  # 1.6 s in all, more than three timeouts
            raw.send(b"line %d\r\n" % number)
            time.sleep(0.2)
        raw.send(b".\r\n")
        assert raw.reply().startswith(b"250 2.0.0 Ok: queued as ")


def test_a_client_that_never_reads_is_cut_off(
    tmp_path: Path, valkey: Valkey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies pile up unread until the server stops reading too; the timeout's 421 cannot be
    flushed, so the connection is aborted after the grace instead of being held forever."""
    monkeypatch.setattr(ingest_session, "HANG_UP_GRACE", 0.5)
    cfg = config(tmp_path, command_timeout=0.5, max_connections=1)
    with RunningServer(cfg, valkey.url) as address:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect((address.host, address.port))
        sock.setblocking(False)
        deadline = time.monotonic() + 5
        with contextlib.suppress(BlockingIOError):
            while time.monotonic() < deadline:
                sock.send(b"EHLO x\r\n" * 1000)  # 8 octets in, ~150 out
        try:
            wait_for(lambda: greets(address), SLOT_FREED, "the stuck session to be cut off")
        finally:
            sock.close()


def test_a_stalled_tls_handshake_is_cut_off_and_frees_its_slot(
    tmp_path: Path, valkey: Valkey
) -> None:
    """asyncio never tells the protocol of a connection lost mid-handshake: the session must
    still end (timeout, server stop), or it holds a max_connections slot forever."""
    cfg = config(tmp_path, command_timeout=0.5, max_connections=1)
    running = RunningServer(cfg, valkey.url)
    with running as address:
        for _ in range(2):
            with Raw(address) as raw:
                raw.greeted().ehlo()
                assert raw.command(b"STARTTLS") == b"220 2.0.0 Ready to start TLS"
                raw.send(b"\x16\x03\x01\x02\x00")  # a ClientHello record header, then nothing
                assert raw.closed_by_server()
            wait_for(lambda: greets(address), SLOT_FREED, "the slot of the stalled handshake")
        stalled = Raw(address).greeted().ehlo()
        assert stalled.command(b"STARTTLS") == b"220 2.0.0 Ready to start TLS"
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 3  # stop() ends it too, without waiting 5 s for it
    stalled.close()


# --------------------------------------------------------------------------- errors


def test_after_ten_bad_commands_421_and_nothing_more_is_run(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    with RunningServer(config(tmp_path), valkey.url) as address:
        with Raw(address) as raw:
            raw.greeted().ehlo()
            for _ in range(6):  # aiosmtpd alone would hang up after 5 unknown verbs (502)
                assert raw.command(b"FROB").startswith(b'500 5.5.2 Error: command "FROB"')
            assert raw.command(b"NOOP") == NOOP_OK
            assert raw.command(b"RCPT TO:<b@dest.example>") == NEED_MAIL  # 503 counts
            assert raw.command(b"MAIL FROM:<a\x00@client.example>")[:4] == b"501 "  # so does 501
            assert raw.command(b"") == b"500 5.5.2 Error: bad syntax"
            # The tenth: its own reply, then 421; the pipelined MAIL after it is never run.
            raw.send(b"X\x00\rY\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<b@dest.example>\r\n")
            assert raw.line() == b'500 5.5.2 Error: command "X??Y" not recognized'
            assert raw.line() == TOO_MANY_ERRORS
            assert raw.closed_by_server()
        assert serving(address)


def test_max_bad_commands_is_configurable(tmp_path: Path, valkey: Valkey) -> None:
    cfg = config(tmp_path, max_bad_commands=2)
    with RunningServer(cfg, valkey.url) as address, Raw(address) as raw:
        raw.greeted()
        raw.send(b"A\r\nB\r\nC\r\n")
        assert raw.line().startswith(b"500 ")
        assert raw.line().startswith(b"500 ")
        assert raw.line() == TOO_MANY_ERRORS
        assert raw.closed_by_server()


# --------------------------------------------------------------------------- STARTTLS injection


def test_commands_pipelined_after_starttls_are_discarded(tmp_path: Path, valkey: Valkey) -> None:
    """RFC 3207 §4.2 (CVE-2011-0411 class; aiosmtpd PR #380, in 1.4.6): what follows STARTTLS in
    the same packet was sent in clear and must never run inside the TLS session."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with RunningServer(config(tmp_path), valkey.url) as address, Raw(address) as raw:
        raw.greeted().ehlo()
        raw.send(b"STARTTLS\r\nEHLO evil.example\r\nMAIL FROM:<evil@x.example>\r\n")
        assert raw.line() == b"220 2.0.0 Ready to start TLS"  # nothing else in clear
        with context.wrap_socket(raw.sock, server_hostname="mx") as tls:
            secure = tls.makefile("rb")
            tls.sendall(b"RCPT TO:<b@dest.example>\r\n")
            # Had the injected EHLO and MAIL run, their replies would come first and RCPT
            # would be accepted.
            assert secure.readline() == NEED_HELO + b"\r\n"
            tls.sendall(b"EHLO client.example\r\n")
            while secure.readline()[3:4] == b"-":
                pass
            tls.sendall(b"RCPT TO:<b@dest.example>\r\n")
            assert secure.readline() == NEED_MAIL + b"\r\n"
            secure.close()


# --------------------------------------------------------------------------- envelope and headers


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"MAIL FROM:<a\rb@client.example>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<a\x00b@client.example>", b"501 5.1.7 Bad sender address syntax"),
        (b"RCPT TO:<a\rb@dest.example>", b"501 5.1.3 Bad recipient address syntax"),
        (b"RCPT TO:<a\x00b@dest.example>", b"501 5.1.3 Bad recipient address syntax"),
    ],
)
def test_cr_and_nul_in_envelope_addresses_are_refused(
    tmp_path: Path, valkey: Valkey, command: bytes, reply: bytes
) -> None:
    with RunningServer(config(tmp_path), valkey.url) as address, Raw(address) as raw:
        raw.greeted().ehlo()
        if command.startswith(b"RCPT"):
            assert raw.command(b"MAIL FROM:<a@client.example>") == MAIL_OK
        assert raw.command(command) == reply
        # An LF ends the line: what follows is a command of its own, never part of the address.
        assert raw.command(b"RSET\nMAIL FROM:<c@client.example>") == b"250 2.0.0 OK"
        assert raw.reply() == MAIL_OK


def test_unparsable_addresses_are_syntax_errors_not_internal_errors(
    tmp_path: Path, valkey: Valkey
) -> None:
    """The stdlib header parser under aiosmtpd raises IndexError on these (found by
    tests/test_fuzz.py): each used to be answered 451 4.3.0 with a stack trace in the log."""
    malformed = b"553 5.1.3 Error: malformed address"
    with RunningServer(config(tmp_path), valkey.url) as address, Raw(address) as raw:
        raw.greeted().ehlo()
        for bad in (b"<", b"<@", b'"', b"a@", b'<"'):
            assert raw.command(b"MAIL FROM:" + bad) == malformed
            assert raw.command(b"VRFY " + bad) == b"502 5.5.1 Could not VRFY " + bad
        assert raw.command(b"MAIL FROM:<a@client.example>") == MAIL_OK
        for bad in (b"<", b"a@"):
            assert raw.command(b"RCPT TO:" + bad) == malformed


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"Subject: caf\xc3\xa9 \xff\r\nFrom: \xe9@x\r\n\r\nbody\r\n", id="8-bit"),
        pytest.param(b"Subject: no separator\r\nthis is the body\r\n", id="no-blank-line"),
        pytest.param(b"just a body, no header at all\r\n", id="no-headers"),
        pytest.param(b"\r\nan empty header section\r\n", id="empty-header-section"),
        pytest.param(b"", id="empty"),
    ],
)
def test_odd_messages_are_accepted_and_stored_as_received(
    tmp_path: Path, valkey: Valkey, store: redis.Redis, message: bytes
) -> None:
    """No 8BITMIME or SMTPUTF8 asked for, no RFC 5322 shape: a relay stores what it got."""
    with RunningServer(config(tmp_path), valkey.url) as address, client(address) as smtp:
        smtp.helo()  # plain SMTP: no extension announced
        smtp.mail("a@client.example")
        smtp.rcpt("b@dest.example")
        message_id = queued_id(smtp.data(message))
    _envelope, body = stored(store, message_id)
    assert body.endswith(message) and body.startswith(b"Received: ")


def test_a_header_section_over_the_limit_is_refused(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    field = b"X-Junk: " + b"j" * 990 + b"\r\n"  # 1000 octets
    folded = b"X-Folded: start\r\n" + b"\t" + b"f" * 997 + b"\r\n"
    cfg = config(tmp_path, max_header_bytes=2000, max_message_bytes=50_000_000)
    with RunningServer(cfg, valkey.url) as address, client(address) as smtp:
        smtp.ehlo()
        for header, expected in [
            (field * 2, 250),  # exactly the limit
            (field * 2 + b"A: b\r\n", 552),
            (folded + folded, 552),  # continuation lines count
            (b"Subject: s\r\nbody line\r\n" + field * 5, 250),  # the body began at "body line"
        ]:
            smtp.mail("a@client.example")
            smtp.rcpt("b@dest.example")
            code, text = smtp.data(header + b"\r\nbody\r\n")
            assert code == expected, (header[:40], code, text)
            if code == 552:
                assert b"552 " + text == HEADER_TOO_LARGE
    assert len(store.keys("tlsrelay:msg:*")) == 2


def test_a_10_mb_header_block_is_refused_by_default(
    tmp_path: Path, valkey: Valkey, store: redis.Redis
) -> None:
    header = b"X-Junk: " + b"j" * 990 + b"\r\n"
    message = header * 10_000 + b"\r\nbody\r\n"  # 10 MB of header section
    cfg = config(tmp_path, max_message_bytes=50_000_000)
    with RunningServer(cfg, valkey.url) as address:
        with client(address) as smtp:
            smtp.ehlo()
            smtp.mail("a@client.example")
            smtp.rcpt("b@dest.example")
            assert smtp.data(message) == (552, HEADER_TOO_LARGE[4:])
        assert serving(address)
    assert store.keys("tlsrelay:msg:*") == []


# --------------------------------------------------------------------------- recipients and size


def test_recipient_and_size_limits(tmp_path: Path, valkey: Valkey, store: redis.Redis) -> None:
    cfg = config(tmp_path, max_recipients=2, max_message_bytes=1000)
    with RunningServer(cfg, valkey.url) as address, Raw(address) as raw:
        raw.greeted().ehlo()
        assert raw.command(b"MAIL FROM:<a@client.example> SIZE=1001") == TOO_BIG
        assert raw.command(b"MAIL FROM:<a@client.example> SIZE=1000") == MAIL_OK
        assert raw.command(b"RCPT TO:<b@dest.example>") == RCPT_OK
        assert raw.command(b"RCPT TO:<c@dest.example>") == RCPT_OK
        assert raw.command(b"RCPT TO:<d@dest.example>") == TOO_MANY_RECIPIENTS
        assert raw.command(b"DATA") == GO_AHEAD
        raw.send(b"x" * 998 + b"\r\n" + b".\r\n")  # 1000 octets: fits
        assert raw.reply().startswith(b"250 2.0.0 Ok: queued as ")
        transaction(raw)
        raw.send(b"x" * 998 + b"\r\n" + b"\r\n" + b".\r\n")  # 1002 octets, SIZE= not given
        assert raw.reply() == TOO_BIG
    assert len(store.keys("tlsrelay:msg:*")) == 1


# --------------------------------------------------------------------------- secrets


def test_password_checks_are_constant_time_and_metrics_bind_loopback() -> None:
    stored_hash = hash_password("right")
    with mock.patch.object(hmac, "compare_digest", wraps=hmac.compare_digest) as compare:
        assert verify("right", stored_hash) and not verify("wrong", stored_hash)
    assert compare.call_count == 2
    metrics = Config.model_validate({}).metrics
    for endpoint in (metrics.ingest, metrics.policy, metrics.deliver):
        assert endpoint is not None and endpoint.host == "127.0.0.1"


# --------------------------------------------------------------------------- the reader alone


def test_message_reader_table() -> None:
    def read(*lines: bytes, max_bytes: int = 10_000, header: int = 100) -> MessageReader:
        reader = MessageReader(max_bytes, header, max_hops=50, stream_limit=AUTH_LINE_MAX)
        for line in lines:
            if not line.endswith(b"\r\n"):
                reader.fragment(line)
            elif reader.line(line):
                return reader
        raise AssertionError("no final dot")

    ok = read(b"A: b\r\n", b"\r\n", b"..dot\r\n", b".\r\n")
    assert (ok.refusal, bytes(ok.content)) == (None, b"A: b\r\n\r\n.dot\r\n")
    # After a fragment, ".\r\n" ends the long line, not the message.
    assert read(b"x" * 50, b".\r\n", b".\r\n").refusal == replies.DATA_LINE_TOO_LONG
    assert read(b"x" * 1001 + b"\r\n", b".\r\n").refusal == replies.DATA_LINE_TOO_LONG
    assert read(b"y" * 90 + b"\r\n", b".\r\n", max_bytes=91).refusal == replies.TOO_BIG
    assert read(b"A: " + b"h" * 98 + b"\r\n", b".\r\n").refusal == replies.HEADER_TOO_LARGE
    # The first limit crossed decides; nothing is kept after it.
    first = read(b"x" * 1001 + b"\r\n", b"y" * 5000 + b"\r\n", b".\r\n", max_bytes=3000)
    assert (first.refusal, first.content) == (replies.DATA_LINE_TOO_LONG, bytearray())


def test_smtplib_sees_the_limits_as_errors(tmp_path: Path, valkey: Valkey) -> None:
    """The stdlib client (as a sending MTA) gets a clean SMTP error, not a dropped connection."""
    with RunningServer(config(tmp_path, max_header_bytes=100), valkey.url) as address:
        with client(address) as smtp, pytest.raises(smtplib.SMTPDataError) as error:
            smtp.sendmail("a@client.example", ["b@dest.example"], b"A: " + b"a" * 200 + b"\r\n")
        assert (error.value.smtp_code, error.value.smtp_error) == (552, HEADER_TOO_LARGE[4:])
