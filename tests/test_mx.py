"""services.deliver.mx against a real DNS server on loopback (tests.dnsserver.LocalDns)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from services.common.deliveryconfig import DeliveryConfig
from services.common.values import HostPort, Route
from services.deliver.mx import (
    Destination,
    DnsPermanentError,
    DnsTemporaryError,
    make_resolver,
    resolve,
    route_for,
)
from tests.dnsserver import LocalDns


@pytest.fixture(scope="module")
def server() -> Iterator[LocalDns]:
    with LocalDns() as dns_server:
        yield dns_server


@pytest.fixture
def local_dns(server: LocalDns) -> Iterator[LocalDns]:
    server.clear()
    yield server
    server.clear()


def _config(local_dns: LocalDns, **kwargs: object) -> DeliveryConfig:
    return DeliveryConfig.model_validate(
        {"dns_servers": [f"127.0.0.1:{local_dns.port}"], "mx_port": 2525, **kwargs}
    )


def _resolve(
    local_dns: LocalDns,
    domain: str,
    route: Route | None = None,
    rng: random.Random | None = None,
    **kwargs: object,
) -> list[Destination]:
    config = _config(local_dns, **kwargs)
    resolver = make_resolver(config.dns_servers, timeout=2.0)
    return asyncio.run(resolve(domain, config, resolver, route=route, rng=rng))


def _hosts(destinations: list[Destination]) -> list[str]:
    return [d.host for d in destinations]


# ----------------------------------------------------------------------------- the server


def test_local_dns_answers_over_udp_and_tcp(local_dns: LocalDns) -> None:
    local_dns.add("x.test", "A", "127.0.0.9")
    query = dns.message.make_query("x.test.", "A")

    async def both() -> tuple[dns.message.Message, dns.message.Message]:
        udp = await dns.asyncquery.udp(query, "127.0.0.1", timeout=2, port=local_dns.port)
        tcp = await dns.asyncquery.tcp(query, "127.0.0.1", timeout=2, port=local_dns.port)
        return udp, tcp

    for reply in asyncio.run(both()):
        assert reply.rcode() == dns.rcode.NOERROR
        assert [r.to_text() for r in reply.answer[0]] == ["127.0.0.9"]


# ----------------------------------------------------------------------------- route_for


def test_route_exact_match_beats_wildcard() -> None:
    routes = {
        "*.example.net": Route(HostPort("wild", 25)),
        "a.example.net": Route(HostPort("exact", 26)),
    }
    assert route_for("A.Example.NET.", routes) == Route(HostPort("exact", 26))
    assert route_for("b.example.net", routes) == Route(HostPort("wild", 25))
    assert route_for("x.y.example.net", routes) == Route(HostPort("wild", 25))


def test_wildcard_does_not_match_bare_suffix() -> None:
    routes = {"*.example.net": Route(HostPort("wild", 25))}
    assert route_for("example.net", routes) is None
    assert route_for("badexample.net", routes) is None


def test_longest_wildcard_wins() -> None:
    routes = {"*.net": Route(HostPort("short", 25)), "*.example.net": Route(HostPort("long", 25))}
    assert route_for("a.example.net", routes) == Route(HostPort("long", 25))
    assert route_for("a.other.net", routes) == Route(HostPort("short", 25))


# ----------------------------------------------------------------------------- MX


def test_mx_sorted_by_preference(local_dns: LocalDns) -> None:
    local_dns.add("example.test", "MX", "20 mx2.example.test.")
    local_dns.add("example.test", "MX", "10 mx1.example.test.")
    local_dns.add("mx1.example.test", "A", "127.0.0.2")
    local_dns.add("mx1.example.test", "AAAA", "::1")
    local_dns.add("mx2.example.test", "A", "127.0.0.3")
    result = _resolve(local_dns, "example.test")
    assert result == [
        Destination("mx1.example.test", 2525, ("::1", "127.0.0.2"), 10, "mx", "mx1.example.test"),
        Destination("mx2.example.test", 2525, ("127.0.0.3",), 20, "mx", "mx2.example.test"),
    ]


def test_equal_preference_is_shuffled(local_dns: LocalDns) -> None:
    for host, ip in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
        local_dns.add("eq.test", "MX", f"10 {host}.eq.test.")
        local_dns.add(f"{host}.eq.test", "A", ip)
    local_dns.add("eq.test", "MX", "5 first.eq.test.")
    local_dns.add("first.eq.test", "A", "127.0.0.4")
    orders = {tuple(_hosts(_resolve(local_dns, "eq.test", rng=random.Random(s)))) for s in range(8)}
    assert orders == {
        ("first.eq.test", "a.eq.test", "b.eq.test"),
        ("first.eq.test", "b.eq.test", "a.eq.test"),
    }
    again = [_hosts(_resolve(local_dns, "eq.test", rng=random.Random(3))) for _ in range(2)]
    assert again[0] == again[1]


def test_mx_host_without_address_is_skipped(local_dns: LocalDns) -> None:
    local_dns.add("skip.test", "MX", "10 gone.skip.test.")  # NXDOMAIN
    local_dns.add("skip.test", "MX", "20 empty.skip.test.")  # NODATA
    local_dns.add("empty.skip.test", "TXT", "nothing")
    local_dns.add("skip.test", "MX", "30 broken.skip.test.")  # SERVFAIL
    local_dns.servfail("broken.skip.test")
    local_dns.add("skip.test", "MX", "40 ok.skip.test.")
    local_dns.add("ok.skip.test", "A", "127.0.0.5")
    result = _resolve(local_dns, "skip.test")
    assert result == [Destination("ok.skip.test", 2525, ("127.0.0.5",), 40, "mx", "ok.skip.test")]


def test_all_mx_hosts_without_address_defers(local_dns: LocalDns) -> None:
    local_dns.add("nohost.test", "MX", "10 gone.nohost.test.")
    with pytest.raises(DnsTemporaryError) as info:
        _resolve(local_dns, "nohost.test")
    assert info.value.domain == "nohost.test"


def test_all_mx_hosts_failing_defers(local_dns: LocalDns) -> None:
    local_dns.add("fail.test", "MX", "10 broken.fail.test.")
    local_dns.servfail("broken.fail.test")
    with pytest.raises(DnsTemporaryError, match=r"broken\.fail\.test"):
        _resolve(local_dns, "fail.test")


def test_implicit_mx_from_addresses(local_dns: LocalDns) -> None:
    local_dns.add("plain.test", "A", "127.0.0.6")
    local_dns.add("plain.test", "AAAA", "::1")
    result = _resolve(local_dns, "Plain.Test.")
    assert result == [
        Destination("plain.test", 2525, ("::1", "127.0.0.6"), None, "implicit", "plain.test")
    ]


def test_no_mx_and_no_address_is_permanent(local_dns: LocalDns) -> None:
    local_dns.add("txtonly.test", "TXT", "v=spf1 -all")
    with pytest.raises(DnsPermanentError) as info:
        _resolve(local_dns, "txtonly.test")
    assert info.value.status == "5.1.2"


def test_nxdomain_is_permanent(local_dns: LocalDns) -> None:
    with pytest.raises(DnsPermanentError) as info:
        _resolve(local_dns, "missing.test")
    assert (info.value.status, info.value.domain) == ("5.1.2", "missing.test")
    assert "missing.test" in str(info.value)


def test_null_mx_is_permanent(local_dns: LocalDns) -> None:
    local_dns.add("nomail.test", "MX", "0 .")
    local_dns.add("nomail.test", "A", "127.0.0.7")
    with pytest.raises(DnsPermanentError) as info:
        _resolve(local_dns, "nomail.test")
    assert info.value.status == "5.1.10"
    assert "null MX" in str(info.value)


def test_servfail_is_temporary(local_dns: LocalDns) -> None:
    local_dns.servfail("broken.test")
    with pytest.raises(DnsTemporaryError) as info:
        _resolve(local_dns, "broken.test")
    assert info.value.domain == "broken.test"


def test_unreachable_dns_server_is_temporary() -> None:
    config = DeliveryConfig.model_validate({"dns_servers": ["127.0.0.1:9"]})
    resolver = make_resolver(config.dns_servers, timeout=0.3)
    with pytest.raises(DnsTemporaryError):
        asyncio.run(resolve("example.test", config, resolver))


# ----------------------------------------------------------------------------- routes


def test_route_ip_literal_v6(local_dns: LocalDns) -> None:
    routes = {"v6.test": "[::1]:2602"}
    result = _resolve(local_dns, "v6.test", routes=routes)
    assert result == [Destination("::1", 2602, ("::1",), None, "route", "v6.test")]


def test_route_ip_literal_v4_skips_dns(local_dns: LocalDns) -> None:
    local_dns.servfail("v4.test")
    result = _resolve(local_dns, "v4.test", routes={"*.test": "127.0.0.8:2600"})
    assert result == [Destination("127.0.0.8", 2600, ("127.0.0.8",), None, "route", "v4.test")]


def test_route_host_name_resolved(local_dns: LocalDns) -> None:
    local_dns.add("relay.test", "A", "127.0.0.9")
    local_dns.add("relay.test", "AAAA", "::1")
    local_dns.add("routed.test", "MX", "10 ignored.test.")
    result = _resolve(local_dns, "routed.test", routes={"routed.test": "relay.test:2601"})
    assert result == [
        Destination("relay.test", 2601, ("::1", "127.0.0.9"), None, "route", "relay.test")
    ]


def test_exact_route_beats_wildcard_in_resolve(local_dns: LocalDns) -> None:
    routes = {"*.corp.test": "127.0.0.10:26", "a.corp.test": "127.0.0.11:27"}
    assert _resolve(local_dns, "a.corp.test", routes=routes)[0].addresses == ("127.0.0.11",)
    assert _resolve(local_dns, "b.corp.test", routes=routes)[0].addresses == ("127.0.0.10",)


def test_wildcard_route_does_not_apply_to_bare_suffix(local_dns: LocalDns) -> None:
    local_dns.add("corp.test", "A", "127.0.0.12")
    result = _resolve(local_dns, "corp.test", routes={"*.corp.test": "127.0.0.10:26"})
    assert result == [
        Destination("corp.test", 2525, ("127.0.0.12",), None, "implicit", "corp.test")
    ]


def test_explicit_route_overrides_routes_and_mx(local_dns: LocalDns) -> None:
    local_dns.add("over.test", "MX", "10 mx.over.test.")
    local_dns.add("mx.over.test", "A", "127.0.0.13")
    route = Route(HostPort("::1", 2602), tls_name="mail.override.test")
    result = _resolve(local_dns, "over.test", route=route, routes={"over.test": "127.0.0.1:1"})
    assert result == [Destination("::1", 2602, ("::1",), None, "route", "mail.override.test")]


def test_route_host_without_address_defers(local_dns: LocalDns) -> None:
    with pytest.raises(DnsTemporaryError):
        _resolve(local_dns, "r.test", routes={"r.test": "nowhere.test:25"})


def test_make_resolver_rejects_named_server() -> None:
    with pytest.raises(ValueError, match="IP address"):
        make_resolver([HostPort("dns.example", 53)], timeout=1.0)
