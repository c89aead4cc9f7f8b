"""Delivery results as metric observations: what an attempt, a round, its MTA-STS and DANE
results, its posture counts, a DSN or a final message means for the deliver metrics of
``services/common/metrics.py``.

The metric objects, names and label values are defined there (a contract: README,
"Observability"); the label logic that reads delivery results is here, beside the code that
produces them. The results are read through the small protocols below (the fields used), so this
module imports neither the session nor the delivery loop. Recording never fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from services.common import metrics
from services.common.model import Reply, TlsMode
from services.common.protocol import TLS_REQUIRED_STATUS
from services.deliver import dane as dane_
from services.deliver.tls import Outcome as TlsOutcome


class AttemptResult(Protocol):
    """What one attempt did (``services.deliver.attempt.Attempt``)."""

    @property
    def mode(self) -> TlsMode: ...
    @property
    def outcome(self) -> TlsOutcome | None: ...
    @property
    def tls_version(self) -> str | None: ...
    @property
    def next_host(self) -> bool: ...
    @property
    def replies(self) -> Mapping[str, Reply]: ...
    @property
    def data_sent(self) -> bool: ...


class RoundResult(Protocol):
    """The fate of a round's recipients (``services.deliver.delivery.Outcome``)."""

    @property
    def delivered(self) -> Mapping[str, Reply]: ...
    @property
    def deferred(self) -> Mapping[str, Reply]: ...
    @property
    def attempts(self) -> Sequence[AttemptResult]: ...


class StsResult(Protocol):
    """What MTA-STS meant for a round (``services.deliver.tlsrpt.StsRound``)."""

    @property
    def mode(self) -> str | None: ...
    @property
    def relaxed(self) -> bool: ...
    @property
    def error_type(self) -> str | None: ...


def attempt(result: AttemptResult, seconds: float) -> None:
    """One attempt (one address) ended after ``seconds``."""
    outcome = result.outcome.value if result.outcome is not None else metrics.NO_CONNECTION
    metrics.DELIVERY_ATTEMPTS.labels(result.mode.label, outcome, _attempt_result(result)).inc()
    metrics.DELIVERY_DURATION.observe(seconds)
    if result.tls_version is not None:
        known = result.tls_version in metrics.TLS_VERSIONS
        metrics.DELIVERY_TLS_VERSIONS.labels(result.tls_version if known else "other").inc()
    may_fall_back = result.mode.tries_tls and not result.mode.requires_encryption
    if may_fall_back and outcome in metrics.FALLBACK_REASONS and result.data_sent:
        metrics.PLAINTEXT_FALLBACK.labels(outcome).inc()


def _attempt_result(result: AttemptResult) -> str:
    replies = result.replies.values()
    if result.next_host:
        return "deferred"
    if any(reply.is_success for reply in replies):
        return "delivered"
    if any(reply.is_permanent for reply in replies):
        return "bounced"
    return "deferred"


def _held_for_tls(outcome: RoundResult) -> bool:
    """Some recipient was deferred because TLS was required and not available (X.7.10)."""
    return any(reply.status == TLS_REQUIRED_STATUS for reply in outcome.deferred.values())


def delivery_round(outcome: RoundResult, received_at: float, now: float) -> None:
    """A delivery round was recorded (after the lifetime check, so expired mail is bounced)."""
    if outcome.delivered:
        metrics.END_TO_END.observe(max(0.0, now - received_at))
    if _held_for_tls(outcome) and outcome.attempts:
        metrics.TLS_REQUIRED_DEFERRALS.labels(outcome.attempts[-1].mode.label).inc()


def mta_sts(sts: StsResult, outcome: RoundResult, failures: int) -> None:
    """A recorded round's MTA-STS result; ``failures``: the TLSRPT failures counted for it."""
    mode = sts.mode
    if sts.error_type:
        metrics.MTA_STS.labels(mode or "unknown", "fetch_error").inc()
    if mode is None:
        return
    if sts.relaxed:
        result = "relaxed"
    elif mode == "enforce":
        result = "failed" if _held_for_tls(outcome) else "ok"
    else:
        result = "failed" if mode == "testing" and failures else "ok"
    metrics.MTA_STS.labels(mode, result).inc()


def dane(found: dane_.DaneRound, outcome: RoundResult) -> None:
    """A recorded round's DANE result, when DANE applied to some host (``tlsrelay_dane_total``):
    ``ok`` if a session was authenticated by TLSA, else ``failed`` if hosts had usable records,
    else ``no_usable_tlsa``, else ``lookup_error``."""
    statuses = {h.status for h in found.hosts} if found.applies else set()
    if any(a.outcome is TlsOutcome.DANE_VERIFIED for a in outcome.attempts):
        result = "ok"
    elif dane_.USABLE in statuses:
        result = "failed"
    elif dane_.UNUSABLE in statuses:
        result = "no_usable_tlsa"
    elif dane_.LOOKUP_ERROR in statuses:
        result = "lookup_error"
    else:
        return
    metrics.DANE.labels(result).inc()


def posture(counts: Mapping[str, int]) -> None:
    """A recorded delivery's posture counts (``services.deliver.posture.columns``), as totals."""
    for transport in metrics.POSTURE_TLS:
        if counts.get(transport):
            metrics.POSTURE_DELIVERIES.labels(transport).inc()
    for mode in ("enforced", "verified"):
        if counts.get(f"would_defer_{mode}"):
            metrics.POSTURE_WOULD_DEFER.labels(mode).inc()


def posture_error() -> None:
    """A delivery's posture counts could not be written (the delivery is recorded)."""
    metrics.POSTURE_RECORDING_ERRORS.inc()


def dsn_sent(action: str) -> None:
    """A DSN (``failed`` or ``delayed``) was queued in the same transaction as the round."""
    metrics.DSN_SENT.labels(action).inc()


def interrupted() -> None:
    """A delivery resumed after a worker died while sending DATA (a possible duplicate)."""
    metrics.INTERRUPTED.inc()


def unreplicated_mark() -> None:
    """A round was deferred unsent: its in-flight mark was not acknowledged by
    ``redis_min_replicas`` replicas in time."""
    metrics.UNREPLICATED_MARKS.inc()


def message_final(states: Iterable[str]) -> None:
    """Every recipient of a message is final; ``states`` are theirs (delivered / bounced)."""
    result = "delivered" if all(state == "delivered" for state in states) else "bounced"
    metrics.MESSAGES_FINAL.labels(result).inc()


def throttled(site: str, reason: str) -> None:
    """A round waited for a shaping limit (``site``: a configured name or ``default``)."""
    metrics.THROTTLED.labels(site, reason).inc()


def backoff_event(site: str) -> None:
    """A destination's throttling reply lowered its site's connection limit."""
    metrics.BACKOFF_EVENTS.labels(site).inc()
