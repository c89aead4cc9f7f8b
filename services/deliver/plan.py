"""The plan of one delivery round: routes → hosts → the destination policy → TLS settings per peer.

:meth:`Planner.plan` turns a job's decision into a :class:`Plan`: where to connect, in order (the
addresses of each allowed host, as :class:`~services.deliver.attempt.Peer` values), the decision
as the destination policy leaves it, and what to report — or the reply for every recipient when
nothing can be tried:

1. the host list: the decision's route (a rule, a platform hop), else ``delivery.routes``, else MX,
   else implicit MX (:func:`services.deliver.mx.resolve`); NXDOMAIN / null MX → a 5xx
   (bounce), any other DNS failure → 451 4.4.3 (defer; the destination counts as unreachable);
2. the destination policy (:mod:`services.deliver.destination`; DANE over MTA-STS, for
   MX-routed mail only): the hosts that may be used and the TLS requirement at each; none left
   → 451 4.7.10 (defer, never in clear), 451 4.4.3 when TLSA lookups failed; for a REQUIRETLS
   message only MX hosts from DNSSEC-validated MX records or matching an MTA-STS policy, else
   550 5.7.30 (RFC 8689 §4.2.1);
3. the addresses of those hosts in order, cut at the first that is one of our own listeners
   (none left → 554 5.4.6 "loops back to myself", :mod:`services.deliver.loops`), at most
   ``delivery.mx_address_limit``;
4. per peer, when it is about to be tried (:meth:`Planner.tls`): the requirement with its
   material — the platform's CA and client certificate for intra-platform mail (at least
   ``verified``), else ``delivery.ca_file``; the TLSA records and names of a DANE host — and
   whether a STARTTLS handshake there failed lately (the "TLS broken" memory,
   ``tlsrelay:tlsbroken:*``, read once per peer and batch; never for a host whose mode requires
   TLS, where it would change nothing).

Failure: DNS and policy trouble become the plan's reply, never exceptions; Redis errors propagate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import dns.asyncresolver

from services.common import spool
from services.common.config import Config
from services.common.model import Decision, Reply, TlsMode
from services.common.tenants import PLATFORM_PROFILE
from services.common.values import HostPort, Route
from services.deliver import destination, loops, mtasts, mx, tlsrpt
from services.deliver.attempt import Peer, TlsSettings
from services.deliver.session import TLS_UNAVAILABLE


@dataclass(frozen=True)
class Hop:
    """One address to try, and what TLS its host requires."""

    peer: Peer
    host: destination.HostPolicy


@dataclass(frozen=True)
class Plan:
    """Where one round goes, or why it goes nowhere."""

    decision: Decision  # the effective decision (a destination policy may have raised it)
    hops: tuple[Hop, ...] = ()
    report: tlsrpt.StsRound | None = None  # MTA-STS and TLSRPT facts (None: routed mail)
    check_leaf: bool = False  # MTA-STS testing: note what verification would say
    refused: Reply | None = None  # nothing can be tried: every recipient gets this reply
    unreachable: bool = False  # refused because the destination could not be found now
    # (host, port, source) of every host resolved: the traffic-shaping site (sites.site_of)
    destinations: tuple[tuple[str, int, str], ...] = ()


class Store(mtasts.CacheStore, Protocol):
    """The Redis commands the planner uses — the MTA-STS cache's, and ``EXISTS`` for the "TLS
    broken" memory — so that ``redis.Redis`` and ``tlsrelay check``'s in-memory stand-in both
    fit, and a new command is a type error until both have it."""

    def exists(self, name: str, /) -> Any: ...


class Planner:
    """Per worker process: resolver, MTA-STS cache and the TLS-broken memory (per batch)."""

    def __init__(self, config: Config, client: Store, resolver: dns.asyncresolver.Resolver) -> None:
        self.config = config
        self.client = client
        self.resolver = resolver
        delivery = config.delivery
        self.cache: mtasts.PolicyCache | None = None
        if delivery.mta_sts:
            ca = str(delivery.mta_sts_ca_file) if delivery.mta_sts_ca_file else None
            self.cache = mtasts.PolicyCache(
                client, resolver, ca, delivery.mta_sts_port, delivery.mta_sts_timeout
            )
        if delivery.dnssec == "trust_resolver":
            mx.want_dnssec(resolver)
        self.new_batch()

    def new_batch(self) -> None:
        """Forget what this batch learnt (MTA-STS lookups, broken TLS): the next one asks again."""
        self.policy: destination.DestinationPolicy = destination.Dane(
            destination.MtaSts(self.cache), self.resolver, self.config.delivery.dane_active
        )
        self._broken: dict[tuple[str, int], bool] = {}

    async def plan(
        self, decision: Decision, tls_required_no: bool, requiretls: bool = False
    ) -> Plan:
        route = self._route(decision)
        failure: mx.DnsError | None = None
        try:
            hosts = await mx.resolve(decision.domain, self.config.delivery, self.resolver, route)
        except mx.DnsError as exc:
            hosts, failure = [], exc
        if route is None:  # MTA-STS, DANE are about MX hosts: never for routed mail
            path = await self.policy.path(decision, hosts, tls_required_no)
            if requiretls:
                path = destination.requiretls(path, decision.domain)
        else:
            path = destination.plain(decision, hosts)
        plan = Plan(path.decision, report=path.report, check_leaf=path.check_leaf)
        if isinstance(failure, mx.DnsPermanentError):
            return _refused(plan, Reply(550, failure.status, str(failure)))
        if failure is not None:
            return _refused(plan, Reply(451, "4.4.3", str(failure)), unreachable=True)
        if not path.hosts:
            reply = path.refused or Reply(451, TLS_UNAVAILABLE.status, path.refusal)
            return _refused(plan, reply)
        hops = _hops(path.hosts, loops.own_listeners(self.config))
        if not hops and path.hosts:
            return _refused(plan, loops.loop_reply(decision.domain))
        plan = _with_hops(plan, hops, self.config.delivery.mx_address_limit)
        # The site is the hosts the domain resolves to, whatever a policy allowed this round
        # (DANE, MTA-STS, REQUIRETLS, TLS-Required: No): else one host could be in two sites.
        where = tuple((h.host, h.port, h.source) for h in hosts)
        return replace(plan, destinations=where)

    def _route(self, decision: Decision) -> Route | None:
        """The decision's route (a rule, a platform hop), else ``delivery.routes``'."""
        if decision.route:
            return decision.override_route
        return mx.route_for(decision.domain, self.config.delivery.routes)

    def tls(self, plan: Plan, hop: Hop) -> TlsSettings:
        """The TLS requirement and material at ``hop``: the platform's own for intra-platform
        mail; with the "TLS broken" memory of its address."""
        peer, mode = hop.peer, hop.host.tls
        broken = False if mode.requires_encryption else self._broken.get((peer.address, peer.port))
        if broken is None:  # read once per peer and batch
            broken = bool(self.client.exists(spool.tls_broken_key(peer.address, peer.port)))
            self._broken[(peer.address, peer.port)] = broken
        platform = self.config.platform_tls
        if plan.decision.tls_profile == PLATFORM_PROFILE and platform is not None:
            return TlsSettings(
                mode=mode.at_least(TlsMode.VERIFIED),
                ca_file=str(platform.ca),
                remembered_broken=broken,
                client_cert=(str(platform.cert), str(platform.key)),
                check_leaf=plan.check_leaf,
            )
        ca_file = str(self.config.delivery.ca_file) if self.config.delivery.ca_file else None
        if mode.must_match_tlsa:  # DANE: the records, and the names a DANE-TA leaf may carry
            names = (hop.host.name, plan.decision.domain)
            return TlsSettings(mode, None, False, tlsa=hop.host.tlsa, tlsa_names=names)
        return TlsSettings(mode, ca_file, broken, check_leaf=plan.check_leaf)

    def remember_broken(self, peer: Peer) -> None:
        """A STARTTLS handshake failed at ``peer``: opportunistic mail goes there in clear for
        ``delivery.tls_broken_ttl`` (every worker reads the mark)."""
        ttl = max(1, int(self.config.delivery.tls_broken_ttl))
        self._broken[(peer.address, peer.port)] = True
        self.client.set(spool.tls_broken_key(peer.address, peer.port), peer.host, ex=ttl)


def _refused(plan: Plan, reply: Reply, unreachable: bool = False) -> Plan:
    return Plan(plan.decision, (), plan.report, plan.check_leaf, reply, unreachable)


def _hops(
    hosts: tuple[destination.HostPolicy, ...], listeners: tuple[HostPort, ...]
) -> tuple[Hop, ...]:
    """Every address of every allowed host in order, up to the first that is one of our own
    listeners (what follows would come back to us too: :mod:`services.deliver.loops`)."""
    hops: list[Hop] = []
    for h in hosts:
        for address in h.destination.addresses:
            if loops.is_myself(address, h.destination.port, listeners):
                return tuple(hops)
            hops.append(Hop(Peer(h.destination.host, address, h.destination.port, h.name), h))
    return tuple(hops)


def _with_hops(plan: Plan, hops: tuple[Hop, ...], limit: int) -> Plan:
    """At most ``limit`` addresses (0: all) — ``delivery.mx_address_limit``, as Postfix's
    ``smtp_mx_address_limit``."""
    return Plan(plan.decision, hops[:limit] if limit else hops, plan.report, plan.check_leaf)
