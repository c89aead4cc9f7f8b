"""A small world on loopback for end-to-end tests: a real Redis-compatible server, a real DNS
server, real SMTP destination sinks, and the three tlsrelay services as real processes started
with the ``tlsrelay`` command line — exactly what an operator runs.

Destinations (``World.sinks``):

- ``tls``     STARTTLS with a certificate from the test CA   ← route ``tls.test``, ``d1.test``
- ``plain``   no STARTTLS                                     ← route ``plain.test``, ``d2.test``
- ``broken``  STARTTLS offered, handshake broken              ← route ``broken.test``
- ``other``   STARTTLS                                        ← route ``d3.test``
- ``mx``      STARTTLS on 127.0.0.3:``mx_port``               ← via DNS: ``mx.test`` (first MX
              127.0.0.2 refuses connections), ``implicit.test`` (A record only)

Every service of a world serves ``/metrics`` on a free port: a config file without a ``metrics``
section gets one when the first service starts (:func:`metrics_ports`), so worlds side by side
(two regions) never meet on the default ports. ``World.metrics_url(service)`` says where.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from services.common import spool
from services.common.redisserver import EmbeddedRedis, free_port
from tests.dnsserver import LocalDns
from tests.peers import Sink

T = TypeVar("T")
SERVICES = ("ingest", "policy", "deliver")


def wait_until(
    predicate: Callable[[], T | Literal[False] | None],
    timeout: float = 20.0,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline.
    The value returned is that truthy one (so never None or False)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class World:
    root: Path
    redis: EmbeddedRedis
    dns: LocalDns
    sinks: dict[str, Sink]
    ingest_port: int
    config_path: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # ----------------------------------------------------------------- processes
    def start_service(self, name: str) -> None:
        self.start_services(name)

    def start_services(self, *names: str) -> None:
        """Start the services side by side and wait until each has bound its ports (its log
        says so). Ports are chosen free a moment before a service binds them, so a test running
        beside this one can take one in between: that service then exits with "Address already
        in use" and is started again on new ports (never left talking to whoever took them)."""
        pending = list(names)
        for _ in range(5):
            launched = [(name, self._launch(name)) for name in pending]
            pending = [name for name, started in launched if not self._bound(name, *started)]
            if not pending:
                return
        raise AssertionError(f"{pending} could not bind their ports: {self.log(pending[0])}")

    def _launch(self, name: str) -> tuple[subprocess.Popen[bytes], int]:
        """Start ``name``; return its process and where its output starts in its log."""
        settings = yaml.safe_load(self.config_path.read_text()) or {}
        if "metrics" not in settings:
            settings["metrics"] = metrics_ports(avoid={self.ingest_port})
            self.config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        log_path = self.root / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        log = log_path.open("ab")
        proc = self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "services.cli", name, "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() takes the pool children too
        )
        log.close()
        return proc, offset

    def _bound(self, name: str, proc: subprocess.Popen[bytes], offset: int) -> bool:
        """Wait until ``name`` said it bound its ports, or exited. False (and new ports in the
        config) when it exited because one was taken meanwhile: start it again."""
        settings = yaml.safe_load(self.config_path.read_text())
        # What the service prints once each of its ports is bound (nothing for metrics: null).
        lines = [f"{name} metrics on "] if (settings["metrics"] or {}).get(name) else []
        if name == "ingest":
            lines.append(f"ingest listening on smtp://127.0.0.1:{self.ingest_port} ")

        def said() -> str:
            with (self.root / f"{name}.log").open("rb") as file:
                file.seek(offset)
                return file.read().decode(errors="replace")

        wait_until(
            lambda: proc.poll() is not None or all(line in said() for line in lines),
            60,
            f"{name} to bind its ports",
        )
        if proc.poll() is None or "Address already in use" not in said():
            return True  # running and bound (or exited for a reason of its own: the test sees)
        self.procs.pop(name)
        if (settings["metrics"] or {}).get(name):
            taken = {self.ingest_port, *_ports_of(settings["metrics"])}
            settings["metrics"][name] = metrics_ports(avoid=taken)[name]
        if name == "ingest":
            while (port := free_port()) in _ports_of(settings["metrics"]):
                pass  # the kernel handed back a metrics port (configured, not yet bound)
            self.ingest_port = port
            settings["ingest"]["listen"] = f"127.0.0.1:{self.ingest_port}"
        self.config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        return False

    def stop_service(self, name: str, kill: bool = False) -> None:
        """SIGTERM (warm shutdown), or SIGKILL to the whole process group with ``kill``."""
        proc = self.procs.pop(name)
        if kill:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # pool children left behind

    def stop_all(self) -> None:
        """SIGTERM to every service at once, then wait for each (warm shutdowns side by side)."""
        procs = dict(self.procs)
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + 20
        for name, proc in procs.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            self.stop_service(name)  # reaps it (SIGKILL if still running) and its pool children

    def metrics_url(self, name: str) -> str:
        """Where service ``name`` serves its metrics (from the config file)."""
        settings = yaml.safe_load(self.config_path.read_text())
        return f"http://{settings['metrics'][name]}/metrics"

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    # ----------------------------------------------------------------- client side
    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.ingest_port, timeout=30)
        client.ehlo("client.test")
        return client

    def send(self, rcpts: list[str], data: bytes, sender: str = "sender@origin.test") -> str:
        """Send one message through ingest; return its queue id (from the 250 reply)."""
        with self.smtp() as client:
            client.mail(sender)
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                assert code == 250, (rcpt, code, text)
            code, text = client.data(data)
            assert code == 250, (code, text)
        reply = text.decode()
        assert reply.startswith("2.0.0 Ok: queued as "), reply
        return reply.rsplit(" ", 1)[1]

    # ----------------------------------------------------------------- Redis side
    def client(self) -> Any:
        return spool.connect(self.redis.url)

    def trace(self, message_id: str) -> list[dict[str, Any]]:
        with contextlib.closing(self.client()) as client:
            return spool.read_trace(client, message_id)

    def events(self, message_id: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.trace(message_id) if e["event"] == kind]

    def wait_completed(self, message_id: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        wait_until(
            lambda: self.events(message_id, "completed"),
            timeout,
            f"message {message_id} to complete; trace: {self.trace(message_id)}",
        )
        return self.trace(message_id)

    def wait_settled(self, message_id: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until a delivery round recorded an outcome (delivered, deferred or bounced) for
        the message; return its trace."""
        outcomes = ("delivered", "deferred", "bounced")
        return wait_until(
            lambda: (t := self.trace(message_id)) and any(e["event"] in outcomes for e in t) and t,
            timeout,
            f"{message_id} to be delivered or deferred",
        )


def metrics_ports(avoid: Collection[int] = ()) -> dict[str, str]:
    """A free loopback port for each service's ``/metrics`` (instead of the fixed defaults),
    all different: each stays bound until all are chosen (the kernel may hand a port that was
    just released straight back), and none of ``avoid`` (the ingest listener's, chosen free
    earlier but not held: the same port for both is a configuration error, and the services
    exit before they bind anything)."""
    with contextlib.ExitStack() as held:
        ports = {}
        for name in SERVICES:
            port = 0
            while port == 0 or port in avoid:
                sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            ports[name] = f"127.0.0.1:{port}"
        return ports


def _ports_of(metrics: dict[str, str] | None) -> set[int]:
    return {int(where.rsplit(":", 1)[1]) for where in (metrics or {}).values() if where}


def message(subject: str, body: str = "Hello.\r\n") -> bytes:
    return (
        f"From: sender@origin.test\r\nTo: someone@example\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@origin.test>\r\n\r\n{body}"
    ).encode()


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, recursing into nested mappings."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def base_config(root: Path, redis_url: str, ingest_port: int, sinks: dict[str, Sink],
                dns_port: int, mx_port: int) -> dict[str, Any]:  # fmt: skip
    def at(name: str) -> str:
        return sinks[name].address_text

    return {
        "hostname": "relay.test",
        "redis_url": redis_url,
        "data_dir": str(root / "var"),
        "ingest": {"listen": f"127.0.0.1:{ingest_port}"},
        "delivery": {
            "routes": {
                "tls.test": at("tls"),
                "d1.test": at("tls"),
                "plain.test": at("plain"),
                "d2.test": at("plain"),
                "broken.test": at("broken"),
                "d3.test": at("other"),
            },
            "dns_servers": [f"127.0.0.1:{dns_port}"],
            "mx_port": mx_port,
            "connect_timeout": "5s",
            "command_timeout": "20s",
            "retry_schedule": ["1s"],
            "scheduler_interval": "0.2s",
            "concurrency": 2,
        },
        "policy": {"concurrency": 1},
    }


@contextlib.contextmanager
def make_world(
    root: Path,
    extra_sinks: dict[str, Sink] | None = None,
    config: Callable[[World], dict[str, Any]] | None = None,
) -> Iterator[World]:
    """Start the world. ``extra_sinks`` join ``World.sinks`` (started here); ``config(world)``
    returns settings merged over the base configuration before the services start."""
    root.mkdir(parents=True, exist_ok=True)
    mx_port = free_port("127.0.0.3")
    sinks = {
        "tls": Sink("starttls"),
        "plain": Sink("plain"),
        "broken": Sink("broken"),
        "other": Sink("starttls"),
        "mx": Sink("starttls", host="127.0.0.3", port=mx_port),
        **(extra_sinks or {}),
    }
    with contextlib.ExitStack() as stack:
        for sink in sinks.values():
            stack.enter_context(sink)
        dns = stack.enter_context(LocalDns())
        dns.add("mx.test", "MX", "10 mx1.mx.test.")
        dns.add("mx.test", "MX", "20 mx2.mx.test.")
        dns.add("mx1.mx.test", "A", "127.0.0.2")  # nothing listens there: connection refused
        dns.add("mx2.mx.test", "A", "127.0.0.3")
        dns.add("implicit.test", "A", "127.0.0.3")
        redis = EmbeddedRedis(root / "redis")
        redis.start()
        stack.callback(redis.stop)
        ingest_port = free_port()
        world = World(root, redis, dns, sinks, ingest_port, root / "tlsrelay.yaml")
        settings = base_config(root, redis.url, ingest_port, sinks, dns.port, mx_port)
        settings = merge(settings, config(world) if config else {})
        world.config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        stack.callback(world.stop_all)
        world.start_services(*SERVICES)
        yield world
