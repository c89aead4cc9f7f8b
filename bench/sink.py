"""A fast SMTP destination sink for the benchmark, in its own process: ``python -m bench.sink``.

Two listeners on 127.0.0.1 (free ports): one offers STARTTLS (a self-signed RSA-2048 certificate,
as many MX hosts have, from :func:`services.ingest.tlscert.selfsigned_cert_pem`; opportunistic
senders do not verify it), one does not. Both speak ESMTP with PIPELINING, accept every sender
and recipient, and answer DATA (or the last BDAT) with ``250 2.0.0 Ok: queued as S<n>``.
Written on ``asyncio.Protocol`` (no aiosmtpd: one parser, no per-command coroutines) so that the
sink is never what limits the relay.

Per message it records an :class:`Arrival`: the ``X-Bench-Id`` header (else ``Message-Id``, the
one id Postfix's ``smtp-source`` sends), the arrival time (``time.monotonic()``, the same clock as
the load client's accept times on this machine), whether the session was TLS, and the recipient
domains. It counts connections and TLS handshakes (and how many of them resumed a session), and
the most sessions open at once.

Both offer CHUNKING (RFC 3030: ``BDAT <size> [LAST]``, the chunk read by its size), as Postfix
and the big mailbox providers do; ``--no-chunking`` leaves it out (DATA only).

``python -m bench.sink RTT`` (seconds) puts a delay line (:mod:`bench.delayline`) in front of
each listener and announces its ports instead: whoever connects is RTT away from the sink.

Protocol with the parent (stdin/stdout, one JSON line each): on start it prints
``{"tls_port": P, "plain_port": Q, "pid": N}``; then it answers each command line:

- ``stats``     → ``{"connections", "handshakes", "resumed", "failed_handshakes", "messages",
  "tls_messages", "open", "peak_open"}`` (``open``: sessions open now; ``peak_open``: most
  open at once since ``mark``)
- ``mark``      → starts counting ``peak_open`` from the sessions open now; answers as ``stats``
- ``dump PATH`` → writes the arrivals to ``PATH`` (one JSON list per line:
  ``[id, at, tls, [domains]]``) and answers ``{"arrivals": n}``
- ``quit`` or end of input → exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bench.delayline import BACKLOG, DelayLine
from services.ingest import tlscert

HOSTNAME = "sink.bench.test"
GREETING = f"220 {HOSTNAME} ESMTP bench sink\r\n".encode()
MAX_LINE = 4096  # RFC 5321 §4.5.3.1.4 says 512 for commands; be lenient, but bounded
_ID_HEADER = re.compile(rb"^(x-bench-id|message-id):[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
_ADDRESS = re.compile(rb"<([^>]*)>")


class Arrival(NamedTuple):
    id: str | None
    at: float
    tls: bool
    domains: tuple[str, ...]


@dataclass
class Counters:
    connections: int = 0
    handshakes: int = 0
    resumed: int = 0
    failed_handshakes: int = 0
    messages: int = 0
    tls_messages: int = 0
    open: int = 0  # sessions open now
    peak_open: int = 0  # most sessions open at once since the last ``mark``
    arrivals: list[Arrival] = field(default_factory=list)

    def to_json(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "handshakes": self.handshakes,
            "resumed": self.resumed,
            "failed_handshakes": self.failed_handshakes,
            "messages": self.messages,
            "tls_messages": self.tls_messages,
            "open": self.open,
            "peak_open": self.peak_open,
        }


def message_id(content: bytes) -> str | None:
    """``X-Bench-Id`` if the header section has one, else ``Message-Id``, else None."""
    end = content.find(b"\r\n\r\n")
    found = dict(
        (m.group(1).lower(), m.group(2).strip())
        for m in _ID_HEADER.finditer(content[: end if end >= 0 else len(content)])
    )
    value = found.get(b"x-bench-id") or found.get(b"message-id")
    return value.decode("ascii", "replace") if value else None


class SinkProtocol(asyncio.Protocol):
    """One SMTP session. Commands are parsed from a buffer, so pipelined groups get one write."""

    def __init__(
        self, counters: Counters, context: ssl.SSLContext | None, chunking: bool = True
    ) -> None:
        self.counters = counters
        self.context = context  # None: STARTTLS not offered
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        self.scanned = 0  # DATA: the terminator is not before this offset
        self.domains: list[str] = []
        self.tls = False
        self.upgrading = False
        self.chunking = chunking  # offer CHUNKING (RFC 3030), as Postfix and the big providers do
        self.chunk_left = 0  # BDAT: bytes of the chunk still to come
        self.chunk_last = False
        self.chunks = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        counters = self.counters
        counters.connections += 1
        counters.open += 1
        counters.peak_open = max(counters.peak_open, counters.open)
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgrading:
            self._process()

    def _process(self) -> None:
        out: list[bytes] = []
        while not self.upgrading and self.transport is not None:
            if self.in_data:
                if not self._take_message(out):
                    break
                continue
            if self.chunk_left:
                if not self._take_chunk(out):
                    break
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    out.append(b"500 5.5.6 Line too long\r\n")
                    self.buffer.clear()
                break
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            self._command(line, out)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _take_message(self, out: list[bytes]) -> bool:
        # The buffer starts with a CRLF sentinel, so an empty message (".\r\n") is found too.
        end = self.buffer.find(b"\r\n.\r\n", self.scanned)
        if end < 0:
            self.scanned = max(0, len(self.buffer) - 4)
            return False
        content = bytes(self.buffer[2 : end + 2])
        del self.buffer[: end + 5]
        self.in_data = False
        self._arrived(content, out)
        return True

    def _take_chunk(self, out: list[bytes]) -> bool:
        """A BDAT chunk's bytes (RFC 3030), as many as are here; False until it is whole."""
        taken = self.buffer[: self.chunk_left]
        del self.buffer[: len(taken)]
        self.chunks += taken
        self.chunk_left -= len(taken)
        if self.chunk_left:
            return False
        self._chunk_done(out)
        return True

    def _chunk_done(self, out: list[bytes]) -> None:
        if not self.domains:
            self.chunks.clear()
            out.append(b"554 5.5.1 Error: no valid recipients\r\n")
        elif self.chunk_last:
            content = bytes(self.chunks)
            self.chunks.clear()
            self._arrived(content, out)
        else:
            out.append(b"250 2.0.0 Ok: chunk received\r\n")

    def _bdat(self, line: bytes, out: list[bytes]) -> None:
        words = line.split()
        last = len(words) == 3 and words[2].upper() == b"LAST"
        if not self.chunking or len(words) not in (2, 3) or not words[1].isdigit():
            out.append(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")  # (the chunk is not read)
            return
        if len(words) == 3 and not last:
            out.append(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")
            return
        self.chunk_left, self.chunk_last = int(words[1]), last
        if not self.chunk_left:  # BDAT 0 LAST: nothing to read
            self._chunk_done(out)

    def _arrived(self, content: bytes, out: list[bytes]) -> None:
        counters = self.counters
        counters.messages += 1
        counters.tls_messages += self.tls
        arrival = Arrival(message_id(content), time.monotonic(), self.tls, tuple(self.domains))
        counters.arrivals.append(arrival)
        self.domains = []
        out.append(b"250 2.0.0 Ok: queued as S%d\r\n" % counters.messages)

    def _command(self, line: bytes, out: list[bytes]) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            out.append(self._ehlo())
        elif verb == b"HELO":
            out.append(f"250 {HOSTNAME}\r\n".encode())
        elif verb == b"MAIL":
            self.domains = []
            self.chunks.clear()
            out.append(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            address = _ADDRESS.search(line)
            domain = address.group(1).rpartition(b"@")[2] if address else b""
            self.domains.append(domain.decode("ascii", "replace").lower())
            out.append(b"250 2.1.5 Ok\r\n")
        elif verb == b"BDAT":
            self._bdat(line, out)
        elif verb == b"DATA":
            if not self.domains:
                out.append(b"503 5.5.1 Error: need RCPT command\r\n")
                return
            self.in_data, self.scanned = True, 0
            self.buffer[0:0] = b"\r\n"
            out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb in (b"RSET", b"NOOP"):
            if verb == b"RSET":
                self.domains = []
            out.append(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            out.append(b"221 2.0.0 Bye\r\n")
            self._close_after(out)
        elif line.upper() == b"STARTTLS":
            self._starttls(out)
        else:
            out.append(b"502 5.5.2 Error: command not recognized\r\n")

    def _ehlo(self) -> bytes:
        lines = [HOSTNAME, "PIPELINING", "SIZE 104857600", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.chunking:
            lines.insert(2, "CHUNKING")
        if self.context is not None and not self.tls:
            lines.append("STARTTLS")
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        return text.encode()

    def _close_after(self, out: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(out))
        out.clear()
        self.transport.close()
        self.transport = None

    def _starttls(self, out: list[bytes]) -> None:
        if self.context is None or self.tls:
            out.append(b"502 5.5.1 STARTTLS not available\r\n")
            return
        assert self.transport is not None
        out.append(b"220 2.0.0 Ready to start TLS\r\n")
        self.transport.write(b"".join(out))
        out.clear()
        self.transport.pause_reading()  # the ClientHello is for start_tls(), not for the parser
        self.buffer.clear()  # RFC 3207 §4.2: nothing sent in clear after STARTTLS counts
        self.upgrading = True
        asyncio.get_running_loop().create_task(self._upgrade(self.transport, self.context))

    async def _upgrade(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            upgraded = await loop.start_tls(transport, self, context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError):
            self.counters.failed_handshakes += 1
            transport.abort()
            self.transport = None
            return
        if upgraded is None:  # the connection went away during the handshake
            self.transport = None
            return
        self.transport = upgraded
        self.tls, self.upgrading, self.domains = True, False, []
        self.counters.handshakes += 1
        ssl_object = upgraded.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject) and ssl_object.session_reused:
            self.counters.resumed += 1
        if self.buffer:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.counters.open -= 1


def server_context() -> ssl.SSLContext:
    """A server context with a fresh self-signed RSA-2048 certificate for the sink's name."""
    cert_pem, key_pem = tlscert.selfsigned_cert_pem([HOSTNAME])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp) / "sink.pem"
        pem.write_bytes(key_pem + cert_pem)
        context.load_cert_chain(pem)
    return context


def dump(counters: Counters, path: str) -> dict[str, int]:
    with open(path, "w") as out:
        for arrival in counters.arrivals:
            out.write(json.dumps([arrival.id, arrival.at, arrival.tls, list(arrival.domains)]))
            out.write("\n")
    return {"arrivals": len(counters.arrivals)}


async def control(counters: Counters) -> None:
    """Answer the parent's commands on stdin until ``quit`` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        command, _, argument = line.partition(" ")
        if command == "quit":
            return
        if command == "stats":
            answer: dict[str, object] = dict(counters.to_json())
        elif command == "mark":  # the peak of open sessions counts from now
            counters.peak_open = counters.open
            answer = dict(counters.to_json())
        elif command == "dump":
            answer = dict(dump(counters, argument))
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)


async def main(rtt: float, chunking: bool = True) -> None:
    loop = asyncio.get_running_loop()
    counters = Counters()
    context = server_context()
    tls = await loop.create_server(
        lambda: SinkProtocol(counters, context, chunking), "127.0.0.1", 0, backlog=BACKLOG
    )
    plain = await loop.create_server(
        lambda: SinkProtocol(counters, None, chunking), "127.0.0.1", 0, backlog=BACKLOG
    )
    ports = [server.sockets[0].getsockname()[1] for server in (tls, plain)]
    lines = []
    if rtt > 0:  # the relay reaches the sink through a delay line (bench/delayline.py)
        lines = [await DelayLine(rtt, port).start() for port in ports]
        ports = [line.port for line in lines]
    print(
        json.dumps({"tls_port": ports[0], "plain_port": ports[1], "pid": os.getpid()}), flush=True
    )
    try:
        await control(counters)
    finally:
        for line in lines:
            line.close()
        tls.close()
        plain.close()


if __name__ == "__main__":
    options = [a for a in sys.argv[1:] if a.startswith("--")]
    positional = [a for a in sys.argv[1:] if not a.startswith("--")]
    if set(options) - {"--no-chunking"}:
        sys.exit(f"bench.sink: unknown option(s) {sorted(set(options) - {'--no-chunking'})}")
    rtt = float(positional[0]) if positional else 0.0
    asyncio.run(main(rtt, "--no-chunking" not in options))
