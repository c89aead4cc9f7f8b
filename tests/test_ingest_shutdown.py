"""`tlsrelay ingest` stopping (SIGTERM): sessions between transactions are closed at once with
`421 4.3.2`; a transaction in progress finishes (its message stored) and then gets the same."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import redis

from services.common import spool
from services.common.redisserver import EmbeddedRedis, free_port
from tests.world import port_open, wait_until

SHUTTING_DOWN = (421, b"4.3.2 Service shutting down, try again later")


def test_sigterm_closes_idle_sessions_at_once_and_lets_a_transaction_finish(
    tmp_path: Path, valkey: EmbeddedRedis
) -> None:
    port = free_port()
    config = tmp_path / "tlsrelay.yaml"
    config.write_text(
        f"hostname: relay.test\nredis_url: {valkey.url}\ndata_dir: ./var\n"
        f"ingest:\n  listen: 127.0.0.1:{port}\n  drain_grace: 60s\n"
        "metrics: {ingest: null, policy: null, deliver: null}\n"
    )
    with (tmp_path / "ingest.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "ingest", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def listening() -> bool:
        return port_open("127.0.0.1", port)

    clients: list[smtplib.SMTP] = []
    try:
        wait_until(listening, 30, "ingest to listen")
        idle = smtplib.SMTP("127.0.0.1", port, timeout=10)  # a pooled connection, say
        clients.append(idle)
        idle.ehlo("idle.test")
        busy = smtplib.SMTP("127.0.0.1", port, timeout=10)
        clients.append(busy)
        busy.ehlo("busy.test")
        busy.mail("a@origin.test")
        busy.rcpt("b@example.org")

        proc.send_signal(signal.SIGTERM)
        assert idle.getreply() == SHUTTING_DOWN  # unasked, long before the 60 s grace
        assert idle.sock is not None and idle.sock.recv(1) == b"", "idle session left open"

        code, text = busy.data(b"Subject: during shutdown\r\n\r\nx\r\n")
        assert code == 250, (code, text)
        assert busy.getreply() == SHUTTING_DOWN
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for each in clients:
            each.close()
    message_id = text.decode().rsplit(" ", 1)[1]
    with redis.Redis.from_url(valkey.url) as client:
        assert [e["event"] for e in spool.read_trace(client, message_id)] == ["received"]
