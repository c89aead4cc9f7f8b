"""The load client, in its own process: ``python -m bench.load --port P --workload JSON --out F``.

``sessions`` concurrent SMTP sessions (asyncio), each one connection that sends message after
message (re-connecting only after an error), optionally after STARTTLS (``client_tls``). With
PIPELINING offered, MAIL, the RCPTs and DATA go out as one group (RFC 2920 §3.1). Messages are
numbered 0…N-1 and taken in order by whichever session is free; with ``rate`` > 0 message ``i`` is
not sent before ``start + i / rate`` (an open-loop schedule shared by all sessions). With
``connect_first`` every session connects (and says EHLO) before any sends, so that they all send
together (:mod:`bench.sessions`: ingest's group commits then hold a message of every session).
At most ``CONNECTS_AT_ONCE`` sessions connect at once.

For each message it records the accept time (``time.monotonic()`` when the final ``250`` reply
arrived) and the queue id from ``250 … queued as ID``; each failure with its reply or error.
The result is one JSON document in ``--out``::

    {"started": t0, "finished": t1, "cpu_s": s,
     "accepted": [[bench_id, accept_time, queue_id], ...], "failed": [[bench_id, why], ...]}

and one summary line on stdout. Exit 0 even when messages failed (the report counts them).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.workload import SENDER, Workload, bench_id, message_bytes

CONNECT_TIMEOUT = 30.0
REPLY_TIMEOUT = 120.0  # generous: a relay under overload is measured, not failed early
# Sessions connecting at once: a listener's accept queue is short (asyncio's default backlog is
# 100), and a thousand sessions connecting together would overflow it: the connections beyond
# it are dropped, or (SYN cookies) look open to the client while the server never saw them.
CONNECTS_AT_ONCE = 50


class SmtpError(Exception):
    """A reply that ends the session (bad greeting, EHLO or STARTTLS refused)."""


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pipelining: bool = False

    @classmethod
    async def open(cls, host: str, port: int, use_tls: bool) -> Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), CONNECT_TIMEOUT
        )
        conn = cls(reader, writer)
        await conn.expect(220)
        capabilities = await conn.ehlo()
        if use_tls:
            if "STARTTLS" not in capabilities:
                raise SmtpError("STARTTLS not offered")
            conn.write(b"STARTTLS\r\n")
            await conn.expect(220)
            await writer.start_tls(client_context())
            capabilities = await conn.ehlo()
        conn.pipelining = "PIPELINING" in capabilities
        return conn

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its last line's text."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            if len(line) < 4:
                raise SmtpError(f"connection closed or bad reply: {line!r}")
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode("utf-8", "replace").strip()

    async def expect(self, code: int) -> str:
        got, text = await self.reply()
        if got != code:
            raise SmtpError(f"{got} {text}")
        return text

    async def ehlo(self) -> set[str]:
        self.write(b"EHLO load.bench.test\r\n")
        words = set()
        while True:
            line = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            if line[:3] != b"250":
                raise SmtpError(f"EHLO refused: {line!r}")
            words.add(line[4:].decode("ascii", "replace").split(" ", 1)[0].strip().upper())
            if line[3:4] != b"-":
                return words

    async def send(self, recipients: Sequence[str], data: bytes) -> tuple[int, str]:
        """One transaction; the final reply (a refusal of MAIL/RCPT/DATA is returned as is)."""
        commands = [f"MAIL FROM:<{SENDER}>\r\n".encode()]
        commands += [f"RCPT TO:<{rcpt}>\r\n".encode() for rcpt in recipients]
        commands.append(b"DATA\r\n")
        replies = []
        if self.pipelining:
            self.write(b"".join(commands))
            replies = [await self.reply() for _ in commands]
        else:
            for command in commands:
                self.write(command)
                replies.append(await self.reply())
                if replies[-1][0] >= 400:
                    break
        if replies[-1][0] != 354:
            self.write(b"RSET\r\n")
            await self.reply()
            return next((r for r in replies if r[0] >= 400), replies[-1])
        self.write(dot_stuff(data) + b".\r\n")
        final = await self.reply()
        refused = [r for r in replies[:-1] if r[0] >= 400]
        return refused[0] if refused and final[0] < 400 else final

    async def quit(self) -> None:
        try:
            self.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 5)
        except (OSError, SmtpError, TimeoutError):
            pass
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()


@functools.cache
def client_context() -> ssl.SSLContext:
    """The relay's inbound certificate is self-signed: encrypt, do not verify. Built once:
    loading the system CA store costs milliseconds, far more than a handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 §4.5.2; ``data`` ends with CRLF."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def queue_id(text: str) -> str | None:
    return text.rsplit(" ", 1)[-1] if "queued as" in text else None


@dataclass
class LoadClient:
    workload: Workload
    host: str
    port: int
    run_id: str
    next_index: int = 0
    started: float = 0.0
    finished: float = 0.0
    accepted: list[tuple[str, float, str | None]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    waiting: int = 0  # sessions not yet connected (connect_first)
    all_connected: asyncio.Event = field(default_factory=asyncio.Event)
    connecting: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(CONNECTS_AT_ONCE)
    )

    def take(self) -> int | None:
        if self.next_index >= self.workload.messages:
            return None
        self.next_index += 1
        return self.next_index - 1

    async def pace(self, index: int) -> None:
        if self.workload.rate > 0:
            delay = self.started + index / self.workload.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def session(self) -> None:
        conn: Connection | None = None
        if self.workload.connect_first:  # every session connected before any sends
            try:
                async with self.connecting:
                    conn = await Connection.open(self.host, self.port, self.workload.client_tls)
            except (OSError, SmtpError, TimeoutError, ssl.SSLError, ValueError):
                conn = None  # connects again for its first message, failing it if need be
            self.waiting -= 1
            if not self.waiting:
                self.all_connected.set()
            await self.all_connected.wait()
        while (index := self.take()) is not None:
            await self.pace(index)
            recipients = self.workload.recipients_of(index)
            data = message_bytes(self.run_id, index, recipients, self.workload.size)
            ident = bench_id(self.run_id, index)
            try:
                if conn is None:
                    async with self.connecting:
                        conn = await Connection.open(self.host, self.port, self.workload.client_tls)
                code, text = await conn.send(recipients, data)
            except (OSError, SmtpError, TimeoutError, ssl.SSLError, ValueError) as exc:
                self.failed.append((ident, f"{type(exc).__name__}: {exc}"))
                if conn is not None:
                    conn.abort()
                conn = None
                continue
            if code == 250:
                self.accepted.append((ident, time.monotonic(), queue_id(text)))
            else:
                self.failed.append((ident, f"{code} {text}"))
        if conn is not None:
            await conn.quit()

    async def run(self) -> dict[str, object]:
        self.started = time.monotonic()
        self.waiting = self.workload.sessions
        await asyncio.gather(*(self.session() for _ in range(self.workload.sessions)))
        self.finished = time.monotonic()
        times = os.times()
        return {
            "started": self.started,
            "finished": self.finished,
            "cpu_s": times.user + times.system,
            "accepted": self.accepted,
            "failed": self.failed,
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workload", default="{}", help="Workload fields as a JSON object")
    parser.add_argument("--run-id", default="bench", help="prefix of every X-Bench-Id")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    workload = Workload(**json.loads(args.workload))
    client = LoadClient(workload, args.host, args.port, args.run_id)
    result = asyncio.run(client.run())
    with open(args.out, "w") as out:
        json.dump(result, out)
    print(
        f"load: {len(client.accepted)} accepted, {len(client.failed)} failed in "
        f"{client.finished - client.started:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
