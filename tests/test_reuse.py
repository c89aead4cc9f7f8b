"""Connection reuse: deliveries to the same destination ride one SMTP session (one TLS handshake),
never across TLS requirements, and a session the peer dropped is replaced transparently."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.peers import Sink
from tests.world import World, make_world, message, wait_until


def settings(world: World) -> dict[str, Any]:
    busy, plain = world.sinks["busy"].address_text, world.sinks["clear"].address_text
    return {
        "delivery": {
            "concurrency": 1,  # one worker process: one pool, so reuse is deterministic
            "tasks_per_process": 1,  # and one task at a time: two under way need two sessions
            "routes": {
                "busy.test": busy,
                "enf-busy.test": busy,
                "clear.test": plain,
                "enf-clear.test": plain,
            },
        },
        "rules": [{"name": "enforce", "when": {"recipient_domain": "enf-*"}, "tls": "enforced"}],
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    sinks = {"busy": Sink("starttls"), "clear": Sink("plain")}
    with make_world(tmp_path_factory.mktemp("reuse"), sinks, settings) as w:
        yield w


def attempts(world: World, message_id: str) -> list[dict[str, Any]]:
    return [e for e in world.wait_completed(message_id) if e["event"] == "attempt"]


def test_one_handshake_for_many_messages(world: World) -> None:
    busy = world.sinks["busy"]
    ids = []
    for i in range(20):  # one after another: a burst's messages share a task and its lanes
        ids.append(world.send([f"u{i}@busy.test"], message(f"reuse {i}")))
        world.wait_completed(ids[-1])
    reused = [a["reused"] for m in ids for a in attempts(world, m)]
    assert len(busy.messages) == 20 and all(m.tls for m in busy.messages)
    assert busy.tls_handshakes_ok == 1, busy.summary()
    assert reused == [False] + [True] * 19


def test_enforced_mail_never_rides_a_session_of_another_requirement(world: World) -> None:
    busy, clear = world.sinks["busy"], world.sinks["clear"]
    handshakes = busy.tls_handshakes_ok
    first = attempts(world, world.send(["e@enf-busy.test"], message("enforced reuse")))
    assert not first[0]["reused"] and busy.tls_handshakes_ok == handshakes + 1

    opportunistic = world.send(["o@clear.test"], message("clear first"))
    assert attempts(world, opportunistic)[0]["tls_outcome"] == "not_offered"
    before = clear.cleartext_transactions
    enforced = world.send(["x@enf-clear.test"], message("must not ride clear"))
    deferred = wait_until(lambda: world.events(enforced, "deferred"), 30, "the deferral")
    assert deferred[0]["recipients"]["x@enf-clear.test"].startswith("451 4.7.10")
    assert clear.cleartext_transactions == before, "no MAIL in clear for enforced mail"


def test_a_session_the_peer_dropped_is_replaced(world: World) -> None:
    busy = world.sinks["busy"]
    world.wait_completed(world.send(["a@busy.test"], message("before restart")))
    busy.stop()  # drops every open connection, including our parked one
    busy.start()
    found = attempts(world, world.send(["b@busy.test"], message("after restart")))
    assert [a["reused"] for a in found] == [False]
    assert any(b"after restart" in m.data for m in busy.messages)
