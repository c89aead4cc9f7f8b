"""The delivery job: one message to one destination domain, as policy queues it, deliver reads it.

A :class:`Job` crosses Redis in two places: inside ``deliver`` task payloads
(:func:`services.common.queueing.deliver_task`) and as a member of the deferred set
(``tlsrelay:deferred``, services/deliver/scheduler.py), where members are matched *as strings*:
``ZADD`` de-duplicates and ``ZREM`` removes by the exact bytes. So :meth:`Job.to_json` gives the
document exactly as it has always been written — keys ``id``, ``domain``, ``recipients``,
``decision``, ``attempt`` in that order, then ``last_error`` only once a round deferred the job,
then ``throttled`` only while it waits for a traffic-shaping limit (``{"reason", "site"}``:
parked in the deferred set without it counting as an attempt, services/deliver/shaping.py) —
and ``json.dumps(Job.from_json(doc).to_json(), sort_keys=True)`` is the same member again.

:func:`job_key` reads only (message id, domain) of a document, for code that moves documents
without needing the rest (the scheduler, the rescue sweep).

Failure: ``from_json`` raises ``KeyError``/``ValueError``/``TypeError`` on a document that is not a
job (or whose decision is not one): callers decide what that means (deliver parks it, never drops).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.common.model import Decision


@dataclass(frozen=True)
class Job:
    """One message's recipients at one destination domain, with the decision for that domain."""

    id: str  # the message id (the queue id)
    domain: str
    recipients: tuple[str, ...]  # still to deliver (a retry carries only those deferred)
    decision: Decision
    attempt: int = 1  # 1 for the first round; each deferral adds one
    last_error: str | None = None  # the reply that deferred it last (None: never deferred)
    throttled: tuple[str, str] | None = None  # (reason, site id) while parked by shaping

    def throttle(self, reason: str, site: str) -> Job:
        """The same job, parked for a shaping limit: the same attempt, the same retry step."""
        return replace(self, throttled=(reason, site))

    @property
    def key(self) -> tuple[str, str]:
        """(message id, domain): how the spool names this job's state."""
        return self.id, self.domain

    def retry(self, recipients: Sequence[str], last_error: str) -> Job:
        """The next round's job: what is left, one attempt on, with the reply that deferred it."""
        return replace(
            self,
            recipients=tuple(recipients),
            attempt=self.attempt + 1,
            last_error=last_error,
            throttled=None,
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "domain": self.domain,
            "recipients": list(self.recipients),
            "decision": self.decision.to_json(),
            "attempt": self.attempt,
        }
        if self.last_error is not None:
            doc["last_error"] = self.last_error
        if self.throttled is not None:
            doc["throttled"] = {"reason": self.throttled[0], "site": self.throttled[1]}
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Job:
        return cls(
            id=doc["id"],
            domain=doc["domain"],
            recipients=tuple(doc["recipients"]),
            decision=Decision.from_json(doc["decision"]),
            attempt=int(doc["attempt"]),
            last_error=doc.get("last_error"),
            throttled=_throttled(doc.get("throttled")),
        )


def _throttled(value: Any) -> tuple[str, str] | None:
    if value is None:
        return None
    return str(value["reason"]), str(value["site"])


def job_key(doc: Mapping[str, Any]) -> tuple[str, str]:
    """(message id, domain) of a job document, without reading (or validating) the rest."""
    return doc["id"], doc["domain"]
