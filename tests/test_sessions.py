"""Many sessions per worker process (issue #20 item 1): the jobs of one deliver task run in up to
``delivery.sessions_per_process`` lanes at once, each over its own session, within the site's
connection limit — every message exactly once, each lane's round recorded as soon as it ends.

Real Redis (the ``store`` fixture), the deliverer's own code against real SMTP sinks that count
how many transactions they hold at once (``Sink.busy_peak``: final dots not yet answered).
"""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from services.common import spool
from services.common.config import Config, ConfigError, load_config
from services.common.model import Envelope, TlsMode
from services.common.redisserver import EmbeddedRedis
from services.deliver import lanes, observe, shaping, sites
from services.deliver.attempt import Attempt, Hooks, Peer, Timeouts, TlsSettings
from services.deliver.batch import Deliverer
from services.deliver.ledger import Ledger
from services.deliver.pool import ConnectionPool
from services.deliver.session import attempt
from services.deliver.shaping import Lease, Shaper
from tests.peers import Sink
from tests.sinksmtp import Message
from tests.test_batching import deliver, queue_jobs, routed
from tests.test_exactly_once import queued_jobs

DOMAIN = "lanes.test"


def delivered_once(sink: Sink, jobs: list[dict[str, Any]]) -> None:
    """Every job's recipient arrived exactly once, and its message is final and gone."""
    arrived = sorted(r for m in sink.messages for r in m.rcpt_tos)
    assert arrived == sorted(r for j in jobs for r in j["recipients"]), sink.summary()


def settled(store: redis.Redis, jobs: list[dict[str, Any]]) -> None:
    """Nothing left behind: no message, claim, in-flight mark or waiting entry."""
    for job in jobs:
        assert not store.exists(spool.msg_key(job["id"]))
        kinds = [e["event"] for e in spool.read_trace(store, job["id"])]
        assert kinds[-2:] == ["delivered", "completed"], kinds
    assert store.keys(spool.claim_key("*", "*")) == []
    assert store.keys(spool.in_flight_key("*", "*")) == []
    assert store.zcard(spool.WAITING_DELIVER) == 0


def test_a_batch_to_a_slow_destination_goes_over_several_sessions_at_once(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    with Sink("starttls", data_delay=0.3) as sink:
        config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=4)
        jobs = queue_jobs(store, DOMAIN, 12)
        outcomes = deliver(config, store, jobs)
        assert all(o is not None and len(o.delivered) == 1 for o in outcomes)
        delivered_once(sink, jobs)
        assert 1 < sink.busy_peak <= 4, sink.summary()
        assert sink.peak_connections <= 4 and sink.tls_handshakes_ok <= 4, sink.summary()
        assert all(m.tls for m in sink.messages)
    settled(store, jobs)


def test_a_site_limit_of_one_keeps_the_lanes_to_one_session(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    with Sink("starttls", data_delay=0.1) as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=4,
            shaping={"default": {"connections": 1}},
        )  # fmt: skip
        jobs = queue_jobs(store, DOMAIN, 8)
        outcomes = deliver(config, store, jobs)
        assert all(o is not None and len(o.delivered) == 1 for o in outcomes), outcomes
        delivered_once(sink, jobs)
        assert sink.busy_peak == 1 and sink.peak_connections == 1, sink.summary()
    settled(store, jobs)


def hangs(msg: Message) -> float:
    """The first job's message is never answered (within the test)."""
    return 60.0 if "r0@lanes.test" in msg.rcpt_tos else 0.0


def test_a_lane_whose_peer_hangs_does_not_hold_up_the_others(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The first job's peer never answers the final dot: the other lanes deliver and record the
    rest meanwhile; the hung round is abandoned at ``delivery.job_timeout`` and deferred, its
    in-flight mark saying it may have arrived (RFC 1047)."""
    with Sink("starttls", slow_for=hangs) as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=3, job_timeout="5s"
        )
        jobs = queue_jobs(store, DOMAIN, 6)
        outcomes = deliver(config, store, jobs)
        assert outcomes[0] is not None and outcomes[0].deferred, outcomes[0]
        assert all(o is not None and len(o.delivered) == 1 for o in outcomes[1:]), outcomes
        assert sorted(r for m in sink.messages for r in m.rcpt_tos) == sorted(
            r for j in jobs[1:] for r in j["recipients"]
        ), sink.summary()
    settled(store, jobs[1:])
    hung = spool.read_trace(store, jobs[0]["id"])
    (deferred,) = [e for e in hung if e["event"] == "deferred"]
    assert "job_timeout" in str(deferred) and "RFC 1047" in str(deferred)
    recorded = [
        e["at"] for j in jobs[1:] for e in spool.read_trace(store, j["id"])
        if e["event"] == "completed"
    ]  # fmt: skip
    assert len(recorded) == 5 and max(recorded) < deferred["at"], (recorded, deferred)


@pytest.mark.parametrize("value", [0, -1, "five", 1001])
def test_sessions_per_process_must_be_a_positive_count(tmp_path: Path, value: object) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"delivery": {"sessions_per_process": value}}))
    with pytest.raises(ConfigError, match="sessions_per_process"):
        load_config(path)


def test_sessions_per_process_defaults_to_postfix_s_twenty_over_two_processes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    delivery = load_config(path).delivery
    assert delivery.sessions_per_process * delivery.concurrency == 20


def test_lanes_start_no_job_after_the_start_window_and_hand_the_rest_back(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Two lanes start a job each within the start window (a tenth of job_timeout: 0.3 s); the
    replies take a second, so neither starts another: the rest go back as one task, the job a
    lane had claimed ahead (in its recording) released with it, nothing left marked."""
    with Sink("starttls", data_delay=1.0) as slow:
        config = routed(
            tmp_path, valkey, DOMAIN, slow.address_text, sessions_per_process=2, job_timeout="3s"
        )
        jobs = queue_jobs(store, DOMAIN, 6)
        results = deliver(config, store, jobs)
        assert [r is not None for r in results] == [True, True, False, False, False, False]
        delivered_once(slow, jobs[:2])
    settled(store, jobs[:2])
    assert queued_jobs(store) == jobs[2:]
    for job in jobs[2:]:
        assert [e["event"] for e in spool.read_trace(store, job["id"])][-1] == "requeued"


def slow_but_first(msg: Message) -> float:
    return 0.0 if "r0@lanes.test" in msg.rcpt_tos else 0.5


def test_a_redis_error_in_one_lane_lets_the_others_record_their_rounds(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first job's recording fails (Redis): the task must run again, but the lanes sending
    meanwhile finish and record their rounds first (cancelled, they would leave deliveries
    unrecorded, to be sent again), and no lane starts another job."""
    real = Ledger._record_all  # the recordings of a turn (in a thread of the process)

    def failing(self: Ledger, requests: Any) -> Any:
        if any("r0@lanes.test" in writes.round_.job.recipients for writes in requests):
            raise redis.exceptions.ConnectionError("Redis went away")
        return real(self, requests)

    monkeypatch.setattr(Ledger, "_record_all", failing)
    with Sink("starttls", slow_for=slow_but_first) as sink:
        config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=3)
        jobs = queue_jobs(store, DOMAIN, 5)
        with pytest.raises(redis.exceptions.ConnectionError):
            deliver(config, store, jobs)
        delivered_once(sink, jobs[:3])
    for job in jobs[1:3]:
        assert not store.exists(spool.msg_key(job["id"]))
        assert [e["event"] for e in spool.read_trace(store, job["id"])][-1] == "completed"
    for job in jobs[3:]:  # not started: still stored, never claimed or marked
        assert store.exists(spool.msg_key(job["id"]))
    assert store.keys(spool.claim_key("*", "*")) == []
    # The first round's DATA went out unrecorded: its mark stays, so its retry says "may have
    # it" (RFC 1047), as after a crash; no other job is marked.
    assert store.keys(spool.in_flight_key("*", "*")) == [
        spool.in_flight_key(jobs[0]["id"], DOMAIN).encode()
    ]


def test_lanes_to_a_destination_that_just_took_mail_start_at_once(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """A batch to a destination no lane of this process has reached tries one job first (an
    unreachable destination then costs one attempt per batch); once the destination took a
    message, the next batch to it starts every lane at once, without that round trip. The sink
    answers MAIL slowly and counts the MAIL commands waiting at once."""
    with Sink("starttls", mail_delay=0.5) as sink:
        config = routed(tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=3)
        deliverer = Deliverer(config, store)
        first, second = queue_jobs(store, DOMAIN, 3), queue_jobs(store, DOMAIN, 3)

        async def run() -> tuple[int, int]:
            try:
                await deliverer.run_batch(first)
                cold = sink.mail_busy_peak
                sink.mail_busy_peak = 0
                await deliverer.run_batch(second)
                return cold, sink.mail_busy_peak
            finally:
                deliverer.pool.close_all()

        try:
            cold, warm = asyncio.run(run())
        finally:  # as test_batching.deliver: parked TLS sockets outlive their loop
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
        delivered_once(sink, first + second)
        # Cold: the first MAIL alone, then the two other lanes together once it was answered.
        assert cold == 2, sink.summary()
        assert warm == 3, sink.summary()
    settled(store, first + second)


def test_processes_sharing_a_full_site_send_over_the_sessions_they_hold(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes (two deliverers, each with its own sessions and lanes) send to one site
    whose connection limit is what each alone could use. A lane that finds every connection
    taken while its process's other lanes send there waits for one of their sessions instead of
    parking its job and the rest of its batch as throttled: every job is delivered in its own
    task, the limit holds, nothing waits in the deferred set. (The wait for a connection within
    the worker is cut from 5 s to 0.3 s, so the batches need not last seconds to outlast it.)

    Each process first delivers one message, so each holds a session there when the batches
    race for the rest (else the process that starts a few milliseconds late may find all four
    taken and none of its own: throttled, as it should be). No shaping tick runs: at a tick a
    process closes a parked session for a waiter elsewhere, which here is the other process."""
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.3)
    monkeypatch.setattr(lanes, "SHORT_WAIT", 0.3)
    monkeypatch.setattr(shaping, "TICK", 600.0)
    with Sink("starttls", data_delay=0.1) as sink:
        config = routed(
            tmp_path, valkey, DOMAIN, sink.address_text, sessions_per_process=4,
            shaping={"default": {"connections": 4}},
        )  # fmt: skip
        warm = [queue_jobs(store, DOMAIN, 1), queue_jobs(store, DOMAIN, 1)]
        batches = [queue_jobs(store, DOMAIN, 16), queue_jobs(store, DOMAIN, 16)]
        deliverers = [Deliverer(config, store), Deliverer(config, store)]

        async def run() -> list[list[Any]]:
            try:
                for deliverer, batch in zip(deliverers, warm, strict=True):
                    await deliverer.run_batch(batch)
                return list(
                    await asyncio.gather(
                        *(d.run_batch(b) for d, b in zip(deliverers, batches, strict=True))
                    )
                )
            finally:
                for deliverer in deliverers:
                    deliverer.pool.close_all()
                    deliverer.shaper.close()

        try:
            outcomes = asyncio.run(run())
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
        jobs = warm[0] + warm[1] + batches[0] + batches[1]
        throttled = [
            e for j in jobs for e in spool.read_trace(store, j["id"]) if e["event"] == "throttled"
        ]
        assert throttled == [] and store.zcard(spool.DEFERRED) == 0, throttled[:3]
        assert all(o is not None and len(o.delivered) == 1 for b in outcomes for o in b), outcomes
        delivered_once(sink, jobs)
        assert sink.peak_connections <= 4, sink.summary()
    settled(store, jobs)


def test_a_round_waiting_for_a_connection_takes_the_session_its_sibling_parks(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds one of a site's two connections; lane 1 of this process holds the
    other and sends slowly; lane 2 waits for a lease. When lane 1 parks its session, lane 2
    takes it: closing it to get its lease back (as a look that found none used to) would hand
    the connection to whichever process looks next and, at a full site, leave this process's
    lanes with no session at all (their jobs then parked as throttled). One connection from
    this process, both messages delivered, the second over the reused session. Lane 2 waited
    for the site's limit: tlsrelay_throttled_total counts it, as it counts a round that waited
    and then got a lease (review s10)."""
    waited: list[tuple[str, str]] = []
    monkeypatch.setattr(observe, "throttled", lambda *labels: waited.append(labels))
    other = Shaper(Config(), store)  # another worker process, holding one connection
    shaper = Shaper(Config(), store)
    pool = ConnectionPool(10, 60, shaper.release)
    shaper.attach(pool.leases, pool.close_one, pool.expire)  # as Deliverer does

    with Sink("plain", data_delay=0.3) as sink:
        spec = {"name": "wait", "match": ["x.test"], "connections": 2}
        config = Config.model_validate({"delivery": {"shaping": {"sites": [spec]}}})
        site = sites.site_of(config, "x.test", [("mx.x.test", sink.port, "mx")])
        peer = Peer("mx.x.test", "127.0.0.1", sink.port, "mx.x.test")
        timeouts = Timeouts("relay.test", connect=5, command=10, greeting=10, data=10)

        async def lane(n: int) -> Attempt:
            gate = shaper.gate(site)
            envelope = Envelope(id=f"0123456789ab-lane{n}", sender="s@o.test", recipients=())
            try:
                return await attempt(
                    peer, envelope, ["r@x.test"], b"Subject: x\r\n\r\nx\r\n",
                    TlsSettings(mode=TlsMode.NONE), timeouts, Hooks(), pool, gate,
                )  # fmt: skip
            finally:
                gate.close()

        async def run() -> tuple[Attempt, Attempt]:
            held = await other.gate(site).lease()
            assert isinstance(held, Lease)
            try:
                first = asyncio.create_task(lane(1))
                deadline = time.monotonic() + 10
                while sink.stats()["connections"] < 1:  # lane 1 holds the second connection
                    assert time.monotonic() < deadline, sink.summary()
                    await asyncio.sleep(0.01)
                second = await lane(2)
                return await first, second
            finally:
                other.release(held)
                pool.close_all()

        first, second = asyncio.run(run())
        assert first.replies and second.replies, (first, second)
        assert len(sink.messages) == 2, sink.summary()
        assert second.reused and sink.stats()["connections"] == 1, sink.summary()
        assert waited == [("wait", shaping.CONNECTIONS)], waited
