"""Review: with ``redis_min_replicas`` the marks' ``WAIT`` must never hold the event loop (all
lanes, all batches of the process) for ``redis_replica_timeout`` — whatever
``delivery.redis_calls`` says. Real master + replica (SIGSTOPped), real SMTP sink."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import spool
from services.common.redisserver import EmbeddedRedis
from services.deliver.batch import Deliverer
from tests.peers import Sink
from tests.test_batching import queue_jobs, run_quietly, write_config
from tests.test_replicated_marks import DOMAIN, TIMEOUT, client, master, replica, sink  # noqa: F401


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one_by_one"])
@pytest.mark.parametrize("redis_calls", ["threads", "auto", "inline"])
def test_an_unacknowledged_mark_does_not_hold_the_loop(
    tmp_path: Path,
    master: EmbeddedRedis,  # noqa: F811
    replica: EmbeddedRedis,  # noqa: F811
    client: redis.Redis,  # noqa: F811
    sink: Sink,  # noqa: F811
    redis_calls: str,
    pipelining: bool,
) -> None:
    settings: dict[str, Any] = {
        "redis_url": master.url,
        "redis_min_replicas": 1,
        "redis_replica_timeout": f"{TIMEOUT}s",
        "delivery": {
            "routes": {DOMAIN: sink.address_text},
            "pipelining": pipelining,
            "sessions_per_process": 2,
            "redis_calls": redis_calls,
        },
    }
    config = write_config(tmp_path / "c.yaml", settings)
    deliverer = Deliverer(config, spool.connect(master.url))
    jobs = queue_jobs(client, DOMAIN, 2)
    gaps: list[float] = []

    async def batch_and_heartbeat() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        async def heartbeat() -> None:
            last = loop.time()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = loop.time()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        try:
            await deliverer.run_batch(jobs)
        finally:
            done.set()
            await beat

    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        run_quietly(deliverer, batch_and_heartbeat())
    finally:
        replica.process.send_signal(signal.SIGCONT)
    assert sink.messages == [], "nothing sent unacknowledged"
    assert max(gaps) < TIMEOUT / 2, f"the loop was held {max(gaps):.2f} s by a WAIT"


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one_by_one"])
def test_a_deadline_during_the_wait_does_not_say_the_peer_may_have_it(
    tmp_path: Path,
    master: EmbeddedRedis,  # noqa: F811
    replica: EmbeddedRedis,  # noqa: F811
    client: redis.Redis,  # noqa: F811
    sink: Sink,  # noqa: F811
    pipelining: bool,
) -> None:
    """delivery.job_timeout lands while the mark's WAIT waits (the replica stopped): nothing
    was sent, so the deferral must not say the destination may have the message."""
    settings: dict[str, Any] = {
        "redis_url": master.url,
        "redis_min_replicas": 1,
        "redis_replica_timeout": "3s",
        "delivery": {
            "routes": {DOMAIN: sink.address_text},
            "pipelining": pipelining,
            "sessions_per_process": 1,
            "job_timeout": "1s",
        },
    }
    config = write_config(tmp_path / "c.yaml", settings)
    deliverer = Deliverer(config, spool.connect(master.url))
    (job,) = queue_jobs(client, DOMAIN, 1)
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        run_quietly(deliverer, deliverer.run_batch([job]))
    finally:
        replica.process.send_signal(signal.SIGCONT)
    assert sink.messages == []
    text = json.dumps(spool.read_trace(client, job["id"]))
    assert "abandoned" in text, text
    assert "may have it" not in text, text
