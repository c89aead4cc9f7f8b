"""The soak (``make soak``, :mod:`bench.soak`) on a tiny load: it runs end to end with a worker
process SIGKILLed and Redis SIGKILLed and restarted, accounts for every message and reports every
field.

Runs ``python -m bench.soak --messages 60 --kills 1 --victims child`` as a subprocess (real
Redis, the three services, real sinks, the load client as a process), with a short queue
lifetime so that the enforced-to-clear mail bounces within seconds. Checks the contract, not
speed: exit 0, nothing lost or stuck, enforced mail never in clear, the relay's TLS account agrees
with the sinks', every behaviour met its expected fate. The second test runs ``--sentinel`` (a
master, a replica and a sentinel; the master SIGKILLed under load, ``redis_min_replicas: 1``):
nothing answered ``250`` is lost, and ingest accepts again once a replica is back in sync.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.soak import BEHAVIOURS

REPO = Path(__file__).resolve().parent.parent
FIELDS = {
    "messages", "accepted", "refused", "delivered", "bounced", "dsn_received", "dsn_missing",
    "still_queued", "lost", "overlap", "duplicates", "interrupted", "unexpected_fate",
    "sink_tls", "sink_clear", "unexpected_channel", "relay_tls", "relay_clear", "tls_mismatches",
    "enforced_seen_in_clear", "drained", "seconds", "kills", "kills_by_role", "restarts",
    "delivered_by_tls_outcome", "attempts_by_tls_outcome", "behaviours", "settings",
    "redis_kills",
}  # fmt: skip


def test_soak_with_a_kill_loses_nothing_and_reports_every_field(tmp_path: Path) -> None:
    # A pool process: killing a worker's main process can lose a task in kombu's BRPOP window
    # (a known gap, bench/README.md "Stuck messages"; `make soak` reports it): not at random here.
    argv = [sys.executable, "-m", "bench.soak", "--messages", "60", "--kills", "1",
            "--victims", "child", "--kill-every", "1", "--lifetime", "4",
            "--visibility-timeout", "5", "--deadline", "40", "--redis-kill-after", "2",
            "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) >= FIELDS, FIELDS - set(report)
    assert report["kills"] == 1 and report["redis_kills"] == 1 and report["drained"], report
    assert report["accepted"] == 60 and report["lost"] == 0 and report["stuck"] == 0, report
    assert report["still_queued"] == 0 and report["delivered"] + report["bounced"] == 60, report
    assert report["enforced_seen_in_clear"] == report["tls_mismatches"] == 0, report
    assert report["unexpected_channel"] == 0, report
    rows = {row["behaviour"]: row for row in report["behaviours"]}
    assert list(rows) == [b.name for b in BEHAVIOURS]
    assert rows["tls"]["sink_tls"] == rows["tls"]["delivered"] == 10, rows["tls"]
    assert rows["clear"]["sink_clear"] == rows["broken-handshake"]["sink_clear"] == 10, rows
    assert rows["enforced-to-clear"]["bounced"] == rows["5xx"]["dsn_received"] == 10, rows
    # The sender of mail that required TLS is told too: a redacted DSN (no returned headers),
    # matched by the original's queue id.
    assert rows["enforced-to-clear"]["dsn_received"] == 10, rows["enforced-to-clear"]
    # Each was refused once; it is delivered on the retry — or, when the kill held it up past
    # the 4 s lifetime, bounced (as configured): never both, never neither.
    flaky = rows["4xx-then-ok"]
    assert flaky["refused_at_sink"] == 10 and flaky["delivered"] + flaky["bounced"] == 10, flaky
    assert flaky["sink_tls"] == flaky["delivered"]
    assert "LOST 0" in done.stdout  # the readable table precedes the JSON line


def test_soak_through_a_sentinel_failover_loses_nothing(tmp_path: Path) -> None:
    # Master + replica + sentinel; the master SIGKILLed 2 s in, the replica promoted, the old
    # master started again as its replica. redis_min_replicas 1: ingest answers 451 until the
    # replica is back, then 250 again (the load lasts 30 s: 300 messages at 10/s; the replica
    # is back about 8 s after the kill, and once 18.8 s after it, on a loaded machine where the
    # sentinel failed over twice: the load must outlast that to see the 250s come back).
    argv = [sys.executable, "-m", "bench.soak", "--sentinel", "--failover-after", "2",
            "--messages", "300", "--rate", "10", "--kills", "1", "--victims", "child",
            "--kill-every", "1", "--lifetime", "4", "--visibility-timeout", "5",
            "--deadline", "40", "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    failover = report["failover"]
    assert failover["redis_min_replicas"] == 1 and report["redis_kills"] == 1, failover
    assert failover["promoted_after"] is not None, failover
    assert failover["replica_back_after"] is not None, failover
    assert failover["accepted_after"] > 0, failover  # 250 again once the replica is back
    assert report["accepted"] + report["refused"] == 300, report
    assert report["lost"] == report["stuck"] == report["still_queued"] == 0, report
    assert report["drained"] and report["delivered"] + report["bounced"] == report["accepted"]
    assert report["enforced_seen_in_clear"] == report["tls_mismatches"] == 0, report
    assert "LOST 0" in done.stdout and "failover (redis_min_replicas 1)" in done.stdout
