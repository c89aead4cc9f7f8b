"""Misbehaving SMTP peers for fault tests: raw asyncio servers that speak just enough SMTP to go
wrong in one specific way. Each runs in its own thread on loopback.

Kinds:
- ``silent``: accepts the TCP connection and never sends a byte (no greeting).
- ``hang_after_data``: a normal session until the final dot, then never answers it.
- ``drop_after_data``: a normal session until the final dot, then closes without a reply.
- ``garbage``: greets, then answers every command with bytes that are not an SMTP reply.
- ``refuse_first_data``: keeps SMTP state as Postfix does: the first DATA is answered
  ``452 4.3.1`` and the transaction stays open, so a MAIL before ``RSET`` gets
  ``503 5.5.1 Error: nested MAIL command``; later transactions are accepted.
- ``data_250``: answers ``250`` to DATA instead of ``354`` (it never reads a body).
- ``double_rcpt``: answers each RCPT twice (``250`` ``250``), so the extra one answers DATA.
- ``busy``: greets, then answers EHLO with ``421 4.3.2`` (a session that reached a greeting).
- ``hang_at_quit``: a normal session that takes the message (``250`` to the final dot), then
  never answers ``QUIT``.
- ``reset_after_354``: advertises PIPELINING, answers DATA ``354``, then resets the connection
  (TCP RST) before the message comes.

``connections`` counts accepted connections; ``data_received`` counts messages whose final dot
arrived (the relay may believe they were not delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from typing import Literal

from tests.background import Background

Kind = Literal[
    "silent", "hang_after_data", "drop_after_data", "garbage",
    "refuse_first_data", "data_250", "double_rcpt", "busy", "hang_at_quit", "reset_after_354",
]  # fmt: skip


class BadPeer(Background):
    def __init__(self, kind: Kind, host: str = "127.0.0.1", port: int = 0) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.connections = 0
        self.data_received = 0
        self.replies: list[bytes] = []  # every reply line sent, in order (all sessions)
        self._data_commands = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address_text(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> BadPeer:
        self._thread = threading.Thread(target=self._run, name=f"badpeer-{self.kind}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("bad peer did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        serving = asyncio.start_server(self._serve, self.host, self.port)
        self._server = loop.run_until_complete(serving)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for writer in list(self._writers):
                writer.close()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
        self._writers.add(writer)
        try:
            if self.kind == "silent":
                await reader.read()  # until the client gives up
                return
            writer.write(b"220 bad.peer.test ESMTP\r\n")
            await self._session(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        in_mail = False  # a transaction is open (MAIL accepted, not ended by RSET or the dot)
        while line := await reader.readline():
            verb = line[:4].upper()
            if self.kind == "garbage":
                writer.write(b"\x00\xffnot smtp at all\r\n")
            elif verb in (b"EHLO", b"HELO") and self.kind == "busy":
                self._reply(writer, b"421 4.3.2 too busy, try later")
                return
            elif verb in (b"EHLO", b"HELO") and self.kind == "reset_after_354":
                writer.write(b"250-bad.peer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb in (b"EHLO", b"HELO"):
                writer.write(b"250-bad.peer.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA" and self.kind == "reset_after_354":
                self._reply(writer, b"354 go ahead")
                await writer.drain()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # linger 0: a reset, not an orderly close
                return
            elif verb == b"MAIL" and in_mail:
                self._reply(writer, b"503 5.5.1 Error: nested MAIL command")
            elif verb == b"MAIL":
                in_mail = self.kind == "refuse_first_data"
                self._reply(writer, b"250 2.1.0 ok")
            elif verb == b"RSET":
                in_mail = False
                self._reply(writer, b"250 2.0.0 ok")
            elif verb == b"RCPT" and self.kind == "double_rcpt":
                # One write: the doubled reply arrives with the first (two writes may reach the
                # relay apart, and aiosmtplib drops a reply that comes with no command waiting).
                self._reply(writer, b"250 2.1.5 ok\r\n250 2.1.5 ok again")
            elif verb == b"DATA" and self.kind in (
                "refuse_first_data", "data_250", "double_rcpt", "hang_at_quit",
            ):  # fmt: skip
                with self._lock:
                    self._data_commands += 1
                    first = self._data_commands == 1
                if self.kind == "data_250":
                    self._reply(writer, b"250 2.0.0 ok")
                elif first and self.kind == "refuse_first_data":  # the transaction stays open
                    self._reply(writer, b"452 4.3.1 insufficient system storage")
                else:
                    self._reply(writer, b"354 go ahead")
                    await self._read_data(reader)
                    in_mail = False
                    with self._lock:
                        self.data_received += 1
                    self._reply(writer, b"250 2.0.0 queued")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await self._read_data(reader)
                with self._lock:
                    self.data_received += 1
                if self.kind == "drop_after_data":
                    return
                await reader.read()  # hang_after_data: never answer the final dot
                return
            elif verb == b"QUIT" and self.kind == "hang_at_quit":
                await reader.read()  # until the client gives up
                return
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    def _reply(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        with self._lock:
            self.replies.append(line)
        writer.write(line + b"\r\n")

    async def _read_data(self, reader: asyncio.StreamReader) -> None:
        while (line := await reader.readline()) and line not in (b".\r\n", b".\n"):
            pass
