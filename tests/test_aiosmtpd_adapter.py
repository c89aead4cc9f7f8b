"""aiosmtpd still has every private member services/ingest/adapter.py relies on.

The adapter is the one module allowed to touch aiosmtpd's internals. When a new aiosmtpd (or
asyncio) renames or drops one of them, these tests fail naming it, before any SMTP test fails in
an obscure way.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Session

from services.ingest import adapter

INGEST = Path(__file__).resolve().parents[1] / "services" / "ingest"


class _Handler:
    """No hooks: aiosmtpd's own replies."""


@pytest.mark.parametrize("name", adapter.PRIVATE_METHODS)
def test_private_method_exists(name: str) -> None:
    member = inspect.getattr_static(SMTP, name, None)
    assert member is not None, f"aiosmtpd's SMTP has no {name} any more: update adapter.py"
    assert callable(member), f"aiosmtpd's SMTP.{name} is no longer a method: update adapter.py"


@pytest.mark.parametrize("name", adapter.PRIVATE_ATTRIBUTES)
def test_private_attribute_is_set_by_the_constructor(name: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        smtp = SMTP(_Handler(), loop=loop)
        assert hasattr(smtp, name), f"aiosmtpd's SMTP() sets no {name} any more: update adapter.py"
    finally:
        loop.close()


def test_verb_table_is_a_dict_of_smtp_methods() -> None:
    loop = asyncio.new_event_loop()
    try:
        methods = SMTP(_Handler(), loop=loop)._smtp_methods
    finally:
        loop.close()
    assert isinstance(methods, dict), "aiosmtpd's _smtp_methods is no longer a dict"
    assert {"MAIL", "RCPT", "DATA", "AUTH"} <= set(methods), sorted(methods)


def test_session_still_has_the_deprecated_login_data() -> None:
    assert hasattr(Session, "login_data"), "aiosmtpd's Session.login_data is gone: adapter.py"


def test_connected_attributes_and_the_stream_buffer() -> None:
    """A real connection: the reader and writer are set, the reader has a ``_buffer``."""

    async def connect() -> SMTP:
        loop = asyncio.get_running_loop()
        protocols: list[SMTP] = []

        def factory() -> SMTP:
            protocols.append(SMTP(_Handler(), hostname="adapter.test", loop=loop))
            return protocols[-1]

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await asyncio.wait_for(reader.readline(), 5)  # the greeting: the session runs
            return protocols[0]
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    smtp = asyncio.run(connect())
    for name in adapter.CONNECTED_ATTRIBUTES:
        assert hasattr(smtp, name), f"aiosmtpd's SMTP sets no {name} on connection: adapter.py"
    stream = smtp._reader
    assert isinstance(stream, asyncio.StreamReader), type(stream)
    buffer = getattr(stream, "_buffer", None)
    assert isinstance(buffer, bytearray), "asyncio.StreamReader has no _buffer any more"
    assert adapter.unread(stream) is buffer
    assert adapter.stream_limit(stream) == smtp.line_length_limit, "StreamReader._limit changed"


def test_the_stream_buffer_and_limit_are_what_readuntil_uses() -> None:
    """``unread`` holds what the reads return, ``stream_limit`` is where readuntil gives up."""

    async def read() -> None:
        stream = asyncio.StreamReader(limit=8)
        stream.feed_data(b"12345678\r\n123456789\r\nnext")
        assert adapter.stream_limit(stream) == 8
        assert bytes(adapter.unread(stream)) == b"12345678\r\n123456789\r\nnext"
        assert await stream.readuntil(b"\r\n") == b"12345678\r\n"
        with pytest.raises(asyncio.LimitOverrunError) as overrun:
            await stream.readuntil(b"\r\n")
        assert overrun.value.consumed == 9
        assert bytes(adapter.unread(stream)) == b"123456789\r\nnext"

    asyncio.run(read())


def test_no_other_ingest_module_touches_those_members() -> None:
    private = (*adapter.PRIVATE_METHODS, *adapter.PRIVATE_ATTRIBUTES, *adapter.CONNECTED_ATTRIBUTES)
    pattern = re.compile(
        r"\.(" + "|".join(map(re.escape, (*private, *adapter.STREAM_ATTRIBUTES))) + r")\b"
    )
    for path in sorted(INGEST.glob("*.py")):
        if path.name != "adapter.py":
            found = pattern.findall(path.read_text())
            assert not found, f"{path.name} uses aiosmtpd's {sorted(set(found))}: use adapter.py"
