"""Smoke test of the benchmark (``make bench``): it runs end to end on a small load and reports.

Runs ``python -m bench.run --messages 200 --sessions 5 --rtt 5ms`` as a subprocess (real Redis,
the three services, the sink behind its delay line and the load client as processes) and checks
only that it works: exit 0, the last line is the JSON report with every field, nothing lost.
Nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare
from bench.run import parse_rtt

REPO = Path(__file__).resolve().parent.parent
FIELDS = {
    "target", "client", "messages", "size", "sessions", "recipients", "domains", "tls_mix",
    "rate", "client_tls", "policy_workers", "deliver_workers", "accepted", "refused",
    "queue_ids", "delivered", "lost", "duplicates", "e2e_msgs_per_s", "accept_msgs_per_s",
    "e2e_seconds", "latency_ms", "tls_handshakes_per_msg", "tls_resumed_per_msg",
    "sink_connections_per_msg", "tls_delivery_share", "cpu_ms_per_msg", "peak_rss_mb",
    "other_load_cores", "complete_before_deadline", "rtt_ms", "sink_sessions_peak",
    "redis_commands_per_msg",
}  # fmt: skip
SERVICES = {"ingest", "policy", "deliver", "redis"}


def test_bench_runs_small_load_and_reports_every_field(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.run", "--messages", "200", "--sessions", "5",
            "--warmup", "5", "--deadline", "60", "--workdir", str(tmp_path),
            "--rtt", "5ms"]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) >= FIELDS, FIELDS - set(report)
    assert report["lost"] == 0
    assert report["delivered"] == report["accepted"] == report["queue_ids"] == 200
    assert set(report["latency_ms"]) == {"p50", "p95", "p99", "max"}
    assert SERVICES | {"relay_total", "sink", "client"} <= set(report["cpu_ms_per_msg"])
    for service in SERVICES:
        assert report["peak_rss_mb"][service][0]["role"] == "main"
    # The Celery workers' pool processes are measured too (policy 2, deliver 4 by default).
    assert len(report["peak_rss_mb"]["policy"]) == 1 + report["policy_workers"]
    assert len(report["peak_rss_mb"]["deliver"]) == 1 + report["deliver_workers"]
    assert "end-to-end" in done.stdout  # the readable table precedes the JSON line
    # Through the delay line (bench/delayline.py); Redis commands counted from INFO commandstats.
    assert report["rtt_ms"] == 5.0
    assert report["sink_sessions_peak"] >= 1
    commands = report["redis_commands_per_msg"]
    assert commands["total"] > 0 and "info" not in commands["by_command"]


@pytest.mark.parametrize(
    "text, seconds", [("40ms", 0.04), ("0.1s", 0.1), ("20", 0.02), ("0", 0.0), (" 100MS ", 0.1)]
)
def test_rtt_is_read_in_milliseconds_or_seconds(text: str, seconds: float) -> None:
    assert parse_rtt(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["forty", "-5ms", "11s", "ms"])
def test_a_bad_rtt_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rtt(text)


def test_compare_rounds_alternate_and_each_ratio_is_taken_within_its_round() -> None:
    """``bench.compare --rounds``: the order flips every round (a drifting machine favours no
    target), and the summary is the median of the ratios each round gives on its own."""
    labels = ["tlsrelay", "postfix reuse=yes"]
    assert compare.order(labels, 0) == labels
    assert compare.order(labels, 1) == labels[::-1]
    assert compare.order(labels, 2) == labels

    def run(label: str, msgs: float, cpu: float) -> dict[str, object]:
        return {"label": label, "e2e_msgs_per_s": msgs, "accept_msgs_per_s": msgs,
                "cpu_ms_per_msg": {"relay_total": cpu}, "tls_handshakes_per_msg": 0.01}  # fmt: skip

    rounds = [  # a machine twice as fast in the second round: the rounds' ratios 1.5, 1.5, 1.65
        {label: run(label, m, c) for label, (m, c) in zip(labels, pair, strict=True)}
        for pair in [((300, 2.0), (200, 2.0)), ((600, 1.0), (400, 1.0)), ((330, 2.0), (200, 2.0))]
    ]
    summary = compare.paired(rounds)["tlsrelay/postfix reuse=yes"]
    assert summary["e2e_msgs_per_s"] == 1.5 and summary["cpu_ms_per_msg"] == 1.0
