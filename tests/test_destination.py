"""The destination TLS policy interface (services/deliver/destination.py), MTA-STS behind it:
given the decision and the hosts, which hosts may be used and what each must give."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from services.common.model import Decision, TlsMode
from services.common.values import HostPort
from services.deliver import destination, mtasts
from services.deliver.destination import Auth
from services.deliver.mx import Destination, make_resolver, want_dnssec
from tests.dnsserver import LocalDns

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


# --------------------------------------------------------------------------- DANE over MTA-STS
# A real DNS server publishes the TLSA records (with the AD bit: "secure"); the hosts' own
# DNSSEC status is what services/deliver/mx.py found (mx_secure, address_secure).


@pytest.fixture(scope="module")
def tlsa_dns() -> Iterator[LocalDns]:
    with LocalDns() as server:
        for name, record in (("usable", "3 1 1 " + "ab" * 32), ("unusable", "1 1 1 " + "ab" * 32)):
            server.add(f"_25._tcp.{name}.a.test", "TLSA", record)
            server.secure(f"_25._tcp.{name}.a.test")
        server.add("_25._tcp.unsigned.a.test", "TLSA", "3 1 1 " + "ab" * 32)
        server.servfail("_25._tcp.fail.a.test")
        yield server


def mx_host(name: str, secure: bool = True, address_secure: bool = True) -> Destination:
    host = f"{name}.a.test"
    return Destination(host, 25, ("192.0.2.9",), 10, "mx", host, secure, address_secure)


def dane_path(
    server: LocalDns,
    hosts: list[Destination],
    policy: str | None = None,
    tls: TlsMode = TlsMode.OPPORTUNISTIC,
    relaxed: bool = False,
    active: bool = True,
) -> destination.DestinationPath:
    resolver = make_resolver([HostPort("127.0.0.1", server.port)], 3.0)
    want_dnssec(resolver)
    sts = destination.MtaSts(Cache(POLICIES[policy]))  # type: ignore[arg-type]
    dane = destination.Dane(sts, resolver, active)
    return asyncio.run(dane.path(Decision("a.test", tls), hosts, relaxed))


def modes(found: destination.DestinationPath) -> list[tuple[str, TlsMode, Auth]]:
    return [(h.destination.host.split(".")[0], h.tls, h.auth) for h in found.hosts]


D, VE, EN, OP = TlsMode.DANE, TlsMode.VERIFIED, TlsMode.ENFORCED, TlsMode.OPPORTUNISTIC
# hosts (name, MX secure, address secure), STS policy, rule mode -> hosts with mode and auth
DANE_TABLE = [
    ([("usable", True, True)], None, OP, [("usable", D, Auth.TLSA)]),
    ([("usable", True, True)], None, VE, [("usable", D, Auth.TLSA)]),  # verified met by DANE
    ([("usable", True, True)], None, EN, [("usable", D, Auth.TLSA)]),  # enforced raised
    ([("unusable", True, True)], None, OP, [("unusable", EN, Auth.NONE)]),
    ([("unusable", True, True)], None, VE, [("unusable", VE, Auth.PKIX)]),
    ([("unsigned", True, True)], None, OP, [("unsigned", OP, Auth.NONE)]),
    ([("none", True, True)], None, OP, [("none", OP, Auth.NONE)]),
    ([("usable", False, True)], None, OP, [("usable", OP, Auth.NONE)]),  # MX not validated
    ([("usable", True, False)], None, OP, [("usable", OP, Auth.NONE)]),  # address not validated
    # a rule's none is raised too (as MTA-STS enforce raises it): never clear where DANE applies
    ([("usable", True, True)], None, TlsMode.NONE, [("usable", D, Auth.TLSA)]),
    ([("unusable", True, True)], None, TlsMode.NONE, [("unusable", EN, Auth.NONE)]),
    # RFC 8461 §2: DANE over MTA-STS — a host outside the enforced policy but with usable
    # TLSA is used with DANE; the policy's own host stays verified.
    (
        [("mx", True, True), ("usable", True, True)],
        "enforce",
        OP,
        [("mx", VE, Auth.PKIX), ("usable", D, Auth.TLSA)],
    ),
    # a failed TLSA lookup leaves that host out (never downgraded)
    ([("fail", True, True), ("none", True, True)], None, OP, [("none", OP, Auth.NONE)]),
]


@pytest.mark.parametrize(("hosts", "policy", "tls", "expected"), DANE_TABLE)
def test_dane_over_mta_sts(
    tlsa_dns: LocalDns,
    hosts: list[tuple[str, bool, bool]],
    policy: str | None,
    tls: TlsMode,
    expected: list[tuple[str, TlsMode, Auth]],
) -> None:
    targets = [mx_host(*spec) for spec in hosts]
    if policy == "enforce":  # the policy names mx.a.test: the first host is it
        targets[0] = Destination("mx.a.test", 25, ("192.0.2.1",), 10, "mx", "mx.a.test", True, True)
    found = dane_path(tlsa_dns, targets, policy, tls)
    assert modes(found) == expected
    assert found.report is not None and found.report.dane is not None
    assert found.report.skipped == []  # a host DANE took over is not "outside the policy"
    if any(mode is D for _, mode, _ in expected):
        assert found.decision.circumstances[-1] == "dane"
        assert found.decision.tls >= EN and found.hosts[-1].tlsa[0].startswith("3 1 1 ")


def test_dane_is_not_applied_when_off_or_relaxed(tlsa_dns: LocalDns) -> None:
    hosts = [mx_host("usable")]
    off = dane_path(tlsa_dns, hosts, active=False)
    assert modes(off) == [("usable", OP, Auth.NONE)]
    assert off.report is not None and off.report.dane is None
    relaxed = dane_path(tlsa_dns, hosts, relaxed=True)
    assert modes(relaxed) == [("usable", OP, Auth.NONE)]
    assert relaxed.report is not None and relaxed.report.dane is not None
    assert "TLS-Required: No" in relaxed.report.dane.why


def test_every_tlsa_lookup_failing_defers_4_4_3(tlsa_dns: LocalDns) -> None:
    found = dane_path(tlsa_dns, [mx_host("fail")])
    assert found.hosts == () and found.refused is not None
    assert (found.refused.code, found.refused.status) == (451, "4.4.3")
    assert "TLSA lookup failed for fail.a.test" in found.refused.text


def test_requiretls_keeps_only_validated_mx_hosts_or_mta_sts_matches() -> None:
    secure = Destination("s.a.test", 25, ("192.0.2.3",), 10, "mx", "s.a.test", True, True)
    kept = destination.requiretls(path(None), "a.test")  # GOOD, ROGUE: not validated
    assert kept.hosts == () and kept.refused is not None
    assert (kept.refused.code, kept.refused.status) == (550, "5.7.30")
    assert kept.report is not None and kept.report.requiretls_skipped == [
        "mx.a.test",
        "rogue.example",
    ]
    sts = destination.MtaSts(Cache(POLICIES["testing"]))  # type: ignore[arg-type]
    mixed = asyncio.run(sts.path(Decision("a.test"), [ROGUE, GOOD, secure], False))
    allowed = destination.requiretls(mixed, "a.test")
    assert [h.destination.host for h in allowed.hosts] == ["mx.a.test", "s.a.test"]
