"""Fuzzing with Hypothesis: a real IngestServer under random command sequences, and the parsers
that read stored messages (policy facts, the TLS-Required header) under random bytes.

Every run is derandomized (the same examples each time, no example database) and bounded
(``max_examples``), so CI is stable and fast. What must hold:

- the server never crashes or hangs: each session ends (QUIT, 421, or a failed TLS handshake)
  within a deadline, every read has a timeout, and a fresh EHLO is answered afterwards;
- every reply line is ``NNN`` then a space or a hyphen, with a reply code of RFC 5321 §4.2, at
  most 512 octets, and never the ``Internal error`` of an unexpected exception;
- ``facts_from_message`` and ``has_tls_required_no`` never raise.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest
from aiosmtplib.email import quote_address
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from services.common.model import Envelope, TlsMode, has_tls_required_no, new_message_id
from services.common.rules import Rules
from services.common.values import HostPort
from services.deliver import pipelining
from services.ingest import session as ingest_session
from services.policy.decide import Ruleset
from services.policy.facts import facts_from_message
from tests.test_ingest import RunningServer, Valkey, make_config

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SESSION_DEADLINE = 10.0  # seconds for one fuzzed session to end (command_timeout is 1 s)
REPLY_LINE = re.compile(rb"^(\d{3})[ -]")
# RFC 5321 §4.2.2/§4.2.3 and the extensions in use (RFC 3207, 4954, 8689): every code we send.
REPLY_CODES = frozenset(
    {211, 214, 220, 221, 235, 250, 251, 252, 334, 354}
    | {421, 450, 451, 452, 454, 455}
    | {500, 501, 502, 503, 504, 521, 530, 534, 535, 538, 550, 551, 552, 553, 554, 555}
)

VERBS = (
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP",
    "STARTTLS", "AUTH", "BDAT", "ETRN", "XCLIENT",
)  # fmt: skip
ARGUMENTS = (
    "FROM:<a@client.example>", "FROM:<>", "TO:<b@dest.example>", "TO:<postmaster>",
    "FROM:<a@client.example> SIZE=99999999999999999999", "FROM:<a@b> BODY=8BITMIME SMTPUTF8",
    "FROM:<a@b> REQUIRETLS", "FROM:<a@b> REQUIRETLS=1", "FROM:<é@b> SMTPUTF8", "FROM:a@b",
    "TO:<\"q\\\"x\"@dest.example>", "TO:<@relay:b@dest.example>", "PLAIN", "LOGIN =", "*",
    "client.example", "[127.0.0.1]", "FROM:<" + "a" * 300 + "@b>",
)  # fmt: skip


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostPort]:
    """One server for every example: small limits so that the examples reach them."""
    directory = tmp_path_factory.mktemp("fuzz")
    valkey = Valkey(directory)
    valkey.start()
    grace, ingest_session.HANG_UP_GRACE = ingest_session.HANG_UP_GRACE, 0.5
    config = make_config(
        directory,
        command_timeout=1.0,
        max_bad_commands=50,
        max_message_bytes=50_000,
        max_header_bytes=2_000,
        max_recipients=5,
    )
    try:
        with RunningServer(config, valkey.url) as bound:
            yield bound
    finally:
        ingest_session.HANG_UP_GRACE = grace
        valkey.stop()


def _text(alphabet: st.SearchStrategy[str], max_size: int) -> st.SearchStrategy[bytes]:
    return st.text(alphabet, max_size=max_size).map(lambda t: t.encode("utf-8", "surrogatepass"))


command_lines = st.builds(
    lambda verb, arg: verb + (b" " + arg if arg else b"") + b"\r\n",
    st.sampled_from(VERBS).map(str.encode) | _text(st.characters(), 8),
    st.none()
    | st.sampled_from(ARGUMENTS).map(lambda a: a.encode())
    | _text(st.characters(codec="utf-8"), 40)
    | st.binary(max_size=40),
)
# Addresses and parameters made of what the parsers under MAIL, RCPT and VRFY trip over (the
# seeds made the stdlib's header parser raise IndexError under aiosmtpd).
SEEDS = ("<", "<@", '"', '<"', "a@", "<a@", "@", "(", "\\", "<<>>", "<a@b>>", '"\\')
tricky = st.sampled_from(SEEDS) | st.text('<>@:"\\()[],;. =\t\raZ9é\x00', max_size=12)
envelope_lines = st.builds(
    lambda template, text: (template.format(text) + "\r\n").encode(),
    st.sampled_from(["MAIL FROM:{}", "RCPT TO:{}", "VRFY {}", "MAIL FROM:<a@b> {}", "RCPT {}"]),
    tricky,
)
chunks = st.one_of(
    command_lines,  # commands twice as likely as each kind of junk below
    command_lines,
    envelope_lines,
    envelope_lines,
    st.lists(command_lines, min_size=2, max_size=6).map(b"".join),  # pipelined
    st.binary(max_size=200),  # junk, with or without line ends
    st.integers(500, 20_000).map(lambda n: b"A" * n + b"\r\n"),  # long lines
    st.sampled_from([b".\r\n", b"\r\n", b"\n", b"\r", b"\x00", b"\r\n.\r\n", b"\n.\n"]),
    st.just(b"Subject: x\r\n" + b"X-H: " + b"h" * 990 + b"\r\n"),  # header growth
)
SESSION_END = b"\r\n.\r\nQUIT\r\n"  # ends DATA if in it, then the session


def session(address: HostPort, sent: list[bytes]) -> bytes:
    """Send every chunk, then SESSION_END; everything the server said until it closed."""
    received = bytearray()
    deadline = time.monotonic() + SESSION_DEADLINE
    with socket.create_connection((address.host, address.port), timeout=SESSION_DEADLINE) as sock:
        for chunk in [*sent, SESSION_END]:
            try:
                sock.sendall(chunk)
            except OSError:  # closed by the server (QUIT, 421, a failed TLS handshake)
                break
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                pytest.fail(f"the server hung: no close within {SESSION_DEADLINE}s of {sent!r}")
            if not data:
                break
            received += data
    return bytes(received)


def check_replies(received: bytes, sent: list[bytes]) -> None:
    lines = received.split(b"\r\n")
    assert lines[-1] == b"", f"reply cut or not CRLF-terminated: {lines[-1]!r} for {sent!r}"
    assert lines[0].startswith(b"220 "), lines[0]
    for line in lines[:-1]:
        match = REPLY_LINE.match(line)
        assert match is not None, f"not an SMTP reply line: {line!r} for {sent!r}"
        assert int(match.group(1)) in REPLY_CODES, f"unexpected code: {line!r} for {sent!r}"
        assert len(line) + 2 <= 512, f"reply line over 512 octets for {sent!r}"
        assert b"Internal error" not in line, f"an exception answered {line!r} for {sent!r}"


def still_serving(address: HostPort) -> None:
    with socket.create_connection((address.host, address.port), timeout=5) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO check.example\r\n")
        line = reader.readline()
        while line[3:4] == b"-":
            line = reader.readline()
        assert line.startswith(b"250 "), line
        reader.close()


@FUZZ
@given(greet=st.booleans(), chunks=st.lists(chunks, max_size=12))
def test_fuzzed_sessions_get_well_formed_replies_and_never_break_the_server(
    address: HostPort, greet: bool, chunks: list[bytes]
) -> None:
    sent = [b"EHLO client.example\r\n", *chunks] if greet else chunks  # most commands need it
    check_replies(session(address, sent), sent)
    still_serving(address)


# --------------------------------------------------------------------------- the parsers

RULES = TypeAdapter(Rules).validate_python(
    [
        {"name": "subject", "when": {"subject": "(?i)secret"}, "tls": "enforced"},
        {"name": "header", "when": {"header": {"name": "X-Class", "matches": "x"}}},
        {"name": "body", "when": {"body": "account"}, "tls": "verified"},
        {"name": "attachment", "when": {"attachment": {"filename": "*.xlsx"}}},
    ]
)
DEEP = Ruleset(TlsMode.OPPORTUNISTIC, RULES, 4096)
HEADERS_ONLY = Ruleset(TlsMode.OPPORTUNISTIC, RULES[:2], 4096)

mime_lines = st.sampled_from(
    [
        b"Content-Type: multipart/mixed; boundary=b",
        b'Content-Type: multipart/alternative; boundary="b"',
        b"Content-Type: text/html; charset=x-unknown",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Type: message/rfc822",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b'Content-Disposition: attachment; filename="a.xlsx"',
        b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.xlsx",
        b"Subject: =?utf-8?b?c2VjcmV0?= =?bogus?q?x?=",
        b"TLS-Required: No",
        b"TLS-Required:No ",
        b"--b",
        b"--b--",
        b"<html><script>x</script><p>account &amp; &#xZZ;</p>",
        b"=E2=82=AC=\r\n=ZZ",
        b"YWNjb3VudA==",
        b"",
        b" folded",
    ]
)
messages = st.one_of(
    st.binary(max_size=2000),
    st.lists(mime_lines | st.binary(max_size=60), max_size=40).map(b"\r\n".join),
    st.lists(mime_lines, max_size=40).map(b"\n".join),
)


@FUZZ
@given(raw=messages)
def test_message_parsers_never_raise(raw: bytes) -> None:
    envelope = Envelope(new_message_id(), "s@origin.example", ("a@dest.example",), size=len(raw))
    for ruleset in (DEEP, HEADERS_ONLY):
        assert facts_from_message(envelope, raw, ruleset).size == len(raw)
    assert isinstance(has_tls_required_no(raw), bool)


_ADDRESS_CHARS = "abcXYZ09!#$%&'*+/=?^_`{|}~-.@ <>\"(),:;[]\\\r\n\té"


def _quoted_as_aiosmtplib(address: str) -> str:
    try:
        return quote_address(address)
    except ValueError:
        return "ValueError"


def _quoted_here(address: str) -> str:
    try:
        return pipelining.quoted(address)
    except ValueError:
        return "ValueError"


@FUZZ
@given(
    address=st.one_of(
        st.text(alphabet=_ADDRESS_CHARS, max_size=24),
        st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,10}@[a-z0-9.-]{1,10}", fullmatch=True),
    )
)
def test_envelope_addresses_are_quoted_as_aiosmtplib_quotes_them(address: str) -> None:
    """The deliver client's quick way for plain addresses (services/deliver/pipelining.py
    ``quoted``) gives what aiosmtplib's ``quote_address`` gives, or the same ValueError, for
    any string: plain, odd (dots, quotes, brackets, spaces) or hostile (CR, LF)."""
    assert _quoted_here(address) == _quoted_as_aiosmtplib(address)
