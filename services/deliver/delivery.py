"""Deliver one job — (message, destination domain, its recipients, the policy decision) — and
record what happened.

Steps: skip recipients already final (never re-send an accepted recipient); for mail that is
not routed, look up the domain's MTA-STS policy and apply it (:mod:`services.deliver.mtasts`:
``enforce`` → verified TLS to matching MX hosts only); find the destination
hosts (a rule's route, else ``delivery.routes``, else MX, else implicit MX); try each address in
order with :func:`services.deliver.session.attempt` until one runs a transaction; then, in one Redis
transaction, record per-recipient results, the trace events, — for what is left — a deferred
entry due per ``delivery.retry_schedule``, and the DSN the round calls for (queued as a new
message with a null reverse-path, in the same transaction, so it is neither lost nor doubled) and
the round's TLSRPT counts (:mod:`services.deliver.tlsrpt`).

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
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.model import Decision, Envelope, Reply, TlsMode
from services.common.protocol import TLS_REQUIRED_STATUS
from services.common.tenants import PLATFORM_PROFILE
from services.common.values import Route, format_duration
from services.deliver import dsn, mtasts, mx, observe, scheduler, tlsrpt
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
    unreachable: bool = False  # deferred without any host running a transaction
    skipped: str = ""  # not tried: why (the destination failed earlier in the same batch)

    def not_tried(self, pending: list[str]) -> Outcome:
        """The outcome for another job of the batch to this unreachable destination."""
        reply = next(iter(self.deferred.values()), NO_HOST)
        skipped = f"not tried: the destination failed for an earlier message just now: {reply}"
        return Outcome(
            deferred=dict.fromkeys(pending, reply), skipped=skipped, decision=self.decision
        )

    decision: Decision | None = None  # the effective decision, when MTA-STS changed it
    sts: tlsrpt.StsRound | None = None  # MTA-STS and TLSRPT facts (None: routed mail)

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
        self._broken: dict[tuple[str, int], bool] = {}  # the "TLS broken" memory, this batch
        self._sts_seen: dict[str, mtasts.Lookup] = {}  # MTA-STS lookups, this batch
        self._last_peer: Peer | None = None  # where the last DATA went
        self._premarked: tuple[str, str, str, int] | None = None  # (id, domain, address, port)
        self._mark_ttl = int(config.celery.visibility_timeout * 4)
        self.policies: mtasts.PolicyCache | None = None
        if delivery.mta_sts:
            ca = str(delivery.mta_sts_ca_file) if delivery.mta_sts_ca_file else None
            self.policies = mtasts.PolicyCache(
                client, self.resolver, ca, delivery.mta_sts_port, delivery.mta_sts_timeout
            )

    async def run_batch(self, jobs: list[dict[str, Any]]) -> list[Outcome | None]:
        """Deliver and record a batch of jobs (one ``deliver`` task: one destination domain), one
        after another so they share a reused connection. Their state is read in one round trip;
        each job's outcome is recorded in its own transaction as soon as it is known (a worker
        dying mid-batch re-sends nothing already recorded). When a job finds its destination
        unreachable, the rest of the batch with the same route and TLS requirement is deferred
        with the same error instead of waiting out the same timeouts again. An unexpected error
        in one job parks that job for a retry and lets the batch go on; Redis errors propagate."""
        keys = [(job["id"], job["domain"]) for job in jobs]
        states = spool.load_jobs(self.client, keys)
        bodies = _Bodies(self.client, jobs, states)
        self._broken, self._sts_seen = {}, {}
        unreachable: dict[tuple[Any, ...], Outcome] = {}
        results: list[Outcome | None] = []
        for i, (job, state) in enumerate(zip(jobs, states, strict=True)):
            upcoming = _sendable(jobs[i + 1], states[i + 1]) if i + 1 < len(jobs) else None
            try:
                state = replace(state, body=bodies.take(i))
                results.append(await self._run(job, state, unreachable, upcoming))
            except redis.exceptions.RedisError:
                raise
            except Exception:
                log.exception("delivery of %s to %s failed unexpectedly", job["id"], job["domain"])
                self.park(job)
                results.append(None)
        return results

    async def run(self, job: dict[str, Any]) -> Outcome | None:
        """Deliver and record one job; None when there was nothing left to do."""
        return (await self.run_batch([job]))[0]

    async def _run(
        self,
        job: dict[str, Any],
        state: spool.JobState,
        unreachable: dict[tuple[Any, ...], Outcome],
        upcoming: tuple[str, str] | None = None,
    ) -> Outcome | None:
        envelope, body = state.envelope, state.body
        pending = [r for r in job["recipients"] if r not in state.final]
        if envelope is None or body is None or not pending:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(job["id"], job["domain"]))
                pipe.delete(spool.in_flight_key(job["id"], job["domain"]))
                pipe.hgetall(spool.rcpt_key(job["id"]))
                states = pipe.execute()[-1]
            if envelope is not None:  # an earlier run recorded them and died before finishing
                self._finish_if_final(envelope, states)
            return None
        decision = Decision.from_json(job["decision"])
        if state.in_flight is not None:
            self._note_interrupted(envelope.id, decision.domain, state.in_flight)
        key = (decision.domain, decision.route, decision.tls, decision.tls_profile)
        if key in unreachable:
            outcome = unreachable[key].not_tried(pending)
        else:
            outcome = await self.send(envelope, body, decision, pending)
            if outcome.unreachable:
                unreachable[key] = outcome
        self.record(job, envelope, outcome, body, state, upcoming)
        return outcome

    def park(self, job: dict[str, Any]) -> None:
        """Put a job that failed unexpectedly back into the deferred set, due after the first
        retry step, so a bug in delivery code never drops mail."""
        due = time.time() + self.config.delivery.retry_schedule[0]
        with self.client.pipeline(transaction=True) as pipe:
            scheduler.stage_deferral(pipe, job, due)
            pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(job["id"], job["domain"]))
            pipe.delete(spool.in_flight_key(job["id"], job["domain"]))
            pipe.rpush(spool.trace_key(job["id"]), spool.event("error", domain=job["domain"]))
            pipe.expire(spool.trace_key(job["id"]), int(self.config.trace_ttl))
            pipe.execute()

    def _in_flight(self, envelope: Envelope, decision: Decision, peer: Peer) -> None:
        """Mark the job as sending DATA; ``record`` clears the mark in its transaction. A mark
        found at the start of a later run means a worker died in the RFC 1047 window.

        Within a batch the mark is usually set already: the previous job's recording
        transaction set it for the next job, naming the peer it had just used (one Redis round
        trip less per message). It is set here when that guess was wrong or there was none. So
        the mark may precede DATA by a few commands: a worker dying in between reports a
        possible duplicate that cannot be one (on the safe side)."""
        self._last_peer = peer
        if self._premarked == (envelope.id, decision.domain, peer.address, peer.port):
            return
        note = _in_flight_note(peer)
        self.client.set(spool.in_flight_key(envelope.id, decision.domain), note, ex=self._mark_ttl)

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
        observe.interrupted()

    async def send(
        self, envelope: Envelope, body: bytes, decision: Decision, pending: list[str]
    ) -> Outcome:
        outcome = Outcome()
        route = self._route(decision)
        if route is None:  # MTA-STS is about MX hosts: never for routed mail
            decision = await self._sts(envelope, decision, outcome)
        try:
            hosts = await mx.resolve(decision.domain, self.config.delivery, self.resolver, route)
        except mx.DnsPermanentError as exc:
            outcome.bounced = dict.fromkeys(pending, Reply(550, exc.status, str(exc)))
            return outcome
        except mx.DnsError as exc:
            outcome.deferred = dict.fromkeys(pending, Reply(451, "4.4.3", str(exc)))
            outcome.unreachable = True
            return outcome
        hosts = _sts_hosts(hosts, decision, outcome)
        if not hosts:
            text = f"no MX host of {decision.domain} matches its MTA-STS policy (RFC 8461 §4.1)"
            outcome.deferred = dict.fromkeys(pending, Reply(451, TLS_REQUIRED_STATUS, text))
            return outcome
        errors: list[Reply] = []
        hooks = Hooks(self._remember_broken, lambda peer: self._in_flight(envelope, decision, peer))
        testing = outcome.sts is not None and outcome.sts.mode == mtasts.TESTING
        for peer in self._peers(hosts, decision.domain):
            settings = self._tls(decision, peer)
            if testing:  # note what verification would say (TLSRPT), change nothing else
                settings = replace(settings, check_leaf=True)
            result = await attempt(
                peer, envelope, pending, body, settings, self.timeouts, hooks, self.pool
            )
            outcome.attempts.append(result)
            if not result.next_host:
                outcome.settle(result.replies, peer.host)
                return outcome
            errors.append(result.error or NO_HOST)
        _give_up(outcome, pending, errors)
        outcome.unreachable = bool(outcome.deferred)
        return outcome

    def _route(self, decision: Decision) -> Route | None:
        """The decision's route (a rule, a platform hop), else ``delivery.routes``'."""
        if decision.route:
            return decision.override_route
        return mx.route_for(decision.domain, self.config.delivery.routes)

    async def _sts(self, envelope: Envelope, decision: Decision, outcome: Outcome) -> Decision:
        """Look up the domain's MTA-STS policy and apply it (services/deliver/mtasts.py)."""
        outcome.sts = sts = tlsrpt.StsRound(decision.domain)
        if self.policies is None:
            return decision
        found = self._sts_seen.get(decision.domain)
        if found is None:  # once per domain and batch
            found = self._sts_seen[decision.domain] = await self.policies.lookup(decision.domain)
        sts.policy, sts.error, sts.error_type = found.policy, found.error, found.error_type
        enforceable = found.policy is not None and found.policy.mode != mtasts.NONE
        sts.relaxed = envelope.tls_required_no and enforceable
        effective = mtasts.apply_sts(decision, found.policy, envelope.tls_required_no)
        if effective != decision:
            outcome.decision = effective
        return effective

    def _peers(self, hosts: list[mx.Destination], domain: str) -> list[Peer]:
        return [
            Peer(host.host, address, host.port, host.tls_name or domain)
            for host in hosts
            for address in host.addresses
        ]

    def _tls(self, decision: Decision, peer: Peer) -> TlsSettings:
        """The TLS requirement and material: the platform's own for intra-platform mail."""
        broken = self._broken.get((peer.address, peer.port))
        if broken is None:  # read once per peer and batch
            broken = bool(self.client.exists(spool.tls_broken_key(peer.address, peer.port)))
            self._broken[(peer.address, peer.port)] = broken
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
        self._broken[(peer.address, peer.port)] = True
        self.client.set(spool.tls_broken_key(peer.address, peer.port), peer.host, ex=ttl)

    def record(
        self, job: dict[str, Any], envelope: Envelope, outcome: Outcome, body: bytes,
        state: spool.JobState | None = None, upcoming: tuple[str, str] | None = None,
    ) -> None:  # fmt: skip
        """Write the round's results in one transaction, with the DSN it calls for (if any);
        delete the message once every recipient is final. ``state``: what was read before the
        round (:func:`spool.load_jobs`); read now when not given. ``upcoming``: the (message id,
        domain) the batch sends next, whose in-flight mark rides in this transaction."""
        if state is None:
            state = spool.load_job(self.client, envelope.id, job["domain"])
        now, delivery = time.time(), self.config.delivery
        expires = envelope.received_at + delivery.max_queue_lifetime
        if outcome.deferred and now >= expires:
            lifetime = format_duration(delivery.max_queue_lifetime)
            outcome.give_up(f"The relay gave up: the message was queued longer than {lifetime}.")
        notice = self._notice(job, envelope, outcome, body, now, expires, state.delay_warned)
        events = _sts_events(outcome) + [
            spool.event("attempt", domain=job["domain"], **a.to_json()) for a in outcome.attempts
        ]
        if outcome.skipped:
            events.append(spool.event("skipped", domain=job["domain"], note=outcome.skipped))
        # Final when nothing is left: known here unless another domain's job is still open.
        final = {**state.final, **_final(outcome)}
        complete = set(final) >= set(envelope.recipients)
        sts_failures = 0
        with self.client.pipeline(transaction=True) as pipe:
            if outcome.sts is not None:  # TLSRPT counts ride this transaction
                sts_failures = tlsrpt.stage(pipe, outcome.sts, outcome.attempts, now)
            events += self._stage_states(pipe, job, envelope, outcome, now)
            if outcome.deferred:
                events.append(self._stage_retry(pipe, job, outcome, now, expires))
            if notice is not None:
                events.append(self._stage_notice(pipe, envelope, notice))
            pipe.delete(spool.in_flight_key(envelope.id, job["domain"]))
            premark = self._premark(pipe, upcoming)
            pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(envelope.id, job["domain"]))
            if complete:
                events.append(spool.event("completed"))
                pipe.delete(spool.msg_key(envelope.id))
                scheduler.stage_completion(pipe, envelope.id)
            elif not outcome.deferred:  # the other jobs may have finished meanwhile: look
                pipe.hgetall(spool.rcpt_key(envelope.id))
            pipe.rpush(spool.trace_key(envelope.id), *events)
            pipe.expire(spool.trace_key(envelope.id), int(self.config.trace_ttl))
            replies = pipe.execute()
        self._premarked = premark
        observe.delivery_round(outcome, envelope.received_at, now)
        if outcome.sts is not None:
            observe.mta_sts(outcome.sts, outcome, sts_failures)
        if notice is not None:
            observe.dsn_sent(notice[0])
        if complete:
            observe.message_final(final.values())
        elif not outcome.deferred:
            self._finish_if_final(envelope, replies[-3])

    def _premark(
        self, pipe: redis.client.Pipeline, upcoming: tuple[str, str] | None
    ) -> tuple[str, str, str, int] | None:
        peer = self._last_peer
        if upcoming is None or peer is None:
            return None
        pipe.set(spool.in_flight_key(*upcoming), _in_flight_note(peer), ex=self._mark_ttl)
        return (*upcoming, peer.address, peer.port)

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
        now: float, expires: float, delay_warned: bool,
    ) -> tuple[str, Envelope, bytes] | None:  # fmt: skip
        """The DSN this round calls for: a bounce for failed recipients, else (once per message,
        after ``delay_warning_after``) a delay notice; None when the sender is null."""
        if not dsn.wanted(envelope):
            return None
        if outcome.bounced:
            action, replies, until = dsn.FAILED, outcome.bounced, None
        elif outcome.deferred and not delay_warned and self._delay_warning_due(envelope, now):
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
            reports=reports, decision=outcome.decision or Decision.from_json(job["decision"]),
            notes=notes,
            retry_until=until, now=now,
        )  # fmt: skip
        return action, report_env, report_body

    def _delay_warning_due(self, envelope: Envelope, now: float) -> bool:
        after = self.config.delivery.delay_warning_after
        return after > 0 and now - envelope.received_at >= after

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

    def _finish_if_final(self, envelope: Envelope, raw: dict[bytes, bytes]) -> None:
        """``raw``: the recipients' states read in the recording transaction (after its writes),
        so of two domain jobs finishing together the later one sees every recipient final."""
        states = {k.decode(): json.loads(v).get("state") for k, v in raw.items()}
        states = {r: state for r, state in states.items() if state in spool.FINAL_STATES}
        if set(states) >= set(envelope.recipients):
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(spool.msg_key(envelope.id))
                pipe.rpush(spool.trace_key(envelope.id), spool.event("completed"))
                scheduler.stage_completion(pipe, envelope.id)
                deleted = pipe.execute()[0]
            if deleted:  # both may see all final; only one of them deleted the message
                observe.message_final(states.values())


class _Bodies:
    """A batch's message bodies, read a few megabytes at a time (``spool.budgeted``) as the batch
    reaches them, and let go once used: a worker never holds a whole batch of large messages."""

    def __init__(
        self, client: redis.Redis, jobs: list[dict[str, Any]], states: list[spool.JobState]
    ) -> None:
        self.client = client
        self.ids = [job["id"] for job in jobs]
        # Only jobs with something to send need their body (size 0 for the others).
        sizes = [
            (s.envelope.size or 1) if _sendable(j, s) and s.envelope else 0
            for j, s in zip(jobs, states, strict=True)
        ]
        self.sizes = sizes
        self.chunks = spool.budgeted(sizes)
        self.loaded: dict[int, bytes | None] = {}

    def take(self, index: int) -> bytes | None:
        if not self.sizes[index]:
            return None
        if index not in self.loaded:
            chunk = [i for i in next(c for c in self.chunks if index in c) if self.sizes[i]]
            bodies = spool.load_bodies(self.client, [self.ids[i] for i in chunk])
            self.loaded.update(zip(chunk, bodies, strict=True))
        return self.loaded.pop(index)


def _sendable(job: dict[str, Any], state: spool.JobState) -> tuple[str, str] | None:
    """(message id, domain) of a job that has something to send, else None."""
    if state.envelope is None:  # the message is gone (its body with it)
        return None
    if all(r in state.final for r in job["recipients"]):
        return None
    return job["id"], job["domain"]


def _in_flight_note(peer: Peer) -> str:
    return json.dumps({"host": peer.host, "address": peer.address, "at": time.time()})


def _give_up(outcome: Outcome, pending: list[str], errors: list[Reply]) -> None:
    """No host ran a transaction: bounce when every host failed permanently, else defer."""
    last = errors[-1] if errors else NO_HOST
    if errors and all(e.is_permanent for e in errors):
        outcome.bounced = dict.fromkeys(pending, last)
    else:
        outcome.deferred = dict.fromkeys(pending, last)


def _final(outcome: Outcome) -> dict[str, str]:
    """recipient → final state, for the recipients this round made final."""
    return {
        **dict.fromkeys(outcome.delivered, "delivered"),
        **dict.fromkeys(outcome.bounced, "bounced"),
    }


def _sts_hosts(
    hosts: list[mx.Destination], decision: Decision, outcome: Outcome
) -> list[mx.Destination]:
    """Under an enforced MTA-STS policy only MX hosts that match it are used (RFC 8461 §4.1)."""
    if not decision.mx_patterns:
        return hosts
    allowed = [h for h in hosts if mtasts.mx_matches(h.host, decision.mx_patterns)]
    if outcome.sts is not None:
        outcome.sts.skipped = [h.host for h in hosts if h not in allowed]
    return allowed


def _sts_events(outcome: Outcome) -> list[str]:
    """The ``mta-sts`` trace event: the policy that applied (mode, id), any relaxation by
    ``TLS-Required: No``, MX hosts skipped, a lookup failure. None for domains without one."""
    sts = outcome.sts
    if sts is None or (sts.policy is None and sts.error is None):
        return []
    return [spool.event("mta-sts", **sts.trace_fields())]


def _states(state: str, replies: dict[str, Reply], now: float) -> dict[Any, Any]:
    return {
        r: json.dumps({"state": state, "reply": str(reply), "at": now})
        for r, reply in replies.items()
    }


def _replies(replies: dict[str, Reply]) -> dict[str, Any]:
    return {"recipients": {r: str(reply) for r, reply in replies.items()}}
