"""Delivery against hostile and broken SMTP peers (issue #17): refused DATA that keeps the
transaction open, replies that skip a step, forged reply text, destinations that hold a worker,
routes back to ourselves, TLS 1.0-only peers.

Real parts: the deliver code of a worker process (:class:`services.deliver.batch.Deliverer`) run
in this process against a real valkey and real SMTP peers on loopback (:mod:`tests.badpeers`,
:mod:`tests.peers`), as in tests/test_batching.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common import spool
from services.common.redisserver import EmbeddedRedis
from tests.badpeers import BadPeer, Kind
from tests.test_batching import deliver, queue_jobs, routed


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[BadPeer]:
    kind: Kind = request.param
    server = BadPeer(kind).start()
    try:
        yield server
    finally:
        server.stop()


def events(store: redis.Redis, message_id: str, kind: str) -> list[dict[str, object]]:
    return [e for e in spool.read_trace(store, message_id) if e["event"] == kind]


# --------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("peer", ["refuse_first_data"], indirect=True)
def test_a_refused_data_does_not_poison_the_next_message_of_the_batch(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, peer: BadPeer
) -> None:
    """452 to DATA leaves the peer's transaction open: the reused session is reset first, so
    the next messages are delivered, none bounces (before: 503 to MAIL, every one bounced)."""
    config = routed(tmp_path, valkey, "keep.test", peer.address_text)
    jobs = queue_jobs(store, "keep.test", 3)
    outcomes = deliver(config, store, jobs)
    assert [sorted(o.deferred) for o in outcomes if o] == [["r0@keep.test"], [], []]
    assert [sorted(o.delivered) for o in outcomes if o] == [[], ["r1@keep.test"], ["r2@keep.test"]]
    assert not any(o.bounced for o in outcomes if o)
    assert peer.data_received == 2 and peer.connections == 1
    assert b"503 5.5.1 Error: nested MAIL command" not in peer.replies


# --------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("peer", ["data_250", "double_rcpt"], indirect=True)
def test_a_reply_that_skips_a_step_is_a_deferral_not_a_delivery(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, peer: BadPeer
) -> None:
    """A 2xx where 354 belonged (or a stale 2xx answering DATA): no body was taken → 4.5.0."""
    config = routed(tmp_path, valkey, "skip.test", peer.address_text)
    jobs = queue_jobs(store, "skip.test", 2)
    outcomes = deliver(config, store, jobs)
    for outcome in outcomes:
        assert outcome is not None and not outcome.delivered and not outcome.bounced
        (reply,) = outcome.deferred.values()
        assert (reply.code, reply.status) == (451, "4.5.0"), reply
    assert peer.connections == 2  # a session out of step is never reused
    for job in jobs:
        assert not events(store, job["id"], "delivered")
