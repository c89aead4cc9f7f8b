"""Graceful shutdown and health, against the real processes: ingest drains on SIGTERM (a message
in the middle of DATA is accepted and delivered, never lost), a deliver worker SIGTERMed
mid-delivery finishes it (delivered exactly once), and worker health does not depend on Redis."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from services.common.health import heartbeat_path
from tests.peers import Sink
from tests.sinksmtp import Message
from tests.world import World, make_world, message, port_open, wait_until

HOLD = threading.Event()  # the "slow" sink answers DATA only once this is set
IN_DATA = threading.Event()


def slow_data(msg: Message) -> str | None:
    IN_DATA.set()
    HOLD.wait(30)
    return None  # 250


def settings(world: World) -> dict[str, Any]:
    return {
        "ingest": {"drain_grace": "2s"},
        "celery": {"heartbeat_interval": "0.3s", "heartbeat_max_age": "5s"},
        "delivery": {"routes": {"slow.test": world.sinks["slow"].address_text}},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    sinks = {"slow": Sink("starttls", data_reply=slow_data)}
    with make_world(tmp_path_factory.mktemp("drain"), sinks, settings) as w:
        yield w


def probe(world: World, path: str) -> int:
    url = world.metrics_url("ingest").replace("/metrics", path)
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # not listening


def healthcheck(world: World, service: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "services.cli", "healthcheck", service]
    return subprocess.run(
        [*argv, "--config", str(world.config_path)], capture_output=True, text=True, timeout=60
    )


def test_ingest_drains_a_message_in_the_middle_of_data(world: World) -> None:
    assert (probe(world, "/ready"), probe(world, "/live")) == (200, 200)
    client = world.smtp()
    client.mail("sender@origin.test")
    client.rcpt("x@tls.test")
    assert client.docmd("DATA")[0] == 354
    data = message("sent during shutdown")
    client.send(data[:40])  # half of it, then the service is told to stop

    ingest = world.procs["ingest"]
    ingest.send_signal(signal.SIGTERM)
    wait_until(lambda: probe(world, "/ready") == 503, 10, "readiness to fail while draining")
    wait_until(lambda: not port_open("127.0.0.1", world.ingest_port), 10, "the listener to close")

    client.send(data[40:] + b"\r\n.\r\n")
    code, text = client.getreply()
    assert code == 250, (code, text)  # accepted within the grace period ...
    sink = world.sinks["tls"]
    sink.wait_for(lambda: any(b"sent during shutdown" in m.data for m in sink.messages), 30)

    def refused() -> bool:  # ... and once the grace period is over, new commands get 421
        return client.noop()[0] == 421

    wait_until(refused, 15, "421 to new commands after the grace period")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    assert ingest.wait(timeout=30) == 0
    world.procs.pop("ingest")
    world.start_service("ingest")


def test_deliver_sigterm_mid_delivery_finishes_it_exactly_once(world: World) -> None:
    slow = world.sinks["slow"]
    message_id = world.send(["y@slow.test"], message("slow delivery"))
    assert IN_DATA.wait(30), "the delivery did not reach DATA"
    deliver = world.procs["deliver"]
    deliver.send_signal(signal.SIGTERM)  # warm shutdown: finish the task in hand
    HOLD.set()
    assert deliver.wait(timeout=60) == 0
    world.procs.pop("deliver")
    assert [m.rcpt_tos for m in slow.messages] == [["y@slow.test"]]
    assert world.events(message_id, "delivered"), "recorded before the worker exited"
    world.start_service("deliver")
    world.wait_completed(world.send(["z@slow.test"], message("after restart")))
    assert [m.rcpt_tos for m in slow.messages] == [["y@slow.test"], ["z@slow.test"]]


def test_worker_health_does_not_depend_on_redis(world: World) -> None:
    wait_until(lambda: healthcheck(world, "deliver").returncode == 0, 30, "deliver heartbeat")
    assert healthcheck(world, "policy").returncode == 0
    beat = heartbeat_path(world.root / "var", "deliver")
    world.redis.stop(kill=True)
    try:
        seen = beat.stat().st_mtime
        wait_until(lambda: beat.stat().st_mtime > seen, 10, "a heartbeat during the outage")
        done = healthcheck(world, "deliver")
        assert done.returncode == 0, done.stderr
    finally:
        world.redis.start()

    def accepted() -> str | None:
        try:
            return world.send(["w@tls.test"], message("after the outage"))
        except (AssertionError, smtplib.SMTPException, OSError):
            return None  # 451 until ingest's Redis connection is back; a client retries

    world.wait_completed(wait_until(accepted, 30, "ingest to accept again"), 60)


def test_healthcheck_fails_without_a_worker(world: World) -> None:
    world.stop_service("policy")
    try:
        done = healthcheck(world, "policy")
        assert done.returncode == 1 and "no heartbeat file" in done.stderr
    finally:
        world.start_service("policy")
