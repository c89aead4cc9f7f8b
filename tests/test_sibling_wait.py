"""A lane that finds every connection to its site taken waits for a session of its own
process's other lanes (services/deliver/lanes.py, ``SiteSlots.share``): ``SIBLING_WAIT`` bounds
that wait as a whole, not each time a sibling's session comes free and goes to another worker
— else a round at a saturated site waits until the site's last sibling ends, or until
``delivery.job_timeout`` cuts it and records an abandoned attempt for a message never tried,
holding its worker all that time. Real Redis, a real SMTP sink on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common import spool
from services.common.config import Config
from services.common.redisserver import EmbeddedRedis
from services.deliver import lanes, shaping
from tests.peers import Sink
from tests.sinksmtp import Message
from tests.test_batching import deliver, queue_jobs, write_config

SITE = "sib"
STEP = 0.8  # seconds between the ends of this process's sessions at the site
SIBLING_WAIT = 1.0  # < 2 × STEP: the lane gives up before the third session ends


class OtherWorkers:
    """Once this process holds every connection to the site (three sessions), other workers
    queue for it and take each connection this process frees (three leases of theirs); the
    n-th message's final dot is answered after n × ``STEP`` seconds, so this process's
    sessions there come free one by one."""

    def __init__(self, store: redis.Redis) -> None:
        self.store, self.seen = store, 0

    def __call__(self, msg: Message) -> float:
        self.seen += 1
        if self.seen == 3:
            theirs = {f"other-{n}": time.time() + 3600 for n in range(3)}
            self.store.zadd(spool.site_key("leases", SITE), theirs)
        return STEP * self.seen


@pytest.fixture
def sink(store: redis.Redis) -> Iterator[Sink]:
    server = Sink("plain", slow_for=OtherWorkers(store)).start()
    try:
        yield server
    finally:
        server.stop()


def config(tmp_path: Path, valkey: EmbeddedRedis, sink: Sink) -> Config:
    site = {"name": SITE, "match": [sink.address_text], "connections": 3,
            "messages_per_connection": 1}  # fmt: skip
    settings = {
        "redis_url": valkey.url,
        "delivery": {
            "job_timeout": 30.0,
            "sessions_per_process": 4,
            "routes": {"sib.test": sink.address_text},
            "shaping": {"sites": [site]},
        },
    }
    return write_config(tmp_path / "c.yaml", settings)


def test_a_lane_waits_for_its_siblings_once_in_all_then_is_parked(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.3)
    monkeypatch.setattr(lanes, "SIBLING_WAIT", SIBLING_WAIT)
    jobs = queue_jobs(store, "sib.test", 4)
    outcomes = deliver(config(tmp_path, valkey, sink), store, jobs)
    assert len(sink.messages) == 3, "three sessions: the site's limit"
    assert [len(o.delivered) for o in outcomes if o is not None] == [1, 1, 1]
    members: list[bytes] = store.zrange(spool.DEFERRED, 0, -1)  # type: ignore[assignment]
    parked = [json.loads(m) for m in members]
    assert len(parked) == 1, parked
    assert parked[0]["throttled"] == {"reason": "connections", "site": SITE}, parked
    assert parked[0]["attempt"] == 1 and "last_error" not in parked[0], "not an attempt"
    trace = spool.read_trace(store, parked[0]["id"])
    assert "deferred" not in [e["event"] for e in trace], trace
    (throttled,) = [e["at"] for e in trace if e["event"] == "throttled"]
    delivered = [
        e["at"]
        for job in jobs
        if job["id"] != parked[0]["id"]
        for e in spool.read_trace(store, job["id"])
        if e["event"] == "delivered"
    ]
    assert len(delivered) == 3
    assert throttled < max(delivered), "parked after SIBLING_WAIT, not after every sibling"
