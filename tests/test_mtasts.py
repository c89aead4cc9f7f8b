"""MTA-STS (RFC 8461): the pure parts as tables, the policy cache against a real DNS server, a
real HTTPS server with a local CA and a real Redis (clock injected, so max_age and re-checks
are tested without waiting)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email
import gzip
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from prometheus_client.parser import text_string_to_metric_families

from services.common.model import Decision, TlsMode
from services.common.redisserver import free_port
from services.common.values import HostPort
from services.deliver import mtasts, tlsrpt
from services.deliver.mtasts import (
    Policy,
    PolicyCache,
    PolicyError,
    apply_sts,
    mx_matches,
    parse_policy,
    parse_txt,
)
from services.deliver.mx import make_resolver
from tests.certs import default_ca
from tests.dnsserver import LocalDns
from tests.httpsserver import PolicyServer
from tests.peers import Sink
from tests.world import World, make_world, message, wait_until

ENFORCE_TEXT = (
    "version: STSv1\r\nmode: enforce\r\nmx: mx.a.test\r\nmx: *.b.test\r\nmax_age: 86400\r\n"
)

# --------------------------------------------------------------------------- §3.1 TXT

TXT_TABLE = [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1; id=abc"], "abc"),
    (["v=STSv1;id=abc;"], "abc"),
    (["v=STSv1; id=abc; ext=whatever"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=1"], "1"),  # other records are ignored
    (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # two policies: none (§3.1)
    (["v=STSv1; id="], None),
    (["v=STSv1; id=" + "a" * 33], None),  # 1*32 letters and digits
    (["v=STSv1; id=a-b"], None),
    (["v=STSv1"], None),  # no ";" after the version: not an STS record at all
    (["id=1; v=STSv1;"], None),  # v= must come first
    (["v=STSv2; id=1"], None),
    ([], None),
]


@pytest.mark.parametrize(("records", "expected"), TXT_TABLE)
def test_parse_txt(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


# --------------------------------------------------------------------------- §3.2 policy


def test_parse_policy_reads_every_field() -> None:
    policy = parse_policy(ENFORCE_TEXT, "id1", 100.0)
    assert policy == Policy("id1", "enforce", ("mx.a.test", "*.b.test"), 86400, ENFORCE_TEXT, 100.0)
    assert policy.expires_at == 86500.0
    assert policy.lines == ["version: STSv1", "mode: enforce", "mx: mx.a.test", "mx: *.b.test",
                            "max_age: 86400"]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.test\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: \u00b2\n", "max_age"),  # isdigit()
        ("version: STSv1\nmode: enforce\nmax_age: 60\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 60\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: **.test\nmax_age: 60\n", "mx"),
        ("<html>not a policy</html>", "key: value"),
    ],
)
def test_parse_policy_rejects(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


def test_parse_policy_none_mode_needs_no_mx_and_ignores_unknown_keys() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 0\nfuture: yes\n")
    assert (policy.mode, policy.mx, policy.max_age) == ("none", (), 0)


# --------------------------------------------------------------------------- §4.1 mx


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("mx.a.test", True),
        ("MX.A.Test.", True),
        ("x.b.test", True),  # *.b.test: one label
        ("b.test", False),  # not the bare suffix
        ("y.x.b.test", False),  # not two labels
        ("xb.test", False),
        ("mx2.a.test", False),
        ("other.test", False),
    ],
)
def test_mx_matches(host: str, matches: bool) -> None:
    assert mx_matches(host, ("mx.a.test", "*.b.test")) is matches


# --------------------------------------------------------------------------- testing mode


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def test_leaf_problem(ca: trustme.CA) -> None:
    now = time.time()
    good = der(ca.issue_cert("mx.a.test", "*.b.test"))
    assert mtasts.leaf_problem(good, "mx.a.test", now) is None
    assert mtasts.leaf_problem(good, "x.b.test", now) is None
    assert mtasts.leaf_problem(good, "y.x.b.test", now) == mtasts.HOSTNAME_MISMATCH
    assert mtasts.leaf_problem(good, "mx.c.test", now) == mtasts.HOSTNAME_MISMATCH
    old = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = der(ca.issue_cert("mx.a.test", not_before=old, not_after=old.replace(month=2)))
    assert mtasts.leaf_problem(expired, "mx.a.test", now) == mtasts.CERT_HAS_EXPIRED
    assert mtasts.leaf_problem(b"not DER", "mx.a.test", now) == mtasts.HOSTNAME_MISMATCH


# --------------------------------------------------------------------------- apply (pure)

POLICIES = {
    "enforce": Policy("e1", "enforce", ("mx.a.test",), 86400, ""),
    "testing": Policy("t1", "testing", ("mx.a.test",), 86400, ""),
    "none": Policy("n1", "none", (), 86400, ""),
    None: None,
}
DEFAULT = Decision("a.test")
RULED = Decision("a.test", TlsMode.ENFORCED, ("confidential",), reasons=("confidential: x",))
NONE_RULE = Decision("a.test", TlsMode.NONE, ("cleartext",))
ROUTED = Decision("a.test", TlsMode.OPPORTUNISTIC, ("hop",), route=HostPort("127.0.0.1", 2525))

# (decision, policy, TLS-Required: No) -> (tls, circumstances, mx_patterns)
APPLY_TABLE = [
    (DEFAULT, "enforce", False, (TlsMode.VERIFIED, ("mta-sts",), ("mx.a.test",))),
    (RULED, "enforce", False, (TlsMode.VERIFIED, ("confidential", "mta-sts"), ("mx.a.test",))),
    (NONE_RULE, "enforce", False, (TlsMode.VERIFIED, ("cleartext", "mta-sts"), ("mx.a.test",))),
    (DEFAULT, "testing", False, (TlsMode.OPPORTUNISTIC, ("default",), ())),
    (RULED, "testing", False, (TlsMode.ENFORCED, ("confidential",), ())),
    (DEFAULT, "none", False, (TlsMode.OPPORTUNISTIC, ("default",), ())),
    (DEFAULT, None, False, (TlsMode.OPPORTUNISTIC, ("default",), ())),
    (DEFAULT, "enforce", True, (TlsMode.OPPORTUNISTIC, ("default",), ())),  # relaxed, still TLS
    (NONE_RULE, "enforce", True, (TlsMode.OPPORTUNISTIC, ("cleartext",), ())),  # tries TLS
    (RULED, "enforce", True, (TlsMode.ENFORCED, ("confidential",), ())),  # rules stay
    (ROUTED, "enforce", False, (TlsMode.OPPORTUNISTIC, ("hop",), ())),  # a route is not an MX
    (ROUTED, "testing", True, (TlsMode.OPPORTUNISTIC, ("hop",), ())),
]


@pytest.mark.parametrize(("decision", "policy", "tls_required_no", "expected"), APPLY_TABLE)
def test_apply_sts(
    decision: Decision,
    policy: str | None,
    tls_required_no: bool,
    expected: tuple[TlsMode, tuple[str, ...], tuple[str, ...]],
) -> None:
    effective = apply_sts(decision, POLICIES[policy], tls_required_no)
    assert (effective.tls, effective.circumstances, effective.mx_patterns) == expected
    assert effective.route == decision.route and effective.domain == decision.domain
    if policy in ("enforce", "testing") and not decision.route:
        assert any(r.startswith("mta-sts: a.test publishes policy") for r in effective.reasons)
        assert tls_required_no == any("TLS-Required: No" in r for r in effective.reasons)
    else:
        assert effective == decision


# --------------------------------------------------------------------------- the cache, for real


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(organization_name="tlsrelay MTA-STS test CA")


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def dns_server() -> Iterator[LocalDns]:
    with LocalDns() as server:
        yield server


@pytest.fixture(scope="module")
def web(ca: trustme.CA) -> Iterator[PolicyServer]:
    with PolicyServer(ca) as server:
        yield server


@pytest.fixture
def dns(dns_server: LocalDns) -> Iterator[LocalDns]:
    dns_server.clear()
    yield dns_server
    dns_server.clear()


def publish(dns: LocalDns, web: PolicyServer, domain: str, sts_id: str, text: str) -> None:
    dns.set_txt(f"_mta-sts.{domain}", f"v=STSv1; id={sts_id};")
    dns.add(f"mta-sts.{domain}", "A", "127.0.0.1")
    web.publish(domain, text)


def cache(
    store: redis.Redis, dns: LocalDns, web: PolicyServer, ca_file: Path, timeout: float = 5.0
) -> PolicyCache:
    resolver = make_resolver([HostPort("127.0.0.1", dns.port)], timeout=2.0)
    return PolicyCache(store, resolver, str(ca_file), web.port, timeout)


def lookup(policies: PolicyCache, domain: str, now: float) -> mtasts.Lookup:
    return asyncio.run(policies.lookup(domain, now))


def policy_text(mode: str = "enforce", max_age: int = 86400, mx: str = "mx.a.test") -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: {max_age}\n"


def test_fetch_then_cache_until_recheck(
    store: redis.Redis, dns: LocalDns, web: PolicyServer, ca_file: Path
) -> None:
    publish(dns, web, "c1.test", "one", policy_text())
    policies = cache(store, dns, web, ca_file)
    first = lookup(policies, "c1.test", 1000.0)
    assert first.source == "fetched" and first.error is None
    assert first.policy is not None and first.policy.mx == ("mx.a.test",)
    assert (first.policy.id, first.policy.mode, first.policy.max_age) == ("one", "enforce", 86400)
    # Fresh: from Redis, without DNS or HTTPS (the DNS server does not even know the name now).
    dns.clear()
    again = lookup(policies, "c1.test", 1030.0)
    assert (again.source, again.policy) == ("cache", first.policy)
    assert web.requests("c1.test") == 1
    # A second worker (its own PolicyCache) shares the same Redis entry.
    assert lookup(cache(store, dns, web, ca_file), "c1.test", 1031.0).source == "cache"


class CountingRedis(redis.Redis):
    """A real client that counts the commands it sends (pipelines count once per execute)."""

    commands: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]))
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def test_a_cached_policy_costs_one_redis_get_and_no_dns(
    valkey: Any, dns: LocalDns, web: PolicyServer, ca_file: Path
) -> None:
    publish(dns, web, "perf.test", "one", policy_text())
    dns.add("nosts.test", "MX", "10 mx.nosts.test.")
    with CountingRedis.from_url(valkey.url) as client:
        client.commands = []
        policies = cache(client, dns, web, ca_file)
        lookup(policies, "perf.test", 1000.0)
        lookup(policies, "nosts.test", 1000.0)
        dns.clear()  # any DNS query would now fail: the answers must come from Redis
        client.commands.clear()
        assert lookup(policies, "perf.test", 1010.0).source == "cache"
        assert lookup(policies, "nosts.test", 1010.0) == mtasts.Lookup(None, "cache")
        assert client.commands == ["GET", "GET"]


def test_txt_id_change_triggers_refetch(
    store: redis.Redis, dns: LocalDns, web: PolicyServer, ca_file: Path
) -> None:
    publish(dns, web, "c2.test", "one", policy_text(mx="mx.a.test"))
    policies = cache(store, dns, web, ca_file)
    assert lookup(policies, "c2.test", 1000.0).source == "fetched"
    # Same id after the TXT TTL (60 s): re-checked in DNS, not refetched.
    assert lookup(policies, "c2.test", 1061.0).source == "cache"
    assert web.requests("c2.test") == 1
    publish(dns, web, "c2.test", "two", policy_text(mx="mx.new.test"))
    assert lookup(policies, "c2.test", 1100.0).policy.mx == ("mx.a.test",)  # type: ignore[union-attr]
    changed = lookup(policies, "c2.test", 1122.0)  # 61 s after the last check
    assert changed.source == "fetched" and web.requests("c2.test") == 2
    assert changed.policy is not None and (changed.policy.id, changed.policy.mx) == (
        "two",
        ("mx.new.test",),
    )


def test_max_age_expiry_refetches_even_with_the_same_id(
    store: redis.Redis, dns: LocalDns, web: PolicyServer, ca_file: Path
) -> None:
    publish(dns, web, "c3.test", "one", policy_text(max_age=30))
    policies = cache(store, dns, web, ca_file)
    assert lookup(policies, "c3.test", 1000.0).source == "fetched"
    assert lookup(policies, "c3.test", 1029.0).source == "cache"
    expired = lookup(policies, "c3.test", 1031.0)
    assert expired.source == "fetched" and web.requests("c3.test") == 2


def test_refresh_failure_keeps_the_cached_policy_until_it_expires(
    store: redis.Redis, dns: LocalDns, web: PolicyServer, ca_file: Path
) -> None:
    publish(dns, web, "c4.test", "one", policy_text(max_age=3600))
    policies = cache(store, dns, web, ca_file)
    original = lookup(policies, "c4.test", 1000.0).policy
    publish(dns, web, "c4.test", "two", "oops")  # a new id, and the server now fails
    web.publish("c4.test", "internal error", status=500)
    kept = lookup(policies, "c4.test", 1100.0)
    assert (kept.source, kept.policy, kept.error_type) == (
        "kept",
        original,
        "sts-policy-fetch-error",
    )
    assert "500" in (kept.error or "")
    # The failure is remembered: no new fetch before FAILURE_RETRY, still the cached policy.
    assert lookup(policies, "c4.test", 1200.0) == mtasts.Lookup(original, "cache")
    assert web.requests("c4.test") == 2
    # DNS failing too: still the cached policy (never clear text for an enforced domain).
    dns.servfail("_mta-sts.c4.test")
    assert lookup(policies, "c4.test", 1500.0).policy == original
    # Once max_age has run out, a failed refresh leaves no policy (§5.1).
    gone = lookup(policies, "c4.test", 4700.0)
    assert (gone.policy, gone.source, gone.error_type) == (None, "dns", "sts-policy-fetch-error")


def test_no_policy_is_cached_too(
    store: redis.Redis, dns: LocalDns, web: PolicyServer, ca_file: Path
) -> None:
    dns.add("plain-domain.test", "MX", "10 mx.plain-domain.test.")
    policies = cache(store, dns, web, ca_file)
    assert lookup(policies, "plain-domain.test", 1000.0) == mtasts.Lookup(None, "dns")
    # Published later: not seen before NEGATIVE_TTL (no DNS lookup per delivery) ...
    publish(dns, web, "plain-domain.test", "one", policy_text())
    assert lookup(policies, "plain-domain.test", 1000.0 + 3599) == mtasts.Lookup(None, "cache")
    # ... and seen after it.
    assert lookup(policies, "plain-domain.test", 1000.0 + 3601).source == "fetched"


@pytest.mark.parametrize(
    ("options", "result_type", "text"),
    [
        ({"status": 301, "location": "https://elsewhere.test/"}, "sts-policy-fetch-error", "301"),
        ({"status": 404}, "sts-policy-fetch-error", "404"),
        ({"content_type": "text/html"}, "sts-policy-invalid", "text/html"),
        ({"bad_cert": True}, "sts-webpki-invalid", "certificate"),
    ],
)
def test_fetch_failures_are_reported(
    store: redis.Redis,
    dns: LocalDns,
    web: PolicyServer,
    ca_file: Path,
    options: dict[str, object],
    result_type: str,
    text: str,
) -> None:
    publish(dns, web, "bad.test", "one", policy_text())
    web.publish("bad.test", policy_text(), **options)
    found = lookup(cache(store, dns, web, ca_file), "bad.test", 1000.0)
    assert (found.policy, found.error_type) == (None, result_type)
    assert text in (found.error or "")


def test_invalid_policy_and_oversized_body(
    store: redis.Redis, dns: LocalDns, web: PolicyServer, ca_file: Path
) -> None:
    publish(dns, web, "inv.test", "one", "version: STSv1\nmode: sometimes\nmax_age: 1\n")
    found = lookup(cache(store, dns, web, ca_file), "inv.test", 1000.0)
    assert (found.policy, found.error_type) == (None, "sts-policy-invalid")
    big = policy_text() + "x: " + "y" * mtasts.MAX_BODY + "\n"
    for chunked in (False, True):
        store.flushall()
        publish(dns, web, "big.test", "one", big)
        web.publish("big.test", big, chunked=chunked)
        found = lookup(cache(store, dns, web, ca_file), "big.test", 1000.0)
        assert found.error_type == "sts-policy-invalid" and "larger than" in (found.error or "")


def test_chunked_policy_is_read(
    store: redis.Redis, dns: LocalDns, web: PolicyServer, ca_file: Path
) -> None:
    publish(dns, web, "chunk.test", "one", policy_text())
    web.publish("chunk.test", policy_text(mx="*.chunk.test"), chunked=True)
    found = lookup(cache(store, dns, web, ca_file), "chunk.test", 1000.0)
    assert found.policy is not None and found.policy.mx == ("*.chunk.test",)


def test_lookup_time_limit(store: redis.Redis, dns: LocalDns, ca_file: Path) -> None:
    """A policy host that accepts the connection and never answers costs the time limit only."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        dns.set_txt("_mta-sts.slow.test", "v=STSv1; id=1;")
        dns.add("mta-sts.slow.test", "A", "127.0.0.1")
        resolver = make_resolver([HostPort("127.0.0.1", dns.port)], timeout=2.0)
        policies = PolicyCache(store, resolver, str(ca_file), silent.getsockname()[1], 0.5)
        found = lookup(policies, "slow.test", 1000.0)
    finally:
        silent.close()
    assert (found.policy, found.error_type) == (None, "sts-policy-fetch-error")
    assert "longer than 0.5s" in (found.error or "")


# --------------------------------------------------------------------------- end to end
# Real services, a real DNS server publishing MX and _mta-sts records, a real HTTPS server with
# the test CA publishing the policies, real SMTP sinks as MX hosts (one port, several addresses).

MX_PORT = free_port("127.0.0.20")
E2E_SINKS = {  # name: (kind, address, certificate name)
    "good": ("starttls", "127.0.0.21", "mx.good.test"),
    "plainenf": ("plain", "127.0.0.22", ""),
    "outside": ("plain", "127.0.0.23", ""),
    "inside": ("starttls", "127.0.0.24", "mx2.skip.test"),
    "testing": ("plain", "127.0.0.25", ""),
    "relax": ("plain", "127.0.0.26", ""),
    "wrongname": ("starttls", "127.0.0.27", "mx.elsewhere.test"),
    "testing-wrongname": ("starttls", "127.0.0.28", "mx.elsewhere.test"),
    "keep": ("plain", "127.0.0.29", ""),
    "unfetched": ("plain", "127.0.0.30", ""),
}
# domain: (policy mode, mx patterns, [(preference, MX host, sink)])
E2E_DOMAINS = {
    "good.test": ("enforce", "mx.good.test", [(10, "mx.good.test", "good")]),
    "plainenf.test": ("enforce", "mx.plainenf.test", [(10, "mx.plainenf.test", "plainenf")]),
    "skip.test": (
        "enforce",
        "*.inside.test\nmx: mx2.skip.test",
        [(10, "mx1.skip.test", "outside"), (20, "mx2.skip.test", "inside")],
    ),
    "testing.test": ("testing", "mx.testing.test", [(10, "mx.testing.test", "testing")]),
    "relax.test": ("enforce", "mx.relax.test", [(10, "mx.relax.test", "relax")]),
    "wrongcert.test": ("enforce", "mx.wrongcert.test", [(10, "mx.wrongcert.test", "wrongname")]),
    "testcert.test": (
        "testing",
        "mx.testcert.test",
        [(10, "mx.testcert.test", "testing-wrongname")],
    ),
    "keep.test": ("enforce", "mx.keep.test", [(10, "mx.keep.test", "keep")]),
    "unfetched.test": ("enforce", "mx.unfetched.test", [(10, "mx.unfetched.test", "unfetched")]),
}
MTA_STS_ON = True  # set False to see these tests fail: they depend on MTA-STS being applied


def sink(kind: str, host: str, cert: str) -> Sink:
    if kind == "plain":
        return Sink("plain", host=host, port=MX_PORT)
    return Sink("starttls", host=host, port=MX_PORT, cert_names=[cert])


@pytest.fixture(scope="module")
def policy_web() -> Iterator[PolicyServer]:
    with PolicyServer(default_ca()) as web:
        yield web


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, policy_web: PolicyServer) -> Iterator[World]:
    sinks = {name: sink(*spec) for name, spec in E2E_SINKS.items()}
    web = policy_web
    with contextlib.ExitStack() as stack:

        def settings(world: World) -> dict[str, Any]:
            ca = world.root / "ca.pem"
            default_ca().cert_pem.write_to_path(str(ca))
            return {
                "delivery": {
                    "ca_file": str(ca),
                    "mta_sts": MTA_STS_ON,
                    "mta_sts_ca_file": str(ca),
                    "mta_sts_port": web.port,
                    "mx_port": MX_PORT,
                    "retry_schedule": ["1h"],  # deferred mail stays deferred while we look
                }
            }

        w = stack.enter_context(make_world(tmp_path_factory.mktemp("sts"), sinks, settings))
        for domain, (mode, mx, hosts) in E2E_DOMAINS.items():
            for preference, host, name in hosts:
                w.dns.add(domain, "MX", f"{preference} {host}.")
                w.dns.add(host, "A", E2E_SINKS[name][1])
            w.dns.add(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={mode}1;")
            w.dns.add(f"mta-sts.{domain}", "A", "127.0.0.1")
            web.publish(domain, policy_text(mode, 86400, mx))
        w.dns.add("_smtp._tls.plainenf.test", "TXT", "v=TLSRPTv1; rua=mailto:tlsrpt@plainenf.test")
        yield w


def only(trace: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in trace if e["event"] == kind]
    assert len(found) == 1, (kind, trace)
    return found[0]


def attempts(trace: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["host"], e["tls_mode"], e["tls_outcome"]) for e in trace if e["event"] == "attempt"]


def tlsrpt_counts(world: World, domain: str) -> dict[str, int]:
    with contextlib.closing(world.client()) as client:
        raw = client.hgetall(tlsrpt.day_key(tlsrpt.utc_day(time.time())))
    counts: dict[str, int] = {}
    for name, value in raw.items():
        kind, field_domain, _pkey, *detail = json.loads(name)
        if field_domain == domain and kind != "policy":
            label = kind if kind == "ok" else detail[0]
            counts[label] = counts.get(label, 0) + int(value)
    return counts


def sts_metric(world: World, mode: str, result: str) -> float:
    with urllib.request.urlopen(world.metrics_url("deliver"), timeout=5) as response:
        text = response.read().decode()
    wanted = {"mode": mode, "result": result}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tlsrelay_mta_sts_total" and sample.labels == wanted:
                return float(sample.value)
    return 0.0


def test_enforce_with_valid_tls_is_delivered_verified(world: World) -> None:
    message_id = world.send(["user@good.test"], message("sts good"))
    (got,) = world.sinks["good"].wait_messages(1)
    assert got.tls is not None and b"sts good" in got.data
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.good.test", "verified", "tls_verified")]
    sts = only(trace, "mta-sts")
    assert (sts["mode"], sts["policy_id"], sts["mx"], sts["relaxed"]) == (
        "enforce",
        "enforce1",
        ["mx.good.test"],
        None,
    )
    wait_until(lambda: tlsrpt_counts(world, "good.test") == {"ok": 1}, what="one TLS success")
    wait_until(lambda: sts_metric(world, "enforce", "ok") >= 1, what="the ok metric")


def test_enforce_without_starttls_defers_and_sends_nothing_in_clear(world: World) -> None:
    sink = world.sinks["plainenf"]
    message_id = world.send(["user@plainenf.test"], message("sts plain"))
    trace = world.wait_settled(message_id)
    reply = only(trace, "deferred")["recipients"]["user@plainenf.test"]
    assert reply.startswith("451 4.7.10 TLS required but not available"), reply
    assert attempts(trace) == [("mx.plainenf.test", "verified", "not_offered")]
    assert sink.messages == [] and sink.cleartext_transactions == 0 and sink.mail_commands == []
    wait_until(
        lambda: tlsrpt_counts(world, "plainenf.test") == {"starttls-not-supported": 1},
        what="the failure counted for TLSRPT",
    )
    wait_until(lambda: sts_metric(world, "enforce", "failed") >= 1, what="the failed metric")


def test_enforce_with_a_certificate_for_another_name_defers(world: World) -> None:
    sink = world.sinks["wrongname"]
    message_id = world.send(["user@wrongcert.test"], message("sts wrong name"))
    trace = world.wait_settled(message_id)
    reply = only(trace, "deferred")["recipients"]["user@wrongcert.test"]
    assert reply.startswith("451 4.7.10"), reply
    assert attempts(trace) == [("mx.wrongcert.test", "verified", "verify_failed")]
    assert sink.messages == [] and sink.mail_commands == []
    wait_until(
        lambda: tlsrpt_counts(world, "wrongcert.test") == {"certificate-host-mismatch": 1},
        what="the certificate failure counted for TLSRPT",
    )


def test_mx_outside_the_policy_is_skipped(world: World) -> None:
    message_id = world.send(["user@skip.test"], message("sts skip"))
    (got,) = world.sinks["inside"].wait_messages(1)
    assert got.tls is not None
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx2.skip.test", "verified", "tls_verified")]
    assert only(trace, "mta-sts")["skipped"] == ["mx1.skip.test"]
    assert world.sinks["outside"].connections == 0, "the MX outside the patterns was contacted"


def test_testing_mode_delivers_and_counts_the_failure(world: World) -> None:
    message_id = world.send(["user@testing.test"], message("sts testing"))
    (got,) = world.sinks["testing"].wait_messages(1)
    assert got.tls is None  # delivered as before: opportunistic, in clear
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.testing.test", "opportunistic", "not_offered")]
    assert only(trace, "mta-sts")["mode"] == "testing"
    wait_until(
        lambda: tlsrpt_counts(world, "testing.test") == {"starttls-not-supported": 1},
        what="the would-be failure counted for TLSRPT",
    )
    wait_until(lambda: sts_metric(world, "testing", "failed") >= 1, what="the testing metric")


def test_testing_mode_counts_a_certificate_that_would_not_verify(world: World) -> None:
    message_id = world.send(["user@testcert.test"], message("sts testing cert"))
    (got,) = world.sinks["testing-wrongname"].wait_messages(1)
    assert got.tls is not None  # delivered as before: TLS, certificate not checked
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.testcert.test", "opportunistic", "tls")]
    wait_until(
        lambda: tlsrpt_counts(world, "testcert.test") == {"certificate-host-mismatch": 1},
        what="the would-be certificate failure counted for TLSRPT",
    )


def test_tls_required_no_relaxes_the_policy_for_that_message(world: World) -> None:
    body = message("sts relaxed").replace(b"Subject:", b"TLS-Required: No\r\nSubject:", 1)
    message_id = world.send(["user@relax.test"], body)
    (got,) = world.sinks["relax"].wait_messages(1)
    assert got.tls is None and b"sts relaxed" in got.data
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.relax.test", "opportunistic", "not_offered")]
    assert "TLS-Required: No" in only(trace, "mta-sts")["relaxed"]
    wait_until(lambda: sts_metric(world, "enforce", "relaxed") >= 1, what="the relaxed metric")


def test_tls_required_no_is_ignored_for_a_message_sent_with_requiretls(world: World) -> None:
    """RFC 8689 §5: with REQUIRETLS in MAIL FROM the header does not relax MTA-STS."""
    body = message("sts kept").replace(b"Subject:", b"TLS-Required: No\r\nSubject:", 1)
    with world.smtp() as client:
        client.starttls()
        client.ehlo("client.test")
        client.mail("sender@origin.test", ["REQUIRETLS"])
        client.rcpt("user@relax.test")
        code, text = client.data(body)
    assert code == 250, text
    message_id = text.decode().rsplit(" ", 1)[1]
    trace = world.wait_settled(message_id)
    assert not only(trace, "mta-sts")["relaxed"], only(trace, "mta-sts")
    assert not [m for m in world.sinks["relax"].messages if b"sts kept" in m.data]


def test_a_failed_refresh_keeps_the_cached_enforce_policy(
    world: World, policy_web: PolicyServer
) -> None:
    sink = world.sinks["keep"]
    first = world.send(["a@keep.test"], message("sts keep 1"))
    assert only(world.wait_settled(first), "mta-sts")["policy_id"] == "enforce1"
    # The TXT id changes, the policy server fails, and the cached entry is due for a re-check.
    world.dns.set_txt("_mta-sts.keep.test", "v=STSv1; id=enforce2;")
    policy_web.publish("keep.test", "unavailable", status=503)
    with contextlib.closing(world.client()) as client:
        entry = json.loads(client.get(mtasts.KEY_PREFIX + "keep.test"))
        entry["check_after"] = 0
        client.set(mtasts.KEY_PREFIX + "keep.test", json.dumps(entry))
    second = world.send(["b@keep.test"], message("sts keep 2"))
    trace = world.wait_settled(second)
    sts = only(trace, "mta-sts")
    assert sts["policy_id"] == "enforce1" and "503" in sts["error"], sts
    assert only(trace, "deferred")["recipients"]["b@keep.test"].startswith("451 4.7.10")
    assert policy_web.requests("keep.test") == 2
    assert sink.messages == [] and sink.cleartext_transactions == 0
    wait_until(lambda: sts_metric(world, "enforce", "fetch_error") >= 1, what="fetch_error")
    wait_until(
        lambda: (
            tlsrpt_counts(world, "keep.test")
            == {"starttls-not-supported": 2, "sts-policy-fetch-error": 1}
        ),
        what="the fetch error counted for TLSRPT",
    )


def test_no_policy_to_be_had_and_none_cached_delivers_as_before(
    world: World, policy_web: PolicyServer
) -> None:
    """RFC 8461 §5.1: a TXT record but no policy, nothing cached → as if there were no policy."""
    policy_web.publish("unfetched.test", "gone", status=404)
    message_id = world.send(["a@unfetched.test"], message("sts unfetched"))
    (got,) = world.sinks["unfetched"].wait_messages(1)
    assert got.tls is None
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.unfetched.test", "opportunistic", "not_offered")]
    sts = only(trace, "mta-sts")
    assert sts["mode"] is None and "404" in sts["error"]
    wait_until(lambda: sts_metric(world, "unknown", "fetch_error") >= 1, what="fetch_error")


def test_tlsrpt_report_is_mailed_past_the_failure_it_reports(world: World, tmp_path: Path) -> None:
    sink = world.sinks["plainenf"]
    held = world.send(["other@plainenf.test"], message("sts held for the report"))
    world.wait_settled(held)  # deferred: the enforced domain's MX offers no STARTTLS
    wait_until(lambda: tlsrpt_counts(world, "plainenf.test"), what="something to report")
    day = tlsrpt.utc_day(time.time())
    command = [sys.executable, "-m", "services.cli", "tlsrpt", "build", "--date", day,
               "--out", str(tmp_path), "--config", str(world.config_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "mailed to tlsrpt@plainenf.test" in done.stdout, done.stdout
    name = tlsrpt.file_name("relay.test", "plainenf.test", day)
    assert (tmp_path / name).exists()
    (got,) = sink.wait_messages(1, timeout=30)  # the enforced domain's plain MX, in clear
    assert got.tls is None and got.rcpt_tos == ["tlsrpt@plainenf.test"]
    parsed = email.message_from_bytes(got.data)
    assert parsed["TLS-Required"] == "No" and parsed.get_content_type() == "multipart/report"
    (attachment,) = [p for p in parsed.walk() if p.get_content_type() == tlsrpt.MEDIA_TYPE]
    assert attachment.get_filename() == name
    payload = attachment.get_payload(decode=True)
    assert isinstance(payload, bytes)
    (policy,) = json.loads(gzip.decompress(payload))["policies"]
    assert policy["policy"]["policy-domain"] == "plainenf.test"
    assert [f["result-type"] for f in policy["failure-details"]] == ["starttls-not-supported"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert "already mailed" in again.stdout, again.stdout
