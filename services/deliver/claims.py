"""Exclusive claims on delivery jobs: one worker process works on a (message, domain) job at a time.

A task can reach two workers at once — kombu hands an unacknowledged task to another worker after
``celery.visibility_timeout``, a dead worker's tasks are handed back, the rescue sweep re-queues
what looks lost, and a task may carry a job twice — and a plain "in flight" mark let both send
(issue #16: 6 messages, 9 arrivals). So before a worker looks at a job it claims it:
``tlsrelay:claim:{id}:{domain}`` = its owner token (``host:pid:random``: the worker process), set
only if absent, in one Lua script that also reads the job's state as it is *after* the claim (the
envelope, the recipients' states, an earlier run's in-flight mark) — so whatever an earlier owner
recorded is seen, and a job is never sent by two processes at once. A job claimed by another
process is waited for (:attr:`Claim.owner`); its owner records it, or dies.

The claim is released (compare-and-delete) in the transaction that records the job, or closes,
parks or hands it back. Within a batch, the recording transaction of one job also claims the next
(one round trip per job, as before claims).

Lifetime: a claim lives ``delivery.claim_ttl`` — 15 s, or half ``delivery.job_timeout`` when
that is shorter — and a thread of the owning process refreshes it every third of that while the
process holds it. A dead process stops refreshing, so its claims are void within the TTL: no
longer than a silent worker takes to count as dead (15 s, ``services/common/liveness.py``),
before its tasks are handed back. A worker given a job whose claim is held waits for the claim
to end, at most its TTL (services/deliver/batch.py): a dead owner's claim delays the job by
seconds; a copy still held then is handed back (queued again), never dropped. A job cannot
hold a claim for long either: ``delivery.job_timeout`` abandons an attempt. The remaining
duplicate window: an owner cut off from Redis (or frozen) for longer than the TTL while it
sends may find that another worker sent the job too.

Failure: Redis errors propagate; the refresh thread logs them and tries again.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis

from services.common import spool
from services.common.model import Envelope

log = logging.getLogger("tlsrelay.deliver")

CLAIM_TTL = 15.0  # seconds (the default of delivery.claim_ttl); refreshed every third of it

# KEYS: claim, msg, rcpt, in-flight mark. ARGV: token, TTL (ms), in-flight note ('' = none),
# the note's TTL (s), '1' when the caller knows the envelope (then only whether the message is
# still stored comes back). Claimed by another: {0, owner}. Else (claimed now, or ours already):
# {1, envelope (or 1/0), delay_warned, rcpt as a flat list, the in-flight mark found, 1 when
# the note was written}. The note is written only for a stored message with no mark yet (an
# earlier run's mark stays: it says that run died while sending). Few commands (Redis counts
# each one a script calls): SET NX GET claims and reads the owner at once (Redis ≥ 7.0), one
# HMGET reads the envelope and the notice flag.
_CLAIM = """
local owner = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
if owner and owner ~= ARGV[1] then
  return {0, owner}
end
if owner then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local fields = redis.call('HMGET', KEYS[2], 'envelope', 'delay_warned')
local envelope = fields[1]
if ARGV[5] == '1' then
  envelope = envelope and 1 or 0
end
local mark = redis.call('GET', KEYS[4])
local marked = 0
if ARGV[3] ~= '' and envelope and envelope ~= 0 and not mark then
  redis.call('SET', KEYS[4], ARGV[3], 'EX', ARGV[4])
  marked = 1
end
return {1, envelope, fields[2], redis.call('HGETALL', KEYS[3]), mark, marked}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: claims. ARGV: token, TTL (ms). Extends those still ours; returns the others.
_REFRESH = """
local lost = {}
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    table.insert(lost, key)
  end
end
return lost
"""


def new_token() -> str:
    """An owner token naming this worker process (a restarted pid is a new owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Claim:
    """The answer to a claim: the job's state when it is ours, else who owns it."""

    key: tuple[str, str]  # (message id, domain)
    state: spool.JobState | None  # None: another process owns the job
    owner: str = ""  # that process (when state is None)
    marked: bool = False  # the claim wrote the in-flight note asked for

    @property
    def ours(self) -> bool:
        return self.state is not None


class Claims:
    """One worker process's claims: taken alone or inside the caller's transaction, released in
    the caller's transaction, kept alive by a thread while held."""

    def __init__(self, client: redis.Redis, ttl: float = CLAIM_TTL) -> None:
        self.client = client
        self.ttl = ttl
        self.token = new_token()
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None

    # ----------------------------------------------------------------- take

    def stage_take(
        self,
        pipe: redis.client.Pipeline,
        key: tuple[str, str],
        note: str | None = None,
        note_ttl: int = 0,
        known: bool = False,
    ) -> None:
        """Buffer the claim of ``key`` into ``pipe`` (read its reply with :meth:`taken`).
        ``note``: the in-flight mark to write when the claim is ours (a guess of the peer);
        ``known``: the caller has the envelope (read earlier: it never changes), so only
        whether the message is still stored is read."""
        message_id, domain = key
        pipe.eval(
            _CLAIM,
            4,
            spool.claim_key(message_id, domain),
            spool.msg_key(message_id),
            spool.rcpt_key(message_id),
            spool.in_flight_key(message_id, domain),
            self.token,
            int(self.ttl * 1000),
            note or "",
            max(1, note_ttl),
            "1" if known else "0",
        )

    def take(
        self,
        key: tuple[str, str],
        note: str | None = None,
        note_ttl: int = 0,
        known: Envelope | None = None,
    ) -> Claim:
        """Claim ``key`` now (one round trip); ``known``: its envelope, when read earlier."""
        (claim,) = self.take_all([(key, note, note_ttl, known)])
        if isinstance(claim, Exception):
            raise claim
        return claim

    def take_all(
        self, requests: Sequence[tuple[tuple[str, str], str | None, int, Envelope | None]]
    ) -> list[Claim | Exception]:
        """:meth:`take` for each (key, note, note TTL, known) at once: one round trip. A claim
        whose command failed is its exception; the others stand."""
        with self.client.pipeline(transaction=False) as pipe:
            for key, note, note_ttl, known in requests:
                self.stage_take(pipe, key, note, note_ttl, known is not None)
            replies = pipe.execute(raise_on_error=False)
        return [
            reply if isinstance(reply, Exception) else self.taken(key, reply, known)
            for (key, _, _, known), reply in zip(requests, replies, strict=True)
        ]

    def taken(self, key: tuple[str, str], reply: list[Any], known: Envelope | None = None) -> Claim:
        """The claim from the reply of :meth:`stage_take` (``known`` as given there); one we got
        is kept alive from now."""
        if int(reply[0]) == 0:
            owner = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
            return Claim(key, None, owner)
        stored, warned, flat, mark, marked = reply[1:6]
        rcpts = dict(zip(flat[::2], flat[1::2], strict=True))
        self._hold(spool.claim_key(*key))
        if known is None:
            state = spool.job_state(stored, warned, rcpts, mark)
        else:
            state = replace(spool.job_state(None, warned, rcpts, mark), envelope=known)
            if not stored:  # gone meanwhile (final)
                state = replace(state, envelope=None)
        return Claim(key, state, marked=bool(marked))

    # ----------------------------------------------------------------- release

    def stage_release(self, pipe: redis.client.Pipeline, key: tuple[str, str]) -> None:
        """Buffer into ``pipe``: the claim of ``key`` is released if it is still ours. It is no
        longer refreshed from now (should the transaction fail, it expires)."""
        claim = spool.claim_key(*key)
        pipe.eval(_RELEASE, 1, claim, self.token)
        with self._lock:
            self._held.discard(claim)

    def release_all(self, keys: Iterable[tuple[str, str]] | None = None) -> None:
        """Release whatever is still held (a batch that ended on an error) — of the jobs
        ``keys`` only, when given (the process's other batches keep theirs); best effort."""
        with self._lock:
            if keys is None:
                held, self._held = sorted(self._held), set()
            else:
                held = sorted(self._held & {spool.claim_key(*key) for key in keys})
                self._held -= set(held)
        if not held:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for claim in held:
                    pipe.eval(_RELEASE, 1, claim, self.token)
                pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:  # they expire within the TTL
            log.warning("could not release %d delivery claims: %s", len(held), exc)

    @property
    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    # ----------------------------------------------------------------- keep alive

    def _hold(self, claim: str) -> None:
        with self._lock:
            self._held.add(claim)
            if self._keeper is None:
                self._keeper = threading.Thread(
                    target=_keep, args=(weakref.ref(self), self.ttl / 3),
                    name="tlsrelay-claims", daemon=True,
                )  # fmt: skip
                self._keeper.start()

    def _keep_once(self) -> bool:
        """Refresh the held claims once; False (the keeper ends) when none is held."""
        with self._lock:
            held = sorted(self._held)
            if not held:
                self._keeper = None
                return False
        try:
            lost = self.refresh(held)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("could not refresh %d delivery claims: %s", len(held), exc)
            return True
        with self._lock:  # released meanwhile: not lost
            lost = [claim for claim in lost if claim in self._held]
        if lost:
            log.warning("delivery claims lost (another worker may send these): %s", lost)
        return True

    def refresh(self, claims: list[str]) -> list[str]:
        """Extend those of ``claims`` that are still ours by the TTL; return the others."""
        raw: list[bytes] = self.client.eval(
            _REFRESH, len(claims), *claims, self.token, int(self.ttl * 1000)
        )
        return [claim.decode() for claim in raw]


def _keep(claims: weakref.ref[Claims], every: float) -> None:
    """The keeper thread: refresh the held claims every third of the TTL; end when none is
    held, or when nothing else refers to their :class:`Claims` any more (a discarded object's
    claims run out with their TTL, as a dead process's do)."""
    pause = threading.Event()
    while True:
        pause.wait(every)
        alive = claims()
        if alive is None or not alive._keep_once():
            return
        del alive  # no strong reference while it sleeps
