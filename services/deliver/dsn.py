"""Delivery status notifications (RFC 3464): the bounce and the delay notice.

``build(...)`` is pure: from the original envelope, the original message's bytes and one
:class:`RecipientReport` per recipient it returns the DSN as a new :class:`Envelope` (null
reverse-path ``<>``, addressed to the original sender) and its bytes. The caller queues it through
the normal pipeline (``spool.stage_message``) in the same transaction that records the outcome.

Shape: ``multipart/report; report-type=delivery-status`` with a human-readable ``text/plain``
part (what happened, and for TLS failures which host, that TLS was required and by which rule),
a ``message/delivery-status`` part (``Reporting-MTA``, ``Arrival-Date``, then per recipient
``Final-Recipient``, ``Action``, ``Status``, ``Remote-MTA``, ``Diagnostic-Code``) and the
original headers as ``text/rfc822-headers`` (RFC 6522). Never call it for a message whose
reverse-path is null (RFC 3461 §6.2: no DSN about a DSN) — :func:`wanted` says so.

Protection is decided when the DSN is made (:func:`protection`), never left to how the DSN is
classified later. A DSN about a message whose decision required TLS is **redacted**: no returned
headers, and the circumstances that required TLS are named without the reasons (which quote what
a rule matched, e.g. the Subject); it then travels like any DSN, so the sender is always told.
When the original carried ``REQUIRETLS`` (RFC 8689 §5), the DSN is sent with ``REQUIRETLS``
instead (so it is itself relayed only over verified TLS) and keeps the headers and reasons; its
redacted twin is made at the same time (:attr:`Notice.fallback`) and stored with it. Should that
DSN fail for good (the sender's server has no STARTTLS or no REQUIRETLS, until the queue
lifetime; or a 5.7.30 at once), the twin goes instead, without REQUIRETLS
(:func:`fallback_due`, :func:`fallback_envelope`), so the sender is still told. The twin has no
twin, and a DSN about a DSN is never sent.

Remote text (reply text, host names) is folded to one line and stripped of control characters
wherever it lands in a field (:func:`one_line`), so a server cannot forge report fields.

:func:`notice` decides which DSN a recorded delivery round calls for: a bounce for its failed
recipients, else (once per message, ``delivery.delay_warning_after`` after arrival) a delay
notice for its deferred ones, else none.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from services.common.model import Decision, Envelope, Reply, new_message_id
from services.common.protocol import REQUIRETLS, TLS_REQUIRED_STATUSES

if TYPE_CHECKING:
    from services.deliver.delivery import Outcome, Round

FAILED, DELAYED = "failed", "delayed"
OPEN, REDACTED, WITH_REQUIRETLS = "open", "redacted", "requiretls"  # see protection()
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def one_line(text: str, limit: int = 500) -> str:
    """Remote text made safe for one header-like field: line breaks and other control
    characters become one space, and it is cut at ``limit`` characters."""
    return _CONTROL.sub(" ", text).strip()[:limit]


def protection(envelope: Envelope, decisions: Sequence[Decision | None]) -> str:
    """How a DSN about ``envelope`` must travel: ``WITH_REQUIRETLS`` when the original carried
    REQUIRETLS, else ``REDACTED`` when any of its decisions required TLS, else ``OPEN``."""
    if REQUIRETLS in (o.upper() for o in envelope.mail_options):
        return WITH_REQUIRETLS
    if any(d is not None and d.tls.requires_encryption for d in decisions):
        return REDACTED
    return OPEN


@dataclass(frozen=True)
class RecipientReport:
    recipient: str
    action: str  # "failed" | "delayed"
    reply: Reply  # the last reply (remote, or the relay's own for DNS/TLS/connection problems)
    remote_mta: str | None = None  # the host that gave ``reply`` (None: no host answered)

    @property
    def status(self) -> str:
        """RFC 3463 status: the reply's own, else derived from its class."""
        return self.reply.status or f"{str(self.reply.code)[0]}.0.0"

    @property
    def diagnostic(self) -> str:
        kind = "smtp" if self.remote_mta else "X-tlsrelay"
        return f"{kind}; {one_line(str(self.reply))}"


def wanted(envelope: Envelope) -> bool:
    """A DSN is sent only for messages with a reverse-path (never about a bounce)."""
    return bool(envelope.sender)


def fallback_due(envelope: Envelope, bounced: bool) -> bool:
    """A REQUIRETLS DSN (null reverse-path, REQUIRETLS) failed for good: its twin is due."""
    return bounced and not envelope.sender and REQUIRETLS in envelope.mail_options


def fallback_envelope(dsn: Envelope, body: bytes, now: float) -> Envelope:
    """The envelope of the redacted twin of ``dsn``: a new id, no REQUIRETLS."""
    return dataclasses.replace(
        dsn, id=new_message_id(), mail_options=(), received_at=now, size=len(body)
    )


def build(
    *,
    reporting_mta: str,
    envelope: Envelope,
    original: bytes,
    reports: Sequence[RecipientReport],
    decision: Decision | None = None,
    notes: Sequence[str] = (),
    retry_until: float | None = None,
    now: float | None = None,
    protect: str = OPEN,
) -> tuple[Envelope, bytes]:
    """The DSN for ``reports`` (all failed, or all delayed) about ``envelope``; ``protect``
    (:func:`protection`) says whether it is redacted or sent with REQUIRETLS."""
    now = time.time() if now is None else now
    action = reports[0].action
    boundary = f"tlsrelay-dsn-{secrets.token_hex(8)}"
    dsn_id = new_message_id()
    human = _human(reporting_mta, envelope, reports, decision, notes, retry_until, protect)
    parts = [
        _part("text/plain; charset=utf-8", "Notification", human),
        _part("message/delivery-status", "Delivery report",
              _status(reporting_mta, envelope, reports, now, retry_until)),
    ]  # fmt: skip
    if protect != REDACTED:
        parts.append(
            _part("text/rfc822-headers", "Undelivered Message Headers", _headers(original))
        )
    head = _envelope_headers(reporting_mta, envelope, action, boundary, dsn_id, now)
    body = head + b"".join(b"--" + boundary.encode() + b"\r\n" + p for p in parts)
    body += b"--" + boundary.encode() + b"--\r\n"
    dsn = Envelope(
        id=dsn_id,
        sender="",
        recipients=(envelope.sender,),
        mail_options=(REQUIRETLS,) if protect == WITH_REQUIRETLS else (),
        client_address="127.0.0.1",
        client_helo=reporting_mta,
        received_at=now,
        size=len(body),
    )
    return dsn, body


def _envelope_headers(
    mta: str, envelope: Envelope, action: str, boundary: str, dsn_id: str, now: float
) -> bytes:
    subject = (
        "Undelivered Mail Returned to Sender"
        if action == FAILED
        else "Delayed Mail (still being retried)"
    )
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{envelope.sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{dsn_id}.dsn@{mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834: no auto-replies to this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    return "\r\n".join(lines).encode() + b"\r\n"


def _part(content_type: str, description: str, text: str) -> bytes:
    head = f"Content-Type: {content_type}\r\nContent-Description: {description}\r\n\r\n"
    return (head + text.rstrip("\r\n") + "\r\n\r\n").encode("utf-8", "replace")


def _human(
    mta: str,
    envelope: Envelope,
    reports: Sequence[RecipientReport],
    decision: Decision | None,
    notes: Sequence[str],
    retry_until: float | None,
    protect: str,
) -> str:
    failed = reports[0].action == FAILED
    lines = [
        f"This is the mail system at host {mta}.",
        "",
        "Your message could not be delivered to the recipients below."
        if failed
        else "Your message has not been delivered yet to the recipients below. "
        "Nothing needs to be done; delivery will be retried"
        + (f" until {_date(retry_until)}." if retry_until else "."),
        f"Queue ID: {envelope.id}",
        "",
    ]
    for report in reports:
        where = (
            f"host {one_line(report.remote_mta)} said" if report.remote_mta else "the relay reports"
        )
        lines.append(f"<{report.recipient}>: {where}: {one_line(str(report.reply))}")
    lines += ["", *_tls_note(decision, reports, protect), *notes]
    return "\r\n".join(lines)


def _tls_note(
    decision: Decision | None, reports: Sequence[RecipientReport], protect: str
) -> list[str]:
    """For mail that had to travel encrypted: say so, and which rule or policy required it
    (with what it matched only when the DSN itself travels protected)."""
    if decision is None or not decision.tls.requires_encryption:
        return []
    why = ", ".join(decision.circumstances)
    lines = [f"This message required TLS (mode {decision.tls.label}) because of: {why}."]
    if protect == REDACTED:
        lines.append("Its headers and what the rule matched are not returned in this notice.")
    else:
        lines += [f"  {reason}" for reason in decision.reasons]
    if any(r.reply.status.startswith(TLS_REQUIRED_STATUSES) for r in reports):
        lines.append("It was never sent unencrypted: no destination host offered usable TLS.")
    return [*lines, ""]


def _status(
    mta: str,
    envelope: Envelope,
    reports: Sequence[RecipientReport],
    now: float,
    retry_until: float | None,
) -> str:
    lines = [
        f"Reporting-MTA: dns; {mta}",
        f"X-Tlsrelay-Queue-ID: {envelope.id}",
        f"Arrival-Date: {_date(envelope.received_at or now)}",
    ]
    for report in reports:
        lines += [
            "",
            f"Final-Recipient: rfc822; {report.recipient}",
            f"Action: {report.action}",
            f"Status: {report.status}",
            *([f"Remote-MTA: dns; {one_line(report.remote_mta)}"] if report.remote_mta else []),
            f"Diagnostic-Code: {report.diagnostic}",
            f"Last-Attempt-Date: {_date(now)}",
            *([f"Will-Retry-Until: {_date(retry_until)}"] if retry_until else []),
        ]
    return "\r\n".join(lines)


def _date(timestamp: float) -> str:
    """RFC 5322 date in UTC with a numeric zone (``+0000``)."""
    return email.utils.format_datetime(datetime.fromtimestamp(timestamp, UTC))


def _headers(original: bytes) -> str:
    """The original header section (up to the first empty line), as text."""
    end = original.find(b"\r\n\r\n")
    head = original if end < 0 else original[:end]
    return head.decode("utf-8", "replace")


@dataclass(frozen=True)
class Notice:
    """A DSN to queue with the round that called for it."""

    action: str  # FAILED | DELAYED
    envelope: Envelope  # the DSN's own (null reverse-path, to the original sender)
    body: bytes
    fallback: bytes | None = None  # a REQUIRETLS DSN's redacted twin (sent if it fails)


MAY_HAVE_ARRIVED = "may have received this message despite this report"


def interrupted_note(found: Mapping[str, object] | None) -> str | None:
    """What a bounce must add when a delivery to its recipients' domain was found interrupted
    while sending DATA (``found``: where and since when, ``spool.interrupted_key``, written by
    services/deliver/marks.py): the host may have taken the message before the worker could
    record its reply (RFC 1047), so "could not be delivered" may not be the whole truth. None
    when no delivery there was interrupted."""
    if not found:
        return None
    since = found.get("since")
    when = f" at {_date(since)}" if isinstance(since, int | float) else ""
    host = one_line(str(found.get("host") or "its host"))
    return (
        f"Note: a delivery of this message to {host}{when} was interrupted while the message "
        "was being sent (the relay stopped before it could record the host's reply). The host "
        f"may have accepted it: the recipients below {MAY_HAVE_ARRIVED}."
    )


def notice(
    round_: Round,
    outcome: Outcome,
    reporting_mta: str,
    delay_warning_after: float,
    more_notes: Sequence[str] = (),
) -> Notice | None:
    """The DSN ``round_`` calls for: a bounce for failed recipients, else (once per message,
    after ``delay_warning_after``; 0: never) a delay notice; None when the sender is null.
    ``more_notes``: lines it adds (:func:`interrupted_note`)."""
    envelope = round_.envelope
    if not wanted(envelope):
        return None
    waited = round_.now - envelope.received_at
    delay_due = delay_warning_after > 0 and waited >= delay_warning_after
    notes = [outcome.note] if outcome.note else []
    notes += more_notes
    if outcome.bounced:
        action, replies, until = FAILED, outcome.bounced, None
    elif outcome.deferred and not round_.state.delay_warned and delay_due:
        action, replies, until = DELAYED, outcome.deferred, round_.expires
    else:
        return None
    remote = outcome.remote_mta
    reports = [RecipientReport(r, action, reply, remote.get(r)) for r, reply in replies.items()]
    protect = protection(envelope, (round_.decision, outcome.decision))
    made = functools.partial(
        build,
        reporting_mta=reporting_mta,
        envelope=envelope,
        original=round_.body,
        reports=reports,
        decision=outcome.decision or round_.decision,
        notes=notes,
        retry_until=until,
        now=round_.now,
    )
    dsn_envelope, dsn_body = made(protect=protect)
    twin = made(protect=REDACTED)[1] if protect == WITH_REQUIRETLS else None
    return Notice(action, dsn_envelope, dsn_body, twin)
