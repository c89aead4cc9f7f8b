"""Redis killed (SIGKILL) and restarted with messages queued, deferred and in flight: the AOF
brings every accepted message back and each is delivered — a process crash loses nothing; only
a machine crash could lose the last ``appendfsync everysec`` second (README, Guarantees)."""

from __future__ import annotations

import functools
import smtplib
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.peers import Sink
from tests.sinksmtp import Message
from tests.world import World, make_world, message, wait_until

HELD = threading.Event()
RELEASE = threading.Event()


def replies(address: str) -> str | None:
    return "451 4.3.0 not now" if address.startswith("later") and not RELEASE.is_set() else None


def hold(msg: Message) -> str | None:
    if any(r.startswith("inflight") for r in msg.rcpt_tos) and not HELD.is_set():
        HELD.set()
        RELEASE.wait(30)
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    def settings(world: World) -> dict[str, Any]:
        return {
            "celery": {"visibility_timeout": "12s", "stall_after": "5s"},
            "delivery": {
                "job_timeout": "6s",  # longer than the delivery held in DATA meanwhile
                "concurrency": 1,
                "retry_schedule": ["1h"],
                "routes": {"r.test": world.sinks["r"].address_text},
            },
        }

    sinks = {"r": Sink("starttls", rcpt_replies=replies, data_reply=hold)}
    with make_world(tmp_path_factory.mktemp("restart"), sinks, settings) as w:
        yield w


def supervise(world: World) -> None:
    for name in ("policy", "deliver"):
        if world.procs[name].poll() is not None:
            world.procs.pop(name)
            world.start_service(name)


def send_when_up(world: World, rcpt: str, subject: str) -> str:
    def attempt() -> str | None:
        try:
            return world.send([rcpt], message(subject))
        except (AssertionError, smtplib.SMTPException, OSError):
            return None

    return wait_until(attempt, 30, "ingest to accept")


def test_queued_deferred_and_in_flight_survive_a_redis_kill(world: World) -> None:
    sink = world.sinks["r"]
    deferred = [world.send([f"later{i}@r.test"], message(f"deferred {i}")) for i in range(3)]
    for message_id in deferred:
        wait_until(functools.partial(world.events, message_id, "deferred"), 30, "a deferral")
    in_flight = world.send(["inflight@r.test"], message("in flight"))
    assert HELD.wait(30), "the in-flight delivery did not reach DATA"
    world.stop_service("policy")  # so the next ones stay queued for policy
    queued = [world.send([f"queued{i}@r.test"], message(f"queued {i}")) for i in range(5)]

    world.redis.stop(kill=True)
    RELEASE.set()  # the held delivery now finishes at the peer while Redis is gone
    world.redis.start()
    world.start_service("policy")
    retry = [sys.executable, "-m", "services.cli", "queue", "retry"]
    subprocess.run([*retry, "--config", str(world.config_path)], check=True, timeout=60)

    everything = [*deferred, *queued, in_flight]

    def all_completed() -> bool:
        supervise(world)  # as Kubernetes or `tlsrelay run` would: a worker that exits restarts
        return all(world.events(m, "completed") for m in everything)

    try:
        wait_until(all_completed, 120, "every message to complete")
    except AssertionError:
        stuck = {m: [e["event"] for e in world.trace(m)] for m in everything}
        raise AssertionError(f"not every message completed; their traces: {stuck}") from None
    subjects = [s for m in sink.messages for s in [m.data.split(b"Subject: ")[1].split(b"\r\n")[0]]]
    expected = [f"deferred {i}" for i in range(3)] + [f"queued {i}" for i in range(5)]
    for subject in expected:
        assert subjects.count(subject.encode()) == 1, subject
    assert subjects.count(b"in flight") in (1, 2), "at least once; a second copy is RFC 1047"
    if subjects.count(b"in flight") == 2:
        assert world.events(in_flight, "interrupted"), "a duplicate must show in the trace"
    send_when_up(world, "after@r.test", "after restart")
