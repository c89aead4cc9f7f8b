"""Deliver one job — (message, destination domain, its recipients, the policy decision) — and
record what happened.

Steps: skip recipients already final (never re-send an accepted recipient); find the destination
hosts (a rule's route, else ``delivery.routes``, else MX, else implicit MX); try each address in
order with :func:`services.deliver.session.attempt` until one runs a transaction; then, in one Redis
transaction, record per-recipient results, the trace events and — for what is left — a deferred
entry due per ``delivery.retry_schedule``.

Fates per recipient: 2xx after DATA → delivered; 5xx → bounced (the DSN is a later issue: the
recipient is final and the trace says why); 4xx, no host reachable, TLS required but unavailable,
DNS temporary failure → deferred. DNS NXDOMAIN / null MX → bounced (5.1.2 / 5.1.10).

Failure: Redis errors propagate (the Celery task is then not acknowledged and runs again).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from services.common import spool
from services.common.config import Config, Route, parse_hostport
from services.common.model import Decision, Envelope, Reply
from services.deliver import mx
from services.deliver.session import Attempt, Peer, Timeouts, TlsSettings, attempt

log = logging.getLogger("tlsrelay.deliver")

NO_HOST = Reply(451, "4.4.1", "no destination host could be reached")


@dataclass
class Outcome:
    """The fate of each pending recipient after one delivery round."""

    delivered: dict[str, Reply] = field(default_factory=dict)
    bounced: dict[str, Reply] = field(default_factory=dict)
    deferred: dict[str, Reply] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)

    def settle(self, replies: dict[str, Reply]) -> None:
        for rcpt, reply in replies.items():
            if reply.is_success:
                self.delivered[rcpt] = reply
            elif reply.is_permanent:
                self.bounced[rcpt] = reply
            else:
                self.deferred[rcpt] = reply


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
        self.timeouts = Timeouts(
            config.hostname, delivery.connect_timeout, delivery.command_timeout
        )

    async def run(self, job: dict[str, Any]) -> Outcome | None:
        """Deliver and record one job; None when there was nothing left to do."""
        envelope = spool.load_envelope(self.client, job["id"])
        if envelope is None:
            return None
        done = spool.final_recipients(self.client, envelope.id)
        pending = [r for r in job["recipients"] if r not in done]
        body = spool.load_body(self.client, envelope.id)
        if not pending or body is None:
            return None
        decision = Decision.from_json(job["decision"])
        outcome = await self.send(envelope, body, decision, pending)
        self.record(job, envelope, outcome)
        return outcome

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
        for peer in self._peers(hosts, decision.domain):
            settings = self._tls(decision, peer)
            result = await attempt(
                peer, envelope, pending, body, settings, self.timeouts, self._remember_broken
            )
            outcome.attempts.append(result)
            if not result.next_host:
                outcome.settle(result.replies)
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
        broken = bool(self.client.exists(spool.tls_broken_key(peer.address, peer.port)))
        ca_file = str(self.config.delivery.ca_file) if self.config.delivery.ca_file else None
        return TlsSettings(mode=decision.tls, ca_file=ca_file, remembered_broken=broken)

    def _remember_broken(self, peer: Peer) -> None:
        ttl = max(1, int(self.config.delivery.tls_broken_ttl))
        self.client.set(spool.tls_broken_key(peer.address, peer.port), peer.host, ex=ttl)

    def record(self, job: dict[str, Any], envelope: Envelope, outcome: Outcome) -> None:
        """Write the round's results in one transaction; delete the message once all are final."""
        now, domain = time.time(), job["domain"]
        events = [spool.event("attempt", domain=domain, **a.to_json()) for a in outcome.attempts]
        with self.client.pipeline(transaction=True) as pipe:
            for state, replies in (("delivered", outcome.delivered), ("bounced", outcome.bounced)):
                if replies:
                    pipe.hset(spool.rcpt_key(envelope.id), mapping=_states(state, replies, now))
                    events.append(spool.event(state, domain=domain, **_replies(replies)))
            if outcome.deferred:
                due = now + retry_delay(self.config.delivery.retry_schedule, job["attempt"])
                retry = {**job, "recipients": list(outcome.deferred), "attempt": job["attempt"] + 1}
                pipe.zadd(spool.DEFERRED, {json.dumps(retry, sort_keys=True): due})
                deferred = _replies(outcome.deferred)
                events.append(spool.event("deferred", domain=domain, due=round(due, 3), **deferred))
            pipe.rpush(spool.trace_key(envelope.id), *events)
            pipe.expire(spool.trace_key(envelope.id), spool.TRACE_TTL)
            pipe.execute()
        self._finish_if_final(envelope)

    def _finish_if_final(self, envelope: Envelope) -> None:
        # Write-then-read: of two domain jobs finishing together, the later one sees all final.
        if spool.final_recipients(self.client, envelope.id) >= set(envelope.recipients):
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(spool.msg_key(envelope.id))
                pipe.rpush(spool.trace_key(envelope.id), spool.event("completed"))
                pipe.execute()


def _give_up(outcome: Outcome, pending: list[str], errors: list[Reply]) -> None:
    """No host ran a transaction: bounce when every host failed permanently, else defer."""
    last = errors[-1] if errors else NO_HOST
    if errors and all(e.is_permanent for e in errors):
        outcome.bounced = dict.fromkeys(pending, last)
    else:
        outcome.deferred = dict.fromkeys(pending, last)


def _states(state: str, replies: dict[str, Reply], now: float) -> dict[Any, Any]:
    return {
        r: json.dumps({"state": state, "reply": str(reply), "at": now})
        for r, reply in replies.items()
    }


def _replies(replies: dict[str, Reply]) -> dict[str, Any]:
    return {"recipients": {r: str(reply) for r, reply in replies.items()}}
