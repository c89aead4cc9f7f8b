"""A site's line (review finding 8) and the throttled round's loose ends, against a real
Redis-compatible server and a real SMTP sink on loopback: mail waiting for a site's limit goes
oldest first and younger mail does not pass it, on a new connection or on one a worker holds;
leftovers never block the line and a killed worker's job in it is not stuck; a throttled round
gives its rate cell back; what the sender reads of a throttle names no site; the TLSRPT counts
of a round that was throttled first are recorded once, by the round that tries."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import queueing, spool
from services.common.config import Config
from services.common.jobs import Job
from services.common.model import Decision, Envelope, Reply, TlsMode, new_message_id
from services.common.redisserver import EmbeddedRedis
from services.deliver import rescue, scheduler, shaping, sites, tlsrpt
from services.deliver.batch import Deliverer
from services.deliver.delivery import Outcome
from services.deliver.ledger import Ledger
from services.deliver.shaping import Shaper, Throttle
from tests.peers import Sink
from tests.test_batching import BODY, deliver, tasks, write_config

DOMAIN = "shaped.test"


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink("plain").start()
    try:
        yield server
    finally:
        server.stop()


def shaped(
    tmp_path: Path, valkey: EmbeddedRedis, sink: Sink, name: str = "s", **limits: object
) -> Config:
    """A site ``name`` for the sink; its line's front is two jobs per connection (a task
    carries at most two here)."""
    settings = {
        "redis_url": valkey.url,
        "delivery": {
            "batch_max": 2,
            "routes": {DOMAIN: sink.address_text},
            "shaping": {
                "line": True,
                "sites": [{"name": name, "match": [sink.address_text], **limits}],
            },
        },
    }
    return write_config(tmp_path / "c.yaml", settings)


def queue(client: redis.Redis, name: str, age: float = 0.0) -> dict[str, Any]:
    """A stored message to ``name@shaped.test``, accepted ``age`` seconds ago: its job."""
    rcpt = f"{name}@{DOMAIN}"
    e = Envelope(new_message_id(), "s@origin.test", (rcpt,), received_at=time.time() - age)
    with client.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, e, BODY, spool.TRACE_TTL)
        pipe.execute()
    decision = Decision(domain=DOMAIN, tls=TlsMode.OPPORTUNISTIC)
    spool.record_classifications(client, [(e, [decision])])  # as policy leaves it
    client.delete(queueing.DELIVER_LIST)  # its task: the test runs the job itself
    return Job(e.id, DOMAIN, (rcpt,), decision).to_json()


def come_due(client: redis.Redis, now: float | None = None) -> list[dict[str, Any]]:
    """What the scheduler moves to the deliver queue at ``now``, taken off it as a worker
    would (the jobs are then in waiting:deliver)."""
    scheduler.move_due(client, time.time() if now is None else now)
    docs = [doc for batch in tasks(client, queueing.DELIVER_LIST) for doc in batch]
    client.delete(queueing.DELIVER_LIST)
    return docs


def reasons(client: redis.Redis, job: dict[str, Any]) -> list[str]:
    return [e["reason"] for e in spool.read_trace(client, job["id"]) if e["event"] == "throttled"]


def arrived(sink: Sink) -> list[str]:
    return [m.rcpt_tos[0].split("@")[0] for m in sink.messages]


def line(client: redis.Redis, site: str = "s") -> list[str]:
    members: list[bytes] = client.zrange(spool.site_key("line", site), 0, -1)  # type: ignore[assignment]
    return [json.loads(m)["recipients"][0].split("@")[0] for m in members]


def hold_the_site(client: redis.Redis, site: str = "s") -> None:
    """Another worker holds the site's only connection."""
    client.zadd(spool.site_key("leases", site), {"another-worker": time.time() + 3600})


def free_the_site(client: redis.Redis, site: str = "s") -> None:
    """Every session to the site closed (another worker's, or one a finished test process
    parked: its tick would drop the lease)."""
    client.delete(spool.site_key("leases", site))


# --------------------------------------------------------------------------- the line


def test_younger_mail_does_not_pass_mail_waiting_for_the_site(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Three messages wait for the site's only connection; it comes free just as a fourth,
    younger one arrives. The younger one waits in line behind them (it would have taken the
    connection at once); they go first, then it — none of it an attempt. (Within the line's
    front no order is promised, README "The site's line": a front job asleep in its own
    connection wait may go after the next one called in.)"""
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.3)
    config = shaped(tmp_path, valkey, sink, connections=1)  # the line's front: 2 jobs
    old = [queue(store, name, age) for name, age in (("a", 30), ("b", 20), ("c", 10))]
    hold_the_site(store)
    assert deliver(config, store, old) == [None, None, None]
    assert line(store) == ["a", "b", "c"], "each waits in the site's line, oldest first"
    free_the_site(store)
    young = queue(store, "young")
    assert deliver(config, store, [young]) == [None]
    assert sink.messages == [] and reasons(store, young) == ["line"]
    assert line(store) == ["a", "b", "c", "young"]
    for _ in range(6):  # the scheduler and the workers, until all is delivered
        docs = come_due(store, time.time() + shaping.PARK_CONNECTIONS)
        if not docs:
            break
        deliver(config, store, docs)
        free_the_site(store)
    order = arrived(sink)
    assert sorted(order[:3]) == ["a", "b", "c"] and order[3:] == ["young"], sink.summary()
    assert not store.exists(spool.site_key("line", "s")) and not store.zcard(spool.DEFERRED)
    for job in [*old, young]:
        kinds = [e["event"] for e in spool.read_trace(store, job["id"])]
        assert kinds.count("attempt") == 1 and "deferred" not in kinds, kinds


def test_younger_mail_does_not_take_a_session_the_worker_holds(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink
) -> None:
    """A worker holds an idle session to the site (no lease needed to use it) while older
    mail fills the site's line's front, waiting for another worker: the worker learns of the
    line at its next tick, and a younger message does not ride its session past that mail."""
    config = shaped(tmp_path, valkey, sink, connections=1)  # the line's front: 2 jobs
    first = queue(store, "first", 60)
    waiting = [queue(store, "w1", 30), queue(store, "w2", 20)]
    young = queue(store, "young")

    async def run() -> list[Any]:
        worker = Deliverer(config, store)
        try:
            await worker.run_batch([first])  # its session is parked, with the site's lease
            other = Ledger(config, store)  # another worker's rounds met the limit
            site = worker.shaper.site(DOMAIN, [(sink.address[0], sink.address[1], "route")])
            throttle = Throttle(shaping.CONNECTIONS, site, shaping.PARK_CONNECTIONS)
            for doc in waiting:
                job = Job.from_json(doc)
                envelope = spool.load_envelope(store, job.id)
                assert envelope is not None
                claim = other.claim(job.key)
                round_ = other.round(job, envelope, BODY)
                other.throttle(round_, claim, throttle, Reply(451, "4.4.5", "waiting"))
            worker.shaper.tick()  # renews its lease, sees the line of its parked session's site
            assert worker.shaper.queued(site)
            return await worker.run_batch([young])
        finally:
            worker.pool.close_all()

    assert asyncio.run(run()) == [None]
    assert arrived(sink) == ["first"] and reasons(store, young) == ["line"]
    assert line(store) == ["w1", "w2", "young"]


def test_leftovers_leave_the_line_and_a_killed_workers_job_keeps_its_place(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Two old jobs wait in the line; their worker is SIGKILLed as they come back (the
    scheduler moved them: they are in waiting:deliver, not deferred); a third entry is a
    leftover (its job is nowhere: bounced by hand). A younger message waits behind the two
    (not behind the leftover, which goes), the rescue sweep queues the two again, and all three
    are delivered, the younger last: nothing stuck, nothing twice."""
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.3)
    config = shaped(tmp_path, valkey, sink, connections=1)
    old = [queue(store, "a", 30), queue(store, "b", 20)]
    hold_the_site(store)
    deliver(config, store, old)
    leftover = Job.from_json(queue(store, "gone", 40)).throttle(shaping.CONNECTIONS, "s")
    store.zadd(spool.site_key("line", "s"), {shaping.line_member(leftover.to_json()): 1.0})
    store.zrem(spool.WAITING_DELIVER, spool.waiting_job(*leftover.key))  # bounced by hand
    assert come_due(store, time.time() + shaping.PARK_CONNECTIONS) != []  # the worker dies
    free_the_site(store)
    young = queue(store, "young")
    assert deliver(config, store, [young]) == [None] and reasons(store, young) == ["line"]
    assert line(store) == ["a", "b", "young"], "the leftover went, the running two stayed"
    later = time.time() + 60
    assert rescue.sweep(store, later, 30.0, 30.0, 50) == 0, "suspected"
    store.delete(rescue.LOCK)  # the next sweep, 30 s later
    assert rescue.sweep(store, later + 30, 30.0, 30.0, 50) == 2, "two passes agree: re-queued"
    rescued = [doc for batch in tasks(store, queueing.DELIVER_LIST) for doc in batch]
    store.delete(queueing.DELIVER_LIST)
    assert sorted(j["recipients"][0] for j in rescued) == ["a@shaped.test", "b@shaped.test"]
    assert [j.get("throttled") for j in rescued] == [None, None], "rebuilt from the spool"
    deliver(config, store, rescued)
    free_the_site(store)
    # The scheduler and the workers, until all is delivered or a deadline. Six quick passes
    # once delivered nothing in parallel runs (cause not confirmed; the line's once-a-second
    # look over its front, WAKE_EVERY_MS, is the one step here that waits on the clock), so
    # passes go on for real seconds; a failure shows each job's trace and the line.
    deadline = time.monotonic() + 15
    while len(sink.messages) < 3 and time.monotonic() < deadline:
        docs = come_due(store, time.time() + shaping.PARK_LINE)
        if docs:
            deliver(config, store, docs)
            free_the_site(store)
        else:
            time.sleep(0.1)  # a poll interval within the deadline, not a synchronisation
    traces = {j["recipients"][0]: spool.read_trace(store, j["id"]) for j in [*old, young]}
    order = arrived(sink)  # the line's front (a, b) in no set order (README), young after it
    assert sorted(order[:2]) == ["a", "b"] and order[2:] == ["young"], (traces, line(store))
    # The rescued jobs' old entries (their documents were rebuilt) go at the line's next look.
    store.delete(spool.site_key("wake", "s"))
    site = sites.site_of(config, DOMAIN, [(*sink.address, "route")])
    assert Shaper(config, store).admit(site, time.time()) is None
    assert not store.exists(spool.site_key("line", "s"))


def test_the_lines_front_is_called_in_and_no_one_waits_without_a_line(store: redis.Redis) -> None:
    """Asking the line: without one it admits (one EXISTS); with one, jobs of its front parked
    behind others are made due now; a rate's exact wait is left alone."""
    named = [{"name": "x", "match": ["x.example"], "connections": 1}]
    cfg = Config.model_validate(
        {"delivery": {"batch_max": 1, "shaping": {"line": True, "sites": named}}}
    )
    shaper = Shaper(cfg, store)  # the line's front: two jobs
    site = sites.site_of(cfg, "x.example", [("mx.x.example", 25, "mx")])
    assert shaper.admit(site, time.time()) is None and not shaper.queued(site)
    decision = Decision(domain="x.example", tls=TlsMode.OPPORTUNISTIC)
    later = time.time() + 600
    parked = {}
    for name, reason in (("a", shaping.LINE), ("b", shaping.RATE), ("c", shaping.LINE)):
        job = Job(new_message_id(), "x.example", (f"{name}@x.example",), decision)
        member = shaping.line_member(job.throttle(reason, "x").to_json())
        store.zadd(spool.DEFERRED, {member: later})
        store.zadd(spool.site_key("line", "x"), {member: {"a": 1.0, "b": 2.0, "c": 3.0}[name]})
        parked[name] = member
    got = shaper.admit(site, time.time())
    assert got is not None and got.reason == shaping.LINE and shaper.queued(site)
    assert (store.zscore(spool.DEFERRED, parked["a"]) or later) <= time.time(), "called in"
    assert store.zscore(spool.DEFERRED, parked["b"]) == later, "a rate's wait is its own"
    assert store.zscore(spool.DEFERRED, parked["c"]) == later, "not in the front (two jobs)"
    assert shaper.admit(site, 1.5) is None, "one older than it waits: in the front (two)"


def test_while_a_line_stands_a_freed_connection_goes_to_the_oldest_asking(
    store: redis.Redis,
) -> None:
    """Within the line's front, the oldest round asking for a connection gets the next one
    that comes free, not whichever younger round asks first; with no line, the flag is the
    old "someone waits" and costs nothing more."""
    named = [{"name": "x", "match": ["x.example"], "connections": 1}]
    cfg = Config.model_validate(
        {"delivery": {"batch_max": 4, "shaping": {"line": True, "sites": named}}}
    )
    shaper = Shaper(cfg, store)
    site = sites.site_of(cfg, "x.example", [("mx.x.example", 25, "mx")])
    old, young = time.time() - 60, time.time() - 1
    store.zadd(spool.site_key("line", "x"), {"a job of the line": old - 1})
    store.zadd(spool.DEFERRED, {"a job of the line": time.time() + 600})
    hold_the_site(store, "x")
    first = shaper._take(site, old)
    assert isinstance(first, Throttle) and first.reason == shaping.CONNECTIONS
    free_the_site(store, "x")
    younger = shaper._take(site, young)
    assert isinstance(younger, Throttle) and younger.reason == shaping.CONNECTIONS
    assert isinstance(shaper._take(site, old), shaping.Lease), "the oldest asking gets it"
    assert not store.exists(spool.site_key("waiting", "x"))


# --------------------------------------------------------------------------- loose ends


def test_a_throttled_round_gives_its_rate_cell_back(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A site allows one message a minute and one connection, which another worker holds: the
    round passes the rate, meets the connection limit and is parked. It sent nothing, so the
    minute's one message is still to be had when it comes back."""
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.3)
    config = shaped(tmp_path, valkey, sink, connections=1, rate="1/m")
    job = queue(store, "paced")
    hold_the_site(store)
    assert deliver(config, store, [job]) == [None]
    assert reasons(store, job) == ["connections"]
    free_the_site(store)
    outcomes = deliver(config, store, come_due(store, time.time() + shaping.PARK_CONNECTIONS))
    assert reasons(store, job) == ["connections"], "not throttled again by the rate"
    assert [len(o.delivered) for o in outcomes if o is not None] == [1]


def test_the_rate_cell_goes_back_to_the_minute_it_was_counted_in(store: redis.Redis) -> None:
    """A round counted by the rate in one minute and throttled in the next (it waited for a
    connection) takes its count off the minute it was counted in, not the current one (the
    per-minute counts ``queue sites`` shows)."""
    cfg = Config.model_validate({"delivery": {"shaping": {"default": {"rate": "10/m"}}}})
    site = sites.site_of(cfg, "x.example", [("mx.x.example", 25, "mx")])
    shaper = Shaper(cfg, store)
    paced_at = time.time() - 120
    then = spool.site_key("count", f"{site.id}:{int(paced_at // 60)}")
    now = spool.site_key("count", f"{site.id}:{int(time.time() // 60)}")
    store.set(then, 1)
    store.set(now, 1)
    shaper.refund(site, paced_at)
    assert store.get(then) == b"0" and store.get(now) == b"1"


def test_the_sender_reads_what_happened_not_the_sites_name(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A message still waiting for a site's connection at its queue lifetime bounces; its DSN
    says why in words a sender understands and names no site; the log and the trace do."""
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.3)
    config = shaped(tmp_path, valkey, sink, name="pool-eu-7", connections=1)
    lifetime = config.delivery.max_queue_lifetime
    job = queue(store, "late", age=lifetime + 1)
    hold_the_site(store, "pool-eu-7")
    deliver(config, store, [job])
    trace = spool.read_trace(store, job["id"])
    bounced = [e for e in trace if e["event"] == "bounced"]
    assert bounced and "pool-eu-7" not in json.dumps(bounced), bounced
    reply = next(iter(bounced[0]["recipients"].values()))
    assert reply.startswith("451 4.4.5 delivery not attempted yet: the receiving mail system")
    assert any("pool-eu-7" in e.get("note", "") for e in trace if e["event"] == "skipped")
    dsn = next(e for e in trace if e["event"] == "dsn")
    body = spool.load_body(store, dsn["dsn_id"]) or b""
    assert b"receiving mail system accepts only so many connections" in body.replace(b"\r\n ", b" ")
    assert b"pool-eu-7" not in body and b"traffic shaping" not in body


def test_tlsrpt_counts_a_throttled_jobs_policy_once_when_it_is_tried(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """A throttled round tried no session: its policy lookups are not counted then (counting
    them at each parking would count one message's MTA-STS failure once per wait), but by the
    round that tries — which looks them up again — or, if the message's lifetime ends while it
    waits, by that last round. Once either way."""
    config = write_config(tmp_path / "c.yaml", {"redis_url": valkey.url})
    ledger = Ledger(config, store)
    site = sites.site_of(config, DOMAIN, [("mx.shaped.test", 25, "mx")])
    sts = tlsrpt.StsRound(DOMAIN, error="fetch failed", error_type="sts-policy-fetch-error")
    for age in (0.0, config.delivery.max_queue_lifetime + 1):  # tried later; expired
        job = Job.from_json(queue(store, "r", age))
        envelope = spool.load_envelope(store, job.id)
        assert envelope is not None
        throttle = Throttle(shaping.CONNECTIONS, site, shaping.PARK_CONNECTIONS)
        for _ in range(3):  # three waits
            ledger.throttle(ledger.round(job, envelope, BODY), ledger.claim(job.key), throttle,
                            Reply(451, "4.4.5", "waiting"))  # fmt: skip
        last = Outcome(deferred={job.recipients[0]: Reply(451, "4.4.5", "waiting")}, sts=sts)
        ledger.claim(job.key)
        ledger.record(
            ledger.round(job.throttle(shaping.CONNECTIONS, site.id), envelope, BODY), last
        )
    day = tlsrpt.read_day(store, tlsrpt.utc_day(time.time()))
    failures = day[DOMAIN][tlsrpt.policy_key(sts)].failures
    assert sum(f["failed-session-count"] for f in failures) == 2, failures


def test_the_line_is_off_unless_configured() -> None:
    """``delivery.shaping.line`` is off by default (it costs a saturated site throughput):
    a throttled round then waits in the deferred set as before, in no line."""
    site = sites.site_of(Config(), "x.example", [("mx.x.example", 25, "mx")])
    throttle = Throttle(shaping.CONNECTIONS, site, shaping.PARK_CONNECTIONS)
    assert not shaping.joins_line(Config(), throttle)
    on = Config.model_validate({"delivery": {"shaping": {"line": "on"}}})
    assert shaping.joins_line(on, throttle)
    assert not shaping.joins_line(on, Throttle(shaping.SUSPENDED, site, 60.0))


def test_a_line_left_when_it_is_turned_off_holds_no_one_up(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """An operator turns ``delivery.shaping.line`` off (it halved a saturated site's
    throughput) while mail waits in a site's line: off means off, so younger mail is no longer
    held behind it, by the lease or by the worker's own question; the jobs of the old line go
    as they come due, and leave it."""
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.3)
    config = shaped(tmp_path, valkey, sink, connections=1)  # the line's front: 2 jobs
    old = [queue(store, name, age) for name, age in (("a", 30), ("b", 20), ("c", 10))]
    hold_the_site(store)
    assert deliver(config, store, old) == [None, None, None]
    assert line(store) == ["a", "b", "c"]
    free_the_site(store)
    off = config.model_copy(
        update={
            "delivery": config.delivery.model_copy(
                update={"shaping": config.delivery.shaping.model_copy(update={"line": False})}
            )
        }
    )
    young = queue(store, "young")
    (outcome,) = deliver(off, store, [young])
    assert outcome is not None and list(outcome.delivered) == ["young@shaped.test"]
    assert reasons(store, young) == [], "not parked behind a line that is off"
    free_the_site(store)
    for _ in range(6):
        docs = come_due(store, time.time() + shaping.PARK_CONNECTIONS)
        if not docs:
            break
        deliver(off, store, docs)
        free_the_site(store)
    assert sorted(arrived(sink)) == ["a", "b", "c", "young"], sink.summary()
    assert not store.exists(spool.site_key("line", "s")) and not store.zcard(spool.DEFERRED)
