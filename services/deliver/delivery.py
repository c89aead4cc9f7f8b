"""Deliver one job — (message, destination domain, its recipients, the policy decision) — and
record what happened.

Steps: skip recipients already final (never re-send an accepted recipient); find the destination
hosts (a rule's route, else ``delivery.routes``, else MX, else implicit MX); try each address in
order with :func:`services.deliver.session.attempt` until one runs a transaction; then, in one Redis
transaction, record per-recipient results, the trace events, — for what is left — a deferred
entry due per ``delivery.retry_schedule``, and the DSN the round calls for (queued as a new
message with a null reverse-path, in the same transaction, so it is neither lost nor doubled).

Fates per recipient: 2xx after DATA → delivered; 5xx → bounced with a DSN (RFC 3464); 4xx, no
host reachable, TLS required but unavailable, DNS temporary failure → deferred, until
``max_queue_lifetime`` after arrival, then bounced with the last reply. DNS NXDOMAIN / null MX →
bounced (5.1.2 / 5.1.10). One "delayed" DSN per message once it waited ``delay_warning_after``.
No DSN is ever sent about a message whose reverse-path is null.

Metrics (``services.common.metrics``): each attempt is counted by the session; a recorded round,
its DSN and a message becoming final are counted here, after their transaction committed.

Failure: Redis errors propagate (the Celery task is then not acknowledged and runs again).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from services.common import metrics, spool
from services.common.config import Config, Route, format_duration, parse_hostport
from services.common.model import Decision, Envelope, Reply, TlsMode
from services.common.tenants import PLATFORM_PROFILE
from services.deliver import dsn, mx, scheduler
from services.deliver.pool import ConnectionPool
from services.deliver.session import Attempt, Hooks, Peer, Timeouts, TlsSettings, attempt

log = logging.getLogger("tlsrelay.deliver")

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

    def settle(self, replies: dict[str, Reply], host: str) -> None:
        for rcpt, reply in replies.items():
            self.remote_mta[rcpt] = host
            if reply.is_success:
                self.delivered[rcpt] = reply
            elif reply.is_permanent:
                self.bounced[rcpt] = reply
            else:
                self.deferred[rcpt] = reply

    def give_up(self, note: str) -> None:
        """Time ran out: what was deferred is now bounced, with its last reply."""
        self.bounced.update(self.deferred)
        self.deferred = {}
        self.note = note


def retry_delay(schedule: tuple[float, ...], attempt_number: int) -> float:
    """Delay after the ``attempt_number``-th attempt (1-based); the last step repeats."""
    return schedule[min(attempt_number, len(schedule)) - 1]


class Deliverer:
    """Per worker process: configuration, Redis client, DNS resolver."""

    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.config = config
        self.client = client
        delivery = config.delivery
        self.resolver = mx.make_resolver(delivery.dns_servers, timeout=delivery.connect_timeout)
        self.pool = ConnectionPool(delivery.reuse_max_messages, delivery.reuse_idle_timeout)
        self.timeouts = Timeouts(
            config.hostname,
            connect=delivery.connect_timeout,
            command=delivery.command_timeout,
            greeting=delivery.greeting_timeout,
            data=delivery.data_timeout,
        )

    async def run(self, job: dict[str, Any]) -> Outcome | None:
        """Deliver and record one job; None when there was nothing left to do."""
        state = spool.load_job(self.client, job["id"], job["domain"])
        envelope, body = state.envelope, state.body
        pending = [r for r in job["recipients"] if r not in state.final]
        if envelope is None or body is None:
            return None
        if not pending:  # an earlier run recorded them and died before finishing the message
            self._finish_if_final(envelope)
            return None
        decision = Decision.from_json(job["decision"])
        if state.in_flight is not None:
            self._note_interrupted(envelope.id, decision.domain, state.in_flight)
        outcome = await self.send(envelope, body, decision, pending)
        self.record(job, envelope, outcome, body)
        return outcome

    def _in_flight(self, envelope: Envelope, decision: Decision, peer: Peer) -> None:
        """Mark the job as sending DATA; ``record`` clears the mark in its transaction. A mark
        found at the start of a later run means a worker died in the RFC 1047 window."""
        note = json.dumps({"host": peer.host, "address": peer.address, "at": time.time()})
        ttl = int(self.config.celery.visibility_timeout * 4)
        self.client.set(spool.in_flight_key(envelope.id, decision.domain), note, ex=ttl)

    def _note_interrupted(self, message_id: str, domain: str, raw: bytes) -> None:
        previous = json.loads(raw)
        spool.append_trace(
            self.client,
            message_id,
            spool.event(
                "interrupted",
                domain=domain,
                host=previous["host"],
                since=previous["at"],
                note="a worker stopped while sending DATA; recipients not recorded as delivered "
                "are sent again, so the destination may receive this message twice (RFC 1047)",
            ),
            trace_ttl=self.config.trace_ttl,
        )
        metrics.interrupted()

    async def send(
        self, envelope: Envelope, body: bytes, decision: Decision, pending: list[str]
    ) -> Outcome:
        outcome = Outcome()
        route = None
        if decision.route:
            route = Route(parse_hostport(decision.route), decision.route_tls_name)
        try:
            hosts = await mx.resolve(decision.domain, self.config.delivery, self.resolver, route)
        except mx.DnsPermanentError as exc:
            outcome.bounced = dict.fromkeys(pending, Reply(550, exc.status, str(exc)))
            return outcome
        except mx.DnsError as exc:
            outcome.deferred = dict.fromkeys(pending, Reply(451, "4.4.3", str(exc)))
            return outcome
        errors: list[Reply] = []
        hooks = Hooks(self._remember_broken, lambda peer: self._in_flight(envelope, decision, peer))
        for peer in self._peers(hosts, decision.domain):
            settings = self._tls(decision, peer)
            result = await attempt(
                peer, envelope, pending, body, settings, self.timeouts, hooks, self.pool
            )
            outcome.attempts.append(result)
            if not result.next_host:
                outcome.settle(result.replies, peer.host)
                return outcome
            errors.append(result.error or NO_HOST)
        _give_up(outcome, pending, errors)
        return outcome

    def _peers(self, hosts: list[mx.Destination], domain: str) -> list[Peer]:
        return [
            Peer(host.host, address, host.port, host.tls_name or domain)
            for host in hosts
            for address in host.addresses
        ]

    def _tls(self, decision: Decision, peer: Peer) -> TlsSettings:
        """The TLS requirement and material: the platform's own for intra-platform mail."""
        broken = bool(self.client.exists(spool.tls_broken_key(peer.address, peer.port)))
        platform = self.config.platform_tls
        if decision.tls_profile == PLATFORM_PROFILE and platform is not None:
            return TlsSettings(
                mode=max(decision.tls, TlsMode.VERIFIED),
                ca_file=str(platform.ca),
                remembered_broken=broken,
                client_cert=(str(platform.cert), str(platform.key)),
            )
        ca_file = str(self.config.delivery.ca_file) if self.config.delivery.ca_file else None
        return TlsSettings(mode=decision.tls, ca_file=ca_file, remembered_broken=broken)

    def _remember_broken(self, peer: Peer) -> None:
        ttl = max(1, int(self.config.delivery.tls_broken_ttl))
        self.client.set(spool.tls_broken_key(peer.address, peer.port), peer.host, ex=ttl)

    def record(
        self, job: dict[str, Any], envelope: Envelope, outcome: Outcome, body: bytes
    ) -> None:
        """Write the round's results in one transaction, with the DSN it calls for (if any);
        delete the message once every recipient is final."""
        now, delivery = time.time(), self.config.delivery
        expires = envelope.received_at + delivery.max_queue_lifetime
        if outcome.deferred and now >= expires:
            lifetime = format_duration(delivery.max_queue_lifetime)
            outcome.give_up(f"The relay gave up: the message was queued longer than {lifetime}.")
        notice = self._notice(job, envelope, outcome, body, now, expires)
        events = [
            spool.event("attempt", domain=job["domain"], **a.to_json()) for a in outcome.attempts
        ]
        with self.client.pipeline(transaction=True) as pipe:
            events += self._stage_states(pipe, job, envelope, outcome, now)
            if outcome.deferred:
                events.append(self._stage_retry(pipe, job, outcome, now, expires))
            if notice is not None:
                events.append(self._stage_notice(pipe, envelope, notice))
            pipe.delete(spool.in_flight_key(envelope.id, job["domain"]))
            pipe.rpush(spool.trace_key(envelope.id), *events)
            pipe.expire(spool.trace_key(envelope.id), int(self.config.trace_ttl))
            pipe.execute()
        metrics.delivery_round(outcome, envelope.received_at, now)
        if notice is not None:
            metrics.dsn_sent(notice[0])
        self._finish_if_final(envelope)

    def _stage_states(
        self, pipe: redis.client.Pipeline, job: dict[str, Any], envelope: Envelope,
        outcome: Outcome, now: float,
    ) -> list[str]:  # fmt: skip
        events = []
        for state, replies in (("delivered", outcome.delivered), ("bounced", outcome.bounced)):
            if replies:
                pipe.hset(spool.rcpt_key(envelope.id), mapping=_states(state, replies, now))
                events.append(spool.event(state, domain=job["domain"], **_replies(replies)))
        return events

    def _stage_retry(
        self, pipe: redis.client.Pipeline, job: dict[str, Any], outcome: Outcome,
        now: float, expires: float,
    ) -> str:  # fmt: skip
        """Back into the deferred set; the last try happens at the expiry time, not after it."""
        due = min(now + retry_delay(self.config.delivery.retry_schedule, job["attempt"]), expires)
        last = next(iter(outcome.deferred.values()))
        retry = {
            **job,
            "recipients": list(outcome.deferred),
            "attempt": job["attempt"] + 1,
            "last_error": str(last),
        }
        scheduler.stage_deferral(pipe, retry, due)
        return spool.event(
            "deferred", domain=job["domain"], due=round(due, 3), **_replies(outcome.deferred)
        )

    def _notice(
        self, job: dict[str, Any], envelope: Envelope, outcome: Outcome, body: bytes,
        now: float, expires: float,
    ) -> tuple[str, Envelope, bytes] | None:  # fmt: skip
        """The DSN this round calls for: a bounce for failed recipients, else (once per message,
        after ``delay_warning_after``) a delay notice; None when the sender is null."""
        if not dsn.wanted(envelope):
            return None
        if outcome.bounced:
            action, replies, until = dsn.FAILED, outcome.bounced, None
        elif outcome.deferred and self._delay_warning_due(envelope, now):
            action, replies, until = dsn.DELAYED, outcome.deferred, expires
        else:
            return None
        remote = outcome.remote_mta
        reports = [
            dsn.RecipientReport(r, action, reply, remote.get(r)) for r, reply in replies.items()
        ]
        notes = (outcome.note,) if outcome.note else ()
        report_env, report_body = dsn.build(
            reporting_mta=self.config.hostname, envelope=envelope, original=body,
            reports=reports, decision=Decision.from_json(job["decision"]), notes=notes,
            retry_until=until, now=now,
        )  # fmt: skip
        return action, report_env, report_body

    def _delay_warning_due(self, envelope: Envelope, now: float) -> bool:
        after = self.config.delivery.delay_warning_after
        if after <= 0 or now - envelope.received_at < after:
            return False
        return not self.client.hexists(spool.msg_key(envelope.id), "delay_warned")

    def _stage_notice(
        self, pipe: redis.client.Pipeline, envelope: Envelope,
        notice: tuple[str, Envelope, bytes],
    ) -> str:  # fmt: skip
        action, report_env, report_body = notice
        spool.stage_message(
            pipe, report_env, report_body, self.config.trace_ttl, dsn_for=envelope.id, action=action
        )
        if action == dsn.DELAYED:
            pipe.hset(spool.msg_key(envelope.id), "delay_warned", report_env.id)
        recipients = list(report_env.recipients)
        return spool.event("dsn", action=action, dsn_id=report_env.id, to=recipients)

    def _finish_if_final(self, envelope: Envelope) -> None:
        # Write-then-read: of two domain jobs finishing together, the later one sees all final.
        states = _final_states(self.client, envelope.id)
        if set(states) >= set(envelope.recipients):
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(spool.msg_key(envelope.id))
                pipe.rpush(spool.trace_key(envelope.id), spool.event("completed"))
                scheduler.stage_completion(pipe, envelope.id)
                deleted = pipe.execute()[0]
            if deleted:  # both may see all final; only one of them deleted the message
                metrics.message_final(states.values())


def _give_up(outcome: Outcome, pending: list[str], errors: list[Reply]) -> None:
    """No host ran a transaction: bounce when every host failed permanently, else defer."""
    last = errors[-1] if errors else NO_HOST
    if errors and all(e.is_permanent for e in errors):
        outcome.bounced = dict.fromkeys(pending, last)
    else:
        outcome.deferred = dict.fromkeys(pending, last)


def _final_states(client: redis.Redis, message_id: str) -> dict[str, str]:
    """recipient → its final state (delivered / bounced), for recipients that have one."""
    raw: dict[bytes, bytes] = client.hgetall(spool.rcpt_key(message_id))  # type: ignore[assignment]
    states = {k.decode(): json.loads(v).get("state") for k, v in raw.items()}
    return {r: state for r, state in states.items() if state in spool.FINAL_STATES}


def _states(state: str, replies: dict[str, Reply], now: float) -> dict[Any, Any]:
    return {
        r: json.dumps({"state": state, "reply": str(reply), "at": now})
        for r, reply in replies.items()
    }


def _replies(replies: dict[str, Reply]) -> dict[str, Any]:
    return {"recipients": {r: str(reply) for r, reply in replies.items()}}
