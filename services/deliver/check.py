"""``tlsrelay check DOMAIN``: a live look at one destination through the code that delivers to it.

Nothing here decides anything of its own. :func:`run` takes the decision the rules give the
domain (computed by the command line, which may ask the policy service's ``decide``) and:

1. plans a round per mode (``opportunistic``, ``enforced``, ``verified`` and the rules' own) with
   the deliver worker's :class:`~services.deliver.plan.Planner`: the route or MX lookup
   (:mod:`services.deliver.mx`), the destination policy (:mod:`services.deliver.destination`:
   DANE over MTA-STS — MTA-STS looked up fresh, into a cache of this run only, so a fetch error
   shows), the address limit, the "TLS broken" memory (read from the relay's Redis when one is
   reachable);
2. probes each address those plans would try with :func:`services.deliver.session.probe` — the
   session code of a delivery without a transaction: connect, greeting, EHLO, STARTTLS, the
   handshake with the ``enforced`` context (TLS 1.0 and old ciphers accepted, certificate not
   checked), EHLO again (REQUIRETLS?), QUIT; where that handshake worked, a second probe with the
   ``verified`` context (chain and name checked against ``delivery.ca_file`` or the system CAs)
   confirms what verification says; at a host the planner gives mode ``dane``, a probe at that
   mode with the host's TLSA records — the session compares the server's chain with them
   (:func:`services.deliver.dane.check`) exactly as before a delivery's EHLO. No MAIL command is
   ever sent. Timeouts are the delivery's (``connect_timeout``, ``greeting_timeout``,
   ``command_timeout``) and the whole probing ends within ``delivery.job_timeout``;
3. gives a verdict per mode by walking each plan's hops through the TLS table
   (:func:`services.deliver.tls.wants_starttls` / :func:`~services.deliver.tls.after_starttls`)
   with what the probes found, as a delivery would, within ``delivery.mx_session_limit`` (each
   address judged by :func:`services.deliver.checkreport.judge`).

The report's types and its text and JSON are :mod:`services.deliver.checkreport`'s.

DANE (RFC 7672, with ``delivery.dnssec: trust_resolver`` and ``delivery.dane: on``) is the
planner's: the DNSSEC status of the MX RRset, each host's TLSA status and records are the
round's :class:`services.deliver.dane.DaneRound` (:attr:`Report.dane`, :attr:`HostReport.tlsa`),
and a host with usable records is judged at mode ``dane`` in every verdict (DANE raises
``opportunistic`` and ``enforced``, and meets ``verified``).

Failure: DNS, HTTPS and SMTP trouble are facts of the report, never exceptions; a Redis that
cannot be read for the "TLS broken" memory is noted and the check goes on without it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import redis

from services.common.config import Config
from services.common.deliveryconfig import DeliveryConfig
from services.common.model import Decision, TlsMode
from services.deliver import dane, leafcheck, mtasts, mx, tlsrpt
from services.deliver.attempt import Peer, Timeouts, TlsSettings
from services.deliver.checkreport import HostReport, Report, Verdict, dnssec_word, judge
from services.deliver.destination import Auth
from services.deliver.plan import Hop, Plan, Planner
from services.deliver.session import probe

MODES = (TlsMode.OPPORTUNISTIC, TlsMode.ENFORCED, TlsMode.VERIFIED)


class _Store:
    """What the planner keeps in Redis (a :class:`~services.deliver.plan.Store`), for one check:
    MTA-STS lookups stay in memory (so the domain's policy is looked up now, not taken from the
    relay's cache); the "TLS broken" memory is read from the relay's Redis when there is one."""

    def __init__(self, relay: redis.Redis | None) -> None:
        self.relay = relay
        self.memory: dict[str, Any] = {}
        self.relay_error: str | None = None

    def get(self, key: str) -> Any:
        return self.memory.get(key)

    def set(self, key: str, value: Any, ex: int | None = None) -> None:
        self.memory[key] = value

    def exists(self, key: str) -> int:
        if key in self.memory or self.relay is None:
            return int(key in self.memory)
        try:
            return int(self.relay.exists(key))
        except redis.exceptions.RedisError as exc:
            self.relay_error = f"the relay's Redis could not be read: {exc}"
            return 0


async def run(config: Config, decision: Decision, relay: redis.Redis | None = None) -> Report:
    """Plan, probe and judge ``decision.domain`` (see the module docstring)."""
    delivery = config.delivery
    resolver = mx.make_resolver(delivery.dns_servers, timeout=delivery.connect_timeout)
    store = _Store(relay)
    planner = Planner(config, store, resolver)
    report = Report(decision.domain, decision)
    modes = sorted({*MODES, decision.tls})
    plans = {m: await planner.plan(replace(decision, tls=m), False) for m in modes}
    _describe_plan(report, plans[decision.tls], delivery)
    if not delivery.mta_sts and report.mta_sts.get("applies"):
        report.mta_sts = {"applies": False, "why": "delivery.mta_sts is off"}
    report.tlsrpt = await _tlsrpt(resolver, decision.domain)
    hosts = _hosts(planner, plans, plans[decision.tls])
    report.hosts = list(hosts.values())
    timeouts = Timeouts(config.hostname, delivery.connect_timeout, delivery.command_timeout,
                        delivery.greeting_timeout, delivery.data_timeout)  # fmt: skip
    await _probe_all(planner, plans, hosts, timeouts, delivery.job_timeout)
    limit = delivery.mx_session_limit
    report.verdicts = [_verdict(m, planner, plans[m], hosts, limit) for m in modes]
    if store.relay_error:
        report.notes.append(f"{store.relay_error}; the TLS-broken memory was not consulted")
    return report


# --------------------------------------------------------------------------- planning facts


def _describe_plan(report: Report, plan: Plan, delivery: DeliveryConfig) -> None:
    if plan.refused is not None:
        report.refused = str(plan.refused)
    seen: set[str] = set()
    dnssec = delivery.dnssec == "trust_resolver"
    for hop in plan.hops:
        dest = hop.host.destination
        if dest.host in seen:
            continue
        seen.add(dest.host)
        pref = f"MX {dest.preference} " if dest.preference is not None else f"{dest.source} "
        line = f"{pref}{dest.host}:{dest.port} [{', '.join(dest.addresses)}]"
        if dnssec and dest.source != "route":
            line += f" (DNSSEC: MX {dnssec_word(dest.mx_secure)}, addresses "
            line += f"{dnssec_word(dest.address_secure)})"
        report.routing.append(line)
    report.mta_sts = _sts_facts(plan.report, plan.decision)
    report.dane = _dane_facts(plan, delivery)


def _dane_facts(plan: Plan, delivery: DeliveryConfig) -> dict[str, Any]:
    """DANE at this domain as the plan found it (the planner's :class:`dane.DaneRound`)."""
    found = plan.report.dane if plan.report is not None else None
    doc: dict[str, Any] = {"applies": False, "why": None, "mx_secure": None, "hosts": [],
                           "requires": "nothing"}  # fmt: skip
    if plan.report is None:
        doc["why"] = "routed mail: DANE is about MX hosts"
    elif delivery.dnssec != "trust_resolver":
        doc["why"] = "delivery.dnssec is none: the AD bit is not believed"
    elif found is None:
        doc["why"] = "delivery.dane is off" if not delivery.dane else "no MX host to look up"
        secure = [h.host.destination.mx_secure for h in plan.hops]
        doc["mx_secure"] = any(secure) if secure else None
    else:
        doc.update(mx_secure=found.applies, hosts=[h.to_json() for h in found.hosts])
        mattering = [h for h in found.hosts if h.applies or h.status == dane.LOOKUP_ERROR]
        doc["applies"] = bool(mattering)
        doc["why"] = found.why or (None if mattering else "no MX host has validated TLSA records")
        if mattering:
            doc["requires"] = "; ".join(_dane_requires(h) for h in mattering)
    if doc["requires"] == "nothing" and doc["why"]:
        doc["requires"] = f"nothing ({doc['why']})"
    return doc


def _dane_requires(status: dane.HostStatus) -> str:
    if status.status == dane.USABLE:
        return f"{status.host}: TLS with a certificate matching its TLSA records"
    if status.status == dane.UNUSABLE:
        return f"{status.host}: TLS (no usable TLSA record: the certificate is not checked)"
    return f"{status.host}: not used (TLSA lookup failed: {status.error})"


def _sts_facts(sts: tlsrpt.StsRound | None, effective: Decision) -> dict[str, Any]:
    if sts is None:
        return {"applies": False, "why": "routed mail: MTA-STS is about MX hosts"}
    policy = sts.policy
    doc: dict[str, Any] = {"applies": True, "policy_id": None, "mode": None, "mx": [],
                           "max_age": None, "error": sts.error, "skipped": sts.skipped}  # fmt: skip
    if policy is not None:
        doc.update(policy_id=policy.id, mode=policy.mode, mx=list(policy.mx),
                   max_age=policy.max_age)  # fmt: skip
    requires = {
        mtasts.ENFORCE: "verified TLS to an MX host matching the policy",
        mtasts.TESTING: "nothing (testing: failures are reported)",
    }
    doc["requires"] = requires.get(policy.mode if policy else "", "nothing")
    return doc


async def _tlsrpt(resolver: Any, domain: str) -> dict[str, Any]:
    try:
        return {"rua": await tlsrpt.rua_addresses(resolver, domain), "error": None}
    except Exception as exc:  # a DNS failure is a fact of the report
        return {"rua": [], "error": f"_smtp._tls.{domain} lookup failed: {exc}"}


def _key(hop: Hop) -> tuple[str, int, str]:
    return hop.peer.address, hop.peer.port, hop.peer.tls_name


def _hosts(
    planner: Planner, plans: dict[TlsMode, Plan], at_rules: Plan
) -> dict[tuple[str, int, str], HostReport]:
    """Every address some plan would try, in the order first met, with its DANE status."""
    found: dict[tuple[str, int, str], HostReport] = {}
    round_ = at_rules.report.dane if at_rules.report is not None else None
    for plan in plans.values():
        for hop in plan.hops:
            if _key(hop) in found:
                continue
            dest, peer = hop.host.destination, hop.peer
            broken = planner.tls(plan, hop).remembered_broken
            tlsa = round_.status_of(dest.host) if round_ is not None else None
            found[_key(hop)] = HostReport(peer.host, peer.address, peer.port, peer.tls_name,
                                          dest.source, dest.preference, broken,
                                          tlsa=tlsa)  # fmt: skip
    return found


# --------------------------------------------------------------------------- probing


async def _probe_all(
    planner: Planner,
    plans: dict[TlsMode, Plan],
    hosts: dict[tuple[str, int, str], HostReport],
    timeouts: Timeouts,
    limit: float,
) -> None:
    """The probes at every address, one after another, all within ``limit`` seconds."""
    settings = _settings(planner, plans)
    try:
        async with asyncio.timeout(limit):
            for key, host in hosts.items():
                base, at_dane = settings[key]
                host.plain = await probe(
                    _peer(host), replace(base, mode=TlsMode.ENFORCED), timeouts
                )
                if at_dane is not None:
                    host.dane_probe = await probe(_peer(host), at_dane, timeouts)
                if host.plain.attempt.tls_version is None:
                    continue
                host.verified = await probe(
                    _peer(host), replace(base, mode=TlsMode.VERIFIED), timeouts
                )
                if host.plain.certificate:
                    host.leaf_verdict = leafcheck.verdict(
                        host.plain.certificate, host.tls_name, base.ca_file
                    )
    except TimeoutError:
        for key, host in hosts.items():
            no_dane = host.dane_probe is None and settings[key][1] is not None
            unverified = host.plain is not None and host.plain.attempt.tls_version
            if host.plain is None or no_dane or (unverified and host.verified is None):
                host.note = f"not probed: delivery.job_timeout ({limit:g}s) ran out"


def _settings(
    planner: Planner, plans: dict[TlsMode, Plan]
) -> dict[tuple[str, int, str], tuple[TlsSettings, TlsSettings | None]]:
    """Per address: the TLS material as a verified delivery would have it (platform CA and
    client certificate for intra-platform mail, else ``delivery.ca_file``; never "broken"), and
    the planner's settings at mode ``dane`` (the TLSA records and names) where a plan gives it."""
    pkix: dict[tuple[str, int, str], TlsSettings] = {}
    at_dane: dict[tuple[str, int, str], TlsSettings] = {}
    for plan in (plans[TlsMode.VERIFIED], *plans.values()):
        for hop in plan.hops:
            given = planner.tls(plan, hop)
            if given.mode.must_match_tlsa:
                at_dane.setdefault(_key(hop), given)
                given = planner.tls(plan, _without_dane(hop))
            base = replace(given, remembered_broken=False, check_leaf=False)
            pkix.setdefault(_key(hop), base)
    return {key: (base, at_dane.get(key)) for key, base in pkix.items()}


def _without_dane(hop: Hop) -> Hop:
    """The hop as the planner would give it to a ``verified`` delivery without DANE."""
    host = replace(hop.host, tls=TlsMode.VERIFIED, auth=Auth.PKIX, tlsa=())
    return replace(hop, host=host)


def _peer(host: HostReport) -> Peer:
    return Peer(host.host, host.address, host.port, host.tls_name)


# --------------------------------------------------------------------------- verdicts


def _verdict(
    mode: TlsMode,
    planner: Planner,
    plan: Plan,
    hosts: dict[tuple[str, int, str], HostReport],
    session_limit: int,
) -> Verdict:
    """Walk ``plan``'s hops as a delivery at ``mode`` would, with what the probes found."""
    effective = plan.decision.tls
    if plan.refused is not None:
        why = f"nothing to try: {plan.refused}"
        return Verdict(mode, effective, False, why, bounces=plan.refused.is_permanent)
    failures: list[str] = []
    sessions = 0
    for hop in plan.hops:
        if session_limit and sessions >= session_limit:
            failures.append(f"delivery.mx_session_limit ({session_limit}) reached")
            break
        host = hosts[_key(hop)]
        at = planner.tls(plan, hop)
        effective = effective.at_least(at.mode)  # intra-platform mail: at least verified
        done, why = judge(at.mode, at.remembered_broken, host)
        if done:
            return Verdict(mode, effective, True, why)
        failures.append(why)
        sessions += host.greeted
    return Verdict(mode, effective, False, "; ".join(failures) or "no host to try")
