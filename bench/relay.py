"""tlsrelay as a benchmark target: the embedded Redis and the three services as real processes.

:class:`TlsRelay` starts exactly what an operator runs — an embedded Redis (valkey, AOF with
``appendfsync everysec``, :class:`services.common.redisserver.EmbeddedRedis`) and
``tlsrelay ingest|policy|deliver --config FILE`` — with a generated configuration: ingest on a
free loopback port, one route per benchmark domain to its sink, the worker concurrencies asked
for, metrics on free ports, every other setting at its default unless overridden (``--set
delivery.some_key=VALUE``, the value read as YAML). Each service is started in its
own process group, with its log in ``<root>/<service>.log``. With ``redis_rtt`` the services
reach Redis through a delay line (``python -m bench.delayline``, a process of its own, measured
as ``redis_line`` and not charged to the relay); the benchmark's own snapshots go direct.

Failure: :class:`TargetError` when ingest does not listen in time or a service exits early.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from bench.env import REPO, python_env
from services.common.redisserver import EmbeddedRedis, free_ports

SERVICES = ("ingest", "policy", "deliver")
REDIS_LINE = "redis_line"  # the delay line in front of Redis: measured, not the relay's CPU
START_TIMEOUT = 60.0


class TargetError(RuntimeError):
    pass


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_listening(port: int, alive: Any, what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll until ``port`` accepts connections; fail when ``alive()`` turns false or at the end."""
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if not alive():
            raise TargetError(f"{what} exited before listening")
        if time.monotonic() > deadline:
            raise TargetError(f"{what} did not listen on port {port} within {timeout:.0f}s")
        time.sleep(0.05)


class TlsRelay:
    """Context manager; ``smtp_port`` is ingest's port, ``processes()`` what to measure."""

    name = "tlsrelay"

    def __init__(
        self,
        root: Path,
        routes: dict[str, str],
        policy_workers: int | None = None,
        deliver_workers: int | None = None,
        overrides: dict[str, Any] | None = None,
        redis_rtt: float = 0.0,
    ) -> None:
        self.root = root
        self.redis_rtt = redis_rtt  # seconds between the services and Redis; 0: direct
        self.redis_line: subprocess.Popen[str] | None = None
        self.services_redis_url = ""  # where the services reach Redis (set when started)
        self.overrides = overrides or {}
        self.routes = routes
        self.policy_workers = policy_workers
        self.deliver_workers = deliver_workers
        # Distinct ports: two free_port() calls may return the same one (ingest's and deliver's
        # metrics once did, and ingest refused the configuration).
        self.smtp_port, *metrics = free_ports(1 + len(SERVICES))
        self.metrics_ports = dict(zip(SERVICES, metrics, strict=True))
        self.redis = EmbeddedRedis(root / "redis")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.config_path = root / "tlsrelay.yaml"

    def config(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "hostname": "relay.bench.test",
            "redis_url": self.services_redis_url or self.redis.url,
            "data_dir": str(self.root / "var"),
            "ingest": {"listen": f"127.0.0.1:{self.smtp_port}"},
            "policy": {},
            "delivery": {"routes": dict(self.routes)},
            "metrics": {name: f"127.0.0.1:{port}" for name, port in self.metrics_ports.items()},
        }
        if self.policy_workers:
            settings["policy"]["concurrency"] = self.policy_workers
        if self.deliver_workers:
            settings["delivery"]["concurrency"] = self.deliver_workers
        for key, value in self.overrides.items():
            *parents, last = key.split(".")
            section = settings
            for name in parents:
                section = section.setdefault(name, {})
            section[last] = value
        return settings

    def settings_summary(self) -> dict[str, Any]:
        """The worker concurrencies in force (the service defaults when not given), and the
        ``--set`` overrides."""
        from services.common.config import PolicyConfig
        from services.common.deliveryconfig import DeliveryConfig

        return {
            "policy_workers": self.policy_workers or PolicyConfig().concurrency,
            "deliver_workers": self.deliver_workers or DeliveryConfig().concurrency,
            "settings": dict(self.overrides),
            "redis_rtt_ms": round(self.redis_rtt * 1000, 1),
        }

    def __enter__(self) -> TlsRelay:
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        try:
            if self.redis_rtt > 0:
                self._start_redis_line()
            self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
            for name in SERVICES:
                self._start(name)
            ingest = self.procs["ingest"]
            wait_listening(self.smtp_port, lambda: ingest.poll() is None, "tlsrelay ingest")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _start_redis_line(self) -> None:
        """The delay line between the services and Redis (bench/delayline.py)."""
        argv = [sys.executable, "-m", "bench.delayline", str(self.redis_rtt), str(self.redis.port)]
        with (self.root / "redis_line.log").open("ab") as log:
            self.redis_line = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                cwd=REPO, env=python_env(),
            )  # fmt: skip
        assert self.redis_line.stdout is not None
        hello = self.redis_line.stdout.readline()
        if not hello:
            raise TargetError("the Redis delay line exited; see redis_line.log")
        self.services_redis_url = f"redis://127.0.0.1:{json.loads(hello)['port']}/0"

    def _start(self, name: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "services.cli",
            name,
            "--config",
            str(self.config_path),
        ]
        with (self.root / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=python_env(),
                start_new_session=True,  # its own process group: the pool children stop with it
            )

    @property
    def redis_url(self) -> str:
        """For ``INFO commandstats`` (bench/measure.py)."""
        return self.redis.url

    def processes(self) -> dict[str, int]:
        assert self.redis.process is not None
        pids = {name: proc.pid for name, proc in self.procs.items()}
        if self.redis_line is not None:
            pids[REDIS_LINE] = self.redis_line.pid
        return {**pids, "redis": self.redis.process.pid}

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise TargetError(f"tlsrelay {name} exited with {proc.returncode}: see {name}.log")

    def stop(self) -> None:
        """SIGTERM (warm shutdown) to every service, SIGKILL to what is left after 20 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # pool children left behind
        self.procs.clear()
        if self.redis_line is not None:
            with contextlib.suppress(OSError):
                assert self.redis_line.stdin is not None
                self.redis_line.stdin.close()
            try:
                self.redis_line.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis_line.kill()
                self.redis_line.wait()
            self.redis_line = None
        self.redis.stop()
