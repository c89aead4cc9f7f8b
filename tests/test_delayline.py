"""The benchmark's delay line (bench/delayline.py) over real loopback sockets: every byte passes,
in order, both ways; a half-close comes through after the data before it and the connection
closes once both ways have ended; a round trip never takes less than the configured RTT (a
lower bound only: how much longer it takes is not asserted)."""

from __future__ import annotations

import asyncio
import time

from bench.delayline import DelayLine

RTT = 0.02


class Echo:
    """An echo server on loopback that knows when its sessions are over."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> Echo:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        self.ended.set()

    async def stop(self) -> None:
        await asyncio.wait_for(self.ended.wait(), 10)
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def test_bytes_pass_in_order_both_ways_and_a_close_follows_them() -> None:
    async def run() -> None:
        echo = await Echo().start()
        line = await DelayLine(RTT, echo.port).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", line.port)
        sent = b"".join(b"%08d" % i for i in range(300_000))  # 2.4 MB: past the high water mark
        for start in range(0, len(sent), 7919):  # odd-sized writes
            writer.write(sent[start : start + 7919])
        writer.write_eof()
        received = await asyncio.wait_for(reader.read(), 30)  # until the end comes through
        assert received == sent
        writer.close()
        await writer.wait_closed()
        await echo.stop()
        await asyncio.wait_for(line.idle(), 10)
        line.close()

    asyncio.run(run())


def test_a_round_trip_takes_at_least_the_rtt_and_the_first_two() -> None:
    """The first exchange includes the connection's set-up: the client's connect() returns at
    once on loopback, so the delay line holds the far end for what SYN/SYN-ACK take."""

    async def run() -> tuple[float, float]:
        echo = await Echo().start()
        line = await DelayLine(RTT, echo.port).start()
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", line.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        first = time.monotonic() - started
        started = time.monotonic()
        writer.write(b"pong")
        assert await reader.readexactly(4) == b"pong"
        second = time.monotonic() - started
        writer.close()
        await writer.wait_closed()
        await echo.stop()
        await asyncio.wait_for(line.idle(), 10)
        line.close()
        return first, second

    first, second = asyncio.run(run())
    assert first >= 2 * RTT * 0.99 and second >= RTT * 0.99
