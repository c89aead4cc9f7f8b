"""Two regions of the platform on loopback, each a full relay with its own Redis: contoso
(us-east) writes to fabrikam (ap-south). The message crosses the inter-region endpoint with
mutual TLS and reaches fabrikam's mailbox; both hops verify certificates against the platform CA.
A rule in us-east that says `tls: none` for fabrikam changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from services.common.redisserver import EmbeddedRedis, free_port
from tests.dnsserver import LocalDns
from tests.peers import Sink
from tests.world import SERVICES, World, message, wait_until

REGIONS = ("us-east", "ap-south")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, World]]:
    root = tmp_path_factory.mktemp("regions")
    ca = trustme.CA(organization_name="tlsrelay platform CA")
    ca.cert_pem.write_to_path(str(root / "platform-ca.pem"))
    relay_ports = {r: free_port() for r in REGIONS}
    mailboxes = {
        "us-east": Sink("starttls", ca=ca, cert_names=["contoso.example"]),
        "ap-south": Sink("starttls", ca=ca, cert_names=["fabrikam.example"]),
        "plain": Sink("plain"),  # a tenant mailbox without STARTTLS
    }
    with contextlib.ExitStack() as stack:
        for sink in mailboxes.values():
            stack.enter_context(sink)
        dns = stack.enter_context(LocalDns())
        worlds = {}
        for region in REGIONS:
            cert = ca.issue_cert(region)  # the region's server and client certificate
            cert.private_key_and_cert_chain_pem.write_to_path(str(root / f"{region}.pem"))
            settings = region_config(root, region, relay_ports, mailboxes)
            worlds[region] = stack.enter_context(start_region(root / region, settings, dns))
            worlds[region].sinks["mailbox"] = mailboxes[region]
        worlds["us-east"].sinks["plain"] = mailboxes["plain"]
        yield worlds


def region_config(
    root: Path, region: str, relay_ports: dict[str, int], mailboxes: dict[str, Sink]
) -> dict[str, Any]:
    return {
        "hostname": f"{region}.relay.test",
        "region": region,
        "regions": {r: {"relay": f"127.0.0.1:{port}"} for r, port in relay_ports.items()},
        "platform_tls": {
            "ca": str(root / "platform-ca.pem"),
            "cert": str(root / f"{region}.pem"),
            "key": str(root / f"{region}.pem"),
        },
        "tenants": {
            "contoso": {
                "region": "us-east",
                "domains": ["contoso.example"],
                "mailbox": mailboxes["us-east"].address_text,
            },
            "fabrikam": {
                "region": "ap-south",
                "domains": ["fabrikam.example"],
                "mailbox": mailboxes["ap-south"].address_text,
            },
            "plainco": {
                "region": "us-east",
                "domains": ["plainco.example"],
                "mailbox": mailboxes["plain"].address_text,
            },
        },
        "rules": [
            {
                "name": "no-tls-for-fabrikam",
                "when": {"recipient_domain": "fabrikam.example"},
                "tls": "none",
            },
        ],
        "delivery": {"retry_schedule": ["1s"], "connect_timeout": "5s", "concurrency": 1},
        "policy": {"concurrency": 1},
    }


@contextlib.contextmanager
def start_region(root: Path, settings: dict[str, Any], dns: LocalDns) -> Iterator[World]:
    root.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        redis = EmbeddedRedis(root / "redis")
        redis.start()
        stack.callback(redis.stop)
        ingest_port = free_port()
        settings = {
            **settings,
            "redis_url": redis.url,
            "data_dir": str(root / "var"),
            "ingest": {"listen": f"127.0.0.1:{ingest_port}"},
        }
        world = World(root, redis, dns, {}, ingest_port, root / "tlsrelay.yaml")
        world.config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        stack.callback(world.stop_all)
        for name in SERVICES:
            world.start_service(name)
        yield world


def test_contoso_to_fabrikam_crosses_regions_encrypted_both_hops(
    platform: dict[str, World],
) -> None:
    east, south = platform["us-east"], platform["ap-south"]
    data = message("across the world")
    first = east.send(["bob@fabrikam.example"], data, sender="alice@contoso.example")
    mailbox = south.sinks["mailbox"]
    (got,) = mailbox.wait_messages(1, timeout=30)
    assert got.tls is not None and mailbox.cleartext_transactions == 0
    assert got.data.endswith(data)
    assert got.data.count(b"Received: ") == 2, "one Received header per region"

    trace = east.wait_completed(first)
    (classified,) = [e for e in trace if e["event"] == "classified"]
    (decision,) = classified["decisions"]
    assert decision["tls"] == "verified"
    assert decision["circumstances"] == ["intra-platform", "no-tls-for-fabrikam"]
    (hop1,) = [e for e in trace if e["event"] == "attempt"]
    relay = yaml.safe_load(south.config_path.read_text())["regions"]["ap-south"]["relay"]
    assert (hop1["port"], hop1["tls_outcome"]) == (int(relay.rsplit(":", 1)[1]), "tls_verified")

    second_id = got.data.split(b" id ", 1)[1].split(b"\r\n", 1)[0].decode()
    trace = south.wait_completed(second_id)
    received = trace[0]
    assert received["listener"] == "relay"
    assert received["client_cert"] == "us-east", "the inter-region hop presented our certificate"
    (hop2,) = [e for e in trace if e["event"] == "attempt"]
    assert hop2["tls_outcome"] == "tls_verified"
    assert hop2["port"] == mailbox.port


def test_same_region_tenant_goes_to_its_mailbox_verified(platform: dict[str, World]) -> None:
    east = platform["us-east"]
    message_id = east.send(["carol@contoso.example"], message("next door"))
    (got,) = east.sinks["mailbox"].wait_messages(1, timeout=30)
    assert got.tls is not None
    trace = east.wait_completed(message_id)
    (attempt,) = [e for e in trace if e["event"] == "attempt"]
    assert attempt["tls_outcome"] == "tls_verified"


def test_tenant_mailbox_without_tls_waits_never_in_clear(platform: dict[str, World]) -> None:
    east = platform["us-east"]
    message_id = east.send(["dan@plainco.example"], message("no tls mailbox"))
    wait_until(lambda: east.events(message_id, "deferred"), 30, "the delivery to be deferred")
    (deferred,) = east.events(message_id, "deferred")[:1]
    assert deferred["recipients"]["dan@plainco.example"].startswith("451 4.7.10")
    plain = east.sinks["plain"]
    assert plain.cleartext_transactions == 0 and plain.messages == []
