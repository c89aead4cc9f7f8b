"""`tlsrelay run`: the whole relay from one command with the embedded Redis, stopped by SIGTERM."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from services.common.redisserver import free_port
from tests.peers import Sink
from tests.world import metrics_ports, port_open, wait_until


def trace(config: Path, message_id: str) -> bytes:
    """`tlsrelay trace` finds the embedded Redis of the running `tlsrelay run` by itself."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "trace", "--config", str(config), message_id],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=30,
    ).stdout


def test_run_starts_everything_delivers_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    metrics = metrics_ports(avoid={port})
    with Sink("starttls") as sink:
        config = tmp_path / "tlsrelay.yaml"
        config.write_text(
            f"hostname: relay.test\ndata_dir: ./var\nredis_appendfsync: always\n"
            f"ingest:\n  listen: 127.0.0.1:{port}\n"
            f"delivery:\n  routes:\n    example.org: {sink.address_text}\n"
            "policy:\n  concurrency: 1\n"
            + "metrics:\n"
            + "".join(f"  {name}: {where}\n" for name, where in metrics.items())
        )
        log = (tmp_path / "run.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin"},  # no TLSRELAY_REDIS_URL: the embedded server is used
        )
        try:
            wait_until(lambda: port_open("127.0.0.1", port), 30, "ingest to listen")
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.starttls()
                client.sendmail("a@origin.test", ["b@example.org"], b"Subject: run\r\n\r\nx\r\n")
            (got,) = sink.wait_messages(1, timeout=30)
            assert got.tls is not None
            message_id = got.data.split(b" id ", 1)[1].split(b"\r\n", 1)[0].decode()
            wait_until(lambda: b"completed" in trace(config, message_id), 30, "completed")
            assert b"tls_outcome" in trace(config, message_id)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
            log.close()
    output = (tmp_path / "run.log").read_text()
    assert "redis: embedded server at redis://127.0.0.1:" in output
    assert "AOF on, appendfsync always" in output
    assert f"ingest: smtp://127.0.0.1:{port}" in output
    assert "tlsrelay: stopped" in output
    for name, where in metrics.items():
        assert f"metrics: {name} http://{where}/metrics" in output
    assert (tmp_path / "var" / "redis" / "server.log").exists()
    assert not port_open("127.0.0.1", port), "ingest still listening after run stopped"
