"""The backlog measurement (``make bench-backlog``, :mod:`bench.backlog`) on a small backlog of big
messages: bodies stay in Redis, not in worker memory.

300 messages of 400 kB (about 120 MB of bodies) are queued with no worker running, then worked off.
A policy or deliver process that loaded the queued bodies en masse would pass 150 MB; each must
stay under it (they hold one message at a time). Runs ``python -m bench.backlog`` as a
subprocess: real Redis, the three services, the sink and the load client as processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIELDS = {
    "messages", "accepted", "refused", "backlog", "redis_used_mb", "deliver_queue_max",
    "delivered", "lost", "load_seconds", "drain_seconds", "drain_msgs_per_s", "peak_rss_mb",
    "worker_max_rss_mb", "ingest_max_rss_mb", "limit_mb", "within_limit",
}  # fmt: skip


def test_a_backlog_of_big_messages_stays_out_of_worker_memory(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.backlog", "--messages", "300", "--size", "400000",
            "--deadline", "120", "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) >= FIELDS, FIELDS - set(report)
    assert report["backlog"] == report["accepted"] == report["delivered"] == 300, report
    assert report["redis_used_mb"] > 110, "the bodies were queued in Redis"
    workers = [p for s in ("policy", "deliver") for p in report["peak_rss_mb"][s]]
    assert len(workers) >= 2 + 2 + 2, "every main and pool process was measured"
    assert all(p["mb"] < 150 for p in workers), report["peak_rss_mb"]
    assert report["within_limit"] and report["lost"] == 0
