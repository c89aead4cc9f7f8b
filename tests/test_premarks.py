"""In-flight marks written ahead of DATA, and rounds recorded together (found by review of
this session's gathering of Redis calls, services/deliver/offload.py ``Gathered``): a mark that
no DATA followed must not make a later claim report an interruption (RFC 1047) that never
happened, when Redis misbehaves before DATA — whether a claim or a recording wrote it (a lane's
first claim no longer premarks: the soak showed such marks reported as interruptions after
kills; these tests keep the property whatever marks early); a round that fails within a
gathered transaction leaves the others' replies and the message's end as they should be. Real
deliver code, real Redis, a real sink."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import spool
from services.common.redisserver import EmbeddedRedis
from services.deliver import claims as claims_module
from services.deliver.batch import Deliverer
from tests.peers import Sink
from tests.test_batching import queue_jobs, routed, run_batches

DOMAIN = "premark.test"
RECORDS = "records.test"


def events(client: redis.Redis, message_id: str) -> list[str]:
    return [e["event"] for e in spool.read_trace(client, message_id)]


def warmed(tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink) -> Deliverer:
    """A deliverer that has sent one message to DOMAIN: it knows the domain's last peer, so a
    lane's first claim there carries a premark."""
    config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=1)
    deliverer = Deliverer(config, spool.connect(valkey.url))
    (first,) = queue_jobs(store, DOMAIN, 1)
    run_batches(deliverer, [first])
    assert len(sink.messages) == 1
    assert deliverer.ledger._last_peers.get(DOMAIN) is not None
    return deliverer


def test_a_redis_error_before_data_leaves_no_mark_that_reports_an_interruption(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The lane claims its first job (premarked), then a Redis error before anything is sent
    (here: reading the batch's bodies) fails the task. The batch's end releases the claim but
    not the mark; the task runs again and reports "interrupted" for a message that was never
    sent (before 70f85ec the first claim wrote no mark, and nothing was reported)."""
    deliverer = warmed(tmp_path, valkey, store, sink)
    (job,) = queue_jobs(store, DOMAIN, 1)
    real = spool.load_bodies

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Redis went away while reading the bodies")

    monkeypatch.setattr(spool, "load_bodies", broken)
    with pytest.raises(redis.exceptions.ConnectionError):
        run_batches(deliverer, [job])
    monkeypatch.setattr(spool, "load_bodies", real)
    assert len(sink.messages) == 1, "nothing of the failed task was sent"
    left = store.get(spool.in_flight_key(job["id"], DOMAIN))
    run_batches(deliverer, [job])  # the task runs again
    assert len(sink.messages) == 2
    assert "interrupted" not in events(store, job["id"]), (
        f"a false RFC 1047 report: the mark {left!r} was written by a claim, no DATA followed"
    )


def test_a_claim_whose_reply_was_lost_leaves_no_mark_that_reports_an_interruption(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Redis runs the lanes' gathered claim pipeline but its reply is lost (a Redis stalled
    past socket_timeout, a connection reset by a failover; the client does not retry). The
    claim and its premark stand though the lane never got them; the task fails and runs again,
    and the premark reads as an earlier run's DATA: "interrupted" for a message never sent
    (before 70f85ec the first claim wrote no mark: only the claim was left, to expire)."""
    deliverer = warmed(tmp_path, valkey, store, sink)
    (job,) = queue_jobs(store, DOMAIN, 1)
    real = redis.client.Pipeline._execute_pipeline
    lost: list[int] = []

    def reply_lost_once(self: Any, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        replies = real(self, connection, commands, raise_on_error)  # type: ignore[no-untyped-call]
        claiming = any(args[:2] == ("EVAL", claims_module._CLAIM) for args, _ in commands)
        if claiming and not lost:
            lost.append(1)
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "_execute_pipeline", reply_lost_once)
    with pytest.raises(redis.exceptions.TimeoutError):
        run_batches(deliverer, [job])
    assert lost and len(sink.messages) == 1, "nothing of the failed task was sent"
    run_batches(deliverer, [job])  # the task runs again
    assert len(sink.messages) == 2
    assert "interrupted" not in events(store, job["id"]), "a false RFC 1047 report"


def test_gathered_claims_made_on_a_second_loop_after_the_first_closed_mid_turn(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Several event loops in one process (tests): a loop closed with a claim's group still
    scheduled leaves Gathered's pending task behind; a claim on the next loop must still go."""
    from services.deliver.ledger import Ledger
    from tests.test_batching import write_config

    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    a, b = queue_jobs(store, DOMAIN, 2)
    first = asyncio.new_event_loop()

    async def leave_one_behind() -> None:
        asyncio.get_running_loop().create_task(ledger.claim_async((a["id"], DOMAIN)))

    first.run_until_complete(leave_one_behind())  # the group is scheduled, never run
    left = asyncio.all_tasks(first)
    first.close()

    async def claim_b() -> bool:
        async with asyncio.timeout(5):
            return (await ledger.claim_async((b["id"], DOMAIN))).ours

    try:
        assert asyncio.run(claim_b()), "the claim on the second loop never went"
    finally:
        for task in left:  # no "never awaited" warning for a later test
            task.get_coro().close()


def test_a_redis_error_after_data_keeps_the_mark_of_a_premarked_first_claim(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The other side of the two tests above: DATA went out under the premark, then recording
    failed (Redis): the mark must stay, and the next run says the message may come twice."""
    deliverer = warmed(tmp_path, valkey, store, sink)
    (job,) = queue_jobs(store, DOMAIN, 1)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Redis went away while recording")

    monkeypatch.setattr(deliverer.ledger, "_record_all", broken)
    with pytest.raises(redis.exceptions.ConnectionError):
        run_batches(deliverer, [job])
    monkeypatch.undo()
    assert len(sink.messages) == 2, "DATA went out"
    assert store.get(spool.in_flight_key(job["id"], DOMAIN)) is not None, "the mark went"
    run_batches(deliverer, [job])
    assert len(sink.messages) == 3
    assert "interrupted" in events(store, job["id"]), "a possible duplicate not reported"


def test_a_round_failing_in_a_gathered_group_leaves_no_false_interruption_for_next_jobs(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Two lanes finish their rounds (X, Y) in one turn: one transaction records both, and
    claims each lane's next job (Z, W) premarked with the domain's last peer. X's own writes
    fail (WRONGTYPE on its trace): X's caller gets the error, Y's round and the claims of Z
    and W stand. The batch fails (the task runs again) before Z or W started: no DATA ever
    went out for them. 1f289e6 drops the unused premarks of FIRST claims only; those the
    recordings wrote stay, and the task's next run reports Z and W as "interrupted" (possible
    duplicates, RFC 1047) though they were never sent. And the claim that X's transaction
    took for its lane's next job is released with the failed batch's claims: left unheld, it
    would stand until it expired (``claim_ttl``), and another process would wait for it."""
    config = routed(tmp_path, valkey, RECORDS, sink.address_text, sessions_per_process=2)
    deliverer = Deliverer(config, spool.connect(valkey.url))
    (warm,) = queue_jobs(store, RECORDS, 1)
    run_batches(deliverer, [warm])  # the domain is warm, its last peer known
    assert deliverer.ledger._last_peers.get(RECORDS) is not None
    x, y, z, w = queue_jobs(store, RECORDS, 4)
    store.delete(spool.trace_key(x["id"]))
    store.set(spool.trace_key(x["id"]), "not a list")  # X's round's own writes fail

    real_send = Deliverer.send
    gates: dict[str, asyncio.Event] = {}

    async def send_in_one_turn(self: Deliverer, job: Any, *args: Any, **kwargs: Any) -> Any:
        for name in ("y_sent", "x_go"):
            gates.setdefault(name, asyncio.Event())
        outcome = await real_send(self, job, *args, **kwargs)
        if job.id == x["id"]:  # X records first, Y in the same turn: one group, X before Y
            await gates["y_sent"].wait()
            gates["x_go"].set()
        elif job.id == y["id"]:
            gates["y_sent"].set()
            await gates["x_go"].wait()
        return outcome

    monkeypatch.setattr(Deliverer, "send", send_in_one_turn)
    trips = deliverer.ledger.record_round_trips
    with pytest.raises(redis.exceptions.ResponseError):
        run_batches(deliverer, [x, y, z, w])
    monkeypatch.undo()
    assert deliverer.ledger.record_round_trips == trips + 1, "X and Y in one transaction"
    assert len(sink.messages) == 3, "X and Y went out; Z and W did not"
    assert store.keys(spool.claim_key("*", "*")) == [], "a claim left to expire"
    left = {j["id"][-6:]: store.get(spool.in_flight_key(j["id"], RECORDS)) for j in (z, w)}
    run_batches(deliverer, [z, w])  # the task runs again (X, Y recorded: final)
    assert len(sink.messages) == 5
    false = [j["id"][-6:] for j in (z, w) if "interrupted" in events(store, j["id"])]
    assert not false, f"false RFC 1047 reports for {false}: marks left {left}"


def test_a_round_whose_staging_raises_midway_leaves_the_next_rounds_replies_in_place(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Soundness check: the second of three rounds raises while staged (after its release and
    states were queued): its commands are cut from the transaction, and the third round's
    claim of its next job is read from the right reply (absolute indices)."""
    from services.deliver import recording
    from services.deliver.attempt import Peer
    from services.deliver.ledger import Ledger
    from tests.test_batching import BODY, write_config
    from tests.test_gathered import delivered, stored_jobs

    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    jobs = stored_jobs(store, 5)
    a, b, c = jobs[:3]
    peer = Peer("mx.d.test", "192.0.2.1", 25, "mx.d.test")
    real = recording.stage_leave_line

    def raising_for_b(pipe: Any, job: Any, config: Any) -> None:
        if job.key == b[0].key:
            raise ValueError("a bug while staging b")
        real(pipe, job, config)

    monkeypatch.setattr(recording, "stage_leave_line", raising_for_b)

    async def main() -> list[Any]:
        claims = await asyncio.gather(*(ledger.claim_async(j.key, e) for j, e in (a, b, c)))
        await ledger.mark_in_flight_async(a[0], peer)  # the domain's last peer: premarks
        rounds = [
            ledger.round(j, e, BODY, cl.state) for (j, e), cl in zip((a, b, c), claims, strict=True)
        ]
        return list(
            await asyncio.gather(
                ledger.record_async(rounds[0], delivered(a[0]), jobs[3][0].key, True, jobs[3][1]),
                ledger.record_async(rounds[1], delivered(b[0])),
                ledger.record_async(rounds[2], delivered(c[0]), jobs[4][0].key, True, jobs[4][1]),
                return_exceptions=True,
            )
        )

    first, failed, third = asyncio.run(main())
    assert isinstance(failed, ValueError)
    assert ledger.record_round_trips == 1
    for got, (job, _) in ((first, jobs[3]), (third, jobs[4])):
        assert got is not None and got.key == job.key and got.ours and got.marked
        assert store.exists(spool.in_flight_key(*job.key))
    assert not store.exists(spool.msg_key(a[0].id)) and not store.exists(spool.msg_key(c[0].id))
    assert store.exists(spool.msg_key(b[0].id)), "b: nothing of it written"
    assert not store.hgetall(spool.rcpt_key(b[0].id))


def test_two_domain_jobs_of_one_message_in_one_transaction_finish_it_once(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Soundness check: the jobs of one message to two domains, recorded in one transaction:
    the later one's read-back sees every recipient final; the message goes, counted once."""
    import time

    from services.common.jobs import Job
    from services.common.model import Decision, Envelope, TlsMode, new_message_id
    from services.deliver import ledger as ledger_module
    from services.deliver.ledger import Ledger
    from tests.test_batching import BODY, write_config
    from tests.test_gathered import delivered

    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    envelope = Envelope(
        new_message_id(), "s@o.test", ("r@a.test", "r@b.test"), received_at=time.time()
    )
    with store.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, BODY, spool.TRACE_TTL)
        pipe.execute()
    jobs = [
        Job(envelope.id, d, (f"r@{d}",), Decision(domain=d, tls=TlsMode.OPPORTUNISTIC))
        for d in ("a.test", "b.test")
    ]
    finals: list[Any] = []
    monkeypatch.setattr(ledger_module, "_final", lambda states: finals.append(list(states)))

    async def main() -> None:
        claims = await asyncio.gather(*(ledger.claim_async(j.key, envelope) for j in jobs))
        rounds = [
            ledger.round(j, envelope, BODY, c.state) for j, c in zip(jobs, claims, strict=True)
        ]
        await asyncio.gather(*(ledger.record_async(r, delivered(r.job)) for r in rounds))

    asyncio.run(main())
    assert ledger.record_round_trips == 1
    assert not store.exists(spool.msg_key(envelope.id)), "the message is final: gone"
    assert not store.exists(spool.rcpt_key(envelope.id))
    assert len(finals) == 1, finals
    assert events(store, envelope.id).count("completed") == 1
