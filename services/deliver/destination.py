"""Destination TLS policies: one interface, implemented by MTA-STS today (DANE to come beside it).

A destination policy is asked once per delivery round of MX-routed mail (never for mail with a
route: those hops are ours, not the domain's). Given the decision for the domain, the hosts DNS
gave for it and whether the message says ``TLS-Required: No`` (RFC 8689 §5), it returns one plain
frozen value, a :class:`DestinationPath` (as KumoMTA's ``get_egress_path_config``):

- the hosts that may be used, in order, and per host (:class:`HostPolicy`) the TLS requirement
  and how the server is authenticated: :attr:`Auth.NONE` (encryption only), :attr:`Auth.PKIX`
  (the chain verifies and the certificate names :attr:`HostPolicy.name`) or :attr:`Auth.TLSA`
  (DANE, RFC 7672: the certificate matches :attr:`HostPolicy.tlsa`; no policy gives it yet);
- the decision as the policy leaves it (its circumstances and reasons are what a DSN says);
- what to report (:class:`services.deliver.tlsrpt.StsRound`: trace, TLSRPT, metrics), whether to
  note what verification would have said (MTA-STS ``testing``), and when hosts were given but
  none may be used, why (the round is then deferred with 4.7.10, never sent in clear).

:class:`MtaSts` implements it with :func:`services.deliver.mtasts.apply_sts` over the shared
:class:`~services.deliver.mtasts.PolicyCache` (looked up once per domain and batch; a new
``MtaSts`` per batch). :func:`plain` is the path when no policy applies. A DANE policy (per-host
TLSA, taking precedence over MTA-STS for the hosts it covers) is another implementation of
:class:`DestinationPolicy`. Shaping (leases, rates, back-off) is not a destination policy.

Failure: :meth:`MtaSts.path` never raises for DNS or HTTPS trouble (the cache reports it in the
``StsRound``); Redis errors propagate.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.model import Decision, TlsMode
from services.deliver import mtasts, mx, tlsrpt


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
