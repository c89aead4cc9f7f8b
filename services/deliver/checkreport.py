"""What ``tlsrelay check DOMAIN`` found, and how it is shown: the report's types
(:class:`HostReport` per address, :class:`Verdict` per mode, :class:`Report`), the TLS table's
answer for one address (:func:`judge`), the leaf certificate's facts, and the report as text
(:func:`text_lines`) or JSON (``Report.to_json``).

:mod:`services.deliver.check` plans and probes and fills these in; nothing here touches the
network, DNS or Redis. A verdict walks the same TLS table a delivery does
(:func:`services.deliver.tls.wants_starttls` / :func:`~services.deliver.tls.after_starttls`) with
what the probes found.

Failure: none of its own. What went wrong at a host (no session, a failed handshake, an
unreadable certificate) is a fact of the report, worded here, never an exception.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from services.common.model import Decision, TlsMode
from services.deliver import dane
from services.deliver.session import Probe
from services.deliver.tls import Action, Situation, after_starttls, sends_in_clear, wants_starttls
from services.deliver.tls import Outcome as TlsOutcome

# OpenSSL X509_V_ERR_* codes a verified handshake reports, in words
VERIFY_ERRORS = {
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate (unknown issuer)",
    21: "unable to verify the first certificate",
    62: "certificate does not name the host",
}


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


# --------------------------------------------------------------------------- verdicts


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
    dnssec = "" if mx_secure is None else f"; MX records {dnssec_word(mx_secure)}"
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


def dnssec_word(validated: bool) -> str:
    """How DNSSEC status reads in the report (also in the check's routing lines)."""
    return "validated" if validated else "not validated"
