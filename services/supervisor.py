"""``tlsrelay run``: the whole relay on one machine, one process supervising the others.

Order of start-up, each step only when the one before succeeded:

1. **Lock** ``data_dir``: an exclusive ``flock`` on ``data_dir/run.pid``, which then holds this
   process's pid. A second ``run`` on the same ``data_dir`` exits 2 at once with
   ``tlsrelay run: data_dir ./var is in use by tlsrelay run (pid N)`` and touches nothing (no
   second Redis on the same AOF, no child on the first one's ports, its ``redis/url`` kept).
   The kernel drops the lock when the process ends, however it ends.
2. **Check every listening address** (``ingest.listen``, ``submission``, ``relay``, the three
   ``metrics.*``): one that cannot be bound exits 1 at once naming its key, e.g.
   ``tlsrelay run: ingest.listen: cannot listen on 127.0.0.1:2525: Address already in use``.
3. The **embedded Redis** (when no ``redis_url``), in its own process group: a Ctrl-C in the
   terminal (SIGINT to the foreground group) reaches the children, never Redis, which is
   stopped last, once every child has finished its warm shutdown.
4. ``ingest``, ``policy`` and ``deliver`` as child processes (``python -m services.cli NAME``).

Supervision: a child that dies is started again (as Kubernetes would), unless it exited 2 (its
configuration is bad: a restart cannot help); more than :data:`RESTARTS_PER_MINUTE` restarts of
one child in a minute stop everything. Either way ``run`` exits 1. SIGINT/SIGTERM stop every
child (SIGTERM, SIGKILL after a grace period), then Redis; exit 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from services.common import listeners
from services.common.config import ENV_REDIS_URL, Config
from services.common.values import HostPort

EXIT_BUSY = 2  # data_dir locked by another `tlsrelay run`
EXIT_CONFIG = 2  # a child's configuration is bad (the CLI's exit code for it)
SERVICES = ("ingest", "policy", "deliver")
RESTARTS_PER_MINUTE = 5  # more than this and the failure is not transient: stop everything
LOCK_FILE = "run.pid"


class DataDirBusy(Exception):
    """Another ``tlsrelay run`` holds the lock on ``data_dir``; ``str()`` is the message."""


def embedded_url_file(config: Config) -> Path:
    """Where a running ``tlsrelay run`` leaves its embedded server's URL for the tools."""
    return config.data_dir / "redis" / "url"


def shown(path: Path) -> str:
    """``path`` as the operator thinks of it: ``./var`` under the working directory."""
    with contextlib.suppress(ValueError):
        return f"./{path.relative_to(Path.cwd())}"
    return str(path)


def lock_data_dir(data_dir: Path) -> int:
    """Take the ``run`` lock of ``data_dir`` (creating the directory on a first run) and write
    this pid into the lock file; return its descriptor, to keep open while running.

    Raises :class:`DataDirBusy` (naming the holder's pid) when another process holds it; the
    file is then only opened and read."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        busy = f"data_dir {shown(data_dir)} is in use by tlsrelay run (pid {holder})"
        if holder.isdigit() and not _alive(int(holder)):
            busy += "; that run has died and its embedded Redis still holds the lock: stop it"
            busy += f" (its address is in {shown(data_dir)}/redis/url)"
        raise DataDirBusy(busy) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def listening_addresses(config: Config) -> list[tuple[str, HostPort, str]]:
    """Every address this configuration listens on: ``(key, address, what)``."""
    found = [
        (listeners.listener_key(config, listener), address, "listen on")
        for listener, address in listeners.listener_addresses(config).items()
    ]
    for name in SERVICES:
        address = getattr(config.metrics, name)
        if address is not None:
            found.append((f"metrics.{name}", address, "serve /metrics on"))
    return found


def unbindable(config: Config) -> str | None:
    """The first listening address that cannot be bound now, as the message to print; binds
    with ``SO_REUSEADDR`` as asyncio and the metrics server do, and releases at once."""
    for key, address, what in listening_addresses(config):
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address.host, address.port))
            except OSError as exc:
                return f"{key}: cannot {what} {address}: {exc.strerror or exc}"
    return None


def run(config: Config, config_path: str | None) -> int:
    """``tlsrelay run`` (see the module docstring); the exit code."""
    try:
        lock = lock_data_dir(config.data_dir)
    except DataDirBusy as exc:
        print(f"tlsrelay run: {exc}", file=sys.stderr)
        return EXIT_BUSY
    try:
        problem = unbindable(config)
        if problem is not None:
            print(f"tlsrelay run: {problem}", file=sys.stderr)
            return 1
        return _run_locked(config, config_path, lock)
    finally:
        os.close(lock)


def _refuse_evicting(redis_url: str) -> str | None:
    """Why Redis must not be used (it may evict accepted mail), or None."""
    from services.common import eviction, spool

    client = spool.connect(redis_url)
    try:
        eviction.check(client)
    except eviction.UnfitRedis as exc:
        return str(exc)
    finally:
        client.close()
    return None


def _run_locked(config: Config, config_path: str | None, lock: int) -> int:
    from services.common.redisserver import EmbeddedRedis

    source = f"config {config.source.resolve()}" if config.source else "built-in defaults"
    print(f"tlsrelay run: {source}; data_dir {config.data_dir} (relative to the config file)")
    embedded = None
    redis_url = config.redis_url
    if redis_url is None:
        # The server inherits the data_dir lock: a `run` killed with SIGKILL leaves its server
        # running (its own process group), and no second `run` may start another on the AOF.
        embedded = EmbeddedRedis(
            config.data_dir / "redis", appendfsync=config.redis_appendfsync, keep_fds=(lock,)
        )
        redis_url = embedded.start()
        embedded_url_file(config).write_text(redis_url + "\n")
        print(
            f"redis: embedded server at {redis_url} (data in {embedded.data_dir}, "
            f"AOF on, appendfsync {config.redis_appendfsync})"
        )
    if (refused := _refuse_evicting(redis_url)) is not None:
        if embedded is not None:
            embedded_url_file(config).unlink(missing_ok=True)
            embedded.stop()
        print(f"tlsrelay run: {refused}", file=sys.stderr)
        return 1
    print(f"ingest: smtp://{config.ingest.listen}", flush=True)
    for name in SERVICES:
        address = getattr(config.metrics, name)
        print(f"metrics: {name} {f'http://{address}/metrics' if address else 'off'}", flush=True)
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        children.update(_spawn(config_path, redis_url))
        return _supervise(children, config_path, redis_url)
    finally:
        _stop(children)
        if embedded is not None:
            embedded_url_file(config).unlink(missing_ok=True)
            embedded.stop()
        print("tlsrelay: stopped", flush=True)


def _spawn(config_path: str | None, redis_url: str) -> dict[str, subprocess.Popen[bytes]]:
    return {name: _start(name, config_path, redis_url) for name in SERVICES}


def _start(name: str, config_path: str | None, redis_url: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "services.cli", name]
    if config_path:
        argv += ["--config", config_path]
    return subprocess.Popen(argv, env={**os.environ, ENV_REDIS_URL: redis_url})


def _supervise(
    children: dict[str, subprocess.Popen[bytes]], config_path: str | None, redis_url: str
) -> int:
    """Restart a child that dies (as Kubernetes would); give up (exit 1) when one keeps dying
    or fails on its configuration."""
    stop = {"signal": 0}
    restarts: dict[str, list[float]] = {name: [] for name in children}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop["signal"]:
        for name, child in children.items():
            if child.poll() is None:
                continue
            recent = [t for t in restarts[name] if time.monotonic() - t < 60] + [time.monotonic()]
            restarts[name] = recent
            print(f"tlsrelay: {name} exited with {child.returncode}", file=sys.stderr)
            if child.returncode == EXIT_CONFIG or len(recent) > RESTARTS_PER_MINUTE:
                return 1
            children[name] = _start(name, config_path, redis_url)
        time.sleep(0.2)  # supervisor poll; signals interrupt it at once
    return 0


def _stop(children: dict[str, subprocess.Popen[bytes]], grace: float = 30.0) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
