"""Destination faults: a peer that never answers, one that drops or hangs after DATA, one that
answers garbage — each delivery is deferred (not hung, not lost), and a hung peer does not hold
up mail to other destinations."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.badpeers import BadPeer
from tests.world import World, make_world, message, wait_until

KINDS = ("silent", "hang_after_data", "drop_after_data", "garbage")
TIMEOUT = 3  # seconds: every delivery timeout in this world


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, BadPeer]]:
    started = {kind: BadPeer(kind).start() for kind in KINDS}  # type: ignore[arg-type]
    yield started
    for peer in started.values():
        peer.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, peers: dict[str, BadPeer]) -> Iterator[World]:
    def settings(world: World) -> dict[str, Any]:
        routes = {f"{kind.replace('_', '-')}.test": p.address_text for kind, p in peers.items()}
        return {
            "delivery": {
                "routes": routes,
                "connect_timeout": f"{TIMEOUT}s",
                "command_timeout": f"{TIMEOUT}s",
                "greeting_timeout": f"{TIMEOUT}s",
                "data_timeout": f"{TIMEOUT}s",
                "retry_schedule": ["1h"],
                "concurrency": 2,
            }
        }

    with make_world(tmp_path_factory.mktemp("faults"), config=settings) as w:
        yield w


def deferred_reply(world: World, message_id: str, rcpt: str) -> str:
    events = wait_until(lambda: world.events(message_id, "deferred"), 30, "a deferral")
    reply: str = events[0]["recipients"][rcpt]
    return reply


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("silent", "4.4.1"),  # no greeting: like no answer from host
        ("garbage", "4.5.0"),  # not SMTP: a protocol failure, temporary
        ("hang_after_data", "4.4.2"),  # the final dot was never answered
        ("drop_after_data", "4.4.2"),
    ],
)
def test_faulty_peer_is_deferred_not_hung(
    world: World, peers: dict[str, BadPeer], kind: str, status: str
) -> None:
    rcpt = f"x@{kind.replace('_', '-')}.test"
    message_id = world.send([rcpt], message(f"fault {kind}"))
    reply = deferred_reply(world, message_id, rcpt)
    assert reply[0] == "4" and status in reply, reply
    assert peers[kind].connections >= 1
    with world.client() as client:
        assert client.exists(f"tlsrelay:msg:{message_id}"), "the message is kept for a retry"


def test_a_hung_peer_does_not_hold_up_other_destinations(
    world: World, peers: dict[str, BadPeer]
) -> None:
    silent = peers["silent"]
    before = silent.connections
    hung = world.send(["y@silent.test"], message("stuck"))
    wait_until(lambda: silent.connections > before, 10, "the relay to connect to the silent peer")
    other = world.send(["z@tls.test"], message("not stuck"))
    world.sinks["tls"].wait_for(
        lambda: any(b"not stuck" in m.data for m in world.sinks["tls"].messages), 30
    )
    assert not world.events(hung, "deferred"), "the other delivery did not wait for the hung one"
    world.wait_completed(other)
    deferred_reply(world, hung, "y@silent.test")
