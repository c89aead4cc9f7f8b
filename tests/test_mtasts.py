"""MTA-STS (RFC 8461): the pure parts as tables, the policy cache against a real DNS server, a
real HTTPS server with a local CA and a real Redis (clock injected, so max_age and re-checks
are tested without waiting)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme

from services.common.config import HostPort
from services.common.model import Decision, TlsMode
from services.deliver import mtasts
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
from tests.dnsserver import LocalDns
from tests.httpsserver import PolicyServer

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
ROUTED = Decision("a.test", TlsMode.OPPORTUNISTIC, ("hop",), route="127.0.0.1:2525")

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
