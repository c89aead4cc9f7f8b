"""Calls made in one turn of the deliver loop, made together (services/deliver/offload.py,
``Gathered``): the lanes of a batch that start together claim their first jobs in one Redis
round trip, and the lanes whose rounds end in one turn record them in one transaction (issue
#20 item 4). Each caller still gets its own claim or its own error; a caller
cancelled while its group is under way waits for it and hands its result on, as a single call
does. Real Redis; counts and ordering only, no timed assertions."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import redis

from services.common import spool
from services.common.jobs import Job
from services.common.model import Decision, Envelope, Reply, TlsMode, new_message_id
from services.common.redisserver import EmbeddedRedis
from services.deliver.attempt import Peer
from services.deliver.delivery import Outcome
from services.deliver.ledger import Ledger
from services.deliver.offload import Gathered, Offload
from tests.test_batching import BODY, write_config
from tests.test_exactly_once import deferred_jobs, delay_notices, delayed_rounds
from tests.test_offload import TURNS

LANES = 5


def stored_jobs(store: redis.Redis, count: int) -> list[tuple[Job, Envelope]]:
    decision = Decision(domain="d.test", tls=TlsMode.OPPORTUNISTIC)
    jobs = []
    for n in range(count):
        envelope = Envelope(
            new_message_id(), "s@o.test", (f"r{n}@d.test",), received_at=time.time()
        )
        with store.pipeline(transaction=True) as pipe:
            spool.stage_message(pipe, envelope, BODY, spool.TRACE_TTL)
            pipe.execute()
        jobs.append((Job(envelope.id, "d.test", envelope.recipients, decision), envelope))
    return jobs


def test_claims_made_in_one_turn_take_one_round_trip(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    jobs = stored_jobs(store, LANES + 1)

    async def main() -> None:
        claims = await asyncio.gather(
            *(ledger.claim_async(job.key, envelope) for job, envelope in jobs[:LANES])
        )
        assert [c.key for c in claims] == [job.key for job, _ in jobs[:LANES]]
        assert all(c.ours and c.state is not None for c in claims)
        assert ledger.claim_round_trips == 1
        alone = await ledger.claim_async(jobs[LANES][0].key, jobs[LANES][1])
        assert alone.ours and ledger.claim_round_trips == 2

    asyncio.run(main())
    for job, _ in jobs:
        assert store.get(spool.claim_key(*job.key)) == ledger.claims.token.encode()


def test_a_claim_that_fails_fails_alone(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    (ok, ok_env), (bad, bad_env) = stored_jobs(store, 2)
    store.rpush(spool.claim_key(*bad.key), "not a claim")  # WRONGTYPE for its SET

    async def main() -> None:
        good, failed = await asyncio.gather(
            ledger.claim_async(ok.key, ok_env),
            ledger.claim_async(bad.key, bad_env),
            return_exceptions=True,
        )
        assert isinstance(failed, redis.exceptions.ResponseError)
        assert not isinstance(good, BaseException) and good.ours
        assert ledger.claim_round_trips == 1

    asyncio.run(main())


def test_a_caller_cancelled_while_its_group_runs_waits_and_hands_its_result_on() -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[list[str]] = []
    orphans: list[str] = []

    def run(items: list[str]) -> list[str | Exception]:
        started.set()
        assert release.wait(10), "the test never released the group"
        ran.append(items)
        return [item.upper() for item in items]

    gathered: Gathered[str, str] = Gathered(run)
    io = Offload(1)

    async def main() -> None:
        cancelled = asyncio.create_task(gathered(io, "a", orphan=orphans.append))
        other = asyncio.create_task(gathered(io, "b", orphan=orphans.append))
        assert await asyncio.to_thread(started.wait, 10)
        cancelled.cancel()
        for _ in range(TURNS):
            await asyncio.sleep(0)
        assert not cancelled.done(), "the cancellation must wait for the group under way"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await other == "B"

    asyncio.run(main())
    assert ran == [["a", "b"]], "one group, both calls in it"
    assert orphans == ["A"], "the cancelled caller's result is handed on, the other's returned"
    io.close()


def test_an_error_of_the_whole_group_reaches_every_caller() -> None:
    def run(items: list[str]) -> list[str | Exception]:
        raise redis.exceptions.ConnectionError("Redis went away")

    gathered: Gathered[str, str] = Gathered(run)

    async def main() -> None:
        results = await asyncio.gather(
            gathered(Offload(0), "a"), gathered(Offload(0), "b"), return_exceptions=True
        )
        assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results)

    asyncio.run(main())


def test_marks_written_in_one_turn_take_one_round_trip(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The lanes that reach DATA in the same turn write their in-flight marks together; each
    returns once its own mark is in Redis."""
    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    jobs = stored_jobs(store, LANES)
    peer = Peer("mx.d.test", "192.0.2.1", 25, "mx.d.test")

    async def main() -> None:
        await asyncio.gather(*(ledger.claim_async(j.key, e) for j, e in jobs))
        await asyncio.gather(*(ledger.mark_in_flight_async(j, peer) for j, _ in jobs))
        assert ledger.mark_round_trips == 1

    asyncio.run(main())
    for job, _ in jobs:
        note = store.get(spool.in_flight_key(*job.key))
        assert note is not None and b"mx.d.test" in note


# --------------------------------------------------------------------------- recordings


def delivered(job: Job) -> Outcome:
    return Outcome(delivered=dict.fromkeys(job.recipients, Reply(250, "2.0.0", "ok")))


def test_rounds_recorded_in_one_turn_take_one_transaction(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Each round is recorded whole (its message final and gone, its claim released) and
    the lane's next job claimed, premarked, in the same transaction."""
    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    jobs = stored_jobs(store, LANES * 2)
    peer = Peer("mx.d.test", "192.0.2.1", 25, "mx.d.test")

    async def main() -> None:
        firsts = jobs[:LANES]
        claims = await asyncio.gather(*(ledger.claim_async(j.key, e) for j, e in firsts))
        await ledger.mark_in_flight_async(firsts[0][0], peer)  # the domain's last peer
        rounds = [
            ledger.round(j, e, BODY, c.state) for (j, e), c in zip(firsts, claims, strict=True)
        ]
        upcoming = jobs[LANES:]
        nexts = await asyncio.gather(
            *(
                ledger.record_async(r, delivered(r.job), j.key, premark=True, known=e)
                for r, (j, e) in zip(rounds, upcoming, strict=True)
            )
        )
        assert ledger.record_round_trips == 1
        assert [c.key for c in nexts if c is not None] == [j.key for j, _ in upcoming]
        assert all(c is not None and c.ours and c.marked for c in nexts)

    asyncio.run(main())
    for job, _ in jobs[:LANES]:
        assert not store.exists(spool.msg_key(job.id)), "recorded final: the message is gone"
        assert not store.exists(spool.claim_key(*job.key))
        assert not store.exists(spool.in_flight_key(*job.key))
    for job, _ in jobs[LANES:]:
        assert store.get(spool.claim_key(*job.key)) == ledger.claims.token.encode()
        assert store.exists(spool.in_flight_key(*job.key)), "premarked with its claim"


def test_a_round_whose_writes_fail_fails_alone_the_others_are_recorded(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    (ok, ok_env), (bad, bad_env) = stored_jobs(store, 2)
    store.delete(spool.trace_key(bad.id))
    store.set(spool.trace_key(bad.id), "not a list")  # WRONGTYPE for its trace events

    async def main() -> None:
        claims = await asyncio.gather(
            ledger.claim_async(ok.key, ok_env), ledger.claim_async(bad.key, bad_env)
        )
        rounds = [
            ledger.round(ok, ok_env, BODY, claims[0].state),
            ledger.round(bad, bad_env, BODY, claims[1].state),
        ]
        good, failed = await asyncio.gather(
            *(ledger.record_async(r, delivered(r.job)) for r in rounds), return_exceptions=True
        )
        assert good is None
        assert isinstance(failed, redis.exceptions.ResponseError)
        assert ledger.record_round_trips == 1

    asyncio.run(main())
    assert not store.exists(spool.msg_key(ok.id)), "the other round is recorded"
    assert not store.exists(spool.claim_key(*ok.key))


def test_rounds_that_send_a_delayed_dsn_are_recorded_apart_one_notice_per_message(
    store: redis.Redis,
) -> None:
    """A "delayed" DSN's transaction watches its message (one notice for the message, whichever
    of its jobs records first): such rounds do not join the turn's transaction, and of two
    domain jobs of one message recorded in one turn, one sends the notice."""
    config, envelope, rounds = delayed_rounds(store)
    ledger = Ledger(config, store)

    async def main() -> None:
        await asyncio.gather(
            *(
                ledger.record_async(ledger.round(job, envelope, BODY, state), outcome)
                for job, state, outcome in rounds
            )
        )

    asyncio.run(main())
    assert len(delay_notices(store, envelope.id)) == 1, "one delay notice per message"
    assert len(deferred_jobs(store)) == 2
