"""The ledger: every Redis write about a delivery job, and the metrics counted once they commit.

- :meth:`Ledger.claim` makes a job this process's alone (services/deliver/claims.py) and reads
  its state as it is then; every other write here releases the claim in its transaction.
- :meth:`Ledger.record` writes a round in ONE transaction (its writes staged by
  :mod:`services.deliver.recording`): per-recipient results
  (``rcpt:{id}``: delivered, bounced, or deferred with the attempt that deferred them), the
  trace events, the TLSRPT counts (:func:`services.deliver.tlsrpt.stage`), a delivery's posture
  counts (:func:`services.deliver.posture.stage`; their failure is logged and counted, never
  raised: the round records without them), for what is left a
  deferred entry due per ``delivery.retry_schedule``
  (:func:`services.deliver.scheduler.stage_deferral`), the DSN the round calls for (queued as a
  new message with a null reverse-path, :func:`services.deliver.dsn.notice`; for a REQUIRETLS
  DSN that failed for good, its redacted twin instead of a DSN about it), the job leaving
  ``waiting:deliver``, its in-flight mark and its claim — so a round is neither lost nor doubled.
  The message (``msg:{id}`` and ``rcpt:{id}``) is deleted once every recipient is final; when
  another domain's job may have finished meanwhile, a second transaction finishes it
  (:meth:`Ledger.finish_if_final`). A "delayed" DSN goes out once per message: the transaction
  that sends one watches the message, so of two domain jobs recorded at once only one sends it.
- In-flight marks (RFC 1047), replicated ones with ``redis_min_replicas``, and the premarks
  the recordings' claims write ahead (deleted by a failed batch): :class:`Marks`, written in
  :mod:`services.deliver.marks` (whose docstring says how). Within a batch the recording
  transaction also claims the next job and sets its mark (one round trip per job).
- :meth:`Ledger.throttle` parks a job a traffic-shaping limit stopped before anything was sent
  (services/deliver/shaping.py): in the deferred set marked throttled, the same attempt, with
  the "delayed" DSN when one is due, and for a limit of its whole site in the site's line (by
  its message's acceptance time); a job that was throttled leaves the line in the transaction
  that records or closes it (``shapingscripts.LEAVE_LINE``, which calls the next one in).
- :meth:`Ledger.park` puts a job that failed unexpectedly back into the deferred set, due after
  the first retry step, so a bug in delivery code never drops mail; :meth:`Ledger.hand_back`
  queues the jobs a task had no time left for (``delivery.job_timeout``) in a new task. (These
  two and :meth:`Ledger.throttle` are written in :mod:`services.deliver.setaside`.)
- The rounds lanes record in one turn of the loop (:meth:`Ledger.record_async`) share ONE
  transaction, and their claims and in-flight marks of one turn one pipeline each
  (:class:`services.deliver.offload.Gathered`): one round trip for them all; a round (a
  claim, a mark) whose own writes fail fails alone.

Metrics (``services.deliver.observe``): a recorded round, its DSN, a message becoming final and an
interrupted delivery (:class:`Marks`) are counted here, after their transaction committed — each
in one place.

Threads: the deliver lanes call :meth:`Ledger.claim_async`, :meth:`Ledger.record_async` and
:meth:`Ledger.mark_in_flight_async` (:meth:`Ledger.mark_in_flight` on the loop for a peer
without PIPELINING; :meth:`Ledger.mark_before_mail_async` before MAIL there, with
``redis_min_replicas``), whose Redis I/O runs in the process's thread pool
(:mod:`services.deliver.offload`); the rest (close, leave, park, throttle, hand back) they run
there whole. What a thread may touch: the client, the configuration and the claims (locked); the
premarks and the last peer are changed on the loop only.

Failure: Redis errors propagate (the Celery task is then not acknowledged and runs again; what was
recorded is not sent again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.jobs import Job
from services.common.model import Envelope
from services.deliver import dsn, observe, recording, scheduler, tlsrpt
from services.deliver.claims import Claim, Claims
from services.deliver.delivery import Outcome, Round, expire
from services.deliver.marks import MarkNotReplicated as MarkNotReplicated  # callers import it here
from services.deliver.marks import Marks, in_flight_note
from services.deliver.offload import INLINE, Gathered
from services.deliver.setaside import SetAside

log = logging.getLogger("tlsrelay.deliver")
# A claim: the job, the in-flight note to write with it (None: none) and its TTL, its envelope.
ClaimRequest = tuple[tuple[str, str], str | None, int, Envelope | None]
DAY = 86400.0


@dataclass(frozen=True)
class Writes:
    """One round's recording: its results (``round_``, ``outcome``); the lane's next job,
    claimed in the same transaction (``upcoming``), with the in-flight ``note`` its premark
    writes (None: none) and the envelope read of it (``known``); once prepared
    (:meth:`Ledger._prepare`, off the loop), the DSN the round sends (``notice``) or the
    redacted twin of a REQUIRETLS DSN that failed for good (``fallback``)."""

    round_: Round
    outcome: Outcome
    upcoming: tuple[str, str] | None = None
    note: str | None = None
    known: Envelope | None = None
    notice: dsn.Notice | None = None
    fallback: tuple[Envelope, bytes] | None = None


class Ledger(Marks, SetAside):
    """Per worker process: the Redis writes of delivery jobs."""

    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.config = config
        self.client = client
        lifetime = config.delivery.max_queue_lifetime
        # An in-flight mark waits for the job's next run, however it comes (a retry, a dead
        # worker's task handed back, the rescue sweep): it lives as long as the message may.
        self._mark_ttl = int(max(4 * config.celery.visibility_timeout, lifetime + DAY))
        # rcpt:{id} is deleted with the message; should a late write recreate it, it expires.
        self._rcpt_ttl = int(lifetime + DAY)
        self.claims = Claims(client, config.delivery.claim_ttl)
        # Where the *_async methods make their Redis calls: the deliver process's threads (set
        # by services/deliver/batch.py); the marks' memories (Marks) change on the loop only.
        self.io = INLINE
        self._init_marks(config)  # services/deliver/marks.py
        # Lanes that start together claim their first jobs in one round trip (offload.Gathered;
        # the marks of their DATA are written likewise: Marks) ...
        self._claiming: Gathered[ClaimRequest, Claim] = Gathered(
            lambda requests: self.claims.take_all(requests)
        )
        # ... and the lanes whose rounds end in one turn record them in one transaction.
        self._recording: Gathered[Writes, Claim | None] = Gathered(
            lambda requests: self._record_all(requests)  # (a test may replace _record_all)
        )

    def claim(
        self, key: tuple[str, str], premark: bool = False, known: Envelope | None = None
    ) -> Claim:
        """Claim the job ``key`` (one round trip) and read its state as it is now; ``premark``:
        also set its in-flight mark naming the last peer (it will probably go there too);
        ``known``: its envelope, when read earlier. No premark with ``redis_min_replicas``: the
        mark is written and waited for before DATA anyway (services/deliver/marks.py), and one
        written ahead would only cost a write and, should the worker die before the round, a
        false "interrupted"."""
        premark = premark and not self.min_replicas
        note = self._last_peers.get(key[1]) if premark else None
        text = in_flight_note(note) if note else None
        claim = self.claims.take(key, text, self._mark_ttl, known)
        self._claimed(claim, note)
        return claim

    async def claim_async(self, key: tuple[str, str], known: Envelope | None = None) -> Claim:
        """:meth:`claim` (no premark: a lane's first job is marked just before its DATA, which
        may be a new connection away), its Redis call off the loop (:attr:`io`), made with the
        claims of the lanes that start in the same turn (one round trip)."""

        def claimed(claim: Claim) -> None:
            self._claimed(claim, None)

        claim = await self._claiming(self.io, (key, None, 0, known), orphan=claimed)
        claimed(claim)
        return claim

    @property
    def claim_round_trips(self) -> int:
        """The round trips :meth:`claim_async` made (for tests and benchmarks)."""
        return self._claiming.groups

    @property
    def record_round_trips(self) -> int:
        """The transactions :meth:`record_async` made (for tests and benchmarks)."""
        return self._recording.groups

    def round(
        self, job: Job, envelope: Envelope, body: bytes, state: spool.JobState | None = None
    ) -> Round:
        """The round to record now. ``state``: what was read before it (:func:`spool.load_jobs`);
        read now when not given."""
        if state is None:
            state = spool.load_job(self.client, envelope.id, job.domain)
        lifetime = self.config.delivery.max_queue_lifetime
        return Round(job, envelope, body, state, time.time(), envelope.received_at + lifetime)

    def record(
        self,
        round_: Round,
        outcome: Outcome,
        upcoming: tuple[str, str] | None = None,
        pipe: redis.client.Pipeline | None = None,
        premark: bool = False,
        known: Envelope | None = None,
    ) -> Claim | None:
        """Write the round's results in one transaction, with the DSN it calls for (if any);
        delete the message once every recipient is final. ``upcoming``: the (message id, domain)
        the batch looks at next, claimed in this transaction (with its in-flight mark when
        ``premark``; ``known``: its envelope, when read earlier); its claim is returned (None
        without ``upcoming``). ``pipe``: the caller's transaction (after ``multi()``, with its
        own commands staged first and what it decided on WATCHed); executed here, and then
        ``redis.WatchError`` propagates to the caller. When the recording fails, a claim it took
        for ``upcoming`` all the same is released (the caller never sees it: held, it would be
        kept alive as long as the process lives)."""
        peer = self._last_peers.get(upcoming[1]) if premark and upcoming is not None else None
        note = in_flight_note(peer) if peer is not None else None
        try:
            next_claim = self._write(Writes(round_, outcome, upcoming, note, known), pipe)
        except Exception:
            if upcoming is not None:
                self.claims.release_all([upcoming])
            raise
        if next_claim is not None:
            self._claimed(next_claim, peer)
        return next_claim

    async def record_async(
        self,
        round_: Round,
        outcome: Outcome,
        upcoming: tuple[str, str] | None = None,
        premark: bool = False,
        known: Envelope | None = None,
    ) -> Claim | None:
        """:meth:`record`, off the loop (:attr:`io`), in ONE transaction with the rounds the
        process's other lanes record in the same turn (:meth:`_record_all`), never left
        half-way (a cancellation waits for it to commit or fail); the claim it took for
        ``upcoming`` is noted on the loop, even when the lane was cancelled meanwhile. No
        premark with ``redis_min_replicas`` (:meth:`claim`)."""
        premark = premark and not self.min_replicas
        peer = self._last_peers.get(upcoming[1]) if premark and upcoming is not None else None
        note = in_flight_note(peer) if peer is not None else None

        def claimed(next_claim: Claim | None) -> None:
            if next_claim is not None:
                self._claimed(next_claim, peer)

        if upcoming is not None and note is not None:  # as claim_async: a failed batch drops
            self._asked[upcoming] = note  # the premark when no DATA of the job followed it
        writes = Writes(round_, outcome, upcoming, note, known)
        next_claim = await self._recording(self.io, writes, orphan=claimed)
        claimed(next_claim)
        return next_claim

    def _write(self, writes: Writes, pipe: redis.client.Pipeline | None) -> Claim | None:
        """The Redis side of :meth:`record` (any thread): it reads no state of the loop's."""
        return self._write_prepared(self._prepare(writes), pipe)

    def _prepare(self, writes: Writes) -> Writes:
        """What a round's recording writes besides its results: the DSN it calls for, the
        redacted twin of a REQUIRETLS DSN that failed for good (past the queue lifetime, what
        would be deferred is bounced first)."""
        round_, outcome = writes.round_, writes.outcome
        expire(round_, outcome, self.config.delivery.max_queue_lifetime)
        notice = self._notice(round_, outcome)
        return replace(writes, notice=notice, fallback=self._fallback(round_, outcome))

    def _notice(self, round_: Round, outcome: Outcome) -> dsn.Notice | None:
        """:func:`services.deliver.dsn.notice`; a DSN (bounce or delay notice) about recipients
        a delivery to whose domain was found interrupted says the host may have the message
        (:func:`services.deliver.dsn.interrupted_note`): one GET, only when a DSN is due."""
        made = partial(
            dsn.notice, round_, outcome, self.config.hostname,
            self.config.delivery.delay_warning_after,
        )  # fmt: skip
        notice = made()
        if notice is not None and (note := self._interrupted_note(round_)) is not None:
            notice = made([note])
        return notice

    def _interrupted_note(self, round_: Round) -> str | None:
        """:func:`services.deliver.dsn.interrupted_note` for the round's domain, from what
        ``note_interrupted`` left (one GET, whatever the message's size or number of domains).
        Advice: a value that cannot be read (written by hand, another version) is logged, never
        a round that cannot be recorded, parked again and again, its sender never told. A Redis
        error propagates (the task runs again), as the recording's would."""
        raw = self.client.get(spool.interrupted_key(*round_.job.key))
        if raw is None:
            return None
        try:
            found = json.loads(raw)
            return dsn.interrupted_note(found if isinstance(found, dict) else {})
        except Exception:  # bad JSON, a date out of range: the bounce goes without the note
            log.exception("no note on interrupted deliveries for %s to %s", *round_.job.key)
            return None

    def _write_prepared(self, writes: Writes, pipe: redis.client.Pipeline | None) -> Claim | None:
        if pipe is not None:
            return self._record(writes, pipe)
        while True:
            try:
                return self._record(writes)
            except redis.exceptions.WatchError:  # another job of the message sent the notice
                continue  # or finished the message meanwhile: look again

    def _record(self, writes: Writes, given: redis.client.Pipeline | None = None) -> Claim | None:
        with given or self.client.pipeline(transaction=True) as pipe:
            notice, message_id = writes.notice, writes.round_.envelope.id
            delayed = notice is not None and notice.action == dsn.DELAYED
            if delayed and given is None and not self._delay_notice_due(pipe, message_id):
                writes = replace(writes, notice=None)
            before = len(pipe)  # a given transaction's own commands come first
            finish = self._stage(pipe, writes)
            replies = pipe.execute(raise_on_error=False)
        caller = next((r for r in replies[:before] if isinstance(r, Exception)), None)
        if caller is not None:  # the caller's first: raised, as execute() would
            with contextlib.suppress(Exception):
                finish(replies)  # the round committed all the same (its next claim is held)
            raise caller
        return finish(replies)  # raises the round's own first error

    def _stage(
        self, pipe: redis.client.Pipeline, writes: Writes
    ) -> Callable[[list[Any]], Claim | None]:
        """A round's writes, staged into ``pipe`` (a transaction, perhaps with other rounds');
        returns what follows its commit, given the transaction's replies: the claim of the
        lane's next job, or the first error among the round's own replies, raised. The next
        job's claim may have been taken even so (the transaction runs every command): it is
        then held, so that the failing batch releases it with the rest of its claims rather
        than leave it to expire while another process waits for it."""
        start = len(pipe)
        round_, outcome, notice = writes.round_, writes.outcome, writes.notice
        upcoming = writes.upcoming
        # Final when nothing is left: known here unless another domain's job is still open.
        final = {**round_.state.final, **outcome.final}
        complete = set(final) >= set(round_.envelope.recipients)
        sts_failures, ttl = 0, self.config.trace_ttl
        rec = recording.Recording(round_, outcome, notice)
        events = recording.round_events(rec)
        if outcome.sts is not None:  # TLSRPT counts ride this transaction
            sts_failures = tlsrpt.stage(pipe, outcome.sts, outcome.attempts, round_.now)
        retention = self.config.posture.retention
        at_posture, posture_counts = recording.stage_posture(pipe, round_, outcome, retention)
        events += recording.stage_states(pipe, rec)
        if outcome.deferred:
            schedule = self.config.delivery.retry_schedule
            events.append(recording.stage_retry(pipe, rec, schedule))
        if notice is not None:
            events.append(recording.stage_notice(pipe, round_.envelope.id, notice, ttl))
        if writes.fallback is not None:
            events.append(recording.stage_fallback(pipe, round_.envelope.id, *writes.fallback, ttl))
        self.claims.stage_release(pipe, round_.job.key)
        recording.stage_leave_line(pipe, round_.job, self.config)
        at_upcoming = len(pipe)
        if upcoming is not None:
            known = writes.known is not None
            self.claims.stage_take(pipe, upcoming, writes.note, self._mark_ttl, known)
        at_states = recording.stage_end(pipe, rec, events, complete, self._rcpt_ttl, ttl)
        end = len(pipe)

        def finish(replies: list[Any]) -> Claim | None:
            error = next((r for r in replies[start:end] if isinstance(r, Exception)), None)
            if error is not None:
                if upcoming is not None and not isinstance(replies[at_upcoming], Exception):
                    self.claims.taken(upcoming, replies[at_upcoming], writes.known)
                raise error
            next_claim = None
            if upcoming is not None:
                next_claim = self.claims.taken(upcoming, replies[at_upcoming], writes.known)
            try:  # committed: what follows must not make the caller record the round again
                self._count(rec, sts_failures)
                _posture_recorded(replies, at_posture, posture_counts, round_.job.key)
                if complete:
                    _final(final.values())
                elif at_states is not None:
                    self.finish_if_final(round_.envelope, replies[at_states])
            except redis.exceptions.RedisError:
                raise  # the task runs again; the recorded round is then skipped (final/deferred)
            except Exception:
                log.exception("after recording %s to %s", *round_.job.key)
            return next_claim

        return finish

    def _record_all(self, requests: list[Writes]) -> list[Claim | Exception | None]:
        """The rounds of :meth:`record_async` made in one turn of the loop, in ONE transaction
        (one round trip; Redis applies it whole). A round whose own commands failed, or whose
        staging raised (then nothing of it is staged), gets its exception; the others stand.
        A round that sends a "delayed" DSN needs a transaction of its own (it watches the
        message: :meth:`_delay_notice_due`), made after."""
        results: list[Claim | Exception | None] = [None] * len(requests)
        staged: list[tuple[int, Callable[[list[Any]], Claim | None]]] = []
        alone: list[tuple[int, Writes]] = []
        with self.client.pipeline(transaction=True) as pipe:
            for n, request in enumerate(requests):
                start = len(pipe)
                try:
                    writes = self._prepare(request)
                    if writes.notice is not None and writes.notice.action == dsn.DELAYED:
                        alone.append((n, writes))
                        continue
                    finish = self._stage(pipe, writes)
                except Exception as exc:  # a bug of ours: this round alone is not written
                    del pipe.command_stack[start:]
                    results[n] = exc
                    continue
                staged.append((n, finish))
            replies: list[Any] = pipe.execute(raise_on_error=False) if staged else []
        for n, finish in staged:
            try:
                results[n] = finish(replies)  # raises the round's own first error
            except Exception as exc:
                results[n] = exc
        for n, writes in alone:
            try:
                results[n] = self._write_prepared(writes, None)
            except Exception as exc:
                results[n] = exc
        return results

    def _fallback(self, round_: Round, outcome: Outcome) -> tuple[Envelope, bytes] | None:
        """The redacted twin to send now that this REQUIRETLS DSN failed for good, if any."""
        if not dsn.fallback_due(round_.envelope, bool(outcome.bounced)):
            return None
        body = spool.load_fallback(self.client, round_.envelope.id)
        if body is None:
            return None
        return dsn.fallback_envelope(round_.envelope, body, round_.now), body

    def _count(self, rec: recording.Recording, sts_failures: int) -> None:
        """The round's metrics, once its transaction committed."""
        outcome = rec.outcome
        observe.delivery_round(outcome, rec.round.envelope.received_at, rec.round.now)
        if outcome.sts is not None:
            observe.mta_sts(outcome.sts, outcome, sts_failures)
            if outcome.sts.dane is not None:
                observe.dane(outcome.sts.dane, outcome)
        if rec.notice is not None:
            observe.dsn_sent(rec.notice.action)

    # ----------------------------------------------------------------- nothing to send

    def close(self, job: Job, envelope: Envelope | None) -> None:
        """Nothing left to send (recipients final, or the message gone): the job leaves the
        waiting set, its mark and its claim; a message an earlier run left unfinished is
        finished."""
        message_id, domain = job.key
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(spool.WAITING_DELIVER, spool.waiting_job(message_id, domain))
            pipe.delete(spool.in_flight_key(message_id, domain))
            self.claims.stage_release(pipe, job.key)
            recording.stage_leave_line(pipe, job, self.config)
            if envelope is None:  # gone: so are its recipients' states and its index entry
                pipe.delete(spool.rcpt_key(message_id))
                scheduler.stage_completion(pipe, message_id)
            pipe.hgetall(spool.rcpt_key(message_id))
            states = pipe.execute()[-1]
        if envelope is not None:  # an earlier run recorded them and died before finishing
            self.finish_if_final(envelope, states)

    def leave(self, claim: Claim) -> None:
        """Nothing to send for this copy of a job: its pending recipients were deferred by this
        attempt or a later one (their retry is in the deferred set, or on its way). Only the
        claim goes, with the in-flight mark it set; the waiting set belongs to the retry."""
        with self.client.pipeline(transaction=True) as pipe:
            if claim.marked:
                pipe.delete(spool.in_flight_key(*claim.key))
            self.claims.stage_release(pipe, claim.key)
            pipe.execute()

    def finish_if_final(self, envelope: Envelope, raw: dict[bytes, bytes]) -> None:
        """``raw``: the recipients' states read in the recording transaction (after its writes),
        so of two domain jobs finishing together the later one sees every recipient final."""
        final, _ = spool.recipient_states(raw)
        if set(final) >= set(envelope.recipients):
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(spool.msg_key(envelope.id))
                pipe.delete(spool.rcpt_key(envelope.id))
                pipe.rpush(spool.trace_key(envelope.id), spool.event("completed"))
                pipe.expire(spool.trace_key(envelope.id), int(self.config.trace_ttl))
                scheduler.stage_completion(pipe, envelope.id)
                deleted = pipe.execute()[0]
            if deleted:  # both may see all final; only one of them deleted the message
                _final(final.values())


def _posture_recorded(
    replies: Sequence[Any], at: int | None, counts: Mapping[str, int], key: tuple[str, str]
) -> None:
    """The posture script's reply (failed writes): counted as metrics, or as a recording error
    (logged; the round itself committed)."""
    if at is None:
        return
    if replies[at]:
        log.warning("posture counts of %s to %s not recorded: %s writes failed", *key, replies[at])
        observe.posture_error()
    else:
        observe.posture(counts)


def _final(states: Iterable[str]) -> None:
    """A message became final (counted by whichever transaction deleted it)."""
    observe.message_final(states)
