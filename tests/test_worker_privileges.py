"""A Celery worker run as root says so in one structured log line, once — not as Celery's
multi-line SecurityWarning through ``py.warnings`` — and says nothing when it runs unprivileged.
Through the real command line (`python -m services.cli policy`) against a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from services.common.redisserver import EmbeddedRedis
from tests.world import wait_until


def worker_log(tmp_path: Path, valkey: EmbeddedRedis) -> list[dict[str, Any]]:
    """The JSON log lines of a policy worker, from start until it is ready, then it is stopped."""
    config = tmp_path / "tlsrelay.yaml"
    config.write_text(
        f"redis_url: {valkey.url}\ndata_dir: ./var\npolicy:\n  concurrency: 1\n"
        "metrics:\n  policy: null\n"
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "policy", "--config", str(config)],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
            env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    try:
        wait_until(lambda: b" ready." in log.read_bytes(), 60, "the worker to be ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_superuser_is_one_log_line_once_and_none_unprivileged(
    tmp_path: Path, valkey: EmbeddedRedis
) -> None:
    docs = worker_log(tmp_path, valkey)
    assert not [d for d in docs if d["logger"] == "py.warnings"], docs
    root = [d for d in docs if "superuser" in d["event"]]
    if os.geteuid() != 0:
        assert root == []
        return
    assert len(root) == 1, root
    (line,) = root
    assert "\n" not in line["event"]
    assert (line["level"], line["logger"], line["service"]) == (
        "WARNING",
        "tlsrelay.worker",
        "policy",
    )
    assert (line["uid"], line["euid"]) == (os.getuid(), os.geteuid())
