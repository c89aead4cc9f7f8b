"""Traffic shaping per destination site, end to end: real deliver workers (four processes), real
Redis, real SMTP sinks on loopback. Each test has a site of its own (a route's address named in
``delivery.shaping.sites``), so they share one world."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from services.common import spool
from services.deliver import shaping
from tests.peers import Sink
from tests.sinksmtp import Message
from tests.world import World, make_world, message, wait_until

RATE_ARRIVALS: list[float] = []
HELD = threading.Event()
RELEASE = threading.Event()


def note_arrival(msg: Message) -> str | None:
    RATE_ARRIVALS.append(time.monotonic())
    return None


def too_many_every_third(conn_no: int) -> str | None:
    return "421 4.7.0 Too many connections, try again later" if conn_no % 3 == 0 else None


def hold_first(msg: Message) -> str | None:
    """The first final dot is answered only once the test says so (after the kill)."""
    if not HELD.is_set():
        HELD.set()
        RELEASE.wait(30)
    return None


SITES: dict[str, dict[str, object]] = {
    "lim": {"connections": 2},
    "rate": {"rate": "5/s"},
    "bo": {"connections": 4, "messages_per_connection": 1},
    "susp": {},
    "held": {"connections": 1},
}


def settings(world: World) -> dict[str, Any]:
    sinks = world.sinks
    return {
        "delivery": {
            "concurrency": 4,
            "reuse_idle_timeout": "3s",
            "routes": {f"*.{name}.test": sinks[name].address_text for name in SITES},
            "shaping": {
                "sites": [
                    {"name": name, "match": [sinks[name].address_text], **limits}
                    for name, limits in SITES.items()
                ]
            },
        }
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    sinks = {
        "lim": Sink("starttls", data_delay=0.1),
        "rate": Sink("plain", data_reply=note_arrival),
        "bo": Sink("plain", greeting=too_many_every_third),
        "susp": Sink("plain"),
        "held": Sink("plain", data_reply=hold_first),
    }
    with make_world(tmp_path_factory.mktemp("shaping"), sinks, settings) as w:
        yield w


def send_many(world: World, site: str, count: int, subject: str) -> str:
    """One message to ``count`` domains of ``site``: ``count`` jobs (one task each) at once."""
    rcpts = [f"u@d{i}.{site}.test" for i in range(count)]
    return world.send(rcpts, message(subject))


def cli(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "services.cli", "queue", *args]
    return subprocess.run(
        [*command, "--config", str(world.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def sites_json(world: World) -> dict[str, Any]:
    done = cli(world, "sites", "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def sites(world: World) -> dict[str, dict[str, Any]]:
    return {s["site"]: s for s in sites_json(world)["sites"]}


def test_four_processes_never_open_more_than_the_sites_limit(world: World) -> None:
    lim = world.sinks["lim"]
    message_id = send_many(world, "lim", 16, "limited")
    trace = world.wait_completed(message_id, timeout=90)
    assert len(lim.messages) == 16, lim.summary()
    assert not [e for e in trace if e["event"] == "bounced"]
    assert lim.peak_connections <= 2, lim.summary()
    assert lim.peak_connections == 2, "the limit, not a lack of work, held it"
    assert all(m.tls for m in lim.messages)


def test_idle_sessions_close_between_tasks_and_their_leases_go(world: World) -> None:
    """The worker's event loop runs between tasks: a parked session idle for
    delivery.reuse_idle_timeout (3 s here) is closed, and its lease released, with no task."""
    lim = world.sinks["lim"]
    world.wait_completed(world.send(["u@idle.lim.test"], message("then idle")), timeout=30)
    with world.client() as client:
        wait_until(
            lambda: (
                lim.open_connections == 0
                and client.zcount(spool.site_key("leases", "lim"), time.time(), "+inf") == 0
            ),
            3 + 2 * shaping.TICK + 3,
            "the idle session to close and its lease to go",
        )


def test_a_rate_holds_across_workers(world: World) -> None:
    message_id = send_many(world, "rate", 55, "rated")  # 5 at once, then 5/s: 10 s
    world.wait_completed(message_id, timeout=90)
    arrivals = sorted(RATE_ARRIVALS)
    assert len(arrivals) == 55
    # GCRA with a burst of the rate's count: any stretch of t seconds holds at most 5 t + 5
    # arrivals (one more for clocks: the sink's is not Redis's).
    for i, first in enumerate(arrivals):
        for j in range(i, len(arrivals)):
            assert j - i + 1 <= 5 * (arrivals[j] - first) + 6, (i, j, arrivals)
    assert arrivals[-1] - arrivals[0] >= (55 - 5) / 5 * 0.9, "the rate held it back"


def test_throttling_replies_lower_the_sites_concurrency(world: World) -> None:
    bo = world.sinks["bo"]
    message_id = send_many(world, "bo", 12, "backoff")
    trace = world.wait_completed(message_id, timeout=90)
    assert len(bo.messages) == 12, bo.summary()
    assert not [e for e in trace if e["event"] == "bounced"], "a 421 defers, never bounces"
    state = sites(world)["bo"]
    assert state["backoff_steps"] >= 1 and state["limit"] < state["configured_limit"], state
    with world.client() as client:
        steps = client.hget(spool.site_key("backoff", "bo"), "steps")
    assert int(steps or 0) >= 1


def test_suspend_then_resume(world: World) -> None:
    susp = world.sinks["susp"]
    done = cli(world, "suspend", "susp", "--for", "1h", "--reason", "provider asked")
    assert done.returncode == 0, done.stderr
    message_id = world.send(["a@one.susp.test"], message("suspended"))
    throttled = wait_until(lambda: world.events(message_id, "throttled"), 30, "throttled")
    assert throttled[0]["reason"] == "suspended" and throttled[0]["site"] == "susp"
    listed = json.loads(cli(world, "--json").stdout)["deferred"]
    mine = [d for d in listed if d["id"] == message_id]
    assert mine and mine[0]["throttled"] == "suspended" and mine[0]["attempts"] == 0
    state = sites(world)["susp"]
    assert state["suspended"]["reason"] == "provider asked" and state["waiting"] == 1
    assert sites_json(world)["suspensions"]["susp"]["label"] == "susp"
    refused = cli(world, "suspend", "default")
    assert refused.returncode == 2 and "label of every site" in refused.stderr
    assert susp.connections == 0 and not world.events(message_id, "attempt")

    done = cli(world, "resume", "susp")
    assert done.returncode == 0 and "1 waiting" in done.stdout, (done.stdout, done.stderr)
    trace = world.wait_completed(message_id, timeout=30)
    attempts = [e for e in trace if e["event"] == "attempt"]
    assert len(attempts) == 1 and len(susp.messages) == 1
    assert not [e for e in trace if e["event"] == "deferred"], "the wait was not an attempt"


def test_a_killed_workers_leases_expire(world: World) -> None:
    held = world.sinks["held"]
    first = world.send(["a@one.held.test"], message("held first"))
    assert HELD.wait(30), "the first delivery never reached the sink"
    key = spool.site_key("leases", "held")
    with world.client() as client:
        assert client.zcard(key) == 1
        world.stop_service("deliver", kill=True)
        killed = time.monotonic()
        RELEASE.set()
        wait_until(
            lambda: client.zcount(key, time.time(), "+inf") == 0,
            shaping.LEASE_TTL + 2,
            "the dead worker's lease to expire",
        )
    assert time.monotonic() - killed <= shaping.LEASE_TTL + 2
    world.start_service("deliver")
    second = world.send(["b@two.held.test"], message("held second"))
    world.wait_completed(second, timeout=60)
    world.wait_completed(first, timeout=60)
    assert held.peak_connections <= 1, held.summary()
