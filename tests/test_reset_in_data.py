"""A peer that answers DATA ``354`` and then resets the connection, before the message: the
relay stops writing the message at once (one failed write, not one per chunk of it — asyncio
logs a warning for each write to a lost connection, so a large message would flood the log
once per attempt) and defers it. Real Redis, a raw SMTP peer on loopback."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common import spool
from services.common.model import Decision, Envelope, TlsMode, new_message_id
from services.common.redisserver import EmbeddedRedis
from tests.badpeers import BadPeer
from tests.test_batching import deliver, routed

BODY = b"Subject: large\r\n\r\n" + b"x" * 76 + b"\r\n" + (b"y" * 998 + b"\r\n") * 4096  # 4 MB


@pytest.fixture
def peer() -> Iterator[BadPeer]:
    server = BadPeer("reset_after_354").start()
    try:
        yield server
    finally:
        server.stop()


def test_a_reset_after_354_stops_the_write_and_defers(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, peer: BadPeer,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    envelope = Envelope(
        new_message_id(), "s@origin.test", ("r@reset.test",), received_at=time.time()
    )
    with store.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, BODY, spool.TRACE_TTL)
        pipe.execute()
    decision = Decision(domain="reset.test", tls=TlsMode.OPPORTUNISTIC)
    job = {"id": envelope.id, "domain": "reset.test", "recipients": ["r@reset.test"],
           "decision": decision.to_json(), "attempt": 1}  # fmt: skip
    config = routed(tmp_path, valkey, "reset.test", peer.address_text)
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        (outcome,) = deliver(config, store, [job])
    assert peer.replies[-1] == b"354 go ahead", "the peer reached DATA"
    assert outcome is not None and list(outcome.deferred) == ["r@reset.test"]
    assert not outcome.delivered
    lost = [r for r in caplog.records if r.name == "asyncio"]
    assert len(lost) <= 1, f"{len(lost)} asyncio warnings, e.g. {lost[0].getMessage()!r}"
