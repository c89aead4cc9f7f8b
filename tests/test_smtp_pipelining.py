"""PIPELINING (RFC 2920) in the delivery client, against a scripted raw SMTP peer on loopback.

The peer (:class:`ScriptedPeer`, a raw asyncio server in a thread, plain or with real STARTTLS
and the test CA) answers each command from a script. When it advertises PIPELINING it *holds*
its replies to MAIL and RCPT until DATA has arrived: a client that waited for each reply would
never get one (its command timeout would end the test in failure), so a pass proves the group
went in one go. It then writes the held replies and DATA's together in one write, or byte by
byte (``trickle``), so the client's reader meets replies that arrive together and replies
split anywhere.

Each scenario is run twice, with and without PIPELINING advertised, and the fate of every
recipient must be the same (the one-command-at-a-time path is the reference). Hostile peers:
more replies than commands, an endless line, endless continuation lines, a close mid-group,
``354`` to DATA after every recipient was refused (the message must not be sent).

The client is the deliver service's own session code (:func:`services.deliver.session.attempt`)
in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest

from services.common.model import Envelope, TlsMode
from services.deliver import pipelining
from services.deliver.attempt import Attempt, Peer, Timeouts, TlsSettings
from services.deliver.pool import ConnectionPool
from services.deliver.session import attempt
from tests.certs import default_ca

BODY = b"Subject: pipelining\r\n\r\nline one\r\n.leading dot\r\n"
RCPTS = ["r0@x.test", "r1@x.test", "r2@x.test"]
ENDLESS_LINE = b"<endless line>"
ENDLESS_CONTINUATION = b"<endless continuation>"
TIMEOUTS = Timeouts("relay.test", connect=5, command=10, greeting=10, data=10)
FLOOD_CAP = 8 * 1024 * 1024  # the peer gives up flooding after this much (the test then fails)


@dataclass(frozen=True)
class Script:
    """What the peer answers (each a full reply, CRLF-terminated lines)."""

    mail: bytes = b"250 2.1.0 sender ok\r\n"
    rcpt: dict[str, bytes] = field(default_factory=dict)  # per address; default 250
    data: bytes = b"354 go ahead\r\n"
    final: bytes = b"250 2.0.0 queued as Q1\r\n"
    rset: bytes = b"250 2.0.0 ok\r\n"
    extra: bytes = b""  # written right after the final reply (replies nobody asked for)
    close_after: int | None = None  # close after this many replies to the transaction
    pipelining: bool = True
    trickle: bool = False  # every reply byte in its own write
    tls: bool = False
    chunking: bool = False  # advertise CHUNKING (RFC 3030) and take BDAT
    # At RSET: write this (b"": nothing) and close: a parked session dropped by the server
    rset_close: bytes | None = None
    # Seconds the peer spends on a BDAT chunk it has read (a content check, a milter) before it
    # answers the group, from its ``delay_from``-th chunk on (counting from 0)
    delay: float = 0.0
    delay_from: int = 0
    # at BDAT, or after DATA's 354: read no more and say nothing (a peer that stops reading)
    stall: bool = False
    # CHUNKING offered, BDAT not understood: "500" at once, the chunk then read as commands
    bdat_unknown: bool = False


@dataclass
class Seen:
    commands: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed: int = 0  # connections over (after the client closed its end, TLS shutdown included)
    errors: list[str] = field(default_factory=list)


class ScriptedPeer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.seen = Seen()
        self.port = 0
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        default_ca().issue_cert("localhost", "127.0.0.1").configure_cert(self._context)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scripted-peer", daemon=True)

    def __enter__(self) -> ScriptedPeer:
        self._thread.start()
        assert self._ready.wait(10), "peer did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.seen.connections += 1
        session = _Session(self, reader, writer)
        try:
            await session.run()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            self.seen.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            self.seen.closed += 1


class _Session:
    def __init__(
        self, peer: ScriptedPeer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.peer, self.script, self.reader, self.writer = peer, peer.script, reader, writer
        self.held: list[bytes] = []  # replies to MAIL/RCPT waiting for DATA (pipelining)
        self.sent = 0  # replies sent in this transaction
        self.tls = False

    async def run(self) -> None:
        await self._write([b"220 scripted.test ESMTP\r\n"])
        while line := await self.reader.readline():
            self.peer.seen.commands.append(line.rstrip())
            if not await self._command(line[:4].upper(), line):
                return

    async def _command(self, verb: bytes, line: bytes) -> bool:
        s = self.script
        if verb == b"EHLO":
            caps = [b"250-scripted.test", b"250-8BITMIME"]
            caps += [b"250-PIPELINING"] if s.pipelining else []
            caps += [b"250-CHUNKING"] if s.chunking else []
            caps += [b"250-STARTTLS"] if s.tls and not self.tls else []
            await self._write([b"\r\n".join([*caps, b"250 HELP"]) + b"\r\n"])
        elif verb == b"STAR":
            await self._write([b"220 2.0.0 ready\r\n"])
            await self.writer.start_tls(self.peer._context)
            self.tls = True
        elif verb == b"MAIL":
            return await self._group(s.mail)
        elif verb == b"RCPT":
            address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
            return await self._group(s.rcpt.get(address, b"250 2.1.5 ok\r\n"))
        elif verb == b"DATA":
            return await self._data()
        elif verb == b"BDAT":
            return await self._bdat(line)
        elif verb == b"QUIT":
            await self._write([b"221 2.0.0 bye\r\n"])
            return False
        elif verb == b"RSET":  # held with MAIL and RCPT: it may lead a group
            if s.rset_close is not None:
                await self._write([s.rset_close])
                return False
            self.sent = 0
            return await self._group(s.rset)
        else:  # NOOP
            await self._write([b"250 2.0.0 ok\r\n"])
        return True

    async def _group(self, reply: bytes) -> bool:
        self.held.append(reply)
        if self.script.pipelining:
            return True
        return await self._flush()

    async def _data(self) -> bool:
        self.held.append(self.script.data)
        if not await self._flush():
            return False
        if not self.script.data.startswith(b"354"):
            return True
        if self.script.stall:
            await asyncio.get_running_loop().create_future()  # until the peer is stopped
        lines = []
        while (line := await self.reader.readline()) and line != b".\r\n":
            lines.append(line)
        self.peer.seen.bodies.append(b"".join(lines))
        self.held.append(self.script.final + self.script.extra)
        return await self._flush()

    async def _bdat(self, line: bytes) -> bool:
        """``BDAT <size> LAST``: the chunk is read whole (RFC 3030 §2), then every held reply
        and the chunk's go together: DATA's reply where it refuses (no ``354``), else the
        final one."""
        if self.script.bdat_unknown:  # the chunk's lines are commands to it now
            self.held.append(b"500 5.5.2 Error: command not recognized\r\n")
            return await self._flush()
        size = int(line.split()[1])
        if self.script.stall:
            await asyncio.get_running_loop().create_future()  # until the peer is stopped
        self.peer.seen.bodies.append(await self.reader.readexactly(size))
        s = self.script
        if s.delay and len(self.peer.seen.bodies) > s.delay_from:
            await asyncio.sleep(s.delay)  # the peer's own work, not a synchronisation
        self.held.append(s.final + s.extra if s.data.startswith(b"354") else s.data)
        return await self._flush()

    async def _flush(self) -> bool:
        """Write the held replies in one go; False once the script says to close."""
        replies, self.held = self.held, []
        limit = self.script.close_after
        if limit is not None and self.sent + len(replies) >= limit:
            await self._write(replies[: limit - self.sent])
            return False
        self.sent += len(replies)
        await self._write(replies)
        return True

    async def _write(self, replies: list[bytes]) -> None:
        data = b"".join(replies)
        if ENDLESS_LINE in data or ENDLESS_CONTINUATION in data:
            await self._flood(data)
        elif self.script.trickle:
            for i in range(len(data)):
                self.writer.write(data[i : i + 1])
                await self.writer.drain()
        else:
            self.writer.write(data)
            await self.writer.drain()

    async def _flood(self, data: bytes) -> None:
        """Until the client gives up (it closes) or FLOOD_CAP bytes went out."""
        before = data.split(ENDLESS_LINE)[0].split(ENDLESS_CONTINUATION)[0]
        chunk = b"250 " + b"x" * 65536 if ENDLESS_LINE in data else b"250-xxxxxxxx\r\n" * 4096
        self.writer.write(before)
        sent = 0
        while sent < FLOOD_CAP and not self.writer.is_closing():
            self.writer.write(chunk)
            await self.writer.drain()
            sent += len(chunk)


def deliver(
    script: Script,
    recipients: list[str] | None = None,
    pool: ConnectionPool | None = None,
    times: int = 1,
    timeouts: Timeouts = TIMEOUTS,
) -> tuple[list[Attempt], Seen]:
    """``times`` deliveries to a fresh peer running ``script``, one after the other."""
    recipients = recipients or RCPTS
    envelope = Envelope(
        id="0123456789ab-pipe", sender="s@origin.test", recipients=tuple(recipients)
    )
    mode = TlsMode.ENFORCED if script.tls else TlsMode.NONE

    async def run(peer: ScriptedPeer) -> list[Attempt]:
        results = []
        for _ in range(times):
            results.append(
                await attempt(
                    Peer("scripted.test", "127.0.0.1", peer.port, "localhost"),
                    envelope,
                    recipients,
                    BODY,
                    TlsSettings(mode=mode),
                    timeouts,
                    pool=pool,
                )
            )
        if pool is not None:
            pool.close_all()
        # Let the client's side of each connection (a TLS shutdown too) finish on this loop
        # before asyncio.run closes it: wait until the peer has seen every connection end.
        deadline = time.monotonic() + 10
        while peer.seen.closed < peer.seen.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for _ in range(5):
            await asyncio.sleep(0)
        return results

    with ScriptedPeer(script) as peer:
        results = asyncio.run(run(peer))
    return results, peer.seen


def fates(result: Attempt) -> dict[str, str]:
    return {rcpt: str(reply) for rcpt, reply in result.replies.items()}


def verbs(seen: Seen) -> list[bytes]:
    wanted = (b"MAIL", b"RCPT", b"DATA", b"BDAT")
    return [c[:4].upper() for c in seen.commands if c[:4].upper() in wanted]


SCENARIOS: dict[str, Script] = {
    "all accepted": Script(),
    "multi-line replies": Script(
        mail=b"250-2.1.0 sender\r\n250-ok on\r\n250 two lines\r\n",
        rcpt={"r1@x.test": b"550-5.1.1 no such\r\n550-user here\r\n550 5.1.1 at all\r\n"},
        final=b"250-2.0.0 queued\r\n250 as Q2\r\n",
    ),
    "one refused, one deferred among accepted": Script(
        rcpt={"r1@x.test": b"550 5.1.1 no such user\r\n", "r2@x.test": b"451 4.2.0 later\r\n"}
    ),
    "251 accepted": Script(rcpt={"r0@x.test": b"251 2.1.5 will forward\r\n"}),
    "every recipient refused, DATA refused": Script(
        rcpt={r: b"550 5.1.1 no such user\r\n" for r in RCPTS},
        data=b"554 5.5.1 no valid recipients\r\n",
    ),
    "sender refused": Script(mail=b"550 5.7.1 sender refused\r\n", data=b"503 5.5.1 no\r\n"),
    "sender deferred": Script(mail=b"451 4.3.0 try later\r\n", data=b"503 5.5.1 no\r\n"),
    "MAIL out of sequence": Script(mail=b"503 5.5.1 nested MAIL\r\n", data=b"503 5.5.1 no\r\n"),
    "DATA deferred": Script(data=b"451 4.3.0 not now\r\n"),
    "DATA answered 250": Script(data=b"250 2.0.0 skipped a step\r\n"),
    "final dot refused": Script(final=b"552 5.3.4 too big\r\n"),
}


@pytest.mark.parametrize("trickle", [False, True], ids=["together", "trickle"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_recipient_fares_as_it_does_one_command_at_a_time(name: str, trickle: bool) -> None:
    script = replace(SCENARIOS[name], trickle=trickle)
    (piped,), seen = deliver(script)
    (plain,), plain_seen = deliver(replace(script, pipelining=False))
    assert fates(piped) == fates(plain)
    assert (piped.next_host, piped.data_sent, piped.clean) == (
        plain.next_host,
        plain.data_sent,
        plain.clean,
    )
    assert str(piped.error) == str(plain.error)
    assert seen.bodies == plain_seen.bodies
    assert all(b == BODY.replace(b"\r\n.", b"\r\n..") for b in seen.bodies)


def test_the_group_goes_in_one_write_and_the_replies_are_matched_in_order() -> None:
    script = SCENARIOS["one refused, one deferred among accepted"]
    (result,), seen = deliver(script)  # the peer answers nothing before DATA has arrived
    assert verbs(seen) == [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"]
    assert fates(result) == {
        "r0@x.test": "250 2.0.0 queued as Q1",
        "r1@x.test": "550 5.1.1 no such user",
        "r2@x.test": "451 4.2.0 later",
    }
    assert seen.bodies == [b"Subject: pipelining\r\n\r\nline one\r\n..leading dot\r\n"]
    assert result.clean and not result.desync


@pytest.mark.parametrize("trickle", [False, True], ids=["together", "trickle"])
def test_pipelining_over_tls_and_on_a_reused_session(trickle: bool) -> None:
    """After STARTTLS (never pipelined: EHLO and STARTTLS go one by one), the group runs over the
    TLS transport, and the session goes back to the pool for the next message."""
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    results, seen = deliver(Script(tls=True, trickle=trickle), pool=pool, times=3)
    assert [r.tls_version is not None for r in results] == [True, True, True]
    assert [r.reused for r in results] == [False, True, True]
    assert seen.connections == 1 and len(seen.bodies) == 3
    assert all(set(fates(r).values()) == {"250 2.0.0 queued as Q1"} for r in results)
    assert seen.commands[:3] == [b"EHLO relay.test", b"STARTTLS", b"EHLO relay.test"]


def test_with_pipelining_off_commands_go_one_at_a_time() -> None:
    """delivery.pipelining off: MAIL waits for its reply, which this peer holds until DATA —
    so it never comes, the command times out and nothing else was sent."""
    off = Timeouts("relay.test", connect=5, command=0.5, greeting=10, data=10, pipelining=False)
    (result,), seen = deliver(Script(), timeouts=off)
    assert verbs(seen) == [b"MAIL"]
    assert result.next_host and result.error is not None and result.error.code == 421


REFUSED_ALL = Script(
    rcpt={r: b"550 5.1.1 no such user\r\n" for r in RCPTS},
    data=b"554 5.5.1 no valid recipients\r\n",
)


def test_a_parked_sessions_rset_rides_in_the_next_group() -> None:
    """A session parked after a refused transaction is checked with RSET before reuse; with
    PIPELINING the RSET leads the next group (this peer holds its reply until DATA: an RSET
    waited for alone would time out)."""
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    results, seen = deliver(REFUSED_ALL, pool=pool, times=2)
    assert [r.reused for r in results] == [False, True] and seen.connections == 1
    assert fates(results[0]) == fates(results[1])
    second = [c[:4] for c in seen.commands[seen.commands.index(b"DATA") + 1 :]]
    assert second == [b"RSET", b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"]


def test_a_parked_session_that_refuses_rset_gives_way_to_a_fresh_one() -> None:
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    script = replace(REFUSED_ALL, rset=b"421 4.4.2 idle too long\r\n")
    results, seen = deliver(script, pool=pool, times=2)
    assert seen.connections == 2  # the RSET failed: nothing sent, the round ran on a new one
    assert not results[1].next_host and fates(results[1]) == fates(results[0])


def test_every_recipient_refused_and_354_to_data_the_message_is_not_sent() -> None:
    """RFC 2920 §3.1: DATA went in the group; a peer that answers it 354 after refusing every
    recipient gets nothing more, and the session is closed."""
    refused = {r: b"550 5.1.1 no such user\r\n" for r in RCPTS}
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    results, seen = deliver(Script(rcpt=refused), pool=pool, times=2)
    for result in results:
        assert set(fates(result).values()) == {"550 5.1.1 no such user"}
        assert not result.data_sent
    assert seen.bodies == [b"", b""]  # the peer read until the connection closed
    assert seen.connections == 2, "the session that got 354 must not be reused"


def test_more_replies_than_commands_closes_the_session() -> None:
    pool = ConnectionPool(max_messages=10, idle_timeout=30)
    extra = b"250 2.0.0 nobody asked\r\n550 5.1.1 nor this\r\n"
    results, seen = deliver(Script(extra=extra), pool=pool, times=2)
    assert [set(fates(r).values()) for r in results] == [{"250 2.0.0 queued as Q1"}] * 2
    assert [r.reused for r in results] == [False, False]
    assert seen.connections == 2


def test_a_close_in_the_middle_of_the_group_tries_the_next_host() -> None:
    (result,), seen = deliver(Script(close_after=2))  # MAIL's and r0's replies, then gone
    assert result.next_host and not result.data_sent and not result.replies
    assert result.error is not None and (result.error.code, result.error.status) == (421, "4.4.2")
    assert seen.bodies == []


def test_a_close_after_354_defers_as_a_lost_data_phase() -> None:
    (result,), _ = deliver(Script(close_after=5, final=b""))
    assert result.data_sent and not result.next_host
    assert {(r.code, r.status) for r in result.replies.values()} == {(451, "4.4.2")}


@pytest.mark.parametrize("flood", [ENDLESS_LINE, ENDLESS_CONTINUATION])
@pytest.mark.parametrize("where", ["mail", "rcpt", "data"])
def test_an_endless_reply_is_cut_off_not_buffered(flood: bytes, where: str) -> None:
    """The reader stops at its line and reply bounds (not at the command timeout): the
    session is closed, nothing is sent, the next host gets its turn (or DATA is deferred)."""
    script = {
        "mail": Script(mail=flood),
        "rcpt": Script(rcpt={"r1@x.test": flood}),
        "data": Script(data=flood),
    }[where]
    (result,), seen = deliver(script)
    assert seen.bodies == []
    if where == "data":
        assert {(r.code, r.status) for r in result.replies.values()} == {(451, "4.5.0")}
        assert result.desync
    else:
        assert result.next_host and result.error is not None
        assert (result.error.code, result.error.status) == (451, "4.5.0")
        assert "longer than" in result.error.text


# --------------------------------------------------------------------------- the reader alone


def _feed_all_splits(data: bytes, count: int) -> Iterator[list[pipelining.RawReply]]:
    """The replies read from ``data`` delivered in two chunks, split at every byte."""
    for cut in range(len(data) + 1):
        yield asyncio.run(_read_split(data, cut, count))


async def _read_split(data: bytes, cut: int, count: int) -> list[pipelining.RawReply]:
    reader = pipelining.ReplyReader()
    loop = asyncio.get_running_loop()
    reader.data_received(data[:cut])
    loop.call_soon(reader.data_received, data[cut:])
    return [await reader.read(5) for _ in range(count)]


def test_the_reader_splits_replies_wherever_the_network_cuts_them() -> None:
    data = b"250-first\r\n250 second\r\n550 5.1.1 no\r\n354 go\n"
    expected = [
        pipelining.RawReply(250, "first\nsecond"),
        pipelining.RawReply(550, "5.1.1 no"),
        pipelining.RawReply(354, "go"),
    ]
    for replies in _feed_all_splits(data, 3):
        assert replies == expected


@pytest.mark.parametrize(
    "data, error",
    [
        (b"hello\r\n", pipelining.Malformed),
        (b"25\r\n", pipelining.Malformed),
        (b"250-more\r\n", pipelining.Disconnected),
        (b"", pipelining.Disconnected),
    ],
)
def test_the_reader_refuses_what_is_not_a_whole_reply(data: bytes, error: type[Exception]) -> None:
    async def run() -> None:
        reader = pipelining.ReplyReader()
        reader.data_received(data)
        reader.connection_lost(None)
        with pytest.raises(error):
            await reader.read(5)

    asyncio.run(run())


class _FlowControlled:
    """A transport stand-in for the reader's flow control: it holds ``rest`` back while reading
    is paused and hands it over when reading resumes (as TCP would)."""

    def __init__(self, reader: pipelining.ReplyReader, rest: bytes) -> None:
        self.reader, self.rest, self.paused = reader, rest, False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        rest, self.rest = self.rest, b""
        if rest:
            asyncio.get_running_loop().call_soon(self.reader.data_received, rest)

    def is_closing(self) -> bool:
        return False


def test_a_paused_reader_resumes_when_it_needs_the_rest_of_a_reply() -> None:
    """Past HIGH_WATER unread bytes the reader stops reading; once it has read what is buffered
    and still needs more of a reply, it reads again (else it would wait out its timeout)."""
    many = b"250 ok\r\n" * (pipelining.HIGH_WATER // 8 + 1)
    big = b"".join(b"250-%05d %s\r\n" % (i, b"y" * 140) for i in range(200)) + b"250 end\r\n"
    half = len(big) - 2000  # more than LOW_WATER of it arrives while paused
    assert half > pipelining.LOW_WATER and len(big) < pipelining.MAX_REPLY

    async def run() -> list[pipelining.RawReply]:
        reader = pipelining.ReplyReader()
        transport = _FlowControlled(reader, big[half:])
        reader.attach(transport)  # type: ignore[arg-type]
        reader.data_received(many + big[:half])
        assert transport.paused
        replies = [await reader.read(5) for _ in range(len(many) // 8)]
        replies.append(await reader.read(5))
        return replies

    replies = asyncio.run(run())
    assert {r.code for r in replies} == {250}
    assert replies[-1].text.endswith("\nend") and replies[-1].text.count("\n") == 200


@pytest.mark.parametrize(
    "body",
    [
        b"", b"a", b"a\r\n", b"a\n", b"a\r", b"\r\n\r\n", b"a\nb\r\nc", b"a\rb", b"\n\r",
        b"\r\r\n", b"a\r\n\n", b".dot\r\n..two\r\n", BODY, BODY[:-2],
    ],
)  # fmt: skip
def test_line_ends_are_those_aiosmtplib_sends(body: bytes) -> None:
    """The body's bytes on the wire, DATA and BDAT alike, are aiosmtplib's: its
    normalize_message_line_endings (the fast path skips it only where it changes nothing)."""
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    normalized = normalize_message_line_endings(body)
    assert pipelining.chunk_data(body) == normalized
    assert pipelining.message_data(body) == PERIOD_REGEX.sub(b"..", normalized) + b".\r\n"
