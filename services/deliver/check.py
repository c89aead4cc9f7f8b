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
   with what the probes found, as a delivery would, within ``delivery.mx_session_limit``.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from cryptography import x509

from services.common.config import Config
from services.common.deliveryconfig import DeliveryConfig
from services.common.model import Decision, TlsMode
from services.deliver import dane, leafcheck, mtasts, mx, tlsrpt
from services.deliver.attempt import Peer, Timeouts, TlsSettings
from services.deliver.destination import Auth
from services.deliver.plan import Hop, Plan, Planner
from services.deliver.session import Probe, probe
from services.deliver.tls import Action, Situation, after_starttls, sends_in_clear, wants_starttls
from services.deliver.tls import Outcome as TlsOutcome

MODES = (TlsMode.OPPORTUNISTIC, TlsMode.ENFORCED, TlsMode.VERIFIED)
# OpenSSL X509_V_ERR_* codes a verified handshake reports, in words
VERIFY_ERRORS = {
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate (unknown issuer)",
    21: "unable to verify the first certificate",
    62: "certificate does not name the host",
}


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


@dataclass
class HostReport:
    """One address as the probes found it."""

    host: str
    address: str
    port: int
    tls_name: str  # the name verification checks
    source: str  # route | mx | implicit
    preference: int | None
    remembered_broken: bool = False
    plain: Probe | None = None  # the enforced-context probe
    verified: Probe | None = None  # the verified-context probe (when the first one got TLS)
    dane_probe: Probe | None = None  # the probe at mode dane (a host with usable TLSA records)
    leaf_verdict: str | None = None  # services.deliver.leafcheck's prediction (posture's)
    tlsa: dane.HostStatus | None = None  # DANE's status here (None: DANE not looked up)
    note: str = ""  # not probed: why

    def situation(self, mode: TlsMode) -> Situation | None:
        """What a session at ``mode`` learns here after EHLO; None: no session (next host)."""
        first = self.plain
        if first is None or first.attempt.outcome is None:
            return None  # no connection, no greeting or no EHLO
        if not first.starttls:
            return Situation.NOT_OFFERED
        if mode.must_match_tlsa:
            return self._dane_situation()
        if first.attempt.tls_version is None:
            return Situation.HANDSHAKE_FAILED
        if not mode.must_verify_chain:
            return Situation.HANDSHAKE_OK
        second = self.verified
        if second is None or second.attempt.outcome is None:
            return Situation.HANDSHAKE_FAILED
        if second.attempt.verify_code is not None:
            return Situation.VERIFY_FAILED
        return Situation.HANDSHAKE_OK if second.attempt.tls_version else Situation.HANDSHAKE_FAILED

    def _dane_situation(self) -> Situation:
        """What the session at mode ``dane`` learnt (its outcome is the TLS table's answer)."""
        outcome = self.dane_probe.attempt.outcome if self.dane_probe is not None else None
        if outcome is TlsOutcome.DANE_VERIFIED:
            return Situation.HANDSHAKE_OK
        if outcome in (TlsOutcome.NOT_OFFERED, TlsOutcome.DANE_FAILED):
            return Situation(outcome.value)
        return Situation.HANDSHAKE_FAILED  # the handshake failed, or that session never got there

    def tlsa_match(self) -> str | None:
        """Whether the server's certificate matches the TLSA records here, in words."""
        status = self.tlsa
        if status is None or not status.applies:
            return None
        if status.status == dane.UNUSABLE:
            return "no usable record: TLS required, the certificate is not checked"
        attempt = self.dane_probe.attempt if self.dane_probe is not None else None
        if attempt is not None and attempt.dane:
            return attempt.dane
        why = attempt.outcome.value if attempt is not None and attempt.outcome else "no session"
        return f"not checked: no TLS session at mode dane ({why})"

    @property
    def greeted(self) -> bool:
        return self.plain is not None and self.plain.attempt.greeted

    def to_json(self) -> dict[str, Any]:
        first, second = self.plain, self.verified
        return {
            "host": self.host, "address": self.address, "port": self.port,
            "tls_name": self.tls_name, "source": self.source, "preference": self.preference,
            "remembered_broken": self.remembered_broken,
            "connected": bool(first and first.attempt.greeted),
            "greeting": first.attempt.greeting if first else None,
            "starttls": first.starttls if first else None,
            "tls_version": first.attempt.tls_version if first else None,
            "cipher": first.attempt.cipher if first else None,
            "error": str(first.attempt.error) if first and first.attempt.error else None,
            "requiretls": first.requiretls if first and first.attempt.tls_version else None,
            "certificate": certificate_facts(first.certificate) if first else None,
            "verification": verification_facts(second) if second else None,
            "leaf_verdict": self.leaf_verdict, "note": self.note or None,
            "tlsa": {**self.tlsa.to_json(), "match": self.tlsa_match()} if self.tlsa else None,
        }  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """Whether a round at ``mode`` would deliver, and how, or why not."""

    mode: TlsMode  # asked for
    effective: TlsMode  # after the destination policy (MTA-STS enforce raises it)
    delivers: bool
    how: str  # "over TLS at HOST", "in clear at HOST (not_offered)", or why it would not
    bounces: bool = False  # nothing to try, for good (NXDOMAIN, null MX): a bounce, not a deferral

    @property
    def text(self) -> str:
        raised = f" (raised to {self.effective.label})" if self.effective != self.mode else ""
        return f"{self.mode.label}{raised}: {self.fate}: {self.how}"

    @property
    def fate(self) -> str:
        if self.delivers:
            return "would deliver"
        return "would bounce" if self.bounces else "would defer"

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode.label, "effective": self.effective.label,
                "delivers": self.delivers, "fate": self.fate, "how": self.how}  # fmt: skip


@dataclass
class Report:
    domain: str
    decision: Decision  # what the rules give the domain
    routing: list[str] = field(default_factory=list)
    refused: str | None = None  # the plan could not try anything (DNS, policy): why
    mta_sts: dict[str, Any] = field(default_factory=dict)
    tlsrpt: dict[str, Any] = field(default_factory=dict)
    dane: dict[str, Any] = field(default_factory=dict)  # DNSSEC, TLSA per MX host, requires
    hosts: list[HostReport] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def at_rules(self) -> Verdict:
        """The verdict at the mode the rules give the domain."""
        return next(v for v in self.verdicts if v.mode == self.decision.tls)

    @property
    def ok(self) -> bool:
        return self.at_rules.delivers

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "rules": {"tls": self.decision.tls.label,
                      "circumstances": list(self.decision.circumstances),
                      "route": str(self.decision.route) if self.decision.route else None,
                      "reasons": list(self.decision.reasons)},
            "routing": self.routing, "refused": self.refused, "mta_sts": self.mta_sts,
            "tlsrpt": self.tlsrpt, "dane": self.dane,
            "hosts": [h.to_json() for h in self.hosts],
            "verdicts": [v.to_json() for v in self.verdicts],
            "at_rules": self.at_rules.to_json(), "ok": self.ok, "notes": self.notes,
        }  # fmt: skip


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
            line += f" (DNSSEC: MX {_secure(dest.mx_secure)}, addresses "
            line += f"{_secure(dest.address_secure)})"
        report.routing.append(line)
    report.mta_sts = _sts_facts(plan.report, plan.decision)
    report.dane = _dane_facts(plan, delivery)


def _secure(validated: bool) -> str:
    return "validated" if validated else "not validated"


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


def judge(mode: TlsMode, remembered_broken: bool, host: HostReport) -> tuple[bool, str]:
    """(would deliver here, how or why not) for a session at ``mode`` — the TLS table's answer."""
    where = f"{host.host} [{host.address}]:{host.port}"
    if host.note:
        return False, f"{where}: {host.note}"
    if host.plain is None or not host.greeted or host.plain.attempt.outcome is None:
        error = host.plain.attempt.error if host.plain is not None else None
        return False, f"{where}: no session ({error or 'not probed'})"
    action, outcome = wants_starttls(mode, remembered_broken)
    if action is Action.TRY_TLS:
        situation = host.situation(mode)
        assert situation is not None
        action, outcome = after_starttls(mode, situation)
    reason = outcome.value if outcome is not None else "?"
    if sends_in_clear(action):
        return True, f"in clear at {where} ({reason})"
    if action is Action.SEND_TLS:
        if mode.must_match_tlsa:
            assert host.dane_probe is not None  # HANDSHAKE_OK at mode dane comes from that probe
            third = host.dane_probe.attempt
            return True, f"over DANE-verified TLS at {where} ({third.tls_version}: {third.dane})"
        first = host.plain.attempt
        verified = " verified" if mode.must_verify_chain else ""
        return True, f"over{verified} TLS at {where} ({first.tls_version})"
    detail = _tls_detail(host, mode)
    return False, f"TLS required but not available at {where} ({reason}{detail})"


def _tls_detail(host: HostReport, mode: TlsMode) -> str:
    if mode.must_match_tlsa:
        third = host.dane_probe.attempt if host.dane_probe is not None else None
        return f": {third.dane}" if third is not None and third.dane else ""
    second = host.verified
    if mode.must_verify_chain and second is not None:
        code = second.attempt.verify_code
        if code is not None:
            return f": {VERIFY_ERRORS.get(code, f'verify error {code}')}"
        if second.attempt.error is not None and host.plain and host.plain.attempt.tls_version:
            return f": the verified handshake failed ({host.plain.attempt.tls_version} works only)"
    return ""


# --------------------------------------------------------------------------- certificate facts


def certificate_facts(der: bytes | None, now: float | None = None) -> dict[str, Any] | None:
    """Subject names, issuer and validity of a leaf (DER); None without one."""
    if not der:
        return None
    now = time.time() if now is None else now
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return {"error": f"unreadable certificate: {exc}"}
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*sans.get_values_for_type(x509.DNSName),
                 *(str(a) for a in sans.get_values_for_type(x509.IPAddress))]  # fmt: skip
    except x509.ExtensionNotFound:
        names = []
    expires = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "names": names,
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": expires.isoformat(),
        "days_left": int((expires.timestamp() - now) // 86400),
    }


def verification_facts(second: Probe) -> dict[str, Any]:
    """What the verified handshake said."""
    attempt = second.attempt
    if attempt.tls_version is not None and attempt.error is None:
        return {"ok": True, "why": None}
    code = attempt.verify_code
    if code is not None:
        return {"ok": False, "why": VERIFY_ERRORS.get(code, f"verify error {code}")}
    return {"ok": False, "why": f"handshake failed: {attempt.error}"}


# --------------------------------------------------------------------------- text


def text_lines(report: Report, ca_name: str) -> list[str]:
    """The report as the command prints it."""
    d = report.decision
    lines = [
        f"{report.domain}: checked live, no mail sent",
        f"rules: tls {d.tls.label} ({', '.join(d.circumstances)}) for a message without content "
        f"from <> to postmaster@{report.domain}",
        *(f"  - {reason}" for reason in d.reasons),
    ]
    if d.route is not None:
        lines.append(f"  route: {d.override_route}")
    lines.append("routing: " + ("; ".join(report.routing) or "none"))
    if report.refused:
        lines.append(f"  nothing to try: {report.refused}")
    lines.append(_sts_line(report.mta_sts))
    rua = report.tlsrpt
    lines.append(f"TLSRPT: {rua['error'] or ', '.join(rua['rua']) or 'no mailto rua published'}")
    lines.append(_dane_line(report.dane))
    for host in report.hosts:
        lines.extend(_host_lines(host, ca_name))
    lines.append("verdicts:")
    lines.extend(f"  {v.text}" for v in report.verdicts)
    lines.append(f"  MTA-STS requires: {report.mta_sts.get('requires', 'nothing')}")
    lines.append(f"  DANE requires: {report.dane.get('requires', 'nothing')}")
    lines.extend(f"note: {n}" for n in report.notes)
    at = report.at_rules
    fate = "can take mail" if at.delivers else "cannot take mail"
    lines.append(f"{report.domain} {fate} at the mode the rules give it ({d.tls.label})")
    return lines


def _sts_line(sts: dict[str, Any]) -> str:
    if not sts.get("applies"):
        return f"MTA-STS: not applied ({sts.get('why')})"
    if sts.get("mode") is None:
        fetch = f"; lookup failed: {sts['error']}" if sts.get("error") else ""
        return f"MTA-STS: no policy{fetch}"
    text = (f"MTA-STS: policy {sts['policy_id']} mode {sts['mode']}, mx {', '.join(sts['mx'])}, "
            f"max_age {sts['max_age']}")  # fmt: skip
    if sts.get("error"):
        text += f"; refresh failed: {sts['error']}"
    if sts.get("skipped"):
        text += f"; MX hosts outside the policy: {', '.join(sts['skipped'])}"
    return text


def _dane_line(facts: dict[str, Any]) -> str:
    mx_secure = facts.get("mx_secure")
    dnssec = "" if mx_secure is None else f"; MX records {_secure(mx_secure)}"
    if not facts.get("applies"):
        return f"DANE: not applied ({facts.get('why')}){dnssec}"
    hosts = ", ".join(f"{h['host']} {h['status']}" for h in facts["hosts"])
    return f"DANE: applies{dnssec}; TLSA per MX host: {hosts}"


def _host_lines(host: HostReport, ca_name: str) -> Sequence[str]:
    doc = host.to_json()
    lines = [f"host {host.host} [{host.address}]:{host.port} (certificate name {host.tls_name})"]
    if host.note:
        lines.append(f"  {host.note}")
    if not doc["connected"] or doc["starttls"] is None:
        lines.append(f"  no session: {doc['error']}")
        return lines
    lines.append(f"  greeting: {doc['greeting']}")
    if not doc["starttls"]:
        lines.append("  STARTTLS: not offered")
    elif doc["tls_version"] is None:
        lines.append(f"  STARTTLS: offered; handshake failed: {doc['error']}")
    else:
        lines.append(f"  STARTTLS: offered; handshake: {doc['tls_version']} {doc['cipher']}")
        lines.append(f"  REQUIRETLS after TLS: {'yes' if doc['requiretls'] else 'no'}")
    cert = doc["certificate"]
    if cert and "names" in cert:
        lines.append(f"  certificate: names {', '.join(cert['names']) or '(none)'}; issuer "
                     f"{cert['issuer']}; expires {cert['not_after'][:10]} ({cert['days_left']} "
                     "days)")  # fmt: skip
    check = doc["verification"]
    if check is not None:
        result = "verifies" if check["ok"] else f"does not verify: {check['why']}"
        lines.append(f"  for {host.tls_name} against {ca_name}: {result}")
        lines.append(f"  leaf check (what posture predicts): {host.leaf_verdict}")
    lines.extend(_tlsa_lines(host))
    if host.remembered_broken:
        lines.append("  remembered as TLS broken: opportunistic mail goes in clear meanwhile")
    return lines


def _tlsa_lines(host: HostReport) -> list[str]:
    status = host.tlsa
    if status is None:
        return []
    records = ", ".join(str(r) for r in status.records) or "none"
    lines = [f"  TLSA ({dane.tlsa_name(host.host, host.port)}): {status.status}; {records}"]
    match = host.tlsa_match()
    if match is not None:
        lines.append(f"  certificate against TLSA: {match}")
    return lines
