"""SMTP TLS reporting (RFC 8460): count TLS sessions per policy domain and day, build the reports.

Recording (deliver worker): :func:`stage` buffers ``HINCRBY``s on one hash per UTC day,
``tlsrelay:tlsrpt:<YYYY-MM-DD>``, into the caller's transaction (``Ledger.record``): no round
trip of its own. Fields are JSON arrays:

- ``["policy", domain, pkey]`` → the policy that applied (RFC 8460 §4.4 ``policy`` object);
  ``pkey`` is ``sts:<id>``, ``sts`` (the domain publishes MTA-STS but no policy could be had),
  ``none`` (``no-policy-found``) or, for an MX host DANE applies to (or whose TLSA lookup
  failed), ``tlsa:<mx host>`` (``policy-type: tlsa``, its TLSA records as the policy strings);
- ``["ok", domain, pkey]`` → successful TLS sessions;
- ``["fail", domain, pkey, result-type, sending-mta-ip, receiving-mx-hostname, receiving-ip,
  failure-reason-code]`` → failed sessions.

A session is one new connection that asked for TLS (a reused pooled session is not a new one,
but a successor session — services/deliver/pool.py — is counted with its first transaction;
a connection that never got to EHLO and mode ``none`` are no TLS sessions). Result types
(§4.3.2): STARTTLS not offered → ``starttls-not-supported``; certificate name →
``certificate-host-mismatch``; expired → ``certificate-expired``; chain →
``certificate-not-trusted`` (in MTA-STS ``testing`` mode, where the session does not verify,
name and dates of the leaf are checked afterwards: ``Attempt.verify_code``); a broken
handshake, a host remembered as broken, an MX host outside the MTA-STS policy →
``validation-failure`` (with a failure-reason-code); the policy fetch →
``sts-policy-fetch-error`` / ``sts-policy-invalid`` / ``sts-webpki-invalid``; DANE (§4.3.2.1): a
certificate that matched no TLSA record → ``tlsa-invalid``, a failed TLSA lookup →
``dnssec-invalid``, an MX host a REQUIRETLS message could not use because its MX records were not
DNSSEC-validated (RFC 8689 §4.2.1) → ``dane-required``. Routed mail is
not recorded (no policy domain's MX was involved). Hashes expire after :data:`RETENTION`.

Reporting (``tlsrelay tlsrpt build --date YYYY-MM-DD``): :func:`build` reads the day's hash and
writes one gzip JSON report per policy domain, named per §5.3
``<reporting-domain>!<policy-domain>!<begin>!<end>.json.gz``; for a domain whose
``_smtp._tls`` TXT record (§3) names ``mailto:`` addresses in ``rua`` it queues the report as a
message through the relay (§5.3: ``multipart/report; report-type="tlsrpt"`` with the report as
``application/tlsrpt+gzip``), with ``TLS-Required: No`` (RFC 8689) so the TLS failure it reports
cannot hold it up. A domain's report is queued once per day (re-running ``build`` rewrites the
files but does not send twice). Not done: ``https:`` rua submission, DKIM signing (§5.3).

Failure: Redis errors propagate; a domain whose ``_smtp._tls`` lookup fails is written to a
file but not mailed (said in the result).
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import json
import re
import secrets
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
import redis

from services.common import spool
from services.common.model import Envelope, new_message_id
from services.deliver import dane, mtasts
from services.deliver.attempt import Attempt
from services.deliver.dane import DaneRound
from services.deliver.tls import Outcome as TlsOutcome

KEY_PREFIX = spool.PREFIX + "tlsrpt:"
RETENTION = 8 * 86400  # a day's counts are kept this long after the last one
MEDIA_TYPE = "application/tlsrpt+gzip"  # §5.3 (gzip-compressed report)
SUCCESS = "success"


def day_key(day: str) -> str:
    return f"{KEY_PREFIX}{day}"


def sent_key(day: str) -> str:
    """Set of policy domains whose report for ``day`` was queued as mail."""
    return f"{KEY_PREFIX}sent:{day}"


def utc_day(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


# --------------------------------------------------------------------------- recording


@dataclass
class StsRound:
    """What MTA-STS meant for one delivery round of one domain (trace, TLSRPT, metrics)."""

    domain: str
    policy: mtasts.Policy | None = None  # the policy applied or tested (None: none)
    relaxed: bool = False  # TLS-Required: No on the message (RFC 8689 §5)
    skipped: list[str] = field(default_factory=list)  # MX hosts outside the enforced policy
    error: str | None = None  # the lookup's failure (a cached policy may still apply)
    error_type: str | None = None  # its RFC 8460 result type
    dane: DaneRound | None = None  # DANE's part (None: DANE is not active)
    requiretls_skipped: list[str] = field(default_factory=list)  # RFC 8689 §4.2.1: not validated

    @property
    def mode(self) -> str | None:
        return self.policy.mode if self.policy is not None else None

    def trace_fields(self) -> dict[str, Any]:
        policy = self.policy
        return {
            "domain": self.domain,
            "mode": policy.mode if policy else None,
            "policy_id": policy.id if policy else None,
            "mx": list(policy.mx) if policy else [],
            "relaxed": "TLS-Required: No (RFC 8689 §5)" if self.relaxed else None,
            "skipped": self.skipped,
            "error": self.error,
        }


def classify(attempt: Attempt, round_: StsRound) -> tuple[str, str] | None:
    """(result type or ``success``, failure-reason-code) of one attempt; None: no TLS session."""
    outcome = attempt.outcome
    new = not attempt.reused or attempt.opened_ahead  # a successor's session is new too
    if not new or outcome is None or outcome is TlsOutcome.DISABLED:
        return None
    if outcome is TlsOutcome.DANE_FAILED:
        return "tlsa-invalid", ""  # §4.3.2.1: the certificate matched no TLSA record
    policy = round_.policy
    tested = policy is not None and policy.mode != mtasts.NONE
    sts_host = _pkey(round_, attempt.peer.host) == policy_key(round_)
    if sts_host and tested and policy and not mtasts.mx_matches(attempt.peer.host, policy.mx):
        return "validation-failure", "mx-not-in-policy"  # only seen in testing mode
    checked = outcome is TlsOutcome.TLS and attempt.verify_code is not None  # testing mode
    if outcome is TlsOutcome.VERIFY_FAILED or checked:
        if attempt.verify_code == mtasts.HOSTNAME_MISMATCH:
            return "certificate-host-mismatch", ""
        if attempt.verify_code == mtasts.CERT_HAS_EXPIRED:
            return "certificate-expired", ""
        return "certificate-not-trusted", ""
    if outcome in (TlsOutcome.TLS, TlsOutcome.TLS_VERIFIED, TlsOutcome.DANE_VERIFIED):
        return SUCCESS, ""
    if outcome is TlsOutcome.NOT_OFFERED:
        return "starttls-not-supported", ""
    return "validation-failure", outcome.value  # handshake_failed, remembered_broken


def policy_key(round_: StsRound) -> str:
    """The key of the domain's own (MTA-STS or no) policy."""
    if round_.policy is not None:
        return f"sts:{round_.policy.id}"
    return "sts" if round_.error_type else "none"


def _pkey(round_: StsRound, host: str) -> str:
    """The policy of one MX host: its TLSA RRset (``tlsa:<host>``) where DANE applies to it
    (or its TLSA lookup failed), else the domain's."""
    found = round_.dane.status_of(host) if round_.dane is not None else None
    if found is not None and (found.applies or found.status == dane.LOOKUP_ERROR):
        return f"tlsa:{host}"
    return policy_key(round_)


def policy_object(round_: StsRound, pkey: str | None = None) -> dict[str, Any]:
    """RFC 8460 §4.4 ``policy``: what applied to the domain (or, ``pkey`` ``tlsa:<host>``, to
    that MX host: ``policy-type: tlsa`` with its TLSA records as the policy strings)."""
    if pkey is not None and pkey.startswith("tlsa:"):
        host = pkey.removeprefix("tlsa:")
        found = round_.dane.status_of(host) if round_.dane is not None else None
        tlsa: dict[str, Any] = {"policy-type": "tlsa", "policy-domain": round_.domain}
        if found is not None and found.records:
            tlsa["policy-string"] = [str(r) for r in found.records]
        tlsa["mx-host"] = [host]
        return tlsa
    policy = round_.policy
    if policy is None and not round_.error_type:
        return {"policy-type": "no-policy-found", "policy-domain": round_.domain}
    doc: dict[str, Any] = {"policy-type": "sts", "policy-domain": round_.domain}
    if policy is not None:
        doc["policy-string"] = policy.lines
        doc["mx-host"] = list(policy.mx)
    return doc


Detail = tuple[str, str, str, str, str]  # result type, sending IP, MX host, MX IP, reason code


@dataclass
class _Tally:
    successes: int = 0
    failures: dict[Detail, int] = field(default_factory=dict)

    def fail(self, detail: Detail) -> None:
        self.failures[detail] = self.failures.get(detail, 0) + 1


def tally(round_: StsRound, attempts: Sequence[Attempt]) -> dict[str, _Tally]:
    """Per policy key: successful sessions, and failed ones by (result type, sending IP, MX,
    IP, reason)."""
    found: dict[str, _Tally] = {}
    for attempt in attempts:
        result = classify(attempt, round_)
        if result is None:
            continue
        entry = found.setdefault(_pkey(round_, attempt.peer.host), _Tally())
        if result[0] == SUCCESS:
            entry.successes += 1
            continue
        peer = attempt.peer
        entry.fail((result[0], attempt.local_address or "", peer.host, peer.address, result[1]))
    domain_key = policy_key(round_)
    for host in round_.skipped:
        found.setdefault(domain_key, _Tally()).fail(
            ("validation-failure", "", host, "", "mx-not-in-policy")
        )
    for host in round_.requiretls_skipped:  # RFC 8689 §4.2.1: no validated MX record
        found.setdefault(_pkey(round_, host), _Tally()).fail(("dane-required", "", host, "", ""))
    if round_.error_type:
        detail = (round_.error_type, "", "", "", (round_.error or "")[:200])
        found.setdefault(domain_key, _Tally()).fail(detail)
    for status in round_.dane.hosts if round_.dane is not None else ():
        if status.status == dane.LOOKUP_ERROR:  # §4.3.2.1: no valid records from the resolver
            detail = ("dnssec-invalid", "", status.host, "", status.error[:200])
            found.setdefault(_pkey(round_, status.host), _Tally()).fail(detail)
    return found


def stage(
    pipe: redis.client.Pipeline, round_: StsRound, attempts: Sequence[Attempt], now: float
) -> int:
    """Buffer this round's counts into ``pipe``; return the number of failures counted."""
    key, domain, counted, staged = day_key(utc_day(now)), round_.domain, 0, False
    for pkey, entry in tally(round_, attempts).items():
        if not entry.successes and not entry.failures:
            continue
        staged = True
        policy = json.dumps(policy_object(round_, pkey))
        pipe.hset(key, json.dumps(["policy", domain, pkey]), policy)
        if entry.successes:
            pipe.hincrby(key, json.dumps(["ok", domain, pkey]), entry.successes)
        for detail, count in entry.failures.items():
            pipe.hincrby(key, json.dumps(["fail", domain, pkey, *detail]), count)
        counted += sum(entry.failures.values())
    if staged:
        pipe.expire(key, RETENTION)
    return counted


# --------------------------------------------------------------------------- reports


@dataclass
class _PolicyDay:
    policy: dict[str, Any] = field(default_factory=dict)
    successes: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        failed = sum(f["failed-session-count"] for f in self.failures)
        doc: dict[str, Any] = {
            "policy": self.policy,
            "summary": {
                "total-successful-session-count": self.successes,
                "total-failure-session-count": failed,
            },
        }
        if self.failures:
            doc["failure-details"] = self.failures
        return doc


def read_day(client: redis.Redis, day: str) -> dict[str, dict[str, _PolicyDay]]:
    """policy domain → pkey → what was counted that day."""
    raw: dict[bytes, bytes] = client.hgetall(day_key(day))  # type: ignore[assignment]
    found: dict[str, dict[str, _PolicyDay]] = {}
    for name, value in raw.items():
        kind, domain, pkey, *detail = json.loads(name)
        entry = found.setdefault(domain, {}).setdefault(pkey, _PolicyDay())
        if kind == "policy":
            entry.policy = json.loads(value)
        elif kind == "ok":
            entry.successes += int(value)
        else:
            entry.failures.append(_failure(detail, int(value)))
    for policies in found.values():
        for entry in policies.values():
            entry.failures.sort(key=lambda f: (f["result-type"], json.dumps(f, sort_keys=True)))
    return found


def _failure(detail: list[str], count: int) -> dict[str, Any]:
    result_type, sending_ip, mx_host, receiving_ip, reason = detail
    doc: dict[str, Any] = {"result-type": result_type}
    if sending_ip:
        doc["sending-mta-ip"] = sending_ip
    if mx_host:
        doc["receiving-mx-hostname"] = mx_host
    if receiving_ip:
        doc["receiving-ip"] = receiving_ip
    doc["failed-session-count"] = count
    if reason:
        doc["failure-reason-code"] = reason
    return doc


def day_range(day: str) -> tuple[datetime, datetime]:
    """The UTC day as [start, end] (end = 23:59:59, as in RFC 8460 §4.4's example)."""
    start = datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC)
    return start, start + timedelta(days=1, seconds=-1)


def report(hostname: str, domain: str, policies: dict[str, _PolicyDay], day: str) -> dict[str, Any]:
    """The RFC 8460 §4.4 report of ``domain`` for ``day``."""
    start, end = day_range(day)
    return {
        "organization-name": hostname,
        "date-range": {
            "start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end-datetime": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "contact-info": f"postmaster@{hostname}",
        "report-id": f"{day}.{domain}@{hostname}",
        "policies": [policies[pkey].to_json() for pkey in sorted(policies)],
    }


def file_name(hostname: str, domain: str, day: str) -> str:
    """§5.3: ``sender!policy-domain!begin-timestamp!end-timestamp.json.gz`` (Unix seconds)."""
    start, end = day_range(day)
    return f"{hostname}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}.json.gz"


_RUA_MAILTO = re.compile(r"^mailto:([^?\s]+@[^?\s]+)", re.I)


def parse_tlsrpt_txt(records: Sequence[str]) -> list[str]:
    """The ``mailto:`` addresses of the one ``v=TLSRPTv1`` record (§3); [] when not exactly one."""
    candidates = [r for r in records if re.match(r"^v=TLSRPTv1\s*;", r)]
    if len(candidates) != 1:
        return []
    addresses: list[str] = []
    for part in candidates[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "rua":
            for uri in value.split(","):
                m = _RUA_MAILTO.match(uri.strip())
                if m:
                    addresses.append(email.utils.unquote(m.group(1)))
    return addresses


async def rua_addresses(resolver: dns.asyncresolver.Resolver, domain: str) -> list[str]:
    """Where ``domain`` wants reports by mail; raises ``dns.exception.DNSException`` when the
    lookup fails (NXDOMAIN / no record: [])."""
    try:
        answer = await resolver.resolve(f"_smtp._tls.{domain}", dns.rdatatype.TXT, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return parse_tlsrpt_txt([b"".join(r.strings).decode("utf-8", "replace") for r in answer])


def report_message(
    hostname: str, domain: str, doc: dict[str, Any], recipients: Sequence[str], now: float
) -> tuple[Envelope, bytes]:
    """The report as mail (§5.3), with ``TLS-Required: No`` (RFC 8689 §5)."""
    name = file_name(hostname, domain, doc["date-range"]["start-datetime"][:10])
    payload = gzip.compress(json.dumps(doc, indent=1).encode(), mtime=0)
    boundary = f"tlsrelay-tlsrpt-{secrets.token_hex(8)}"
    message_id = new_message_id()
    sender = f"noreply-smtp-tls-reporting@{hostname}"
    head = [
        f"From: TLS reporting <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in recipients)}",
        f"Subject: Report Domain: {domain} Submitter: {hostname} Report-ID: <{doc['report-id']}>",
        f"Date: {email.utils.formatdate(now, usegmt=True)}",
        f"Message-ID: <{message_id}.tlsrpt@{hostname}>",
        f"TLS-Report-Domain: {domain}",
        f"TLS-Report-Submitter: {hostname}",
        "TLS-Required: No",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"This is an aggregate TLS report (RFC 8460) from {hostname} for {domain}.",
        "",
        f"--{boundary}",
        f"Content-Type: {MEDIA_TYPE}",
        "Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{name}"',
        "",
        *_base64_lines(payload),
        "",
        f"--{boundary}--",
        "",
    ]
    body = "\r\n".join(head).encode("ascii")
    envelope = Envelope(
        id=message_id, sender=sender, recipients=tuple(recipients), client_address="127.0.0.1",
        client_helo=hostname, received_at=now, size=len(body), tls_required_no=True,
    )  # fmt: skip
    return envelope, body


def _base64_lines(payload: bytes) -> list[str]:
    text = base64.b64encode(payload).decode("ascii")
    return [text[i : i + 76] for i in range(0, len(text), 76)]


@dataclass(frozen=True)
class Built:
    """One domain's report: where it was written and whom it was mailed to."""

    domain: str
    path: Path
    mailed_to: tuple[str, ...] = ()
    note: str = ""  # why it was not mailed (no rua, already sent, lookup failed)


async def build(
    client: redis.Redis,
    resolver: dns.asyncresolver.Resolver,
    hostname: str,
    day: str,
    out_dir: Path,
    trace_ttl: float = spool.TRACE_TTL,
) -> list[Built]:
    """Write every report of ``day`` into ``out_dir``; queue those with a mailto rua."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for domain, policies in sorted(read_day(client, day).items()):
        doc = report(hostname, domain, policies, day)
        path = out_dir / file_name(hostname, domain, day)
        path.write_bytes(gzip.compress(json.dumps(doc, indent=1).encode(), mtime=0))
        results.append(await _mail(client, resolver, hostname, domain, doc, path, trace_ttl))
    return results


async def _mail(
    client: redis.Redis,
    resolver: dns.asyncresolver.Resolver,
    hostname: str,
    domain: str,
    doc: dict[str, Any],
    path: Path,
    trace_ttl: float,
) -> Built:
    day = doc["date-range"]["start-datetime"][:10]
    if client.sismember(sent_key(day), domain):
        return Built(domain, path, note="already mailed")
    try:
        recipients = await rua_addresses(resolver, domain)
    except (dns.exception.DNSException, ssl.SSLError, OSError) as exc:
        return Built(domain, path, note=f"_smtp._tls lookup failed: {exc}")
    if not recipients:
        return Built(domain, path, note="no mailto rua")
    envelope, body = report_message(hostname, domain, doc, recipients, time.time())
    with client.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, body, trace_ttl, tlsrpt_for=domain)
        pipe.sadd(sent_key(day), domain)
        pipe.expire(sent_key(day), RETENTION)
        pipe.execute()
    return Built(domain, path, tuple(recipients))
