"""`tlsrelay run` as an operator's hands meet it: a second `run` on the same data_dir, Ctrl-C in a
terminal, and a listening address that is taken — each through the real command line."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common.redisserver import free_port
from tests.world import metrics_ports, port_open, wait_until

ENV = {"PATH": "/usr/bin:/bin"}  # no TLSRELAY_* from the caller


def tlsrelay(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "services.cli", *args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=timeout)


def write_config(root: Path, ingest_port: int, metrics: dict[str, str] | None = None) -> Path:
    ports = metrics or metrics_ports(avoid={ingest_port})
    config = root / "tlsrelay.yaml"
    config.write_text(
        f"hostname: relay.test\ndata_dir: ./var\ningest:\n  listen: 127.0.0.1:{ingest_port}\n"
        "policy:\n  concurrency: 1\ndelivery:\n  concurrency: 1\nmetrics:\n"
        + "".join(f"  {name}: {where}\n" for name, where in ports.items())
    )
    return config


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """A `tlsrelay run` in its own process group (as a terminal's foreground job is)."""
    port = free_port()
    write_config(tmp_path, port)
    with (tmp_path / "run.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", "--config", "tlsrelay.yaml"],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
    url_file = tmp_path / "var" / "redis" / "url"

    def listening() -> bool:
        return port_open("127.0.0.1", port) and url_file.exists()

    try:
        wait_until(listening, 60, "run to start")
        yield proc, tmp_path, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def test_a_second_run_exits_2_and_ctrl_c_stops_redis_last(
    running: tuple[subprocess.Popen[bytes], Path, int],
) -> None:
    proc, root, port = running
    url_file = root / "var" / "redis" / "url"
    url = url_file.read_text()

    second = tlsrelay(root, "run", "--config", "tlsrelay.yaml", timeout=30)
    assert (second.returncode, second.stdout) == (2, "")
    busy = f"tlsrelay run: data_dir ./var is in use by tlsrelay run (pid {proc.pid})\n"
    assert second.stderr == busy
    assert url_file.read_text() == url, "the running instance's redis/url was touched"
    assert port_open("127.0.0.1", port)

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: SIGINT to the whole foreground process group
    assert proc.wait(timeout=60) == 0
    server_log = (root / "var" / "redis" / "server.log").read_text()
    assert "Received SIGINT" not in server_log, "Redis got the terminal's Ctrl-C"
    assert "Received SIGTERM" in server_log, "Redis was not stopped by run"
    assert "Redis unavailable" not in (root / "run.log").read_text(errors="replace")
    assert not url_file.exists()
    banner = (root / "run.log").read_text(errors="replace").splitlines()[0]
    config = root / "tlsrelay.yaml"
    assert (
        banner
        == f"tlsrelay run: config {config}; data_dir {root / 'var'} (relative to the config file)"
    )


def test_a_taken_listening_address_is_named_and_run_exits_1_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(tmp_path, port)
        done = tlsrelay(tmp_path, "run", "--config", "tlsrelay.yaml", timeout=30)
        assert (done.returncode, done.stderr) == (
            1,
            f"tlsrelay run: ingest.listen: cannot listen on 127.0.0.1:{port}: "
            "Address already in use\n",
        )
        assert not (tmp_path / "var" / "redis").exists(), "Redis started for nothing"

        off = {"ingest": "null", "policy": "null", "deliver": "null"}
        config = write_config(tmp_path, port, off)
        config.write_text(config.read_text() + "redis_url: redis://127.0.0.1:1/0\n")
        alone = tlsrelay(tmp_path, "ingest", "--config", "tlsrelay.yaml", timeout=30)
        # Before it: one logged warning that the (unreachable) Redis could not be checked.
        assert (alone.returncode, alone.stderr.splitlines()[-1]) == (
            1,
            f"tlsrelay ingest: ingest.listen: cannot listen on 127.0.0.1:{port}: "
            "Address already in use",
        )


def test_a_taken_metrics_port_stops_run_before_anything_starts(tmp_path: Path) -> None:
    ports = metrics_ports()
    host, busy = ports["policy"].rsplit(":", 1)
    with socket.socket() as taken:
        taken.bind((host, int(busy)))
        taken.listen()
        write_config(tmp_path, free_port(), ports)
        done = tlsrelay(tmp_path, "run", "--config", "tlsrelay.yaml", timeout=30)
    assert (done.returncode, done.stderr) == (
        1,
        f"tlsrelay run: metrics.policy: cannot serve /metrics on {ports['policy']}: "
        "Address already in use\n",
    )


def test_a_killed_run_leaves_its_redis_holding_the_lock(
    running: tuple[subprocess.Popen[bytes], Path, int],
) -> None:
    """SIGKILL of `run` alone: its Redis (own process group) lives on, and so must the lock —
    else a second run would start another server on the same AOF."""
    proc, root, _port = running
    url = (root / "var" / "redis" / "url").read_text().strip()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        second = tlsrelay(root, "run", "--config", "tlsrelay.yaml", timeout=30)
        assert second.returncode == 2, second.stderr
        assert f"in use by tlsrelay run (pid {proc.pid}); that run has died" in second.stderr
        assert "its embedded Redis still holds the lock" in second.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned services (run's process group)
        client = redis.Redis.from_url(url)
        with contextlib.suppress(redis.exceptions.ConnectionError):
            client.shutdown(nosave=True)
        client.close()
