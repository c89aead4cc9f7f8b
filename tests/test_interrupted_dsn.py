"""A bounce after an interrupted delivery (services/deliver/dsn.py, ``interrupted_note``): when a
worker died while sending DATA to a destination (its in-flight mark found by the next run,
services/deliver/marks.py) and the recipients there then fail for good, the destination may have
taken the message all the same (RFC 1047): the DSN must say so, not only "could not be
delivered". Found by the Sentinel soak (a delivery cut by the master's death, its retry past the
queue lifetime while no replica acknowledged marks: delivered and bounced).

Real Redis (the ``valkey`` fixture), the deliverer's own code, a real SMTP sink that refuses the
recipients for good.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common import spool
from services.common.jobs import Job
from services.common.model import Reply
from services.common.redisserver import EmbeddedRedis
from services.deliver import dsn, queue, shaping, sites
from services.deliver.attempt import Peer
from services.deliver.ledger import Ledger
from services.deliver.marks import in_flight_note
from services.deliver.shaping import Throttle
from tests.peers import Sink
from tests.test_batching import BODY, deliver, queue_jobs, queue_old_job, routed, write_config

DOMAIN = "interrupted.test"


def bounce_of(store: redis.Redis, message_id: str) -> str:
    """The text of the DSN the message's trace names."""
    (event,) = [e for e in spool.read_trace(store, message_id) if e["event"] == "dsn"]
    body = store.hget(spool.msg_key(event["dsn_id"]), "body")
    assert isinstance(body, bytes), event
    return body.decode()


def test_a_bounce_after_an_interrupted_delivery_says_the_message_may_have_arrived(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """Two messages to a destination that refuses their recipients (550): the first one's
    delivery had been interrupted while sending DATA (an earlier run's mark stands), so its
    bounce says the host may have it; the second's bounce does not."""
    with Sink("plain", rcpt_replies=lambda rcpt: "550 5.1.1 No such user") as sink:
        config = routed(tmp_path, valkey, DOMAIN, f"127.0.0.1:{sink.port}")
        interrupted, plain = queue_jobs(store, DOMAIN, 2)
        earlier = Peer(f"mx.{DOMAIN}", "127.0.0.1", sink.port, f"mx.{DOMAIN}")
        store.set(spool.in_flight_key(interrupted["id"], DOMAIN), in_flight_note(earlier))
        deliver(config, store, [interrupted, plain])

    kinds = [e["event"] for e in spool.read_trace(store, interrupted["id"])]
    assert "interrupted" in kinds and "bounced" in kinds, kinds
    text = bounce_of(store, interrupted["id"])
    assert "could not be delivered" in text
    assert f"delivery of this message to mx.{DOMAIN} at " in text, text
    assert dsn.MAY_HAVE_ARRIVED in text, text
    assert dsn.MAY_HAVE_ARRIVED not in bounce_of(store, plain["id"])


def test_a_delay_notice_after_an_interrupted_delivery_says_the_message_may_have_arrived(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """An hour-old message whose delivery had been interrupted while sending DATA, now deferred
    (451): its one delay notice must not say only "has not been delivered yet" — the host may
    have it."""
    job = queue_old_job(store, DOMAIN, 3600)
    with Sink("plain", rcpt_replies=lambda rcpt: "451 4.3.0 Try later") as sink:
        config = routed(tmp_path, valkey, DOMAIN, f"127.0.0.1:{sink.port}",
                        delay_warning_after="1m")  # fmt: skip
        earlier = Peer(f"mx.{DOMAIN}", "127.0.0.1", sink.port, f"mx.{DOMAIN}")
        store.set(spool.in_flight_key(job["id"], DOMAIN), in_flight_note(earlier))
        deliver(config, store, [job])

    text = bounce_of(store, job["id"])
    assert "has not been delivered yet" in text, text
    assert dsn.MAY_HAVE_ARRIVED in text, text


def test_the_note_says_where_and_when_in_one_line() -> None:
    assert dsn.interrupted_note(None) is None and dsn.interrupted_note({}) is None
    note = dsn.interrupted_note({"host": "mx.x\r\nInjected: 1", "since": 1796626246.77})
    assert note is not None and "\r" not in note and "\n" not in note, note
    assert "mx.x" in note and " at " in note and dsn.MAY_HAVE_ARRIVED in note


def test_an_operator_bounce_of_a_round_parked_after_data_says_the_message_may_have_arrived(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that sent DATA (the sink has the message) and then failed unexpectedly while
    being recorded is parked in the deferred set with its in-flight mark standing
    (``Ledger.park(keep_mark=True)``, services/deliver/batch.py ``_held_step``): the next run
    would note the interruption. ``tlsrelay queue bounce`` before that run takes the entry: its
    DSN must say the host may have the message — not "could not be delivered" alone for a
    message the destination has — and the interruption must stay in the trace, not leave with
    the mark the bounce's recording deletes."""
    real = Ledger._stage

    def broken(self: Ledger, pipe: Any, writes: Any) -> Any:
        if writes.outcome.delivered:  # a bug of ours while recording a delivered round
            raise ValueError("unexpected")
        return real(self, pipe, writes)

    monkeypatch.setattr(Ledger, "_stage", broken)
    with Sink("plain") as sink:
        config = routed(tmp_path, valkey, DOMAIN, f"127.0.0.1:{sink.port}")
        (job,) = queue_jobs(store, DOMAIN, 1)
        deliver(config, store, [job])
        assert len(sink.messages) == 1  # the destination has it
    monkeypatch.setattr(Ledger, "_stage", real)
    assert store.exists(spool.in_flight_key(job["id"], DOMAIN))  # parked with its mark
    assert store.zcard(spool.DEFERRED) == 1

    assert queue.bounce(config, store, job["id"]) == [job["recipients"][0]]
    kinds = [e["event"] for e in spool.read_trace(store, job["id"])]
    assert "interrupted" in kinds and "bounced" in kinds, kinds
    text = bounce_of(store, job["id"])
    assert dsn.MAY_HAVE_ARRIVED in text, text


def test_a_trace_the_note_cannot_read_does_not_stop_the_bounce(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The note is advice read from the trace, a log: an entry that is not an event (written by
    hand, another tool or version) must not stop the bounce itself. Else ``_prepare`` raises,
    the round is never recorded and is parked again and again (``Ledger.park``, the first retry
    step), also past the queue lifetime, whose bounce reads the trace too: stuck for good, the
    sender never told."""
    with Sink("plain", rcpt_replies=lambda rcpt: "550 5.1.1 No such user") as sink:
        config = routed(tmp_path, valkey, DOMAIN, f"127.0.0.1:{sink.port}")
        (job,) = queue_jobs(store, DOMAIN, 1)
        store.rpush(spool.trace_key(job["id"]), "not an event")
        deliver(config, store, [job])
    assert store.zcard(spool.DEFERRED) == 0, "parked: the bounce was not recorded"
    assert not store.exists(spool.msg_key(job["id"]))  # bounced: final
    text = bounce_of_raw(store, job["id"])
    assert "could not be delivered" in text and dsn.MAY_HAVE_ARRIVED not in text, text


def bounce_of_raw(store: redis.Redis, message_id: str) -> str:
    """:func:`bounce_of`, skipping trace entries that are not JSON."""
    for raw in store.lrange(spool.trace_key(message_id), 0, -1):
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if event.get("event") == "dsn":
            body = store.hget(spool.msg_key(event["dsn_id"]), "body")
            assert isinstance(body, bytes), event
            return body.decode()
    raise AssertionError("no dsn event")


def test_a_throttled_jobs_delay_notice_after_an_interrupted_delivery_says_it_may_have_arrived(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    """The other way a delay notice goes out: a job a shaping limit stopped (Ledger.throttle,
    services/deliver/setaside.py), an hour old, whose earlier delivery had been interrupted
    while sending DATA. Its one delay notice says the host may have the message."""
    job = Job.from_json(queue_old_job(store, DOMAIN, 3600))
    config = write_config(
        tmp_path / "c.yaml", {"redis_url": valkey.url, "delivery": {"delay_warning_after": "1m"}}
    )
    ledger = Ledger(config, store)
    earlier = Peer(f"mx.{DOMAIN}", "127.0.0.1", 25, f"mx.{DOMAIN}")
    ledger.note_interrupted(job, in_flight_note(earlier).encode())
    site = sites.site_of(config, DOMAIN, [(f"mx.{DOMAIN}", 25, "mx")])
    throttle = Throttle(shaping.CONNECTIONS, site, shaping.PARK_CONNECTIONS)
    waiting = Reply(451, "4.4.5", "waiting")
    old = spool.load_envelope(store, job.id)
    assert old is not None
    ledger.throttle(ledger.round(job, old, BODY), ledger.claim(job.key), throttle, waiting)

    text = bounce_of(store, job.id)
    assert "has not been delivered yet" in text, text
    assert dsn.MAY_HAVE_ARRIVED in text, text
