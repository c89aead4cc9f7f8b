"""The destination TLS policy interface (services/deliver/destination.py), MTA-STS behind it:
given the decision and the hosts, which hosts may be used and what each must give."""

from __future__ import annotations

import asyncio

import pytest

from services.common.model import Decision, TlsMode
from services.deliver import destination, mtasts
from services.deliver.destination import Auth
from services.deliver.mx import Destination

GOOD = Destination("mx.a.test", 25, ("192.0.2.1",), tls_name="mx.a.test")
ROGUE = Destination("rogue.example", 25, ("192.0.2.2",), tls_name="rogue.example")
POLICIES = {
    "enforce": mtasts.Policy("e1", "enforce", ("mx.a.test",), 86400, ""),
    "testing": mtasts.Policy("t1", "testing", ("mx.a.test",), 86400, ""),
    "none": mtasts.Policy("n1", "none", (), 86400, ""),
    None: None,
}


class Cache:
    """Stands in for the Redis policy cache: one answer, and how often it was asked."""

    def __init__(self, policy: mtasts.Policy | None) -> None:
        self.policy, self.asked = policy, 0

    async def lookup(self, domain: str) -> mtasts.Lookup:
        self.asked += 1
        return mtasts.Lookup(self.policy, "cache")


def path(
    policy: str | None, tls: TlsMode = TlsMode.OPPORTUNISTIC, relaxed: bool = False
) -> destination.DestinationPath:
    sts = destination.MtaSts(Cache(POLICIES[policy]))  # type: ignore[arg-type]
    return asyncio.run(sts.path(Decision("a.test", tls), [GOOD, ROGUE], relaxed))


# policy, TLS-Required: No -> (hosts allowed, their mode, their authentication, report mode)
TABLE = [
    ("enforce", False, ["mx.a.test"], TlsMode.VERIFIED, Auth.PKIX, "enforce"),
    ("enforce", True, ["mx.a.test", "rogue.example"], TlsMode.OPPORTUNISTIC, Auth.NONE, "enforce"),
    ("testing", False, ["mx.a.test", "rogue.example"], TlsMode.OPPORTUNISTIC, Auth.NONE, "testing"),
    ("none", False, ["mx.a.test", "rogue.example"], TlsMode.OPPORTUNISTIC, Auth.NONE, "none"),
    (None, False, ["mx.a.test", "rogue.example"], TlsMode.OPPORTUNISTIC, Auth.NONE, None),
]


@pytest.mark.parametrize(("policy", "relaxed", "hosts", "tls", "auth", "mode"), TABLE)
def test_mta_sts_as_a_destination_policy(
    policy: str | None, relaxed: bool, hosts: list[str], tls: TlsMode, auth: Auth, mode: str | None
) -> None:
    found = path(policy, relaxed=relaxed)
    assert [h.destination.host for h in found.hosts] == hosts
    assert {(h.tls, h.auth) for h in found.hosts} == {(tls, auth)}
    assert [h.name for h in found.hosts] == hosts  # the MX host name is what is checked
    assert found.report is not None and found.report.mode == mode
    assert found.report.relaxed is (relaxed and policy == "enforce")
    assert found.check_leaf is (policy == "testing") and not found.refusal


def test_enforce_reports_the_hosts_it_skipped_and_refuses_when_none_is_left() -> None:
    found = path("enforce")
    assert found.report is not None and found.report.skipped == ["rogue.example"]
    assert found.decision.circumstances == ("mta-sts",)
    sts = destination.MtaSts(Cache(POLICIES["enforce"]))  # type: ignore[arg-type]
    none_left = asyncio.run(sts.path(Decision("a.test"), [ROGUE], False))
    assert none_left.hosts == () and "RFC 8461" in none_left.refusal


def test_a_policy_is_looked_up_once_per_domain_and_batch() -> None:
    cache = Cache(POLICIES["enforce"])
    sts = destination.MtaSts(cache)  # type: ignore[arg-type]
    for _ in range(3):
        asyncio.run(sts.path(Decision("a.test"), [GOOD], False))
    assert cache.asked == 1


def test_without_a_policy_every_host_is_used_as_decided() -> None:
    found = destination.plain(Decision("a.test", TlsMode.VERIFIED), [GOOD, ROGUE])
    assert [(h.tls, h.auth) for h in found.hosts] == [(TlsMode.VERIFIED, Auth.PKIX)] * 2
    assert found.report is None and not found.check_leaf
