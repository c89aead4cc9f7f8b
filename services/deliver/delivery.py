"""What one delivery round's replies mean: the fate of each recipient, and when to try again.

A round is one job (a message's recipients at one destination domain) tried once, host after
host (services/deliver/sending.py). Its :class:`Outcome` sorts the pending recipients:

- 2xx after DATA → delivered; 5xx → bounced (a DSN follows, RFC 3464); 4xx → deferred;
- no host ran a transaction → bounced when every host failed permanently, else deferred with the
  last error (:meth:`Outcome.no_transaction`); DNS NXDOMAIN / null MX → bounced (5.1.2 / 5.1.10);
  DNS temporary failure, TLS required but unavailable → deferred; a round that outlasts
  ``delivery.job_timeout`` is abandoned and deferred (:meth:`Outcome.abandon`), and so is one
  whose in-flight mark the replicas did not acknowledge (``redis_min_replicas``: not sent);
- deferred until ``delivery.max_queue_lifetime`` after arrival, then bounced with the last reply
  (:func:`expire`); a deferred job is due again after ``delivery.retry_schedule``
  (:func:`retry_due`), never after its expiry.

:class:`Round` is the job with what was read for it and when it ended: the ledger records it
(services/deliver/ledger.py) and the DSN is decided from it (services/deliver/dsn.py). Pure: no
I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common import spool
from services.common.jobs import Job
from services.common.model import Decision, Envelope, Reply
from services.common.values import format_duration
from services.deliver import tlsrpt
from services.deliver.attempt import Attempt, Peer
from services.deliver.shaping import (
    BACKOFF,
    CONNECTION_RATE,
    CONNECTIONS,
    LINE,
    RATE,
    SUSPENDED,
    Throttle,
)

NO_HOST = Reply(451, "4.4.1", "no destination host could be reached")


@dataclass
class Outcome:
    """The fate of each pending recipient after one delivery round."""

    delivered: dict[str, Reply] = field(default_factory=dict)
    bounced: dict[str, Reply] = field(default_factory=dict)
    deferred: dict[str, Reply] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    remote_mta: dict[str, str] = field(default_factory=dict)  # host that gave each reply
    note: str = ""  # said in a DSN (e.g. why the relay gave up)
    unreachable: bool = False  # deferred without any host running a transaction
    skipped: str = ""  # not tried: why (the destination failed earlier in the same batch)
    decision: Decision | None = None  # the effective decision, when MTA-STS changed it
    sts: tlsrpt.StsRound | None = None  # MTA-STS and TLSRPT facts (None: routed mail)
    # A traffic-shaping limit stopped the round before anything was sent
    # (services.deliver.shaping.Throttle): the job waits, parked, not an attempt.
    throttled: Throttle | None = None

    def not_tried(self, pending: list[str]) -> Outcome:
        """The outcome for another job of the batch to this unreachable (or throttled)
        destination."""
        if self.throttled is not None:
            return Outcome(throttled=self.throttled, decision=self.decision)
        reply = next(iter(self.deferred.values()), NO_HOST)
        skipped = f"not tried: the destination failed for an earlier message just now: {reply}"
        return Outcome(
            deferred=dict.fromkeys(pending, reply), skipped=skipped, decision=self.decision
        )

    def settle(self, replies: dict[str, Reply], host: str) -> None:
        """A host ran the transaction: each recipient's reply decides its fate."""
        for rcpt, reply in replies.items():
            self.remote_mta[rcpt] = host
            if reply.is_success:
                self.delivered[rcpt] = reply
            elif reply.is_permanent:
                self.bounced[rcpt] = reply
            else:
                self.deferred[rcpt] = reply

    def refuse(self, pending: list[str], reply: Reply) -> None:
        """Nothing could be tried (DNS, policy): every pending recipient gets ``reply``."""
        if reply.is_permanent:
            self.bounced = dict.fromkeys(pending, reply)
        else:
            self.deferred = dict.fromkeys(pending, reply)

    def no_transaction(self, pending: list[str], errors: list[Reply]) -> None:
        """No host ran a transaction: bounce when every host failed permanently, else defer."""
        last = errors[-1] if errors else NO_HOST
        if errors and all(e.is_permanent for e in errors):
            self.bounced = dict.fromkeys(pending, last)
        else:
            self.deferred = dict.fromkeys(pending, last)
        self.unreachable = bool(self.deferred)

    def abandon(self, pending: list[str], reply: Reply) -> None:
        """The round ran out of time (``delivery.job_timeout``): every pending recipient is
        deferred with ``reply`` (the task then hands the rest of its batch back: its start
        window, a tenth of the job timeout, is over)."""
        self.delivered, self.bounced = {}, {}
        self.deferred = dict.fromkeys(pending, reply)

    def give_up(self, note: str) -> None:
        """Time ran out: what was deferred is now bounced, with its last reply."""
        self.bounced.update(self.deferred)
        self.deferred = {}
        self.note = note

    @property
    def final(self) -> dict[str, str]:
        """recipient → final state, for the recipients this round made final."""
        return {
            **dict.fromkeys(self.delivered, "delivered"),
            **dict.fromkeys(self.bounced, "bounced"),
        }


@dataclass(frozen=True)
class Round:
    """One job's round as it is judged and recorded: the job, its message, what was read for it
    before the round (:func:`spool.load_jobs`), when it ended and when the message expires."""

    job: Job
    envelope: Envelope
    body: bytes
    state: spool.JobState
    now: float
    expires: float  # arrival + delivery.max_queue_lifetime

    @property
    def decision(self) -> Decision:
        return self.job.decision


def expire(round_: Round, outcome: Outcome, lifetime: float) -> None:
    """Past the queue lifetime, what would be deferred is bounced instead."""
    if outcome.deferred and round_.now >= round_.expires:
        text = format_duration(lifetime)
        outcome.give_up(f"The relay gave up: the message was queued longer than {text}.")


def retry_delay(schedule: tuple[float, ...], attempt_number: int) -> float:
    """Delay after the ``attempt_number``-th attempt (1-based); the last step repeats."""
    return schedule[min(attempt_number, len(schedule)) - 1]


def retry_due(round_: Round, schedule: tuple[float, ...]) -> float:
    """When the deferred rest is tried again: the last try happens at the expiry, not after."""
    return min(round_.now + retry_delay(schedule, round_.job.attempt), round_.expires)


def throttled_reply(throttle: Throttle | None) -> Reply | None:
    return None if throttle is None else throttle_reply(throttle)


# What a sender is told of a throttled round (a DSN leaves the relay): what happened in plain
# words, never our internal site names or ids — those are in the log and the trace.
_WAITING = {
    CONNECTIONS: "the receiving mail system accepts only so many connections from us at once",
    CONNECTION_RATE: "the receiving mail system accepts only so many new connections at a time",
    RATE: "the receiving mail system accepts only so many messages from us per period",
    BACKOFF: "the receiving mail system asked us to slow down",
    SUSPENDED: "delivery to this destination is paused by the relay's administrator",
    LINE: "older mail to the same receiving mail system is waiting and goes first",
}


def throttle_reply(throttle: Throttle) -> Reply:
    """Why a throttled round's recipients wait (its "delayed" DSN), the deferral of one still
    throttled at its message's expiry (then bounced), or of an address after which no lease
    could be had: said to the sender, so without internal names (:func:`throttle_detail`
    has them, for the log and the trace). 4.4.5: the destination is congested (RFC 3463)."""
    why = _WAITING.get(throttle.reason, "the receiving mail system limits how fast we may send")
    return Reply(451, "4.4.5", f"delivery not attempted yet: {why}")


def throttle_detail(throttle: Throttle) -> str:
    """The operator's account of a throttle: which limit, which site."""
    return f"traffic shaping ({throttle.reason}) at site {throttle.site.id}"


def unreplicated_reply(why: str) -> Reply:
    """The reply that defers a round whose in-flight mark the replicas did not acknowledge in
    time (``redis_min_replicas``): nothing was sent. 4.3.0: a mail system problem of ours."""
    return Reply(451, "4.3.0", why)


def abandoned_reply(limit: float, data: Peer | None) -> Reply:
    """The reply that defers a round abandoned after ``limit`` seconds (``data``: the peer the
    message was being sent to, if it got that far: it may have it)."""
    text = f"delivery attempt abandoned after {format_duration(limit)} (delivery.job_timeout)"
    if data is not None:
        text += (
            f" while {data.host} was receiving the message: it may have it, and the retry may"
            " deliver it twice (RFC 1047)"
        )
    return Reply(451, "4.4.2", text)
