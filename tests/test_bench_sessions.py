"""Smoke test of the sessions-in-flight benchmark (``make bench-sessions``, :mod:`bench.sessions`):
it runs end to end at a tiny scale and reports every field.

Runs ``python -m bench.sessions --processes 2 --sessions 10 --rtt 200ms`` as a subprocess (real
Redis, the three services, the sink behind its delay line with STARTTLS, the load client) and
checks only that it works: exit 0, the last line is the JSON report with every field, nothing
lost, every deliver process measured. Nothing about speed or how much memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from services.common.redisserver import free_ports

REPO = Path(__file__).resolve().parent.parent
FIELDS = {
    "processes", "sessions_per_process", "rtt_ms", "tls", "messages", "size", "client_sessions",
    "settings", "accepted", "refused", "deliver_tasks", "task_jobs_max", "delivered", "lost",
    "duplicates", "task_jobs", "first_tasks_full", "deliver_seconds", "sink_sessions_peak",
    "sink_sessions_peak_at_s", "sink_connections", "tls_handshakes", "deliver_rss_mb",
    "deliver_max_rss_mb", "limit_mb", "within_limit",
}  # fmt: skip
PROCESS_FIELDS = {"pid", "role", "peak_mb", "at_peak_mb", "sockets_at_peak", "sockets_max"}


def test_sessions_bench_runs_small_and_reports_every_field(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.sessions", "--processes", "2", "--sessions", "10",
            "--rtt", "200ms", "--deadline", "60", "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) >= FIELDS, FIELDS - set(report)
    assert report["messages"] == report["accepted"] == report["delivered"] == 40, report
    assert report["lost"] == 0 and report["within_limit"]
    assert report["settings"]["delivery.sessions_per_process"] == 10
    assert 1 <= report["sink_sessions_peak"] <= 20  # never above the site's connection limit
    assert report["task_jobs_max"] <= 10  # delivery.batch_max = sessions per process
    assert sum(report["task_jobs"]) == 40 and len(report["task_jobs"]) == report["deliver_tasks"]
    rows = report["deliver_rss_mb"]
    assert len(rows) == 1 + 2, "the deliver main process and its 2 pool processes"
    assert rows[0]["role"] == "main"
    for row in rows:
        assert set(row) == PROCESS_FIELDS and row["peak_mb"] > 0, row
    assert "sessions open at the sink" in done.stdout  # the table precedes the JSON line


def test_free_ports_are_distinct() -> None:
    """The benchmarks' relay takes its SMTP and metrics ports at once (bench/relay.py): two
    free_port() calls may return the same port, and ingest then refuses the configuration
    ("metrics: deliver and ingest both on ...", a failure seen in a fresh clone's run)."""
    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(0 < p < 65536 for p in ports)
