"""A deliver worker SIGKILLed after the destination has the whole message but before its reply
was recorded (the RFC 1047 window): after restart the message is delivered — twice, which the
trace and a metric make visible — and nothing is lost."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.peers import Sink
from tests.sinksmtp import Message
from tests.world import World, make_world, message

ARRIVED = threading.Event()
RELEASE = threading.Event()


def hold_first(msg: Message) -> str | None:
    """Hold the reply to the first message's final dot until the test has killed the worker."""
    if not ARRIVED.is_set():
        ARRIVED.set()
        RELEASE.wait(30)
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    def settings(world: World) -> dict[str, Any]:
        return {
            "celery": {"visibility_timeout": "6s"},  # the killed worker's task comes back soon
            "delivery": {
                "job_timeout": "3s",  # at most half the visibility timeout
                "concurrency": 1,
                "routes": {"hold.test": world.sinks["hold"].address_text},
            },
        }

    sinks = {"hold": Sink("starttls", data_reply=hold_first)}
    with make_world(tmp_path_factory.mktemp("crash"), sinks, settings) as w:
        yield w


def test_sigkill_after_the_final_dot_redelivers_and_says_so(world: World) -> None:
    sink = world.sinks["hold"]
    message_id = world.send(["k@hold.test"], message("killed mid-delivery"))
    assert ARRIVED.wait(30), "the delivery never reached the final dot"
    world.stop_service("deliver", kill=True)  # the worker and its pool, no goodbye
    RELEASE.set()
    world.start_service("deliver")
    trace = world.wait_completed(message_id, timeout=90)
    copies = [m for m in sink.messages if b"killed mid-delivery" in m.data]
    assert len(copies) == 2, "the post-DATA window: delivered, and a second copy after restart"
    (interrupted,) = [e for e in trace if e["event"] == "interrupted"]
    assert interrupted["domain"] == "hold.test" and "twice" in interrupted["note"]
    assert [e["event"] for e in trace].count("delivered") == 1
