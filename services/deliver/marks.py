"""The ledger's in-flight marks (RFC 1047): :class:`Marks`, a part of
:class:`services.deliver.ledger.Ledger` (its docstring states what the ledger guarantees as a
whole), with the premarks the recordings' claims write ahead and what a failed batch deletes.

- In-flight marks (RFC 1047): :meth:`Marks.mark_in_flight` just before DATA; a mark found by a
  later run means a worker died while sending, and :meth:`Marks.note_interrupted` says so.
  Within a batch the recording transaction also claims the next job and sets its mark (one
  round trip per job).
- Replicated marks (``redis_min_replicas`` > 0): a mark is worth something after a failover
  only if a replica has it — a master that fails over twice (back to the old master) discards
  what the interim master took, marks included, and the re-run would send again unwarned. So
  DATA goes out only once its mark is acknowledged by that many replicas: the mark is written
  just before DATA (no premark is written ahead: another connection's write is not counted by
  this connection's ``WAIT``), followed by ``WAIT numreplicas timeout`` on the same connection, in
  the marks' pipeline of the loop turn (one ``WAIT`` for all of them: it counts every earlier
  write of its connection). Fewer acknowledgements in ``redis_replica_timeout`` → each of the
  group's marks fails with :class:`MarkNotReplicated` (the round is deferred unsent,
  services/deliver/sending.py; its recording deletes the mark). To a peer without PIPELINING the
  mark is written and acknowledged before MAIL (:meth:`Marks.mark_before_mail_async`), so
  that nothing waits between the last RCPT reply and DATA. With 0 (the default) no ``WAIT`` is
  sent and the premarks spare their round trip as before.

Threads: the Redis I/O of :meth:`Marks.mark_in_flight_async` and
:meth:`Marks.mark_before_mail_async` runs in the process's thread pool (:attr:`Marks.io`), with
the marks of the lanes that reach them in the same turn of the loop (one pipeline); the premarks
and the last peers are changed on the loop only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Container, Iterable, Sequence
from typing import Any

import redis

from services.common import spool
from services.common.config import Config
from services.common.jobs import Job
from services.deliver import observe
from services.deliver.attempt import Peer
from services.deliver.claims import Claim
from services.deliver.offload import Gathered, Offload

log = logging.getLogger("tlsrelay.deliver")
LAST_PEERS = 1000  # domains whose last peer is remembered (for the next job's premark)

RFC1047 = (
    "a worker stopped while sending DATA; recipients not recorded as delivered are sent again, "
    "so the destination may receive this message twice (RFC 1047)"
)
# KEYS: an in-flight mark. ARGV: the note a claim wrote. Deleted only if it is still that note.
_DROP_NOTE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class MarkNotReplicated(Exception):
    """An in-flight mark was written on the master but fewer than ``redis_min_replicas``
    replicas acknowledged it within ``redis_replica_timeout``: its DATA must not go out (a
    failover back to a master without it would send the message again unwarned). Not a Redis
    error: the round is deferred unsent, the task goes on."""

    def __init__(self, acknowledged: int, wanted: int, timeout: float) -> None:
        super().__init__(
            f"in-flight mark not acknowledged by {wanted} replica{'s' if wanted != 1 else ''} "
            f"within {timeout:g} s ({acknowledged} did): not sent"
        )
        self.acknowledged, self.wanted, self.timeout = acknowledged, wanted, timeout


class Marks:
    """Needs, from the ledger: its client, configuration, mark TTL and :attr:`io` (where the
    *_async methods make their Redis calls); its state is set up by :meth:`_init_marks`."""

    client: redis.Redis
    config: Config
    io: Offload
    _mark_ttl: int

    def _init_marks(self, config: Config) -> None:
        # DATA only once its mark is on this many replicas (WAIT after the mark; 0: no WAIT).
        self.min_replicas = config.redis_min_replicas
        self.replica_timeout = config.redis_replica_timeout
        # (id, domain) → (address, port) of the marks written and acknowledged by the replicas
        # before MAIL (a peer without PIPELINING, mark_before_mail_async), until that DATA.
        self._acknowledged: dict[tuple[str, str], tuple[str, int]] = {}
        # Where the last DATA to each domain went (any lane's: a guess for the domain's next job;
        # per domain, as batches to several domains run side by side), newest last, bounded.
        self._last_peers: dict[str, Peer] = {}
        # (id, domain) → (address, port) of the in-flight marks the claims wrote: one per job a
        # lane of the batch has claimed ahead (services/deliver/batch.py runs several at once).
        self._premarked: dict[tuple[str, str], tuple[str, int]] = {}
        # The lanes that reach DATA in one turn write the marks of their DATA in one round trip
        # (offload.Gathered).
        self._marking: Gathered[tuple[str, str], Any] = Gathered(
            lambda marks: self._mark_all(marks),  # (a test may replace _mark_all)
            slow=self.min_replicas > 0,  # WAIT: threads
        )
        # (id, domain) → the in-flight note a recording's claim of the lane's next job asked to
        # write, until DATA of the job (mark_in_flight*): one still here when its batch fails
        # marks no DATA, and is deleted (drop_premarks), else the next run reports an
        # interruption.
        self._asked: dict[tuple[str, str], str] = {}

    @property
    def mark_round_trips(self) -> int:
        """The round trips :meth:`mark_in_flight_async` made (for tests and benchmarks)."""
        return self._marking.groups

    def new_batch(self, keep: Container[tuple[str, str]] = ()) -> None:
        """A batch begins: the premarks of the last one are forgotten (each is also replaced
        whenever its job is claimed again) — but those of the jobs ``keep`` (the process's
        other batches under way work on them)."""
        self._premarked = {k: v for k, v in self._premarked.items() if k in keep}
        self._acknowledged = {k: v for k, v in self._acknowledged.items() if k in keep}
        self._asked = {k: v for k, v in self._asked.items() if k in keep}

    def unused_premarks(self, keys: Iterable[tuple[str, str]]) -> list[tuple[tuple[str, str], str]]:
        """The notes the recordings' claims asked to write for ``keys`` (a failed batch's jobs)
        that no DATA of theirs followed, forgotten here (on the loop): for :meth:`drop_premarks`."""
        return [(key, self._asked.pop(key)) for key in keys if key in self._asked]

    def drop_premarks(self, notes: Sequence[tuple[tuple[str, str], str]]) -> None:
        """Delete each mark that is still exactly the note a claim wrote (no DATA followed it:
        :meth:`unused_premarks`); best effort, any thread. A mark written since (DATA) differs
        and stays."""
        if not notes:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key, note in notes:
                    pipe.eval(_DROP_NOTE, 1, spool.in_flight_key(*key), note)
                pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("could not delete %d unused in-flight marks: %s", len(notes), exc)

    def _claimed(self, claim: Claim, peer: Peer | None) -> None:
        # Always replaced: a premark remembered from an earlier claim must never stand in for
        # this job's mark (its DATA would go out unmarked, an RFC 1047 duplicate unreported).
        self._premarked.pop(claim.key, None)
        self._acknowledged.pop(claim.key, None)
        if claim.marked and peer is not None:
            self._premarked[claim.key] = (peer.address, peer.port)

    # ----------------------------------------------------------------- in flight (RFC 1047)

    def mark_in_flight(self, job: Job, peer: Peer) -> None:
        """Mark the job as sending DATA; ``record`` clears the mark in its transaction. A mark
        found at the start of a later run means a worker died in the RFC 1047 window.

        Within a batch the mark is usually set already: the previous job's recording
        transaction claimed the next job and set its mark, naming the peer it had just used
        (one Redis round trip less per message). It is set here when that guess was wrong or
        there was none. So the mark may precede DATA by a few commands: a worker dying in
        between reports a possible duplicate that cannot be one (on the safe side).

        With ``min_replicas`` the deliverer has written and acknowledged the mark before MAIL
        (:meth:`mark_before_mail_async`): nothing to write here. Should it not have, the mark
        is written and waited for here, on the loop (raises :class:`MarkNotReplicated`)."""
        if self._marks(job, peer):
            key = spool.in_flight_key(job.id, job.domain)
            if self.min_replicas:
                (result,) = self._mark_all([(key, in_flight_note(peer))])
                if isinstance(result, Exception):
                    raise result
                return
            self.client.set(key, in_flight_note(peer), ex=self._mark_ttl)

    async def mark_in_flight_async(self, job: Job, peer: Peer) -> None:
        """:meth:`mark_in_flight`, its SET (:attr:`io`) made with those of the lanes that reach
        DATA in the same turn of the loop (one round trip); returns once the mark is written, so
        DATA goes out only after it (a cancellation meanwhile waits for the write, then
        propagates: no DATA). With ``min_replicas``: only once the replicas acknowledged it,
        else :class:`MarkNotReplicated` (module docstring)."""
        if self._marks(job, peer):
            key = spool.in_flight_key(job.id, job.domain)
            await self._marking(self.io, (key, in_flight_note(peer)))

    async def mark_before_mail_async(self, job: Job, peer: Peer) -> None:
        """With ``min_replicas``, to a peer without PIPELINING: the mark written and
        acknowledged by the replicas before MAIL (:meth:`mark_in_flight_async`'s pipeline and
        ``WAIT``), as between the last RCPT reply and DATA nothing may wait
        (services/deliver/attempt.py, ``Hooks``); that DATA to ``peer`` then writes nothing
        (:meth:`mark_in_flight`). Raises :class:`MarkNotReplicated` when the replicas did not
        acknowledge it in time (nothing was sent yet). A mark no DATA follows is deleted by
        the round's recording, or by a failed batch (:meth:`unused_premarks`)."""
        self._acknowledged.pop(job.key, None)
        key, note = spool.in_flight_key(job.id, job.domain), in_flight_note(peer)
        self._asked[job.key] = note  # until DATA: a failed batch drops it (drop_premarks)
        await self._marking(self.io, (key, note))
        self._acknowledged[job.key] = (peer.address, peer.port)

    def _mark_all(self, marks: list[tuple[str, str]]) -> list[Any]:
        """The in-flight marks (key, note) of one turn, in one pipeline; a SET that failed is
        its exception (its lane sends no DATA), the others stand. With ``min_replicas``, one
        ``WAIT`` after them on the same connection covers them all: too few acknowledgements
        make each written mark a :class:`MarkNotReplicated`."""
        with self.client.pipeline(transaction=False) as pipe:
            for key, note in marks:
                pipe.set(key, note, ex=self._mark_ttl)
            if not self.min_replicas:
                return pipe.execute(raise_on_error=False)
            wait_ms = max(1, round(self.replica_timeout * 1000))
            pipe.wait(self.min_replicas, wait_ms)  # on this connection, after the SETs
            replies = pipe.execute(raise_on_error=False)
        *written, acknowledged = replies
        if isinstance(acknowledged, Exception):  # a Redis error: as a failed SET
            return [reply if isinstance(reply, Exception) else acknowledged for reply in written]
        if int(acknowledged) >= self.min_replicas:
            return written
        count = int(acknowledged)  # each round logs it (services/deliver/sending.py)
        return [
            reply
            if isinstance(reply, Exception)
            else MarkNotReplicated(count, self.min_replicas, self.replica_timeout)
            for reply in written
        ]

    def _marks(self, job: Job, peer: Peer) -> bool:
        """Whether DATA of ``job`` to ``peer`` needs its mark written (not premarked there)."""
        self._asked.pop(job.key, None)  # DATA may follow: its mark stays, whatever happens
        self._last_peers.pop(job.domain, None)
        self._last_peers[job.domain] = peer
        if len(self._last_peers) > LAST_PEERS:
            del self._last_peers[next(iter(self._last_peers))]
        # A premark is used once: a second DATA of the round (another address) marks again.
        where = (peer.address, peer.port)
        premarked = self._premarked.pop(job.key, None) == where
        acknowledged = self._acknowledged.pop(job.key, None) == where
        # With min_replicas a premark does not do (no WAIT counted it): only a mark written and
        # acknowledged before MAIL to this peer spares the write.
        return not acknowledged if self.min_replicas else not premarked

    def note_interrupted(self, job: Job, raw: bytes) -> None:
        """An earlier run's in-flight mark was found: a worker died while sending DATA."""
        previous = json.loads(raw)
        host, since = previous["host"], previous["at"]
        event = spool.event("interrupted", domain=job.domain, host=host, since=since, note=RFC1047)
        ttl = int(self.config.trace_ttl)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(spool.trace_key(job.id), event)
            pipe.expire(spool.trace_key(job.id), ttl)
            # For a bounce that may follow: one GET there, not a read of the whole trace.
            found = json.dumps({"host": host, "since": since})
            pipe.set(spool.interrupted_key(job.id, job.domain), found, ex=ttl)
            pipe.execute()
        observe.interrupted()


def in_flight_note(peer: Peer) -> str:
    """What an in-flight mark says: where DATA goes, and since when."""
    return json.dumps({"host": peer.host, "address": peer.address, "at": time.time()})
