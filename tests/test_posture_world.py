"""``tlsrelay posture`` end to end: a mixed load through a real world (ingest → policy → deliver →
sinks of every kind, MX and routed), then

- what ``posture`` reports equals what the peers received: deliveries per domain, over TLS or
  in clear;
- its what-if columns equal what a rerun of the same load with the rule in place actually
  defers: the policy worker is restarted with ``tls: enforced`` (then ``verified``) for every
  domain of the load, the load is sent again, and the deferrals are counted per domain.
"""

from __future__ import annotations

import json
import ssl
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from services import cli
from services.common.model import domain_of
from tests.peers import Sink
from tests.world import World, make_world, message, wait_until

# domain → messages in the load
LOAD = {
    "good.test": 3,  # STARTTLS, certificate from the trusted CA for the name checked
    "selfsigned.test": 2,
    "wrongname.test": 2,
    "expired.test": 2,
    "tls10.test": 2,  # TLS 1.0 only: encrypted, but not good enough for verified
    "plain.test": 3,  # no STARTTLS
    "broken.test": 2,  # STARTTLS offered, handshake broken (then remembered as broken)
    "mx.test": 2,  # via DNS: first MX refuses, second has a certificate for other names
}
LOCAL = {"tls_name": "localhost"}  # the name the sinks' certificates carry


def settings(world: World) -> dict[str, Any]:
    def at(name: str) -> dict[str, str]:
        return {"address": world.sinks[name].address_text, **LOCAL}

    ca = world.sinks["tls"].write_ca_pem(world.root / "ca.pem")
    return {
        "delivery": {
            "ca_file": ca,
            "routes": {
                "good.test": at("tls"),
                "selfsigned.test": at("selfsigned"),
                "wrongname.test": at("wrongname"),
                "expired.test": at("expired"),
                "tls10.test": at("tls10"),
            },
            "retry_schedule": ["1h"],  # a deferred message stays deferred while we count
            "mta_sts": False,
        }
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    sinks = {
        "selfsigned": Sink("starttls", cert="selfsigned"),
        "wrongname": Sink("starttls", cert_names=["somebody-else.test"]),
        "expired": Sink("starttls", cert="expired"),
        "tls10": Sink("starttls", max_tls_version=ssl.TLSVersion.TLSv1),
    }
    with make_world(tmp_path_factory.mktemp("posture"), sinks, settings) as w:
        yield w


def send_load(world: World, tag: str) -> dict[str, str]:
    """The load, one message per send; message id → domain."""
    sent = {}
    for domain, count in LOAD.items():
        for n in range(count):
            sent[world.send([f"u{n}@{domain}"], message(f"{tag} {domain} {n}"))] = domain
    return sent


def fates(world: World, sent: dict[str, str]) -> dict[str, str]:
    """message id → delivered | deferred, once every message of ``sent`` has one."""
    found: dict[str, str] = {}

    def settled() -> bool:
        for mid in sent:
            if mid not in found:
                kinds = {e["event"] for e in world.trace(mid)}
                if "delivered" in kinds or "deferred" in kinds:
                    found[mid] = "delivered" if "delivered" in kinds else "deferred"
        return len(found) == len(sent)

    wait_until(settled, 60, "every message of the load to be delivered or deferred")
    return found


def received(world: World) -> tuple[Counter[str], Counter[str]]:
    """(messages, those over TLS) per recipient domain of the load, as the sinks saw them."""
    total, tls = Counter[str](), Counter[str]()
    for sink in world.sinks.values():
        for msg in sink.messages:
            domain = domain_of(msg.rcpt_tos[0])
            if domain in LOAD:
                total[domain] += 1
                tls[domain] += msg.tls is not None
    return total, tls


def posture(world: World, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    """``tlsrelay posture --json`` over two days (a run may cross midnight UTC), by domain."""
    capsys.readouterr()
    assert cli.main(["posture", "--json", "--days", "2", "--config", str(world.config_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    return {row["domain"]: row for row in doc["domains"] if row["domain"] in LOAD}


def rerun_with(world: World, mode: str) -> Counter[str]:
    """Restart the policy worker with ``tls: MODE`` for every domain of the load, send the load
    again; the deferred messages per domain."""
    world.stop_service("policy")
    config = yaml.safe_load(world.config_path.read_text())
    config["rules"] = [{"name": f"what-if-{mode}", "when": {"recipient_domain": list(LOAD)},
                        "tls": mode}]  # fmt: skip
    world.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    world.start_service("policy")
    sent = send_load(world, f"rerun {mode}")
    outcome = fates(world, sent)
    return Counter(sent[mid] for mid, fate in outcome.items() if fate == "deferred")


def test_posture_equals_the_peers_and_the_what_if_equals_a_rerun(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    first = fates(world, send_load(world, "load"))
    assert set(first.values()) == {"delivered"}, first
    total, tls = received(world)
    assert total == Counter(LOAD), total
    rows = posture(world, capsys)
    assert {d: r["deliveries"] for d, r in rows.items()} == dict(total)
    assert {d: r["tls"] + r["tls_verified"] for d, r in rows.items()} == {d: tls[d] for d in LOAD}
    assert {d: r["clear"] for d, r in rows.items()} == {d: total[d] - tls[d] for d in LOAD}
    broken = rows["broken.test"]  # the first failure is remembered (unless both ran at once)
    assert broken["clear_handshake_failed"] >= 1
    assert broken["clear_handshake_failed"] + broken["clear_remembered_broken"] == 2
    assert rows["tls10.test"]["versions"] == {"TLSv1": 2}
    assert all(r["verified_unknown"] == 0 for r in rows.values()), rows  # all decidable here
    expected_enforced = {
        d: r["would_defer_enforced"] for d, r in rows.items() if r["would_defer_enforced"]
    }
    expected_verified = {
        d: r["would_defer_verified"] for d, r in rows.items() if r["would_defer_verified"]
    }
    assert expected_enforced == {"plain.test": 3, "broken.test": 2}
    assert expected_verified == {d: n for d, n in LOAD.items() if d != "good.test"}
    assert dict(rerun_with(world, "enforced")) == expected_enforced
    assert dict(rerun_with(world, "verified")) == expected_verified
