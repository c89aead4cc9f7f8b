"""Where to deliver a domain's mail: transport routes first, then DNS (RFC 5321 §5.1).

Contract: :func:`resolve` turns a destination domain into an ordered list of
:class:`Destination` values, each naming a host (for TLS names and traces), a port and the IP
addresses to try in order (IPv6 first, then IPv4, as DNS returned them). The caller tries them in
list order. Sources, by priority:

1. a route given by the caller (a policy rule's override), else
2. a transport route from ``delivery.routes`` (exact domain, then the longest ``*.suffix``), else
3. the domain's MX records: sorted by preference, equal preferences shuffled; each MX host's
   AAAA/A records give its addresses; port ``delivery.mx_port``; else
4. no MX records at all: the domain's own AAAA/A records as an implicit MX.

DNSSEC (``delivery.dnssec: trust_resolver``, :func:`want_dnssec`): queries set DO, and an answer
that carries the AD bit counts as validated — the operator vouches for ``delivery.dns_servers``
(a validating resolver on a trusted path). Each MX destination then says whether its MX RRset
(:attr:`Destination.mx_secure`; for an implicit MX, the denial of MX records) and its own
address records (:attr:`Destination.address_secure`) were validated; DANE (RFC 7672 §2.2) and
REQUIRETLS (RFC 8689 §4.2.1) ask. With ``dnssec: none`` both are always False, AD or not.

Failure: every DNS problem is raised as a :class:`DnsError` subclass, never as a dnspython
exception. :class:`DnsTemporaryError` (SERVFAIL, timeout, no nameserver answered, no usable MX
host, a route host without addresses) means *defer and retry*. :class:`DnsPermanentError` means
*bounce*, with an RFC 3463 status: ``5.1.2`` for a domain that does not exist (NXDOMAIN) or exists
with neither MX nor address records, ``5.1.10`` for a null MX (RFC 7505). An MX host whose own
lookup fails is skipped; only when no MX host yields an address is the whole lookup deferred
(as Postfix does for "MX host not found"). Nothing here touches the network except through the
given resolver; nothing is cached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from services.common.deliveryconfig import DeliveryConfig
from services.common.values import HostPort, Route, ip_address

_ADDRESS_TYPES = (dns.rdatatype.AAAA, dns.rdatatype.A)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Destination:
    """One place to try: a host name (or IP literal), a port and its addresses in order."""

    host: str  # the MX host name (or route host / IP literal); used for TLS names and traces
    port: int
    addresses: tuple[str, ...]  # IP addresses to try in order
    preference: int | None = None  # MX preference; None for routes and implicit MX
    source: str = "mx"  # "route" | "mx" | "implicit"
    # The name its certificate must carry in verified mode: the MX host; for an implicit MX the
    # domain; for a route its tls_name, else its host name, else (IP route) the domain.
    tls_name: str = ""
    # DNSSEC-validated (only with delivery.dnssec: trust_resolver; routes never): the domain's
    # MX RRset (implicit MX: the secure denial of MX records), and this host's addresses.
    mx_secure: bool = False
    address_secure: bool = False


class DnsError(Exception):
    """A DNS lookup for ``domain`` did not give a destination; ``str()`` explains why."""

    def __init__(self, domain: str, text: str) -> None:
        super().__init__(text)
        self.domain = domain


class DnsTemporaryError(DnsError):
    """The lookup may succeed later (SERVFAIL, timeout, no usable MX host): defer."""


class DnsPermanentError(DnsError):
    """The domain cannot receive mail (NXDOMAIN, null MX, no MX and no address): bounce."""

    def __init__(self, domain: str, status: str, text: str) -> None:
        super().__init__(domain, text)
        self.status = status


def _normal(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


def route_for(domain: str, routes: Mapping[str, Route]) -> Route | None:
    """The route for ``domain``: an exact key first, then the longest matching ``*.suffix``."""
    table = {_normal(key): value for key, value in routes.items()}
    name = _normal(domain)
    if name in table:
        return table[name]
    labels = name.split(".")
    for i in range(1, len(labels)):
        found = table.get("*." + ".".join(labels[i:]))
        if found is not None:
            return found
    return None


def want_dnssec(resolver: dns.asyncresolver.Resolver) -> None:
    """Ask for DNSSEC: set DO (RFC 3225) so a validating resolver reports validation (AD)."""
    resolver.use_edns(0, dns.flags.DO, 1232)


def trusts_ad(resolver: dns.asyncresolver.Resolver) -> bool:
    """Whether ``resolver`` asks for DNSSEC (:func:`want_dnssec`): only then is AD believed."""
    return bool(resolver.ednsflags & dns.flags.DO)


def is_secure(resolver: dns.asyncresolver.Resolver, response: dns.message.Message | None) -> bool:
    """Whether ``response`` counts as DNSSEC-validated: AD set, and DNSSEC asked for."""
    return trusts_ad(resolver) and response is not None and bool(response.flags & dns.flags.AD)


def make_resolver(dns_servers: Sequence[HostPort], timeout: float) -> dns.asyncresolver.Resolver:
    """A resolver using ``dns_servers`` (IP addresses with ports), or the system's when empty.

    Raises ``ValueError`` for a server given by name (a resolver needs addresses to start).
    """
    resolver = dns.asyncresolver.Resolver(configure=not dns_servers)
    if dns_servers:
        for server in dns_servers:
            if not server.is_ip:
                raise ValueError(f"DNS server must be an IP address, got {server}")
        resolver.nameservers = [dns.nameserver.Do53Nameserver(s.host, s.port) for s in dns_servers]
    resolver.lifetime = timeout
    return resolver


async def resolve(
    domain: str,
    config: DeliveryConfig,
    resolver: dns.asyncresolver.Resolver,
    route: Route | None = None,
    rng: random.Random | None = None,
) -> list[Destination]:
    """Destinations for ``domain`` in the order to try them; raises :class:`DnsError`."""
    domain = _normal(domain)
    if route is None:
        route = route_for(domain, config.routes)
    if route is not None:
        return [await _route_destination(domain, route, resolver)]
    try:
        answer = await _query(resolver, domain, _name(domain), dns.rdatatype.MX)
    except dns.resolver.NXDOMAIN:
        raise DnsPermanentError(domain, "5.1.2", f"domain {domain} does not exist") from None
    except dns.resolver.NoAnswer as exc:
        response: dns.message.Message | None = exc.response()  # type: ignore[no-untyped-call]
        denied = is_secure(resolver, response)
        return [await _implicit_destination(domain, config, resolver, denied)]
    records = [r for r in answer if isinstance(r, MX)]
    secure = is_secure(resolver, answer.response)
    return await _mx_destinations(domain, records, config, resolver, rng or random.Random(), secure)


def _name(domain: str) -> dns.name.Name:
    try:
        return dns.name.from_text(domain)
    except dns.exception.DNSException as exc:
        raise DnsPermanentError(domain, "5.1.2", f"invalid domain name {domain!r}: {exc}") from None


async def _query(
    resolver: dns.asyncresolver.Resolver,
    domain: str,
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
) -> dns.resolver.Answer:
    """One lookup; NXDOMAIN and NoAnswer pass through, other failures become temporary."""
    try:
        return await resolver.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        raise
    except dns.exception.DNSException as exc:
        what = f"{name.to_text(omit_final_dot=True)}/{dns.rdatatype.to_text(rdtype)}"
        raise DnsTemporaryError(domain, f"DNS lookup of {what} failed: {exc}") from exc


@dataclass(frozen=True)
class _Addresses:
    found: tuple[str, ...]
    secure: bool  # every RRset that gave addresses was DNSSEC-validated


async def _addresses(
    resolver: dns.asyncresolver.Resolver, domain: str, name: dns.name.Name
) -> _Addresses:
    """AAAA then A addresses of ``name``; none when it has none (or does not exist).

    Raises :class:`DnsTemporaryError` only when no address was found and a lookup failed.
    """
    lookups = [_address_list(resolver, domain, name, t) for t in _ADDRESS_TYPES]
    outcomes = await _gather_dns(lookups)
    answers = [o for o in outcomes if not isinstance(o, DnsError) and o[0]]
    found = [a for addresses, _ in answers for a in addresses]
    if found:
        return _Addresses(tuple(dict.fromkeys(found)), all(secure for _, secure in answers))
    for outcome in outcomes:
        if isinstance(outcome, DnsError):
            raise outcome
    return _Addresses((), False)


async def _address_list(
    resolver: dns.asyncresolver.Resolver,
    domain: str,
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
) -> tuple[list[str], bool]:
    try:
        answer = await _query(resolver, domain, name, rdtype)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], False
    found = [str(ipaddress.ip_address(r.to_text())) for r in answer]
    return found, is_secure(resolver, answer.response)


async def _gather_dns(lookups: Sequence[Awaitable[_T]]) -> list[_T | DnsError]:
    """Run lookups concurrently; DNS errors are returned in place, anything else propagates."""
    result: list[_T | DnsError] = []
    for outcome in await asyncio.gather(*lookups, return_exceptions=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, DnsError):
            raise outcome
        result.append(outcome)
    return result


async def _route_destination(
    domain: str, route: Route, resolver: dns.asyncresolver.Resolver
) -> Destination:
    """A route is one destination; a named route host without addresses defers (config issue)."""
    target = route.address
    if target.is_ip:
        ip = str(ip_address(target.host))  # cached (values.ip_address)
        return Destination(ip, target.port, (ip,), None, "route", route.tls_name or domain)
    host = _normal(target.host)
    addresses = (await _addresses(resolver, domain, _name(host))).found
    if not addresses:
        raise DnsTemporaryError(domain, f"route host {host} for {domain} has no address")
    return Destination(host, target.port, addresses, None, "route", route.tls_name or host)


async def _implicit_destination(
    domain: str, config: DeliveryConfig, resolver: dns.asyncresolver.Resolver, denied: bool
) -> Destination:
    """No MX records: the domain's own addresses act as an MX of preference 0 (RFC 5321 §5.1);
    ``denied``: the absence of MX records was DNSSEC-validated (RFC 7672 §2.2.1)."""
    found = await _addresses(resolver, domain, _name(domain))
    if not found.found:
        text = f"domain {domain} has no MX and no address records"
        raise DnsPermanentError(domain, "5.1.2", text)
    return Destination(
        domain, config.mx_port, found.found, None, "implicit", domain, denied, found.secure
    )


def _ordered(records: Sequence[MX], rng: random.Random) -> list[MX]:
    """Sorted by preference; records of equal preference in random order (RFC 5321 §5.1)."""
    result: list[MX] = []
    ranked = sorted(records, key=lambda r: (r.preference, r.exchange.to_text().lower()))
    for _, group in itertools.groupby(ranked, key=lambda r: r.preference):
        same = list(group)
        rng.shuffle(same)
        result.extend(same)
    return result


async def _mx_destinations(
    domain: str,
    records: Sequence[MX],
    config: DeliveryConfig,
    resolver: dns.asyncresolver.Resolver,
    rng: random.Random,
    secure: bool = False,
) -> list[Destination]:
    """One destination per MX host with addresses; hosts without any are skipped. ``secure``:
    the MX RRset was DNSSEC-validated."""
    real = [r for r in records if r.exchange != dns.name.root]
    if not real:
        raise DnsPermanentError(domain, "5.1.10", f"domain {domain} accepts no mail (null MX)")
    ordered = _ordered(real, rng)
    outcomes = await _gather_dns([_addresses(resolver, domain, r.exchange) for r in ordered])
    names = [_normal(r.exchange.to_text()) for r in ordered]
    result = [
        Destination(
            name, config.mx_port, found.found, r.preference, "mx", name, secure, found.secure
        )
        for name, r, found in zip(names, ordered, outcomes, strict=True)
        if not isinstance(found, DnsError) and found.found
    ]
    if not result:
        raise _no_mx_host(domain, outcomes)
    return result


def _no_mx_host(domain: str, outcomes: Sequence[object]) -> DnsTemporaryError:
    failures = [str(o) for o in outcomes if isinstance(o, DnsError)]
    if failures:
        return DnsTemporaryError(domain, f"no MX host of {domain} resolved: {failures[0]}")
    return DnsTemporaryError(domain, f"MX host for {domain} not found (no address records)")
