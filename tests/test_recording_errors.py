"""What an error in our own recording code may and may not do to a round that already ran
(found by review): never make the relay forget a delivery silently, never record it twice, and
never let DATA go out without its in-flight mark. Real deliver code, real Redis, a real sink."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import spool
from services.common.config import Config
from services.common.jobs import Job
from services.common.model import Decision, Envelope, Reply, TlsMode, new_message_id
from services.common.redisserver import EmbeddedRedis
from services.deliver import dsn, observe
from services.deliver.attempt import Peer
from services.deliver.delivery import Outcome
from services.deliver.ledger import Ledger
from tests.peers import Sink
from tests.test_batching import BODY, deferred_members, deliver, write_config


def two_domain_message(client: redis.Redis) -> tuple[Envelope, dict[str, Any]]:
    """A message to one.test and two.test; the job of its one.test part."""
    envelope = Envelope(new_message_id(), "s@origin.test", ("a@one.test", "b@two.test"),
                        received_at=time.time())  # fmt: skip
    with client.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, BODY, spool.TRACE_TTL)
        pipe.execute()
    decision = Decision(domain="one.test", tls=TlsMode.OPPORTUNISTIC)
    job = Job(envelope.id, "one.test", ("a@one.test",), decision)
    return envelope, job.to_json()


def config(tmp_path: Path, valkey: EmbeddedRedis, sink: Sink) -> Config:
    routes = {"one.test": sink.address_text, "two.test": sink.address_text}
    return write_config(
        tmp_path / "c.yaml", {"redis_url": valkey.url, "delivery": {"routes": routes}}
    )


def events(client: redis.Redis, message_id: str) -> list[str]:
    return [e["event"] for e in spool.read_trace(client, message_id)]


def two_messages(store: redis.Redis) -> tuple[list[Envelope], tuple[Job, Job]]:
    """Two stored messages to d.test (x@, y@) and their jobs."""
    envelopes = []
    for rcpt in ("x@d.test", "y@d.test"):
        envelope = Envelope(new_message_id(), "s@o.test", (rcpt,), received_at=time.time())
        with store.pipeline(transaction=True) as pipe:
            spool.stage_message(pipe, envelope, BODY, spool.TRACE_TTL)
            pipe.execute()
        envelopes.append(envelope)
    decision = Decision(domain="d.test", tls=TlsMode.OPPORTUNISTIC)
    jobs = tuple(Job(e.id, "d.test", e.recipients, decision) for e in envelopes)
    return envelopes, (jobs[0], jobs[1])


def test_an_error_after_the_round_committed_does_not_record_it_again(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    envelope, job = two_domain_message(store)

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug after EXEC")

    monkeypatch.setattr(observe, "delivery_round", broken)
    deliver(config(tmp_path, valkey, sink), store, [job])
    assert len(sink.messages) == 1
    assert deferred_members(store) == [], "a delivered recipient was deferred again"
    assert events(store, envelope.id).count("delivered") == 1


def test_an_error_while_recording_keeps_the_in_flight_mark(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The round sent DATA but could not be recorded: the retry sends again (nothing else can
    be known) and says so — as after a crash in the RFC 1047 window."""
    envelope, job = two_domain_message(store)
    real = dsn.notice
    calls = []

    def broken_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug before EXEC")
        return real(*args, **kwargs)

    monkeypatch.setattr(dsn, "notice", broken_once)
    cfg = config(tmp_path, valkey, sink)
    deliver(cfg, store, [job])
    (parked,) = deferred_members(store)
    store.delete(spool.DEFERRED)
    deliver(cfg, store, [json.loads(parked)])
    assert len(sink.messages) == 2
    assert "interrupted" in events(store, envelope.id), "the possible duplicate is not shown"


def test_a_premark_of_an_earlier_claim_never_stands_in_for_a_later_mark(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    envelopes, (x, y) = two_messages(store)
    peer = Peer("mx.d.test", "192.0.2.1", 25, "mx.d.test")
    claim_x = ledger.claim(x.key)
    ledger.mark_in_flight(x, peer)
    sent = Outcome(delivered={"x@d.test": Reply(250, "2.0.0", "ok")})
    round_x = ledger.round(x, envelopes[0], BODY, claim_x.state)
    claim_y = ledger.record(round_x, sent, y.key, premark=True, known=envelopes[1])
    assert claim_y is not None and claim_y.marked
    greylisted = Outcome(deferred={"y@d.test": Reply(451, "4.7.1", "greylisted")})
    ledger.record(ledger.round(y, envelopes[1], BODY, claim_y.state), greylisted)
    retry = y.retry(["y@d.test"], "451")
    ledger.claim(retry.key, known=envelopes[1])  # the retry, first of a new batch
    ledger.mark_in_flight(retry, peer)  # DATA to the same peer
    assert store.get(spool.in_flight_key(*retry.key)) is not None


def test_a_lanes_first_claim_writes_no_mark_its_data_does(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """A lane's first job is marked just before its DATA (a new connection may come first: a
    worker dying meanwhile would report a duplicate that cannot be one), not at its claim —
    even when the domain's last peer is known."""
    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    (x_env, y_env), (x, y) = two_messages(store)
    peer = Peer("mx.d.test", "192.0.2.1", 25, "mx.d.test")

    async def run() -> None:
        await ledger.claim_async(x.key, x_env)
        await ledger.mark_in_flight_async(x, peer)  # DATA of x: the domain's last peer now
        claim_y = await ledger.claim_async(y.key, y_env)
        assert claim_y.ours and not claim_y.marked
        assert store.get(spool.in_flight_key(*y.key)) is None
        await ledger.mark_in_flight_async(y, peer)
        note = json.loads(store.get(spool.in_flight_key(*y.key)) or b"{}")
        assert note["host"] == "mx.d.test"

    asyncio.run(run())


def test_an_error_of_the_callers_own_command_in_a_given_transaction_is_raised(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """``Ledger.record(pipe=...)`` executes the caller's transaction (``tlsrelay queue bounce``:
    its ZREM of the deferred entry comes first): an error of the caller's own command must be
    raised, as ``pipe.execute()`` did before 6bfb8f7 — not dropped because it lies outside the
    round's own replies (review s10)."""
    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    envelope = Envelope(new_message_id(), "s@o.test", ("x@d.test",), received_at=time.time())
    with store.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, BODY, spool.TRACE_TTL)
        pipe.execute()
    job = Job(envelope.id, "d.test", envelope.recipients, Decision(domain="d.test"))
    store.set("review:not-a-zset", "x")
    bounced = Outcome(bounced={"x@d.test": Reply(550, "5.0.0", "given up")})
    with store.pipeline(transaction=True) as pipe:
        pipe.multi()
        pipe.zrem("review:not-a-zset", "member")  # fails inside EXEC: WRONGTYPE
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            ledger.record(ledger.round(job, envelope, BODY), bounced, pipe=pipe)


def test_a_failed_recording_releases_the_claim_it_took_for_the_next_job(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """``Ledger.record(upcoming=...)`` whose round's own writes fail (WRONGTYPE on its trace)
    raises; the claim its transaction took for the next job all the same is released, not
    held (kept alive for as long as the process lives) by a caller that never gets it."""
    ledger = Ledger(write_config(tmp_path / "c.yaml", {"redis_url": valkey.url}), store)
    envelopes, (x, y) = two_messages(store)
    claim_x = ledger.claim(x.key)
    store.delete(spool.trace_key(x.id))
    store.set(spool.trace_key(x.id), "not a list")  # the round's own writes fail
    sent = Outcome(delivered={"x@d.test": Reply(250, "2.0.0", "ok")})
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        ledger.record(ledger.round(x, envelopes[0], BODY, claim_x.state), sent, y.key)
    assert not store.exists(spool.claim_key(*y.key)), "the next job's claim is left standing"
    assert spool.claim_key(*y.key) not in ledger.claims.held, "and kept alive"
