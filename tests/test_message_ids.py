"""Message ids: 64 random bits after the 12 hex digits of milliseconds (still sortable by age),
and a message is never stored over another: an id already in use makes ingest store the new
message under a fresh id, the first one untouched. Ids of earlier versions are still read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from services.common import spool
from services.common.model import Envelope, is_message_id, new_message_id
from services.common.redisserver import EmbeddedRedis
from services.deliver.scheduler import message_time
from services.ingest import handler
from tests.test_ingest import RunningServer, client, make_config, stored


def test_ids_keep_their_sortable_shape() -> None:
    before = int(time.time() * 1000)
    message_id = new_message_id()
    assert len(message_id) == 28 and is_message_id(message_id)
    accepted = message_time(message_id)
    assert accepted is not None and before <= accepted * 1000 <= time.time() * 1000
    assert len({new_message_id() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("0192F1A2B3C4DEADBEEF", True),  # an id of an earlier version: 8 random digits
        ("0192F1A2B3C4DEADBEEF0123", False),  # neither 20 nor 28 digits
        ("0192F1A2B3C4DEADBEEF0123456789AB", False),
        ("0192F1A2B3C4DEADBEEF\n", False),
        ("0192f1a2b3c4deadbeef", False),
    ],
)
def test_id_recognition(text: str, valid: bool) -> None:
    assert is_message_id(text) is valid
    assert (message_time(text) is not None) is valid


def test_a_taken_id_never_overwrites_the_message_that_has_it(
    valkey: EmbeddedRedis, store: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken, fresh = new_message_id(), new_message_id()
    ids = iter([taken, taken, fresh])
    monkeypatch.setattr(handler, "new_message_id", lambda: next(ids))
    with RunningServer(make_config(tmp_path), valkey.url) as address:
        replies = []
        for subject in ("first", "second"):
            with client(address) as smtp:
                smtp.ehlo("client.example")
                smtp.mail("s@origin.example")
                smtp.rcpt("r@dest.example")
                code, text = smtp.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
            assert code == 250, text
            replies.append(text.decode().rsplit(" ", 1)[1])
    assert replies == [taken, fresh]
    first, second = stored(store, taken)[1], stored(store, fresh)[1]
    assert b"Subject: first" in first and b"Subject: second" in second
    assert f"id {taken}".encode() in first and f"id {fresh}".encode() in second


def test_the_same_write_sent_again_is_not_a_collision(
    store: redis.Redis, valkey: EmbeddedRedis
) -> None:
    envelope = Envelope(new_message_id(), "s@origin.example", ("r@dest.example",), size=10)

    async def twice() -> None:
        aio = spool.connect_async(valkey.url)
        try:
            await spool.accept(aio, envelope, b"Subject: x\r\n\r\nbody\r\n")
            await spool.accept(aio, envelope, b"Subject: x\r\n\r\nbody\r\n")  # a retried EXEC
            other = Envelope(envelope.id, "t@origin.example", ("r@dest.example",), size=10)
            with pytest.raises(spool.IdTaken):
                await spool.accept(aio, other, b"Subject: y\r\n\r\nother\r\n")
        finally:
            await aio.aclose()

    asyncio.run(twice())
    assert b"Subject: x" in stored(store, envelope.id)[1]
