"""Redis goes away while clients send: ingest answers 451 4.3.0 and keeps nothing half-written;
when Redis is back, the next message is accepted and delivered without restarting anything."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

from services.common import queueing
from tests.world import World, make_world, message, wait_until


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("outage")) as w:
        yield w


def data_reply(world: World, data: bytes) -> tuple[int, str]:
    with world.smtp() as client:
        client.mail("sender@origin.test")
        client.rcpt("zoe@tls.test")
        code, text = client.data(data)
    return code, text.decode()


def test_redis_down_gives_451_then_recovers(world: World) -> None:
    sink = world.sinks["tls"]
    world.wait_completed(world.send(["zoe@tls.test"], message("before outage")))

    world.redis.stop(kill=True)
    code, text = data_reply(world, message("during outage"))
    assert (code, text[:5]) == (451, "4.3.0"), text

    world.redis.start()
    with world.client() as client:
        keys = client.keys("tlsrelay:msg:*")
        queued = client.llen(queueing.POLICY_LIST) + client.llen(queueing.DELIVER_LIST)
        assert (keys, queued) == ([], 0), "nothing half-written may be left behind"

    def accepted_again() -> str | None:
        try:
            return world.send(["zoe@tls.test"], message("after outage"))
        except (AssertionError, smtplib.SMTPException, OSError):
            return None  # ingest may need a moment to reconnect; the client would retry

    message_id = wait_until(accepted_again, 30, "ingest to accept again")
    sink.wait_for(lambda: any(b"after outage" in m.data for m in sink.messages), 60)
    world.wait_completed(message_id, 60)
    assert not any(b"during outage" in m.data for m in sink.messages)
