"""A user-space delay line: a TCP proxy on loopback that puts a round-trip time between its ends.

This machine has no ``netem``, so distance is made here: :class:`DelayLine` listens on a free
port of 127.0.0.1 and forwards each connection to ``target``, every chunk held ``rtt / 2`` in
each direction, in order (one timer per direction releases what is due, oldest first). TLS and
everything else pass through untouched (it is a TCP proxy). A connection is set up as TCP would
at that distance: the client's ``connect()`` returns at once on loopback, so the target is
connected only after 1.5 round trips and its greeting comes back half a round trip later — the
greeting arrives 2 round trips after the connect, as SYN, SYN-ACK and the greeting take. A
half-close is passed on in order after the data before it; a connection is closed once both
directions have ended.

Memory is bounded: a direction holding more than ``HIGH_WATER`` bytes stops reading its source
until it has written enough (TCP flow control then holds the sender back). Bandwidth is not
limited (loopback's); only the delay is modelled, no loss, no jitter.

It runs inside the sink's process and event loop (:mod:`bench.sink`), so its CPU is reported
with the sink's, never charged to the relay. ``python -m bench.delayline RTT PORT`` runs one
alone, in front of 127.0.0.1:PORT (the benchmark's Redis at a distance, ``--redis-rtt``): it
prints ``{"port": P, "pid": N}`` and runs until its standard input closes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
from collections.abc import Callable

HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
SETUP_ROUND_TRIPS = 1.5  # SYN + SYN-ACK + ACK before the server's accept returns
# Connections waiting to be accepted (asyncio's default, 100, is too few when a relay opens a
# thousand sessions at once: the rest would be dropped or half-open); capped by somaxconn.
BACKLOG = 4096


class _Direction:
    """One way of one connection: chunks released ``delay`` seconds after they were read."""

    def __init__(self, delay: float, source: _Side, loop: asyncio.AbstractEventLoop) -> None:
        self.delay = delay
        self.source = source  # paused when too much is held
        self.loop = loop
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.held = 0
        self.sink: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False  # its end is queued
        self.done = False  # its end was passed on
        self.pair: _Pair = _Pair()

    def push(self, data: bytes | None) -> None:
        """``data``; None: the source's end, passed on as a close (after what came before)."""
        if self.ended:
            return
        self.ended = data is None
        self.queue.append((self.loop.time() + self.delay, data))
        self.held += len(data) if data else 0
        if self.held > HIGH_WATER:
            self.source.pause()
        if self.timer is None and self.sink is not None:
            self._arm()

    def connected(self, sink: asyncio.Transport) -> None:
        self.sink = sink
        if self.queue and self.timer is None:
            self._arm()

    def _arm(self) -> None:
        self.timer = self.loop.call_at(self.queue[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now and self.sink is not None:
            _, data = self.queue.popleft()
            if data is None:
                self.queue.clear()
                self.done = True
                self.pair.ended()
                return
            self.held -= len(data)
            if not self.sink.is_closing():
                self.sink.write(data)
        if self.held < LOW_WATER:
            self.source.resume()
        if self.queue:
            self._arm()


class _Pair:
    """Both directions of one connection: a half-close is passed on as a half-close (after the
    data before it); once both directions have ended, both sockets are closed."""

    def __init__(self, on_closed: Callable[[], None] = lambda: None) -> None:
        self.directions: list[_Direction] = []
        self.sides: list[_Side] = []
        self.on_closed = on_closed
        self.closed = False

    def close(self) -> None:
        for side in self.sides:
            if side.transport is not None:
                side.transport.close()
        if not self.closed:
            self.closed = True
            self.on_closed()

    def ended(self) -> None:
        if all(d.done for d in self.directions):
            self.close()
            return
        for direction in self.directions:
            if direction.done and direction.sink is not None and not direction.sink.is_closing():
                if direction.sink.can_write_eof():
                    direction.sink.write_eof()
                else:
                    direction.sink.close()


class _Side(asyncio.Protocol):
    """One end of a proxied connection; what it reads goes into ``outbound``, delayed."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.outbound: _Direction | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.outbound is not None:
            self.outbound.push(data)

    def eof_received(self) -> bool:
        if self.outbound is not None:
            self.outbound.push(None)
        return True  # the other direction stays open until its own end comes through

    def connection_lost(self, exc: Exception | None) -> None:
        if self.outbound is not None:
            self.outbound.push(None)

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self.paused = True

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self.paused = False


class DelayLine:
    """``await DelayLine(rtt, target_port).start()``; ``port`` is where to connect."""

    def __init__(self, rtt: float, target_port: int, host: str = "127.0.0.1") -> None:
        self.rtt = rtt
        self.host = host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references
        self.open = 0  # connections not yet closed at both ends
        self._idle = asyncio.Event()
        self._idle.set()

    def _closed(self) -> None:
        self.open -= 1
        if not self.open:
            self._idle.set()

    async def idle(self) -> None:
        """Until every connection is closed at both ends."""
        await self._idle.wait()

    async def start(self) -> DelayLine:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, self.host, 0, backlog=BACKLOG)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accept(self) -> _Side:
        loop = asyncio.get_running_loop()
        client, server = _Side(), _Side()
        client.outbound = _Direction(self.rtt / 2, client, loop)  # client → target
        server.outbound = _Direction(self.rtt / 2, server, loop)  # target → client
        self.open += 1
        self._idle.clear()
        pair = _Pair(self._closed)
        pair.directions, pair.sides = [client.outbound, server.outbound], [client, server]
        client.outbound.pair = server.outbound.pair = pair
        loop.call_later(SETUP_ROUND_TRIPS * self.rtt, self._connect, client, server)
        return client

    def _connect(self, client: _Side, server: _Side) -> None:
        task = asyncio.get_running_loop().create_task(self._open(client, server))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, client: _Side, server: _Side) -> None:
        loop = asyncio.get_running_loop()
        assert client.outbound is not None and server.outbound is not None
        if client.transport is None or client.transport.is_closing() or client.outbound.ended:
            client.outbound.pair.close()  # the client came and went before the target was reached
            return
        try:
            await loop.create_connection(lambda: server, self.host, self.target_port)
        except OSError:
            client.outbound.pair.close()
            return
        assert server.transport is not None
        server.outbound.connected(client.transport)
        client.outbound.connected(server.transport)


async def main(rtt: float, target_port: int) -> None:
    """One delay line in front of ``target_port`` until standard input closes."""
    line = await DelayLine(rtt, target_port).start()
    print(json.dumps({"port": line.port, "pid": os.getpid()}), flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        line.close()


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]), int(sys.argv[2])))
