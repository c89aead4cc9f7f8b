"""Review of 96f2e2f + 1f289e6 (rounds of one turn recorded in one transaction; a failed
batch drops the premarks of its first claims): what happens to the premarks that RECORDINGS
write for the lanes' next jobs when one round of a gathered group fails and the batch fails.
Real deliver code, real Redis, a real sink."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import spool
from services.common.redisserver import EmbeddedRedis
from services.deliver.batch import Deliverer
from tests.peers import Sink
from tests.test_batching import queue_jobs, routed, run_batches

DOMAIN = "records.test"


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink("starttls").start()
    try:
        yield server
    finally:
        server.stop()


def events(client: redis.Redis, message_id: str) -> list[str]:
    return [e["event"] for e in spool.read_trace(client, message_id)]


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
    duplicates, RFC 1047) though they were never sent."""
    config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=2)
    deliverer = Deliverer(config, spool.connect(valkey.url))
    (warm,) = queue_jobs(store, DOMAIN, 1)
    run_batches(deliverer, [warm])  # the domain is warm, its last peer known
    assert deliverer.ledger._last_peers.get(DOMAIN) is not None
    x, y, z, w = queue_jobs(store, DOMAIN, 4)
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
    left = {j["id"][-6:]: store.get(spool.in_flight_key(j["id"], DOMAIN)) for j in (z, w)}
    run_batches(deliverer, [z, w])  # the task runs again (X, Y recorded: final)
    assert len(sink.messages) == 5
    false = [j["id"][-6:] for j in (z, w) if "interrupted" in events(store, j["id"])]
    assert not false, f"false RFC 1047 reports for {false}: marks left {left}"
