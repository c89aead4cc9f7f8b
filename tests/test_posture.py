"""The posture store (services/deliver/posture.py): what one delivery adds (a table), the counts
staged into the caller's transaction on a real Redis, the per-day domain cap and its "other"
row, retention, a recording error that is counted and never raised, and ``tlsrelay posture``'s
three outputs. The end-to-end account (a mixed load, a rerun with the rule) is in
tests/test_posture_world.py."""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import yaml

from services import cli
from services.common.redisserver import EmbeddedRedis
from services.deliver import leafcheck, posture
from services.deliver.tls import Outcome

NOON = datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp()
DAY = "2026-03-01"


@dataclass
class Delivered:
    outcome: Outcome | None
    tls_version: str | None = None
    leaf_verdict: str | None = None


COLUMNS = [
    (Delivered(Outcome.TLS_VERIFIED, "TLSv1.3"),
     {"tls_verified": 1, "version:TLSv1.3": 1}),
    (Delivered(Outcome.TLS, "TLSv1.3", leafcheck.OK), {"tls": 1, "version:TLSv1.3": 1}),
    (Delivered(Outcome.TLS, "TLSv1.2", leafcheck.EXPIRED),
     {"tls": 1, "version:TLSv1.2": 1, "would_defer_verified": 1, "why_verified:expired": 1}),
    (Delivered(Outcome.TLS, "TLSv1.3", leafcheck.SELF_SIGNED),
     {"tls": 1, "version:TLSv1.3": 1, "would_defer_verified": 1,
      "why_verified:self_signed": 1}),
    (Delivered(Outcome.TLS, "TLSv1", leafcheck.OK),
     {"tls": 1, "version:TLSv1": 1, "would_defer_verified": 1, "why_verified:old_tls": 1}),
    (Delivered(Outcome.TLS, "TLSv1.3", leafcheck.UNKNOWN),
     {"tls": 1, "version:TLSv1.3": 1, "verified_unknown": 1}),
    (Delivered(Outcome.TLS, "TLSv1.3", None),
     {"tls": 1, "version:TLSv1.3": 1, "verified_unknown": 1}),
    (Delivered(Outcome.NOT_OFFERED),
     {"clear": 1, "clear_not_offered": 1, "would_defer_enforced": 1,
      "would_defer_verified": 1, "why_verified:clear": 1}),
    (Delivered(Outcome.HANDSHAKE_FAILED),
     {"clear": 1, "clear_handshake_failed": 1, "would_defer_enforced": 1,
      "would_defer_verified": 1, "why_verified:clear": 1}),
    (Delivered(Outcome.REMEMBERED_BROKEN),
     {"clear": 1, "clear_remembered_broken": 1, "would_defer_enforced": 1,
      "would_defer_verified": 1, "why_verified:clear": 1}),
    (Delivered(Outcome.DISABLED), {"clear": 1, "clear_disabled": 1, "verified_unknown": 1}),
    # DANE (RFC 7672): the certificate matched the host's TLSA records — authenticated TLS,
    # which meets `verified` (no what-if), whatever a CA would say of the leaf.
    (Delivered(Outcome.DANE_VERIFIED, "TLSv1.3", leafcheck.SELF_SIGNED),
     {"tls_verified": 1, "version:TLSv1.3": 1}),
]  # fmt: skip


@pytest.mark.parametrize(("attempt", "expected"), COLUMNS)
def test_columns(attempt: Delivered, expected: dict[str, int]) -> None:
    assert posture.columns(attempt) == {"deliveries": 1, **expected}


@pytest.mark.parametrize("outcome", [Outcome.DANE_FAILED, Outcome.VERIFY_FAILED])
def test_an_attempt_that_sent_nothing_is_no_delivery(outcome: Outcome) -> None:
    """dane_failed / verify_failed: the session went on to the next host, nothing was sent."""
    assert posture.columns(Delivered(outcome, "TLSv1.3", leafcheck.OK)) == {}


def record(store: redis.Redis, domain: str, attempt: Delivered, now: float = NOON) -> int:
    """One delivery staged and committed; the script's reply (failed writes)."""
    with store.pipeline(transaction=True) as pipe:
        at = posture.stage(pipe, domain, posture.columns(attempt), now, 30)
        replies = pipe.execute()
    reply: int = replies[at]
    return reply


def test_staged_into_the_callers_transaction(store: redis.Redis) -> None:
    with store.pipeline(transaction=True) as pipe:
        pipe.set("tlsrelay:before", "1")
        at = posture.stage(pipe, "A.test", {"deliveries": 1, "clear": 1}, NOON, 30)
        assert at == 1 and not store.exists(posture.day_key(DAY)), "no round trip of its own"
        assert pipe.execute()[at] == 0
    row = posture.read(store, [DAY])["a.test"]
    assert (row["deliveries"], row["clear"]) == (1, 1) and row.days == {DAY}
    assert 30 * 86400 < store.ttl(posture.day_key(DAY)) <= 31 * 86400
    assert 30 * 86400 < store.ttl(posture.domains_key(DAY)) <= 31 * 86400


def test_a_window_sums_days_and_sorts_by_clear_text(store: redis.Redis) -> None:
    for _ in range(3):
        record(store, "tls.test", Delivered(Outcome.TLS, "TLSv1.3", leafcheck.OK))
    record(store, "mixed.test", Delivered(Outcome.NOT_OFFERED))
    record(store, "mixed.test", Delivered(Outcome.TLS, "TLSv1.2", leafcheck.OK), NOON + 86400)
    for _ in range(2):
        record(store, "plain.test", Delivered(Outcome.NOT_OFFERED), NOON + 86400)
    days = posture.window(2, datetime(2026, 3, 2, tzinfo=UTC).date())
    assert days == [DAY, "2026-03-02"]
    rows = posture.read(store, days)
    assert [r.domain for r in posture.select(rows, None, None)] == [
        "plain.test", "mixed.test", "tls.test"
    ]  # fmt: skip
    mixed = rows["mixed.test"].to_json()
    assert mixed["deliveries"] == 2 and mixed["share_clear"] == 0.5 and mixed["days"] == 2
    assert mixed["versions"] == {"TLSv1.2": 1} and mixed["would_defer_enforced"] == 1
    assert [r.domain for r in posture.select(rows, "*.TEST", 1)] == ["plain.test"]
    assert [r.domain for r in posture.select(rows, "t*", None)] == ["tls.test"]
    assert posture.read(store, ["2026-02-01"]) == {}


def test_domains_beyond_the_cap_share_the_other_row(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(posture, "DOMAIN_CAP", 3)
    for n in range(5):
        record(store, f"d{n}.test", Delivered(Outcome.NOT_OFFERED))
    record(store, "d0.test", Delivered(Outcome.NOT_OFFERED))  # known: its own row still
    rows = posture.read(store, [DAY])
    assert sorted(rows) == ["(other)", "d0.test", "d1.test", "d2.test"]
    assert rows["(other)"]["deliveries"] == 2 and rows["d0.test"]["deliveries"] == 2
    assert store.scard(posture.domains_key(DAY)) == 3


def test_a_recording_error_is_returned_not_raised(store: redis.Redis) -> None:
    store.set(posture.day_key(DAY), "not a hash")
    assert record(store, "a.test", Delivered(Outcome.NOT_OFFERED)) > 0
    store.delete(posture.day_key(DAY))
    store.set(posture.domains_key(DAY), "not a set")
    assert record(store, "a.test", Delivered(Outcome.NOT_OFFERED)) == 1


# --------------------------------------------------------------------------- the command


def config(tmp_path: Path, valkey: EmbeddedRedis) -> str:
    path = tmp_path / "tlsrelay.yaml"
    path.write_text(yaml.safe_dump({"redis_url": valkey.url, "posture": {"retention": 3}}))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(["posture", *argv])
    return code, capsys.readouterr().out


def test_the_command(
    store: redis.Redis, valkey: EmbeddedRedis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    record(store, "plain.test", Delivered(Outcome.NOT_OFFERED), now)
    record(store, "tls.test", Delivered(Outcome.TLS, "TLSv1.3", leafcheck.WRONG_NAME), now)
    path = config(tmp_path, valkey)
    code, out = run(capsys, "--config", path, "--json")
    doc = json.loads(out)
    assert code == 0 and len(doc["days"]) == 7 and doc["retention_days"] == 3
    assert [d["domain"] for d in doc["domains"]] == ["plain.test", "tls.test"]
    assert doc["domains"][1]["why_verified"] == {"wrong_name": 1}
    code, out = run(capsys, "--config", path, "--csv", "--domain", "tls.*")
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["domain"] == "tls.test" and row["would_defer_verified"] == "1"
    assert row["versions"] == "TLSv1.3=1"
    code, out = run(capsys, "--days", "1", "--config", path, "--top", "1")
    lines = out.splitlines()
    assert "1 days" in lines[0] and lines[2].split()[:2] == ["plain.test", "1"]
    assert lines[-1] == "-- 1 domains"
    _, out = run(capsys, "--days", "5", "--config", path)
    assert "counts are kept 3 days" in out.splitlines()[0]


@pytest.mark.parametrize("argv", [["--days", "0"], ["--top", "x"], ["--json", "--csv"], ["--days"]])
def test_usage_errors_exit_2(valkey: EmbeddedRedis, tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["posture", "--config", config(tmp_path, valkey), *argv])
    assert stopped.value.code == 2


# --------------------------------------------------------------------------- from a delivery


def counter(name: str, **labels: str) -> float:
    from services.common import metrics

    (family,) = metrics.POSTURE_RECORDING_ERRORS.collect()
    return sum(s.value for s in family.samples if s.name == name and s.labels == labels)


def test_deliveries_are_counted_and_a_recording_error_never_fails_one(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    from tests.peers import Sink
    from tests.test_batching import deliver, queue_jobs, routed

    with Sink("starttls") as sink:
        config = routed(tmp_path, valkey, "batch.test", sink.address_text)
        jobs = queue_jobs(store, "batch.test", 3)
        assert all(o is not None and o.delivered for o in deliver(config, store, jobs))
        today = posture.utc_day(time.time())
        row = posture.read(store, [today])["batch.test"]
        # One TLS session, three deliveries over it; the leaf names localhost, not batch.test.
        assert (row["deliveries"], row["tls"], row["version:TLSv1.3"]) == (3, 3, 3)
        assert row["why_verified:wrong_name"] == 3, row.counts
        assert row["would_defer_enforced"] == 0
        errors = counter("tlsrelay_posture_recording_errors_total")
        store.delete(posture.day_key(today))
        store.set(posture.day_key(today), "not a hash")
        more = queue_jobs(store, "batch.test", 2)
        assert all(o is not None and o.delivered for o in deliver(config, store, more))
        assert len(sink.messages) == 5
    for job in more:  # recorded as usual: final, gone
        assert not store.exists(f"tlsrelay:msg:{job['id']}")
    assert counter("tlsrelay_posture_recording_errors_total") == errors + 2


def test_a_delivery_is_one_field_whose_name_lists_its_columns() -> None:
    counts = {"deliveries": 1, "tls": 1, "version:TLSv1.3": 1, "why_verified:expired": 2}
    name = posture.class_of(counts)
    assert name == "deliveries,tls,version:TLSv1.3,why_verified:expired=2"
    assert posture.columns_of(name) == counts
