"""Prometheus metrics end to end: the real services of a world, scraped over HTTP and parsed with
prometheus_client's own parser.

The world's traffic is counted exactly (deltas of every ``tlsrelay_*`` counter and histogram
count, nothing more, nothing less); the deliver pool's processes add up; the queue gauges follow a
backlog up and back down; every exposition follows Prometheus naming conventions; a busy metrics
port stops a service with a message naming the config key.
"""

from __future__ import annotations

import functools
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from services.common import metrics, queueing, spool
from services.common.config import ConfigError, load_config
from services.common.redisserver import EmbeddedRedis, free_port
from services.deliver import scheduler
from tests.peers import Sink
from tests.sinksmtp import Message
from tests.world import SERVICES, World, make_world, message, metrics_ports, wait_until

Key = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[Key, float]

SLOW_DATA = 0.3  # seconds the "slow" sink sits on each DATA: deliveries overlap in the pool


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def slow_data(msg: Message) -> None:
    time.sleep(SLOW_DATA)


def settings(world: World) -> dict[str, Any]:
    def at(name: str) -> str:
        return world.sinks[name].address_text

    return {
        "metrics": metrics_ports(avoid={world.ingest_port}),
        "ingest": {"max_recipients": 2},  # a third RCPT → 452 4.5.3 (a tempfail)
        "delivery": {
            "routes": {
                "origin.test": at("senders"),  # DSNs to our senders arrive there
                "held.test": at("plain"),  # enforced by rule, no STARTTLS there: deferred
                "reject.test": at("rejecting"),
                "slow.test": at("slow"),
                "old.test": at("old"),  # TLS 1.0 at most
            },
            "retry_schedule": ["1h"],  # the held message stays deferred while we count
            "concurrency": 2,
        },
        "rules": [
            {"name": "must-tls", "when": {"recipient_domain": "held.test"}, "tls": "enforced"}
        ],
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    sinks = {
        "senders": Sink("starttls"),
        "rejecting": Sink("starttls", rcpt_replies={"e@reject.test": "550 5.1.1 no such user"}),
        "slow": Sink("starttls", data_reply=slow_data),
        "old": Sink("starttls", max_tls_version=ssl.TLSVersion.TLSv1),
    }
    with make_world(tmp_path_factory.mktemp("metrics"), sinks, settings) as w:
        for service in SERVICES:
            wait_until(functools.partial(serving, w, service), 30, f"{service} to serve /metrics")
        yield w


# --------------------------------------------------------------------------- scraping


def exposition(world: World, service: str) -> str:
    with urllib.request.urlopen(world.metrics_url(service), timeout=5) as reply:
        text: str = reply.read().decode()
    return text


def serving(world: World, service: str) -> bool:
    try:
        exposition(world, service)
    except OSError:
        return False
    return True


def scrape(world: World, service: str) -> Samples:
    return {
        key(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(exposition(world, service))
        for sample in family.samples
    }


def counted(samples: Samples) -> Samples:
    """The counters and histogram counts of tlsrelay (not buckets, sums or gauges)."""
    return {
        k: v
        for k, v in samples.items()
        if k[0].startswith("tlsrelay_") and k[0].endswith(("_total", "_count"))
    }


def changes(before: Samples, after: Samples) -> Samples:
    diff = {k: v - before.get(k, 0.0) for k, v in counted(after).items()}
    return {k: v for k, v in diff.items() if v}


def settle(world: World, service: str, before: Samples, expected: Samples) -> None:
    """Wait until the counts of ``service`` moved by exactly ``expected`` since ``before``."""
    seen: dict[str, Samples] = {}

    def done() -> bool:
        seen["now"] = changes(before, scrape(world, service))
        return seen["now"] == expected

    try:
        wait_until(done, 30, f"{service} counts")
    except AssertionError:
        got = seen.get("now", {})
        wrong = {k: (got.get(k), expected.get(k)) for k in {*got, *expected}
                 if got.get(k) != expected.get(k)}  # fmt: skip
        raise AssertionError(f"{service}: (got, expected) differ: {wrong}") from None


def queues(world: World, service: str) -> dict[str, tuple[float, float]]:
    """queue → (entries, oldest age) as served by ``service``."""
    samples = scrape(world, service)
    return {
        q: (
            samples[key("tlsrelay_queue_messages", queue=q)],
            samples[key("tlsrelay_queue_oldest_age_seconds", queue=q)],
        )
        for q in ("policy", "deliver", "deferred")
    }


def tls_send(world: World, rcpt: str, data: bytes) -> str:
    with world.smtp() as client:
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo("client.test")
        client.mail("sender@origin.test")
        assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(data)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


# --------------------------------------------------------------------------- the counts


def attempts(mode: str, outcome: str, result: str) -> Key:
    return key(
        "tlsrelay_delivery_attempts_total", tls_mode=mode, tls_outcome=outcome, result=result
    )


def tls_versions(version: str) -> Key:
    return key("tlsrelay_delivery_tls_versions_total", version=version)


def posture(transport: str) -> Key:
    return key("tlsrelay_posture_deliveries_total", transport=transport)


def would_defer(mode: str) -> Key:
    return key("tlsrelay_posture_would_defer_total", tls_mode=mode)


def test_a_day_of_traffic_is_counted_exactly(world: World) -> None:
    before = {service: scrape(world, service) for service in SERVICES}
    tls_send(world, "a@tls.test", message("metrics tls"))  # inbound over STARTTLS
    world.send(["b@plain.test"], message("metrics not offered"))
    world.send(["c@broken.test"], message("metrics handshake failed"))
    held = world.send(["d@held.test"], message("metrics held"))
    world.send(["e@reject.test"], message("metrics bounce"))
    with world.smtp() as client:  # 530 5.7.10: REQUIRETLS in clear
        assert client.docmd("MAIL FROM:<sender@origin.test> REQUIRETLS")[0] == 530
    with world.smtp() as client:  # 452 4.5.3: a third recipient
        client.mail("sender@origin.test")
        assert [client.rcpt(f"{n}@tls.test")[0] for n in "xyz"] == [250, 250, 452]

    listen = {"listener": "listen"}
    settle(world, "ingest", before["ingest"], {
        key("tlsrelay_ingest_connections_total", **listen, tls="yes"): 1,
        key("tlsrelay_ingest_connections_total", **listen, tls="no"): 6,
        key("tlsrelay_ingest_messages_total", **listen, result="accepted"): 5,
        key("tlsrelay_ingest_messages_total", **listen, result="rejected"): 1,
        key("tlsrelay_ingest_messages_total", **listen, result="tempfail"): 1,
        key("tlsrelay_ingest_message_size_bytes_count"): 5,
    })  # fmt: skip
    settle(world, "policy", before["policy"], {  # the four messages, the DSN, the held one
        key("tlsrelay_policy_decisions_total", circumstance="default", tls_mode="opportunistic"): 5,
        key("tlsrelay_policy_decisions_total", circumstance="must-tls", tls_mode="enforced"): 1,
    })  # fmt: skip
    settle(world, "deliver", before["deliver"], {
        attempts("opportunistic", "tls", "delivered"): 2,  # a@tls.test and the DSN
        attempts("opportunistic", "not_offered", "delivered"): 1,
        attempts("opportunistic", "handshake_failed", "delivered"): 1,
        attempts("enforced", "not_offered", "deferred"): 1,
        attempts("opportunistic", "tls", "bounced"): 1,
        key("tlsrelay_plaintext_fallback_total", reason="not_offered"): 1,
        key("tlsrelay_plaintext_fallback_total", reason="handshake_failed"): 1,
        key("tlsrelay_tls_required_deferrals_total", tls_mode="enforced"): 1,
        tls_versions("TLSv1.3"): 3,  # the three attempts over TLS
        key("tlsrelay_messages_final_total", result="delivered"): 4,
        key("tlsrelay_messages_final_total", result="bounced"): 1,
        key("tlsrelay_dsn_sent_total", action="failed"): 1,
        key("tlsrelay_delivery_duration_seconds_count"): 6,
        key("tlsrelay_end_to_end_seconds_count"): 4,
        # Deliveries: two over TLS (certificates for localhost, checked against the domain
        # routed to an IP: a verified delivery would fail the name), two in clear.
        posture("tls"): 2, posture("clear"): 2,
        would_defer("enforced"): 2, would_defer("verified"): 4,
    })  # fmt: skip
    assert world.events(held, "deferred"), "the held message is deferred"
    sizes = scrape(world, "ingest")[key("tlsrelay_ingest_message_size_bytes_sum")]
    assert sizes > 5 * len(message("metrics tls"))
    for service in ("deliver", "policy"):  # the held message waits in the deferred set
        entries, age = queues(world, service)["deferred"]
        assert entries == 1 and age > 0, (service, entries, age)


def per_process_attempts(world: World) -> dict[str, float]:
    """pid → delivery attempts counted in that process's multiprocess file."""
    counts = {}
    for path in (world.root / "var" / "metrics" / "deliver").glob("counter_*.db"):
        families = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
        counts[path.stem.rpartition("_")[2]] = sum(
            s.value for f in families for s in f.samples
            if s.name == "tlsrelay_delivery_attempts_total"
        )  # fmt: skip
    return counts


def test_counts_of_several_pool_processes_add_up(world: World) -> None:
    n = 6
    files_before, before = per_process_attempts(world), scrape(world, "deliver")
    with world.smtp() as client:  # all at once, so both pool processes get some
        for i in range(n):
            client.sendmail("sender@origin.test", [f"u{i}@slow.test"], message(f"slow {i}"))
    settle(world, "deliver", before, {
        attempts("opportunistic", "tls", "delivered"): n,
        tls_versions("TLSv1.3"): n,
        posture("tls"): n,
        would_defer("verified"): n,
        key("tlsrelay_messages_final_total", result="delivered"): n,
        key("tlsrelay_delivery_duration_seconds_count"): n,
        key("tlsrelay_end_to_end_seconds_count"): n,
    })  # fmt: skip
    grown = {
        pid: count - files_before.get(pid, 0.0)
        for pid, count in per_process_attempts(world).items()
        if count > files_before.get(pid, 0.0)
    }
    assert len(grown) >= 2, f"one process did all the work: {grown}"
    assert sum(grown.values()) == n


def test_the_negotiated_tls_version_is_counted(world: World) -> None:
    """A server that speaks only TLS 1.0 gets opportunistic mail over TLS 1.0, counted as such."""
    before = scrape(world, "deliver")
    message_id = world.send(["f@old.test"], message("metrics tls 1.0"))
    settle(world, "deliver", before, {
        attempts("opportunistic", "tls", "delivered"): 1,
        tls_versions("TLSv1"): 1,
        posture("tls"): 1,
        would_defer("verified"): 1,
        key("tlsrelay_messages_final_total", result="delivered"): 1,
        key("tlsrelay_delivery_duration_seconds_count"): 1,
        key("tlsrelay_end_to_end_seconds_count"): 1,
    })  # fmt: skip
    (attempt,) = world.events(message_id, "attempt")
    assert attempt["tls_version"] == "TLSv1"


# --------------------------------------------------------------------------- conventions

OWN_FAMILIES = {
    "ingest": {
        "tlsrelay_ingest_connections",
        "tlsrelay_ingest_messages",
        "tlsrelay_ingest_message_size_bytes",
    },
    "policy": {"tlsrelay_policy_decisions"},
    "deliver": {
        "tlsrelay_delivery_attempts",
        "tlsrelay_delivery_tls_versions",
        "tlsrelay_plaintext_fallback",
        "tlsrelay_tls_required_deferrals",
        "tlsrelay_messages_final",
        "tlsrelay_dsn_sent",
        "tlsrelay_delivery_interrupted",
        "tlsrelay_delivery_unreplicated_marks",
        "tlsrelay_dane",  # primed at 0 for each result
        "tlsrelay_posture_deliveries",
        "tlsrelay_posture_would_defer",
        "tlsrelay_posture_recording_errors",
        "tlsrelay_delivery_duration_seconds",
        "tlsrelay_end_to_end_seconds",
        "tlsrelay_site_connections",  # read from Redis (metrics.SiteCollector): always there
        "tlsrelay_site_backoff_steps",
        "tlsrelay_site_suspended",
    },
}
QUEUE_FAMILIES = {"tlsrelay_queue_messages", "tlsrelay_queue_oldest_age_seconds"}
CLIENT_LIBRARY = ("process_", "python_")  # prometheus_client's own collectors (ingest)
FORBIDDEN_LABEL_WORDS = {"address", "addr", "domain", "id", "ip", "host", "sender", "recipient",
                         "rcpt", "email", "mailbox", "user", "message"}  # fmt: skip
LABEL_VALUES = {
    "listener": {"listen", "submission", "relay"},
    "tls": {"yes", "no"},
    "result": {
        "accepted",
        "rejected",
        "tempfail",
        "delivered",
        "bounced",
        "deferred",
        "ok",
        "failed",
        "no_usable_tlsa",
        "lookup_error",
    },
    "tls_mode": {"none", "opportunistic", "enforced", "verified", "dane"},
    "tls_outcome": {
        "tls",
        "tls_verified",
        "dane_verified",
        "dane_failed",
        "not_offered",
        "handshake_failed",
        "remembered_broken",
        "verify_failed",
        "disabled",
        "no_connection",
    },
    "reason": {"not_offered", "handshake_failed", "remembered_broken"},
    "action": {"failed", "delayed"},
    "queue": {"policy", "deliver", "deferred"},
    "version": {"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "other"},
    "site": {"default"},  # and the names of delivery.shaping.sites (none in this world)
    "transport": {"clear", "tls", "tls_verified"},
}


@pytest.mark.parametrize("service", SERVICES)
def test_exposition_follows_prometheus_conventions(world: World, service: str) -> None:
    families = list(text_string_to_metric_families(exposition(world, service)))
    ours = [f for f in families if not f.name.startswith(CLIENT_LIBRARY)]
    queue_families = QUEUE_FAMILIES if service != "ingest" else set()
    assert {f.name for f in ours} == OWN_FAMILIES[service] | queue_families
    for family in ours:
        name = family.name
        assert re.fullmatch(r"tlsrelay_[a-z][a-z0-9_]*[a-z0-9]", name), name
        assert family.documentation, f"{name} has no HELP"
        assert family.type in ("counter", "gauge", "histogram"), (name, family.type)
        if family.type == "counter":
            assert not name.endswith("_total")  # the parser strips it: the sample has it once
            assert all(s.name == f"{name}_total" for s in family.samples), name
        else:
            assert not name.endswith("_total"), f"{name}: _total is for counters"
        if family.type == "histogram" or re.search(r"(^|_)(age|duration|size|seconds)(_|$)", name):
            assert name.endswith(("_seconds", "_bytes")), f"{name}: base unit in the name"
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le":
                    continue
                assert re.fullmatch(r"[a-z][a-z0-9_]*", label), (name, label)
                assert not FORBIDDEN_LABEL_WORDS & set(label.split("_")), (name, label)
                if label in LABEL_VALUES:
                    assert value in LABEL_VALUES[label], (name, label, value)
                else:
                    assert label == "circumstance", (name, label)


def message_id_at(when: float) -> str:
    return f"{int(when * 1000):012X}ABCDEF01"


def test_queue_readings_from_redis(tmp_path: Path) -> None:
    """Lists: length and the age of the tail (the oldest); deferred: the set's size and the age
    of the oldest message in the index, skipping messages already gone (the scrape only reads;
    the scheduler drops them from the index)."""
    now = time.time()
    gone, alive, older, newer = (message_id_at(now - age) for age in (300, 100, 50, 10))
    with EmbeddedRedis(tmp_path / "redis") as server, closing(spool.connect(server.url)) as client:
        client.hset(spool.msg_key(alive), "envelope", "{}")
        with client.pipeline(transaction=True) as pipe:
            for mid in (gone, alive):
                job = {"id": mid, "domain": "x.test", "recipients": ["a@x.test"], "attempt": 2}
                scheduler.stage_deferral(pipe, job, now + 3600)
            pipe.execute()
        # Tasks carry batches: the gauges count messages (waiting sets), not list entries.
        client.lpush(queueing.POLICY_LIST, queueing.classify_task([older, newer]))
        client.zadd(spool.WAITING_POLICY, {older: now - 50, newer: now - 10})
        client.lpush(queueing.DELIVER_LIST, queueing.deliver_task([{"id": newer}]))
        client.zadd(spool.WAITING_DELIVER, {spool.waiting_job(newer, "x.test"): now - 10})
        readings: dict[str, Any] = dict(metrics.QueueCollector(server.url).read(now))
        assert readings == {
            "policy": (2, pytest.approx(50, abs=0.01)),
            "deliver": (1, pytest.approx(10, abs=0.01)),
            "deferred": (2, pytest.approx(100, abs=0.01)),
        }
        assert client.zcard(spool.DEFERRED_SINCE) == 2  # the scrape only reads
        assert scheduler.prune_deferred_index(client) == 1
        assert client.zrange(spool.DEFERRED_SINCE, 0, -1) == [alive.encode()]


def test_queue_gauges_are_left_out_while_redis_is_down() -> None:
    collector = metrics.QueueCollector(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
    assert list(collector.collect()) == []


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("metrics:\n  policy: 127.0.0.1:9101\n", "metrics: policy and ingest both on"),
        ("ingest:\n  listen: 127.0.0.1:9103\n", ":4: metrics.deliver: 127.0.0.1:9103 is also"),
        ("metrics:\n  deliver: 9103\n", ":2: metrics.deliver: expected host:port"),
    ],
)
def test_metrics_config_errors_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "tlsrelay.yaml"
    if "listen: 127.0.0.1:9103" in text:
        text += "metrics:\n  deliver: 127.0.0.1:9103\n"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(path)


def test_metrics_defaults_and_null_disables(tmp_path: Path) -> None:
    path = tmp_path / "tlsrelay.yaml"
    path.write_text("metrics:\n  policy: null\n")
    config = load_config(path)
    assert (str(config.metrics.ingest), config.metrics.policy, str(config.metrics.deliver)) == (
        "127.0.0.1:9101",
        None,
        "127.0.0.1:9103",
    )


@pytest.mark.parametrize("service", ["ingest", "policy"])
def test_a_busy_metrics_port_stops_the_service_naming_the_key(world: World, service: str) -> None:
    """A second instance with the same config: the first holds the port; the second stops at
    once, and the first's counts (its multiprocess files) are untouched."""
    before = counted(scrape(world, service))
    argv = [
        sys.executable,
        "-m",
        "services.cli",
        service,
        "--config",
        str(world.config_path),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    address = world.metrics_url(service).removeprefix("http://").removesuffix("/metrics")
    assert done.returncode == 1, done.stderr
    assert f"tlsrelay {service}: metrics.{service}: cannot serve /metrics on {address}: " in (
        done.stderr
    )
    assert counted(scrape(world, service)) == before


# --------------------------------------------------------------------------- the queues


def test_queue_gauges_follow_a_backlog_up_and_down(world: World) -> None:
    """While deliver is down, the policy service still serves the queue gauges."""
    world.stop_service("deliver")
    ids = [world.send([f"q{i}@tls.test"], message(f"backlog {i}")) for i in range(3)]
    backlog = wait_until(
        lambda: (q := queues(world, "policy"))["deliver"][0] == 3 and q, 20, "a backlog of 3"
    )
    _entries, age = backlog["deliver"]
    assert 0 < age < 60, age
    assert backlog["policy"] == (0.0, 0.0)

    world.start_service("deliver")

    wait_until(lambda: serving(world, "deliver"), 30, "deliver to serve /metrics")
    wait_until(
        lambda: all(queues(world, s)["deliver"] == (0.0, 0.0) for s in ("deliver", "policy")),
        30,
        "the deliver queue to drain",
    )
    for message_id in ids:
        world.wait_completed(message_id)


# --------------------------------------------------------------------------- tlsrelay run


def test_run_prints_and_serves_the_three_urls(tmp_path: Path) -> None:
    listen = free_port()
    ports = metrics_ports(avoid={listen})
    config = tmp_path / "tlsrelay.yaml"
    config.write_text(
        f"hostname: relay.test\ndata_dir: ./var\ningest:\n  listen: 127.0.0.1:{listen}\n"
        f"policy:\n  concurrency: 1\ndelivery:\n  concurrency: 1\nmetrics: {ports}\n"
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin"},  # the embedded Redis
        )
    try:
        for service, address in ports.items():
            url = f"http://{address}/metrics"
            wait_until(functools.partial(reachable, url), 30, f"{service} metrics in tlsrelay run")
            assert f"metrics: {service} {url}\n" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False
