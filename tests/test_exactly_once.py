"""Nothing sent twice, nothing left behind (issue #16, items 1, 3, 8 and 11).

- A deliver task longer than ``celery.visibility_timeout`` used to reach a second worker while the
  first was still sending, and both sent (a plain in-flight mark): now a job is claimed
  exclusively, a round is bounded by ``delivery.job_timeout`` and a task stops starting jobs
  after a tenth of it, handing the rest back — end to end, every message of a batch of 20 to a
  destination that takes a second per message arrives exactly once.
- A redelivered task re-sent recipients its first run had deferred, and two copies of one job in
  a task were both sent: only final recipients were skipped.
- Two domain jobs of one message recorded at once could each send the "delayed" DSN.
- ``rcpt:{id}`` outlived its message forever: now every per-message key is deleted or expires.

Real Redis (the ``store`` fixture), the deliverer's own code against real SMTP sinks, and a
world of real processes (tests/world.py).
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from services.common import queueing, spool
from services.common.config import Config, ConfigError, load_config
from services.common.jobs import Job
from services.common.model import Decision, Envelope, Reply, TlsMode, is_message_id, new_message_id
from services.common.redisserver import EmbeddedRedis
from services.deliver import dsn, rescue, scheduler
from services.deliver.claims import Claims
from services.deliver.delivery import Outcome
from services.deliver.ledger import Ledger
from tests.badpeers import BadPeer
from tests.peers import Sink
from tests.test_batching import deliver
from tests.world import World, make_world, wait_until

BODY = b"Subject: once\r\nMessage-ID: <once@origin.test>\r\n\r\nHello.\r\n"


# --------------------------------------------------------------------------- helpers


def write_config(path: Path, settings: dict[str, Any]) -> Config:
    path.write_text(yaml.safe_dump(settings))
    return load_config(path)


def routed(
    tmp_path: Path, valkey: EmbeddedRedis, routes: dict[str, str], **delivery: Any
) -> Config:
    settings = {"redis_url": valkey.url, "delivery": {"routes": routes, **delivery}}
    return write_config(tmp_path / "c.yaml", settings)


def stored(client: redis.Redis, *recipients: str, age: float = 0.0) -> Envelope:
    """A stored message, classified and queued for delivery (its ``waiting:deliver`` members)."""
    envelope = Envelope(
        new_message_id(), "s@origin.test", recipients, received_at=time.time() - age
    )
    with client.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, BODY, spool.TRACE_TTL, enqueue=False)
        pipe.zrem(spool.WAITING_POLICY, envelope.id)
        for domain in envelope.recipients_by_domain():
            pipe.zadd(spool.WAITING_DELIVER, {spool.waiting_job(envelope.id, domain): 1.0})
        pipe.execute()
    return envelope


def job(envelope: Envelope, domain: str, attempt: int = 1) -> Job:
    recipients = envelope.recipients_by_domain()[domain]
    decision = Decision(domain=domain, tls=TlsMode.OPPORTUNISTIC)
    return Job(envelope.id, domain, recipients, decision, attempt=attempt)


# The Redis list of the deliver queue (named with kombu's key prefix where there is one).
DELIVER_LIST: str = queueing.DELIVER_LIST


def queued_jobs(client: redis.Redis) -> list[dict[str, Any]]:
    """The jobs of the one task in the deliver queue, taken off it."""
    (raw,) = client.lrange(DELIVER_LIST, 0, -1)
    client.delete(DELIVER_LIST)
    found = queueing.task_batch(raw)
    assert found is not None and found[0] == queueing.TASK_DELIVER
    return found[1]


def deferred_jobs(client: redis.Redis) -> list[dict[str, Any]]:
    members: list[bytes] = client.zrange(spool.DEFERRED, 0, -1)  # type: ignore[assignment]
    return [json.loads(m) for m in members]


def events(client: redis.Redis, message_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in spool.read_trace(client, message_id) if e["event"] == kind]


# --------------------------------------------------------------------------- item 8


def test_a_redelivered_task_sends_no_recipient_again(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The first run delivered one recipient and deferred the other; the same task again (kombu
    redelivers it, a dead worker's task is handed back) sends nothing: the deferred recipient
    belongs to the retry in the deferred set, which alone sends it."""
    busy = threading.Event()
    busy.set()

    def replies(address: str) -> str | None:
        return "451 4.2.0 try later" if address.startswith("later") and busy.is_set() else None

    with Sink("starttls", rcpt_replies=replies) as server:
        config = routed(tmp_path, valkey, {"x.test": server.address_text})
        envelope = stored(store, "a@x.test", "later@x.test")
        task = [job(envelope, "x.test").to_json()]

        (first,) = deliver(config, store, task)
        assert set(first.delivered) == {"a@x.test"} and set(first.deferred) == {"later@x.test"}
        assert len(server.mail_commands) == 1
        (retry,) = deferred_jobs(store)
        assert (retry["attempt"], retry["recipients"]) == (2, ["later@x.test"])

        assert deliver(config, store, task) == [None], "the redelivered task sent again"
        assert len(server.mail_commands) == 1, "a deferred recipient was sent again"
        assert deferred_jobs(store) == [retry], "the deferred set changed"
        assert len(events(store, envelope.id, "attempt")) == 1

        busy.clear()
        assert scheduler.move_due(store, now=time.time() + 86400) == 1  # the retry, when due
        (second,) = deliver(config, store, queued_jobs(store))
        assert set(second.delivered) == {"later@x.test"}
        assert [m.rcpt_tos for m in server.messages] == [["a@x.test"], ["later@x.test"]]
    assert not store.exists(spool.msg_key(envelope.id), spool.rcpt_key(envelope.id))
    assert deferred_jobs(store) == [] and store.zcard(spool.WAITING_DELIVER) == 0


def test_two_copies_of_a_job_in_one_task_are_sent_once(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink
) -> None:
    config = routed(tmp_path, valkey, {"x.test": sink.address_text})
    one, two = stored(store, "a@x.test"), stored(store, "b@x.test")
    docs = [job(one, "x.test").to_json(), job(two, "x.test").to_json()]
    results = deliver(config, store, [docs[0], docs[1], docs[0]])
    assert [r is not None for r in results] == [True, True, False]
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == ["a@x.test", "b@x.test"]


def test_a_lost_task_is_rebuilt_one_attempt_after_the_last_deferral(store: redis.Redis) -> None:
    """The rescue sweep rebuilds a job whose task was lost: as the retry it was, so that what
    the earlier attempt deferred is sent (a copy of that attempt would skip it)."""
    envelope = stored(store, "a@x.test", "b@x.test")
    decision = Decision(domain="x.test")
    store.hset(spool.msg_key(envelope.id), "decisions", json.dumps([decision.to_json()]))
    state = {"state": "deferred", "reply": "451 4.2.0 later", "at": time.time(), "attempt": 2}
    store.hset(spool.rcpt_key(envelope.id), "b@x.test", json.dumps(state))
    rebuilt = rescue._job(store, envelope.id, "x.test")
    assert rebuilt is not None and rebuilt.attempt == 3
    assert spool.load_job(store, envelope.id, "x.test").pending(rebuilt) == ["a@x.test", "b@x.test"]


# --------------------------------------------------------------------------- item 3: claims


def test_a_job_a_live_worker_holds_is_left_to_it(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink
) -> None:
    """A second worker given the same task while the first still sends it (its claim is kept
    alive) waits at most the claim's TTL, then leaves the job to the first."""
    config = routed(tmp_path, valkey, {"x.test": sink.address_text}, job_timeout="2s")
    assert config.delivery.claim_ttl == 1.0
    envelope = stored(store, "a@x.test")
    first = Claims(store, ttl=2.0)  # the other worker, refreshing its claim
    assert first.take((envelope.id, "x.test")).ours
    task = [job(envelope, "x.test").to_json()]

    started = time.monotonic()
    assert deliver(config, store, task) == [None]
    assert 1.0 <= time.monotonic() - started < 3.0
    assert sink.messages == [] and store.exists(spool.msg_key(envelope.id))
    assert store.get(spool.claim_key(envelope.id, "x.test")) == first.token.encode()

    first.release_all()  # it finished without recording (it died, say): the job is free
    (outcome,) = deliver(config, store, task)
    assert outcome is not None and set(outcome.delivered) == {"a@x.test"}
    assert len(sink.messages) == 1


def test_a_dead_workers_claim_delays_its_job_by_seconds(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink
) -> None:
    """A claim nobody refreshes any more (its worker was killed) ends within its TTL; the
    worker that got the job meanwhile waits for that and sends it."""
    config = routed(tmp_path, valkey, {"x.test": sink.address_text})
    envelope = stored(store, "a@x.test")
    store.set(spool.claim_key(envelope.id, "x.test"), "other-host:4242:cafe", px=1500)
    started = time.monotonic()
    (outcome,) = deliver(config, store, [job(envelope, "x.test").to_json()])
    assert outcome is not None and set(outcome.delivered) == {"a@x.test"}
    assert 1.0 <= time.monotonic() - started < 5.0
    assert len(sink.messages) == 1
    assert store.keys(spool.claim_key("*", "*")) == []


def test_a_claim_is_kept_alive_while_held_and_ends_with_its_release(store: redis.Redis) -> None:
    claims = Claims(store, ttl=1.0)
    envelope = stored(store, "a@x.test")
    key = (envelope.id, "x.test")
    taken = claims.take(key)
    assert taken.ours and taken.state is not None and taken.state.envelope == envelope
    rival = Claims(store, ttl=1.0).take(key)
    assert not rival.ours and rival.owner == claims.token
    time.sleep(2.5)  # more than twice the TTL: only the refreshes keep it
    assert store.get(spool.claim_key(*key)) == claims.token.encode()
    with store.pipeline(transaction=True) as pipe:
        claims.stage_release(pipe, key)
        pipe.execute()
    assert not store.exists(spool.claim_key(*key)) and claims.held == set()
    # Given the envelope read earlier, a claim reads only whether the message is still there.
    again = claims.take(key, known=envelope)
    assert again.state is not None and again.state.envelope is envelope
    store.delete(spool.msg_key(envelope.id))
    gone = claims.take(key, known=envelope)
    assert gone.ours and gone.state is not None and gone.state.envelope is None
    claims.release_all()
    assert not store.exists(spool.claim_key(*key))


def test_the_keeper_of_a_discarded_claims_object_ends(store: redis.Redis) -> None:
    """A :class:`Claims` nothing refers to any more (a test's, a tool's) stops its refresh
    thread: its claims then run out with their TTL, as a dead process's do — the thread no
    longer outlives it, refreshing (and logging) for ever."""
    claims = Claims(store, ttl=0.3)
    envelope = stored(store, "a@x.test")
    assert claims.take((envelope.id, "x.test")).ours
    keeper = claims._keeper
    assert keeper is not None and keeper.is_alive()
    del claims
    gc.collect()
    keeper.join(timeout=10)
    assert not keeper.is_alive(), "the keeper outlived its Claims"


# --------------------------------------------------------------------------- item 3: time


def test_a_round_that_outlasts_the_job_timeout_is_abandoned_and_deferred(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The reply to the final dot does not come within ``delivery.job_timeout``: the round is
    given up and deferred, and the trace says why (and that the peer may have the message)."""
    with Sink("starttls", data_delay=3.0) as slow:
        config = routed(tmp_path, valkey, {"x.test": slow.address_text}, job_timeout="1s")
        envelope = stored(store, "r@x.test")
        started = time.monotonic()
        (outcome,) = deliver(config, store, [job(envelope, "x.test").to_json()])
        assert time.monotonic() - started < 2.5
    (reply,) = outcome.deferred.values()
    assert (reply.code, reply.status) == (451, "4.4.2")
    assert "abandoned after 1s (delivery.job_timeout)" in reply.text and "RFC 1047" in reply.text
    assert [j["id"] for j in deferred_jobs(store)] == [envelope.id]
    (deferred,) = events(store, envelope.id, "deferred")
    assert "job_timeout" in deferred["recipients"]["r@x.test"]
    assert store.keys(spool.claim_key("*", "*")) == []
    assert store.keys(spool.in_flight_key("*", "*")) == []


def test_a_peer_slow_to_answer_quit_does_not_turn_a_delivery_into_a_deferral(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The message is taken (250 to the final dot), then the peer never answers QUIT: the job
    timeout falling on the goodbye must not abandon the round (its retry would send the message
    twice). The QUIT goes on after the recording, bounded on its own."""
    with BadPeer("hang_at_quit") as peer:
        config = routed(
            tmp_path, valkey, {"x.test": peer.address_text}, job_timeout="1s",
            reuse_max_messages=1,  # never parked: the session is closed at once
        )  # fmt: skip
        envelope = stored(store, "r@x.test")
        (outcome,) = deliver(config, store, [job(envelope, "x.test").to_json()])
        assert peer.data_received == 1
    assert outcome is not None and set(outcome.delivered) == {"r@x.test"}, outcome
    assert not outcome.deferred
    assert deferred_jobs(store) == []
    assert [e["event"] for e in spool.read_trace(store, envelope.id)][-1] == "completed"


def test_a_task_out_of_time_hands_the_jobs_it_did_not_start_back(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """After its start window (a tenth of ``delivery.job_timeout``) a task starts no new job:
    the rest go back to the ``deliver`` queue as one new task, each trace saying so. One lane
    here (tests/test_sessions.py: several)."""
    with Sink("starttls", data_delay=0.3) as slow:
        config = routed(
            tmp_path, valkey, {"x.test": slow.address_text}, job_timeout="1s",
            sessions_per_process=1,
        )  # fmt: skip
        envelopes = [stored(store, f"r{i}@x.test") for i in range(4)]
        docs = [job(e, "x.test").to_json() for e in envelopes]
        results = deliver(config, store, docs)
        assert [r is not None for r in results] == [True, False, False, False]
        assert len(slow.messages) == 1
    assert queued_jobs(store) == docs[1:]
    for envelope in envelopes[1:]:
        (requeued,) = events(store, envelope.id, "requeued")
        assert "start window" in requeued["note"]
        assert store.zscore(spool.WAITING_DELIVER, spool.waiting_job(envelope.id, "x.test"))
    assert store.keys(spool.claim_key("*", "*")) == []
    assert store.keys(spool.in_flight_key("*", "*")) == []


def test_the_visibility_timeout_must_leave_room_for_a_task(tmp_path: Path) -> None:
    path = tmp_path / "tlsrelay.yaml"
    path.write_text(
        "hostname: relay.test\ndelivery:\n  job_timeout: 10m\ncelery:\n  visibility_timeout: 15m\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}:3: delivery.job_timeout: ")
    assert "celery.visibility_timeout (15m) must be at least twice delivery.job_timeout (10m)" in (
        str(raised.value)
    )
    path.write_text("hostname: relay.test\ncelery:\n  visibility_timeout: 5m\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: celery.visibility_timeout"):
        load_config(path)
    path.write_text(
        "hostname: relay.test\ndelivery:\n  job_timeout: 5m\ncelery:\n  visibility_timeout: 10m\n"
    )
    config = load_config(path)
    assert config.delivery.task_window == 30 and config.delivery.task_budget == 30 + 15 + 300
    defaults = Config(hostname="relay.test")
    assert defaults.delivery.task_budget < defaults.celery.visibility_timeout / 2


# --------------------------------------------------------------------------- item 11


def delayed_rounds(store: redis.Redis) -> tuple[Config, Envelope, list[Any]]:
    """A message to two domains, an hour old (past ``delay_warning_after``), and for each
    domain a round that deferred it — both judged from what was read before either recorded."""
    config = Config.model_validate(
        {"hostname": "relay.test", "delivery": {"delay_warning_after": "1m"}}
    )
    envelope = stored(store, "a@one.test", "b@two.test", age=3600)
    rounds = []
    for domain in ("one.test", "two.test"):
        the_job = job(envelope, domain)
        state = spool.load_job(store, envelope.id, domain)
        outcome = Outcome(deferred=dict.fromkeys(the_job.recipients, Reply(451, "4.4.1", "busy")))
        rounds.append((the_job, state, outcome))
    return config, envelope, rounds


def delay_notices(store: redis.Redis, message_id: str) -> list[dict[str, Any]]:
    return [e for e in events(store, message_id, "dsn") if e["action"] == dsn.DELAYED]


def test_two_domain_jobs_recorded_at_once_send_one_delayed_dsn(store: redis.Redis) -> None:
    config, envelope, rounds = delayed_rounds(store)
    for the_job, state, outcome in rounds:
        ledger = Ledger(config, store)
        ledger.record(ledger.round(the_job, envelope, BODY, state), outcome)
    assert len(delay_notices(store, envelope.id)) == 1, "one delay notice per message"
    assert len(store.zrange(spool.WAITING_POLICY, 0, -1)) == 1  # the one DSN, queued
    assert len(deferred_jobs(store)) == 2


def test_a_delay_notice_sent_between_look_and_commit_is_seen(
    valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other job's notice commits after this recording looked and before it committed: the
    transaction (watching the message) fails, and the second look sees the notice."""
    config, envelope, ((job_a, state_a, outcome_a), (job_b, state_b, outcome_b)) = delayed_rounds(
        store
    )
    ledger_a = Ledger(config, store)
    other = redis.Redis.from_url(valkey.url)
    ledger_b = Ledger(config, other)
    look = ledger_a._delay_notice_due
    looks: list[bool] = []

    def look_then_race(pipe: redis.client.Pipeline, message_id: str) -> bool:
        due = look(pipe, message_id)
        if not looks:  # the other job records its round (and its notice) just now
            ledger_b.record(ledger_b.round(job_b, envelope, BODY, state_b), outcome_b)
        looks.append(due)
        return due

    monkeypatch.setattr(ledger_a, "_delay_notice_due", look_then_race)
    try:
        ledger_a.record(ledger_a.round(job_a, envelope, BODY, state_a), outcome_a)
    finally:
        other.close()
    assert looks == [True, False]
    assert len(delay_notices(store, envelope.id)) == 1
    assert len(deferred_jobs(store)) == 2


# --------------------------------------------------------------------------- end to end

FIRST_TIME: set[str] = set()
FIRST_TIME_LOCK = threading.Lock()


def busy_once(address: str) -> str | None:
    """``later*`` recipients are deferred once; ``no*`` are refused (a bounce, and its DSN)."""
    if address.startswith("no"):
        return "550 5.1.1 no such user"
    if address.startswith("later"):
        with FIRST_TIME_LOCK:
            if address not in FIRST_TIME:
                FIRST_TIME.add(address)
                return "451 4.2.0 try again"
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    def settings(world: World) -> dict[str, Any]:
        routes = {
            "slow.test": world.sinks["slow"].address_text,
            "flaky.test": world.sinks["flaky"].address_text,
            "origin.test": world.sinks["tls"].address_text,  # where the DSNs go
        }
        return {
            # A few seconds: a task of 20 jobs at a second each outlives it many times over.
            "celery": {"visibility_timeout": "6s"},
            "delivery": {"job_timeout": "3s", "routes": routes, "delay_warning_after": 0},
        }

    sinks = {
        "slow": Sink("starttls", data_delay=1.0),
        "flaky": Sink("starttls", rcpt_replies=busy_once),
    }
    with make_world(tmp_path_factory.mktemp("once"), sinks, settings) as w:
        yield w


def message_ids(sink: Sink) -> list[str]:
    found = []
    for m in sink.messages:
        header = re.search(rb"^Message-ID:\s*<([^>]+)>", m.data, re.M | re.I)
        found.append(header.group(1).decode() if header else "")
    return found


def test_a_batch_that_outlives_the_visibility_timeout_arrives_exactly_once(world: World) -> None:
    """20 jobs in one task to a destination taking a second per message (20 s ≫ the 6 s
    visibility timeout): each message arrives once, counted at the sink by Message-ID."""
    count = 20
    envelopes = []
    with contextlib.closing(world.client()) as client:
        for i in range(count):
            envelope = Envelope(
                new_message_id(), "s@origin.test", (f"m{i}@slow.test",), received_at=time.time()
            )
            body = f"Subject: once {i}\r\nMessage-ID: <once-{i}@origin.test>\r\n\r\nHi.\r\n"
            with client.pipeline(transaction=True) as pipe:
                spool.stage_message(pipe, envelope, body.encode(), spool.TRACE_TTL, enqueue=False)
                pipe.execute()
            envelopes.append(envelope)
        # As policy records them: one deliver task carrying all 20 jobs.
        decision = Decision(domain="slow.test", tls=TlsMode.OPPORTUNISTIC)
        spool.record_classifications(client, [(e, [decision]) for e in envelopes], batch_max=50)
    for envelope in envelopes:
        world.wait_completed(envelope.id, timeout=120)
    arrived = message_ids(world.sinks["slow"])
    assert sorted(arrived) == sorted(f"once-{i}@origin.test" for i in range(count)), (
        f"{len(arrived)} arrivals of {count} messages"
    )
    requeued = [e for m in envelopes for e in world.events(m.id, "requeued")]
    assert requeued, "the task ran out of time and handed its jobs back"
    assert not any(world.events(m.id, "interrupted") for m in envelopes)


def persistent_keys(client: redis.Redis) -> set[str]:
    """Keys without a TTL, once the relay is idle (nothing waiting, queued or deferred)."""

    def idle() -> bool:  # the spool's own account of the work, and no task left unacknowledged
        waiting = (spool.WAITING_POLICY, spool.WAITING_DELIVER, spool.DEFERRED)
        return not any(client.zcard(k) for k in waiting) and not client.hlen(queueing.UNACKED)

    wait_until(idle, 60, "the relay to be idle")
    return {k.decode() for k in client.scan_iter(count=1000) if client.ttl(k) == -1}


def names_a_message(key: str) -> bool:
    return any(is_message_id(part) for part in re.split(r"[:\s]", key))


def test_no_key_grows_with_the_messages_delivered(world: World) -> None:
    """Deliver messages of every fate (delivered, deferred then delivered, bounced with a DSN,
    to several domains), then twice as many: no key without a TTL names a message, and their
    number does not grow."""

    def batch(n: int, tag: str) -> list[str]:
        ids = []
        for i in range(n):
            rcpts = [f"u{tag}{i}@tls.test", f"v{tag}{i}@d2.test", f"later{tag}{i}@flaky.test"]
            rcpts.append(f"no{tag}{i}@flaky.test")
            ids.append(world.send(rcpts, f"Subject: keys {tag}{i}\r\n\r\nHi.\r\n".encode()))
        for message_id in ids:
            world.wait_completed(message_id, timeout=60)
        return ids

    with contextlib.closing(world.client()) as client:
        first = batch(3, "a")
        after_first = persistent_keys(client)
        second = batch(6, "b")
        after_second = persistent_keys(client)
        assert all(world.events(m, "dsn") for m in first + second)  # each bounced one recipient
        assert [k for k in after_second if names_a_message(k)] == []
        assert client.keys(spool.rcpt_key("*")) == []
        assert after_second <= after_first, sorted(after_second - after_first)


def test_closing_the_job_of_a_gone_message_drops_it_from_the_deferred_index(
    store: redis.Redis,
) -> None:
    """The message was deferred once (indexed by age), then disappeared (deleted by hand, or a
    copy of its last job finished it): closing a leftover job leaves no index entry behind."""
    config = Config.model_validate({"hostname": "relay.test"})
    envelope = stored(store, "a@one.test")
    store.zadd(spool.DEFERRED_SINCE, {envelope.id: envelope.received_at})
    store.delete(spool.msg_key(envelope.id))
    Ledger(config, store).close(job(envelope, "one.test"), None)
    assert store.zscore(spool.DEFERRED_SINCE, envelope.id) is None
    assert not store.exists(spool.rcpt_key(envelope.id))
    assert not store.zrange(spool.WAITING_DELIVER, 0, -1)
