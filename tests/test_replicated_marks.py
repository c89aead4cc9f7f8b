"""``redis_min_replicas`` for deliveries: DATA goes out only once the round's in-flight mark
(RFC 1047) is acknowledged by that many replicas (``WAIT`` after the mark, on its connection).

Why: a sentinel that fails over twice (the replica promoted, then the old master promoted back)
discards what the interim master took, the workers' in-flight marks included; a re-run then
sends again without knowing it had sent (a soak saw 226 duplicates, 2 of them reported). With the
mark on a replica before DATA, such a re-run finds it and reports ``interrupted``.

Real parts: a master and a replica (the valkey binary, tests/redisha.py), the deliver code of a
worker process, a real SMTP sink on loopback; with PIPELINING (the mark before the message) and
without (the mark before MAIL: nothing may wait between the last RCPT reply and DATA). The
replica is stopped (SIGSTOP) to make ``WAIT`` come back short. Waits are conditions with a
deadline; the only timed thing is the relay's own ``redis_replica_timeout``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from services.common import spool
from services.common.config import Config
from services.common.redisserver import EmbeddedRedis
from services.deliver.attempt import Peer
from services.deliver.batch import Deliverer
from services.deliver.ledger import Ledger
from tests.peers import Sink
from tests.redisha import online_replicas, replica_of
from tests.test_batching import (
    deferred_members,
    queue_jobs,
    queue_old_job,
    run_batches,
    write_config,
)
from tests.test_gathered import stored_jobs
from tests.world import wait_until

DOMAIN = "replicated.test"
TIMEOUT = 0.5  # redis_replica_timeout here (s)


@pytest.fixture
def master(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "master", appendonly=False) as server:
        yield server


@pytest.fixture
def replica(tmp_path: Path, master: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    server = replica_of(tmp_path / "replica", master)
    try:
        yield server
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)  # a stopped one cannot stop
        server.stop()


@pytest.fixture
def client(master: EmbeddedRedis) -> Iterator[redis.Redis]:
    with redis.Redis(port=master.port) as c:
        yield c


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink("plain") as server:
        yield server


def configured(
    tmp_path: Path,
    master: EmbeddedRedis,
    sink: Sink,
    min_replicas: int,
    pipelining: bool,
    lanes: int = 2,
    lifetime: str | None = None,
) -> Config:
    settings: dict[str, Any] = {
        "redis_url": master.url,
        "redis_min_replicas": min_replicas,
        "redis_replica_timeout": f"{TIMEOUT}s",
        "delivery": {
            "routes": {DOMAIN: sink.address_text},
            "pipelining": pipelining,
            "sessions_per_process": lanes,
            **({"max_queue_lifetime": lifetime} if lifetime else {}),
        },
    }
    return write_config(tmp_path / "c.yaml", settings)


def waits(client: redis.Redis) -> int:
    """``WAIT`` commands the master has run."""
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


def trace_text(client: redis.Redis, message_id: str) -> str:
    return json.dumps(spool.read_trace(client, message_id))


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one_by_one"])
@pytest.mark.parametrize("min_replicas", [1, 0])
def test_deliveries_wait_for_the_replica_only_when_asked(
    tmp_path: Path,
    master: EmbeddedRedis,
    replica: EmbeddedRedis,
    client: redis.Redis,
    sink: Sink,
    min_replicas: int,
    pipelining: bool,
) -> None:
    """With the replica in sync every message is delivered once; with ``redis_min_replicas: 1``
    each marks group is followed by one ``WAIT`` (the marks of one loop turn share it), with 0
    none is sent — and no more mark round trips than there are messages."""
    config = configured(tmp_path, master, sink, min_replicas, pipelining)
    deliverer = Deliverer(config, spool.connect(master.url))
    jobs = queue_jobs(client, DOMAIN, 4)
    before = waits(client)

    run_batches(deliverer, jobs)

    assert len(sink.messages) == 4, [m.data for m in sink.messages]
    for job in jobs:
        assert not client.exists(spool.msg_key(job["id"])), "delivered: final, gone"
        assert not client.exists(spool.in_flight_key(job["id"], DOMAIN))
    marks = deliverer.ledger.mark_round_trips
    if min_replicas:
        assert 1 <= marks <= 4
        assert waits(client) - before == marks, "one WAIT per marks group, none elsewhere"
    else:
        assert waits(client) == before, "redis_min_replicas 0: no WAIT"
        assert marks <= 4


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one_by_one"])
def test_a_mark_no_replica_acknowledged_sends_nothing_and_the_retry_delivers_once(
    tmp_path: Path,
    master: EmbeddedRedis,
    replica: EmbeddedRedis,
    client: redis.Redis,
    sink: Sink,
    pipelining: bool,
) -> None:
    """The replica stops acknowledging (SIGSTOP): the round's ``WAIT`` comes back short after
    ``redis_replica_timeout``, DATA is not sent (the sink has nothing), the recipient is
    deferred (due again per the retry schedule) with the reason in the trace, and the mark is
    gone with the round's recording. Once the replica is back, the retry delivers the message,
    once, and reports no interruption."""
    config = configured(tmp_path, master, sink, 1, pipelining)
    deliverer = Deliverer(config, spool.connect(master.url))
    (job,) = queue_jobs(client, DOMAIN, 1)
    message_id = job["id"]
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        run_batches(deliverer, [job])
    finally:
        replica.process.send_signal(signal.SIGCONT)

    assert sink.messages == [] and sink.rejected == [], "DATA went out unacknowledged"
    states = cast(dict[bytes, bytes], client.hgetall(spool.rcpt_key(message_id)))
    _, deferred = spool.recipient_states(states)
    assert set(deferred) == set(job["recipients"]), "deferred for a retry"
    (raw,) = deferred_members(client)
    retry = json.loads(raw)
    assert retry["id"] == message_id and retry["attempt"] == 2
    assert not client.exists(spool.in_flight_key(message_id, DOMAIN)), "the mark went with it"
    text = trace_text(client, message_id)
    assert "in-flight mark not acknowledged by 1 replica within 0.5 s" in text, text
    assert "not sent" in text

    wait_until(lambda: online_replicas(master.port) >= 1, 20, "the replica back in sync")
    before = waits(client)
    client.zrem(spool.DEFERRED, raw)  # the scheduler's part: the retry is due, taken
    # It is due per delivery.retry_schedule, minutes later: long past the process's hold on
    # new rounds after an unacknowledged mark (sending.UNREPLICATED_HOLD).
    deliverer._unreplicated = (0.0, "")
    run_batches(deliverer, [retry])

    (delivered,) = sink.wait_messages(1)
    assert b"batch" in delivered.data
    assert waits(client) > before
    assert not client.exists(spool.msg_key(message_id)), "delivered: final, gone"
    assert "interrupted" not in trace_text(client, message_id)
    assert len(sink.messages) == 1, "delivered once"


def test_after_a_mark_no_replica_acknowledged_the_next_rounds_are_deferred_without_a_session(
    tmp_path: Path,
    master: EmbeddedRedis,
    replica: EmbeddedRedis,
    client: redis.Redis,
    sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The replica stops acknowledging; one lane, three jobs: the first round goes as far as
    RCPT, waits ``redis_replica_timeout`` for its ``WAIT`` and is deferred unsent. The next two,
    started a moment later, are deferred at once the same way, never reaching the destination
    (a failover keeps the replicas away for seconds: each round would open or take a session
    and wait for nothing). Nothing is sent; every recipient waits for its retry, the reason in
    its trace."""
    config = configured(tmp_path, master, sink, 1, True, lanes=1)
    deliverer = Deliverer(config, spool.connect(master.url))
    refunds: list[object] = []  # the message-rate cells given back: the first round's
    monkeypatch.setattr(deliverer.shaper, "refund", lambda site, at=None: refunds.append(site))
    jobs = queue_jobs(client, DOMAIN, 3)
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        run_batches(deliverer, jobs)
    finally:
        replica.process.send_signal(signal.SIGCONT)

    assert sink.messages == [], "DATA went out unacknowledged"
    assert len(sink.mail_commands) == 1, sink.mail_commands
    assert len(deferred_members(client)) == 3, "each deferred for its retry"
    first, *others = (trace_text(client, job["id"]) for job in jobs)
    assert "within 0.5 s (0 did): not sent" in first, first
    for text in others:
        assert "(a moment ago); not tried" in text, text
    assert len(refunds) == 1, refunds  # it sent nothing: its rate cell goes back


@pytest.mark.parametrize("min_replicas", [1, 0])
def test_the_marks_of_one_turn_share_one_wait_and_no_premark_stands_in(
    tmp_path: Path,
    master: EmbeddedRedis,
    replica: EmbeddedRedis,
    client: redis.Redis,
    sink: Sink,
    min_replicas: int,
) -> None:
    """Five lanes reach DATA in one turn: one pipeline, and with ``redis_min_replicas`` one
    ``WAIT`` after its five SETs (it counts every earlier write of its connection). A claim
    writes the mark ahead (a premark) and spares the round trip only with 0: with
    ``redis_min_replicas`` the mark is written just before DATA and waited for (a ``WAIT`` would
    not count another connection's write), so no premark is written at all."""
    ledger = Ledger(configured(tmp_path, master, sink, min_replicas, True), client)
    jobs = stored_jobs(client, 6)
    peer = Peer("mx.d.test", "192.0.2.1", 25, "mx.d.test")
    before = waits(client)

    async def turn() -> None:
        claimed = [ledger.claim_async(j.key, e) for j, e in jobs[:5]]
        await asyncio.gather(*claimed)
        await asyncio.gather(*(ledger.mark_in_flight_async(j, peer) for j, _ in jobs[:5]))

    asyncio.run(turn())
    assert ledger.mark_round_trips == 1
    assert waits(client) - before == (1 if min_replicas else 0)

    premarked, envelope = jobs[5]
    # A premark (the last peer) only without min_replicas: with it, a write for nothing.
    assert ledger.claim(premarked.key, premark=True, known=envelope).marked == (not min_replicas)
    asyncio.run(ledger.mark_in_flight_async(premarked, peer))
    assert ledger.mark_round_trips == (2 if min_replicas else 1), "premark spares it only at 0"
    assert waits(client) - before == (2 if min_replicas else 0)


def test_the_hold_after_an_unacknowledged_mark_never_bounces_a_message_at_its_last_try(
    tmp_path: Path,
    master: EmbeddedRedis,
    replica: EmbeddedRedis,
    client: redis.Redis,
    sink: Sink,
) -> None:
    """The process holds its new rounds after a mark no replica acknowledged (the replica is
    back in sync by now). A message whose queue lifetime is over is at its last try: deferred
    unsent by the hold it would be bounced without ever being tried (expire), its sender told
    it could not be delivered. It is tried (its own mark waits for the replica) and delivered;
    a message with time left is still held, not tried."""
    config = configured(tmp_path, master, sink, 1, True, lanes=1, lifetime="1h")
    deliverer = Deliverer(config, spool.connect(master.url))
    (fresh,) = queue_jobs(client, DOMAIN, 1)
    last = queue_old_job(client, DOMAIN, 3601, local="old", attempt=9)
    why = "in-flight mark not acknowledged by 1 replica within 0.5 s (0 did): not sent"
    deliverer._unreplicated = (time.monotonic() + 60, why)  # loop time: monotonic

    run_batches(deliverer, [last, fresh])

    assert [m.rcpt_tos for m in sink.messages] == [[f"old@{DOMAIN}"]], "tried at its last try"
    assert "bounced" not in trace_text(client, last["id"]), trace_text(client, last["id"])
    assert "(a moment ago); not tried" in trace_text(client, fresh["id"])
