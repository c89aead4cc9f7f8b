"""Destination TLS policies: one interface, implemented by MTA-STS and by DANE over it.

A destination policy is asked once per delivery round of MX-routed mail (never for mail with a
route: those hops are ours, not the domain's). Given the decision for the domain, the hosts DNS
gave for it and whether the message says ``TLS-Required: No`` (RFC 8689 §5), it returns one plain
frozen value, a :class:`DestinationPath` (as KumoMTA's ``get_egress_path_config``):

- the hosts that may be used, in order, and per host (:class:`HostPolicy`) the TLS requirement
  and how the server is authenticated: :attr:`Auth.NONE` (encryption only), :attr:`Auth.PKIX`
  (the chain verifies and the certificate names :attr:`HostPolicy.name`) or :attr:`Auth.TLSA`
  (DANE, RFC 7672: the certificate matches :attr:`HostPolicy.tlsa`);
- the decision as the policy leaves it (its circumstances and reasons are what a DSN says);
- what to report (:class:`services.deliver.tlsrpt.StsRound`: trace, TLSRPT, metrics), whether to
  note what verification would have said (MTA-STS ``testing``), and when hosts were given but
  none may be used, why (the round is then deferred with 4.7.10, never sent in clear).

:class:`MtaSts` implements it with :func:`services.deliver.mtasts.apply_sts` over the shared
:class:`~services.deliver.mtasts.PolicyCache` (looked up once per domain and batch; a new
``MtaSts`` per batch). :class:`Dane` wraps it (RFC 8461 §2: DANE takes precedence): when the
domain's MX RRset was DNSSEC-validated, each host with validated TLSA records gets them
(:mod:`services.deliver.dane`): usable records → mode ``dane`` (whatever MTA-STS said of that
host), only unusable ones → at least ``enforced``, a failed TLSA lookup → the host is left out
(the round defers when none is left, 4.4.3), no or unsigned records → as MTA-STS left it.
:func:`requiretls` then keeps, for a REQUIRETLS message, only the hosts RFC 8689 §4.2.1 allows.
:func:`plain` is the path when no policy applies. Shaping (leases, rates, back-off) is not a
destination policy.

Failure: :meth:`MtaSts.path` and :meth:`Dane.path` never raise for DNS or HTTPS trouble (the
report says it: ``StsRound``, ``StsRound.dane``); Redis errors propagate.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import dns.asyncresolver

from services.common.model import Decision, Reply, TlsMode
from services.deliver import dane, mtasts, mx, tlsrpt


class Auth(enum.Enum):
    """How the server at a host is authenticated."""

    NONE = "none"  # encryption only (or not even that): the certificate is not checked
    PKIX = "pkix"  # the chain verifies against trusted CAs and the certificate names the host
    TLSA = "tlsa"  # DANE (RFC 7672): the certificate matches the host's TLSA records


@dataclass(frozen=True)
class HostPolicy:
    """One host that may be used, with what its TLS session must give."""

    destination: mx.Destination
    tls: TlsMode  # the requirement at this host
    auth: Auth
    name: str  # the name its certificate is checked against (and shown)
    tlsa: tuple[str, ...] = ()  # Auth.TLSA: the records (presentation format)


@dataclass(frozen=True)
class DestinationPath:
    """A destination policy's answer for one round (a plain value)."""

    decision: Decision  # as the policy leaves it
    hosts: tuple[HostPolicy, ...]  # those that may be used, in order
    report: tlsrpt.StsRound | None = None  # what to report (None: no policy was asked)
    check_leaf: bool = False  # note what verification would say, change nothing (testing)
    refusal: str = ""  # hosts were given and none may be used: why
    refused: Reply | None = None  # ... and the reply for it (None: 451 4.7.10 with ``refusal``)


class DestinationPolicy(Protocol):
    """What every destination TLS policy answers (MTA-STS now; DANE next)."""

    async def path(
        self, decision: Decision, hosts: Sequence[mx.Destination], tls_required_no: bool
    ) -> DestinationPath: ...


def host_policy(destination: mx.Destination, decision: Decision) -> HostPolicy:
    """The host under ``decision`` alone: its mode, PKIX when that mode checks the name."""
    auth = Auth.PKIX if decision.tls.must_match_name else Auth.NONE
    name = destination.tls_name or decision.domain
    return HostPolicy(destination, decision.tls, auth, name)


def plain(decision: Decision, hosts: Sequence[mx.Destination]) -> DestinationPath:
    """The path when no destination policy applies (routed mail): every host, as decided."""
    return DestinationPath(decision, tuple(host_policy(h, decision) for h in hosts))


class MtaSts:
    """MTA-STS (RFC 8461) as a destination policy; ``cache`` None: MTA-STS is off (the round is
    still reported, as a domain without a policy)."""

    def __init__(self, cache: mtasts.PolicyCache | None) -> None:
        self.cache = cache
        self._seen: dict[str, mtasts.Lookup] = {}  # lookups of this batch

    async def path(
        self, decision: Decision, hosts: Sequence[mx.Destination], tls_required_no: bool
    ) -> DestinationPath:
        found = await self._lookup(decision.domain)
        policy = found.policy
        enforceable = policy is not None and policy.mode != mtasts.NONE
        effective = mtasts.apply_sts(decision, policy, tls_required_no)
        allowed = [h for h in hosts if _allowed(h, effective)]
        report = tlsrpt.StsRound(decision.domain, policy, tls_required_no and enforceable)
        report.error, report.error_type = found.error, found.error_type
        if effective.mx_patterns:
            report.skipped = [h.host for h in hosts if h not in allowed]
        refusal = f"no MX host of {decision.domain} matches its MTA-STS policy (RFC 8461 §4.1)"
        return DestinationPath(
            effective,
            tuple(host_policy(h, effective) for h in allowed),
            report,
            check_leaf=report.mode == mtasts.TESTING,
            refusal="" if allowed else refusal,
        )

    async def _lookup(self, domain: str) -> mtasts.Lookup:
        if self.cache is None:  # MTA-STS off: as a domain without a policy
            return mtasts.Lookup(None, "off")
        found = self._seen.get(domain)
        if found is None:  # once per domain and batch
            found = self._seen[domain] = await self.cache.lookup(domain)
        return found


def _allowed(host: mx.Destination, decision: Decision) -> bool:
    """Under an enforced MTA-STS policy only MX hosts that match it are used (RFC 8461 §4.1)."""
    return not decision.mx_patterns or mtasts.mx_matches(host.host, decision.mx_patterns)


class Dane:
    """DANE (RFC 7672) over another destination policy (MTA-STS), for one batch; ``active``
    False (``delivery.dane: off`` or ``delivery.dnssec: none``): the inner policy alone."""

    def __init__(
        self, inner: DestinationPolicy, resolver: dns.asyncresolver.Resolver, active: bool
    ) -> None:
        self.inner, self.resolver, self.active = inner, resolver, active

    async def path(
        self, decision: Decision, hosts: Sequence[mx.Destination], tls_required_no: bool
    ) -> DestinationPath:
        path = await self.inner.path(decision, hosts, tls_required_no)
        if not self.active or not hosts:
            return path
        found = await self._round(decision, hosts, tls_required_no)
        if path.report is not None:
            path.report.dane = found
        return _with_dane(path, hosts, found) if found.applies else path

    async def _round(
        self, decision: Decision, hosts: Sequence[mx.Destination], tls_required_no: bool
    ) -> dane.DaneRound:
        if tls_required_no:
            return dane.DaneRound(
                False, "not applied to this message: TLS-Required: No (RFC 8689 §5)"
            )
        if not any(h.mx_secure for h in hosts):
            return dane.DaneRound(
                False, f"the MX records of {decision.domain} are not DNSSEC-validated"
            )
        return dane.DaneRound(True, hosts=await dane.statuses(self.resolver, hosts))


def _with_dane(
    path: DestinationPath, hosts: Sequence[mx.Destination], found: dane.DaneRound
) -> DestinationPath:
    """The hosts in DNS order, each as DANE says (see the module docstring)."""
    inner = {h.destination: h for h in path.hosts}
    kept: list[HostPolicy] = []
    used: list[dane.HostStatus] = []
    for host, status in zip(hosts, found.hosts, strict=True):
        if status.status == dane.USABLE:
            records = tuple(str(r) for r in status.records)
            kept.append(HostPolicy(host, TlsMode.DANE, Auth.TLSA, host.host, records))
        elif status.status != dane.LOOKUP_ERROR and host in inner:
            policy = inner[host]
            if status.status == dane.UNUSABLE:
                policy = replace(policy, tls=dane.host_mode(status, policy.tls))
            kept.append(policy)
        if status.applies:
            used.append(status)
    decision = dane.raised(path.decision, used)
    if path.report is not None:  # hosts DANE took over were not skipped (RFC 8461 §2)
        taken = {h.destination.host for h in kept if h.auth is Auth.TLSA}
        path.report.skipped = [h for h in path.report.skipped if h not in taken]
    failed = [s for s in found.hosts if s.status == dane.LOOKUP_ERROR]
    if kept or not failed:
        return replace(path, decision=decision, hosts=tuple(kept))
    text = f"TLSA lookup failed for {failed[0].host}: {failed[0].error} (RFC 7672 §2.2: not used)"
    return replace(
        path, decision=decision, hosts=(), refusal=text, refused=Reply(451, "4.4.3", text)
    )


def requiretls(path: DestinationPath, domain: str) -> DestinationPath:
    """RFC 8689 §4.2.1: a REQUIRETLS message goes only to an MX host found through
    DNSSEC-validated MX records, or that matches the domain's MTA-STS policy (mode enforce or
    testing); with none such, its recipients bounce 5.7.30."""
    policy = path.report.policy if path.report is not None else None
    patterns = policy.mx if policy is not None and policy.mode != mtasts.NONE else ()

    def allowed(host: HostPolicy) -> bool:
        name = host.destination.host
        return host.destination.mx_secure or bool(patterns and mtasts.mx_matches(name, patterns))

    kept = tuple(h for h in path.hosts if allowed(h))
    if path.report is not None:  # reported to TLSRPT (dane-required)
        path.report.requiretls_skipped = [h.destination.host for h in path.hosts if h not in kept]
    if kept or not path.hosts:
        return replace(path, hosts=kept)
    text = (
        f"REQUIRETLS: no MX host of {domain} was found through DNSSEC-validated MX records or "
        "matches an MTA-STS policy (RFC 8689 §4.2.1)"
    )
    return replace(path, hosts=(), refusal=text, refused=Reply(550, "5.7.30", text))
