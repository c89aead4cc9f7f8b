"""Traffic shaping's parts: the configuration keys (every bad value named with file, key and
line), the site of a round, and the Redis scripts (leases, GCRA, back-off, renewal) against a
real Redis-compatible server."""

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
from services.common.config import Config, ConfigError, load_config
from services.common.jobs import Job
from services.common.metrics import SiteCollector
from services.common.model import Decision, TlsMode
from services.common.redisserver import EmbeddedRedis
from services.deliver import scheduler, shaping, sites
from services.deliver.shaping import Lease, Shaper, Throttle
from tests.peers import Sink
from tests.test_batching import deliver, queue_jobs, tasks, write_config

SHAPED = """\
delivery:
  reuse_max_messages: 7
  shaping:
    default:
      connections: 3
      connection_rate: 10/s
    sites:
      - name: microsoft
        match: ["*.mail.protection.outlook.com"]
        connections: 2
        rate: 50/s
      - name: lab
        match: "127.0.0.1:2601"
        messages_per_connection: 1
  backoff:
    replies: ['^421 ']
    factor: 0.25
    recover_after: 1m
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tlsrelay.yaml"
    path.write_text(text)
    return path


def test_shaping_keys(tmp_path: Path) -> None:
    delivery = load_config(write(tmp_path, SHAPED)).delivery
    shaping_config = delivery.shaping
    assert shaping_config.default.connections == 3
    assert str(shaping_config.default.connection_rate) == "10/1s"
    assert shaping_config.default.messages_per_connection == 7, "reuse_max_messages: its alias"
    microsoft = shaping_config.sites[0].limits(shaping_config.default)
    assert (microsoft.connections, str(microsoft.rate)) == (2, "50/1s")
    assert microsoft.messages_per_connection == 7
    assert shaping_config.sites[1].match == ("127.0.0.1:2601",)
    assert shaping_config.sites[1].limits(shaping_config.default).messages_per_connection == 1
    assert delivery.backoff.factor == 0.25 and delivery.backoff.recover_after == 60
    assert [p.pattern for p in delivery.backoff.replies] == ["^421 "]


def test_the_alias_works_both_ways(tmp_path: Path) -> None:
    text = "delivery:\n  shaping:\n    default: {messages_per_connection: 9}\n"
    assert load_config(write(tmp_path, text)).delivery.reuse_max_messages == 9
    defaults = Config().delivery
    assert defaults.reuse_max_messages == defaults.shaping.default.messages_per_connection == 100


BAD = """\
delivery:
  reuse_max_messages: 7
  shaping:
    default:
      connections: 0
      rate: 10/q
      messages_per_connection: 8
    sites:
      - name: default
        match: []
      - name: x
        match: [a.example]
        burst: 3
      - name: x
        match: [b.example]
  backoff:
    replies: ['(?i']
    factor: 1.5
    recover_after: soon
"""


def test_every_bad_value_named_with_file_key_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, BAD))
    lines = str(caught.value).splitlines()
    expected = [
        ":5: delivery.shaping.default.connections: must be greater than 0, got 0",
        ":6: delivery.shaping.default.rate: expected a rate such as 600/m, got '10/q'",
        ":9: delivery.shaping.sites.0.name: 'default' is the name of every site without",
        ":10: delivery.shaping.sites.0.match: expected at least 1 item(s)",
        ":13: delivery.shaping.sites.1.burst: unknown key",
        ":17: delivery.backoff.replies.0: bad regex '(?i'",
        ":18: delivery.backoff.factor: must be less than 1, got 1.5",
        ":19: delivery.backoff.recover_after: expected a duration",
    ]
    for line, text in zip(lines, expected, strict=True):
        assert text in line, (line, text)
    assert all(line.startswith(str(tmp_path / "tlsrelay.yaml")) for line in lines)


def test_duplicate_site_names_and_a_differing_alias(tmp_path: Path) -> None:
    text = BAD.split("  backoff:")[0].replace("connections: 0", "connections: 1")
    text = text.replace("rate: 10/q", "rate: 10/s").replace("        burst: 3\n", "")
    text = text.replace("      - name: default\n        match: []\n", "")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    message = str(caught.value)
    assert ":11: delivery.shaping.sites.1.name: duplicate site name 'x'" in message
    assert (
        ":7: delivery.shaping.default.messages_per_connection: delivery.reuse_max_messages (7)"
        in message
    )


def config(**sites: dict[str, object]) -> Config:
    listed = [{"name": name, **spec} for name, spec in sites.items()]
    return Config.model_validate({"delivery": {"shaping": {"sites": listed}}})


def test_the_site_of_a_round() -> None:
    cfg = config(
        microsoft={"match": ["*.mail.protection.outlook.com"], "connections": 5},
        lab={"match": ["127.0.0.1:2601"]},
        bank={"match": ["bank.example"]},
    )
    outlook = [("contoso-com.mail.protection.outlook.com", 25, "mx")]
    assert sites.site_of(cfg, "contoso.com", outlook).id == "microsoft"
    assert sites.site_of(cfg, "contoso.com", outlook).limits.connections == 5
    assert sites.site_of(cfg, "x.test", [("127.0.0.1", 2601, "route")]).label == "lab"
    assert sites.site_of(cfg, "bank.example", [("mx.bank.example", 25, "mx")]).id == "bank"
    # MX rollup: the same MX hosts, in any order, are one site; labelled default.
    a = sites.site_of(cfg, "a.example", [("mx1.host.test", 25, "mx"), ("MX2.host.test.", 25, "mx")])
    b = sites.site_of(cfg, "b.example", [("mx2.host.test", 25, "mx"), ("mx1.host.test", 25, "mx")])
    c = sites.site_of(cfg, "c.example", [("mx3.host.test", 25, "mx")])
    assert a.id == b.id != c.id and a.id.startswith("mx:") and a.label == "default"
    route = sites.site_of(cfg, "d.example", [("10.0.0.1", 2525, "route")])
    assert route.id == "route:10.0.0.1:2525" and route.label == "default"


def site(connections: int = 2, **limits: object) -> sites.Site:
    spec = {"x": {"match": ["x.example"], "connections": connections, **limits}}
    return sites.site_of(config(**spec), "x.example", [("mx.x.example", 25, "mx")])


def test_leases_hold_the_limit_and_expire(store: redis.Redis) -> None:
    shaper = Shaper(Config(), store)
    s = site(2)
    first, second = shaper._take(s), shaper._take(s)
    assert isinstance(first, Lease) and isinstance(second, Lease)
    third = shaper._take(s)
    assert isinstance(third, Throttle) and third.reason == "connections"
    assert store.exists(spool.site_key("waiting", s.id)), "a waiter is announced"
    shaper.release(first)  # dropped with the next lease of the site (or the next tick)
    assert isinstance(shaper._take(s), Lease)
    # A holder that stopped renewing (killed): its leases' expiry passes and they go.
    store.zadd(first.key, {second.id: 0}, xx=True)
    assert isinstance(shaper._take(s), Lease)
    document = json.loads(store.hget(spool.SHAPING_SITES, s.id) or "{}")
    assert document["label"] == "x"


def test_the_tick_renews_and_notices_lost_leases(store: redis.Redis) -> None:
    shaper = Shaper(Config(), store)
    s = site(3)
    kept, lost = shaper._take(s), shaper._take(s)
    assert isinstance(kept, Lease) and isinstance(lost, Lease)
    store.zrem(kept.key, lost.id)  # as if it had expired and been dropped by another worker
    before = store.zscore(kept.key, kept.id)
    shaper.tick()
    assert (store.zscore(kept.key, kept.id) or 0) >= (before or 0)
    assert not kept.lost and lost.lost
    shaper.release(kept)
    shaper.tick()
    assert store.zscore(kept.key, kept.id) is None


def test_a_connection_rate(store: redis.Redis) -> None:
    shaper = Shaper(Config(), store)
    s = site(100, connection_rate="2/10s")
    assert isinstance(shaper._take(s), Lease) and isinstance(shaper._take(s), Lease)
    third = shaper._take(s)
    assert isinstance(third, Throttle) and third.reason == "connection_rate"
    assert 4 < third.wait <= 5.01, third


def test_a_message_rate_waits_shortly_or_throttles(store: redis.Redis) -> None:
    shaper = Shaper(Config(), store)
    s = site(rate="2/60s")
    assert asyncio.run(shaper.pace(s)) is None and asyncio.run(shaper.pace(s)) is None
    throttle = asyncio.run(shaper.pace(s))
    assert throttle is not None and throttle.reason == "rate" and 29 < throttle.wait <= 30.01
    assert asyncio.run(shaper.pace(site(5))) is None, "no rate: no Redis call, no wait"


def test_backoff_steps_down_for_everyone_and_recovers(store: redis.Redis) -> None:
    cfg = Config.model_validate({"delivery": {"backoff": {"factor": 0.5, "recover_after": "1s"}}})
    shaper = Shaper(cfg, store)
    s = site(8)
    assert not shaper.backoff(s, ["450 4.2.0 mailbox busy"])
    assert shaper.backoff(s, ["421 4.7.0 Too many connections"])
    held = [shaper._take(s) for _ in range(5)]
    assert [isinstance(h, Lease) for h in held] == [True] * 4 + [False]
    assert isinstance(held[-1], Throttle) and held[-1].reason == "backoff"
    key = spool.site_key("backoff", s.id)
    store.hset(key, mapping={"at": float(store.hget(key, "at") or 0) - 1.5})  # a second later
    assert isinstance(shaper._take(s), Lease), "one step back per recover_after"
    assert int(store.hget(key, "steps") or 5) == 0 or not store.exists(key)


def test_suspension_by_domain_or_site(store: redis.Redis) -> None:
    shaper = Shaper(Config(), store)
    s = site()
    assert shaper.suspended(s, "x.example") is None
    store.hset(spool.SHAPING_SUSPENDED, "x", json.dumps({"until": None, "reason": ""}))
    shaper._suspended_at = -1e9  # as after SUSPENSION_REFRESH
    stopped = shaper.suspended(s, "x.example")
    assert stopped is not None and stopped.reason == "suspended"
    store.delete(spool.SHAPING_SUSPENDED)  # resumed: a copy saying "suspended" is read again
    assert shaper.suspended(s, "x.example") is None, "never a stale suspension after resume"
    store.hset(spool.SHAPING_SUSPENDED, "default", json.dumps({"until": None, "reason": ""}))
    shaper._suspended_at = -1e9
    assert shaper.suspended(s, "x.example") is None, "a label is not a site"
    store.hset(spool.SHAPING_SUSPENDED, "x.example", json.dumps({"until": 1, "reason": ""}))
    shaper._suspended_at = -1e9
    assert shaper.suspended(s, "x.example") is None, "expired"


def test_a_throttled_job_keeps_its_attempt_and_member_form() -> None:
    decision = Decision(domain="x.example", tls=TlsMode.OPPORTUNISTIC)
    job = Job("0190f0a0b0c0-abc", "x.example", ("a@x.example",), decision, attempt=3)
    parked = job.throttle("connections", "x")
    doc = parked.to_json()
    assert doc["attempt"] == 3 and doc["throttled"] == {"reason": "connections", "site": "x"}
    assert Job.from_json(doc) == parked
    assert "throttled" not in job.to_json(), "unthrottled documents are as they always were"
    assert parked.retry(["a@x.example"], "451 x").throttled is None


def test_the_site_gauges_read_redis(store: redis.Redis, valkey: EmbeddedRedis) -> None:
    shaper = Shaper(Config(), store)
    named, other = site(5), sites.site_of(Config(), "y.example", [("mx.y.example", 25, "mx")])
    leases = [shaper._take(named), shaper._take(named), shaper._take(other)]
    assert all(isinstance(lease, Lease) for lease in leases)
    assert shaper.backoff(named, ["421 4.7.0 slow down"])
    store.hset(
        spool.SHAPING_SUSPENDED, "y.example", json.dumps({"until": None, "label": "default"})
    )
    connections, steps, suspended = SiteCollector(valkey.url).read(time.time())
    assert connections == {"default": 1, "x": 2}
    assert steps == {"default": 0, "x": 1} and suspended == {"default": 1, "x": 0}
    assert sites.prune_sites(store, time.time()) == 0, "recently seen sites stay"
    assert sites.prune_sites(store, time.time() + 2 * sites.SITE_MEMORY) == 2
    assert not store.exists(spool.SHAPING_SITES), "unseen for a day, their leases long gone"


# --------------------------------------------------------------------------- in a deliverer


def come_due(client: redis.Redis, now: float | None = None) -> list[dict[str, Any]]:
    """What the scheduler moves to the deliver queue at ``now`` (the job documents of its
    tasks, taken off the queue as a worker would)."""
    scheduler.move_due(client, time.time() if now is None else now)
    docs = [doc for batch in tasks(client, queueing.DELIVER_LIST) for doc in batch]
    client.delete(queueing.DELIVER_LIST)
    return docs


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink("plain").start()
    try:
        yield server
    finally:
        server.stop()


def shaped(tmp_path: Path, valkey: EmbeddedRedis, sink: Sink, **limits: object) -> Config:
    settings = {
        "redis_url": valkey.url,
        "delivery": {
            "routes": {"shaped.test": sink.address_text},
            "shaping": {"sites": [{"name": "s", "match": [sink.address_text], **limits}]},
        },
    }
    return write_config(tmp_path / "c.yaml", settings)


def test_a_redis_error_at_the_lease_sends_nothing_and_loses_nothing(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    config = shaped(tmp_path, valkey, sink)
    jobs = queue_jobs(store, "shaped.test", 2)

    async def unreachable(self: Shaper, site: sites.Site, *rest: object) -> object:
        raise redis.exceptions.ConnectionError("Redis went away")

    with monkeypatch.context() as patch:
        patch.setattr(Shaper, "take", unreachable)  # the lease's script, off the loop
        with pytest.raises(redis.exceptions.ConnectionError):
            deliver(config, store, jobs)  # the task is then parked for a retry (retry.py)
    assert sink.connections == 0 and sink.messages == []
    assert not store.keys(spool.rcpt_key("*")), "nothing recorded: every recipient still pending"
    assert not store.keys(spool.claim_key("*", "*")), "claims released"
    outcomes = deliver(config, store, jobs)  # the retry
    assert [len(o.delivered) for o in outcomes if o is not None] == [1, 1]
    assert len(sink.messages) == 2


def test_a_batch_that_meets_the_limit_is_parked_as_throttled(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.3)
    config = shaped(tmp_path, valkey, sink, connections=1)
    jobs = queue_jobs(store, "shaped.test", 3)
    leases = spool.site_key("leases", "s")
    store.zadd(leases, {"another-worker": time.time() + 3600})  # holds the only connection
    assert deliver(config, store, jobs) == [None, None, None]
    assert sink.connections == 0
    members: list[bytes] = store.zrange(spool.DEFERRED, 0, -1)  # type: ignore[assignment]
    parked = [json.loads(m) for m in members]
    assert sorted(p["id"] for p in parked) == sorted(j["id"] for j in jobs)
    assert all(p["throttled"] == {"reason": "connections", "site": "s"} for p in parked)
    assert all(p["attempt"] == 1 and "last_error" not in p for p in parked), "not an attempt"
    for job in jobs:
        kinds = [e["event"] for e in spool.read_trace(store, job["id"])]
        assert "throttled" in kinds and "attempt" not in kinds and "deferred" not in kinds
    line = store.zrange(spool.site_key("line", "s"), 0, -1)
    assert line == [], "no line unless delivery.shaping.line is on"
    store.delete(leases)
    outcomes = deliver(config, store, come_due(store, time.time() + shaping.PARK_CONNECTIONS))
    assert [len(o.delivered) for o in outcomes if o is not None] == [1, 1, 1]
    assert len(sink.messages) == 3 and sink.peak_connections == 1
    assert not store.exists(spool.site_key("line", "s")), "the line is empty again"


def test_a_long_throttled_wait_tells_the_sender_once(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """delivery.delay_warning_after applies to mail that waits for a limit as to deferred
    mail: one "delayed" DSN per message, queued with the throttled parking."""
    monkeypatch.setattr(shaping, "SHORT_WAIT", 0.1)
    config = shaped(tmp_path, valkey, sink, connections=1)
    config = config.model_copy(
        update={"delivery": config.delivery.model_copy(update={"delay_warning_after": 0.001})}
    )
    jobs = queue_jobs(store, "shaped.test", 1)
    store.zadd(spool.site_key("leases", "s"), {"another-worker": time.time() + 3600})
    deliver(config, store, jobs)
    parked: list[bytes] = store.zrange(spool.DEFERRED, 0, -1)  # type: ignore[assignment]
    deliver(config, store, [json.loads(m) for m in parked])
    trace = spool.read_trace(store, jobs[0]["id"])
    assert [e["event"] for e in trace].count("throttled") == 2
    dsns = [e for e in trace if e["event"] == "dsn"]
    assert len(dsns) == 1 and dsns[0]["action"] == "delayed", trace
    assert store.hget(spool.msg_key(jobs[0]["id"]), "delay_warned")
    assert sink.connections == 0
