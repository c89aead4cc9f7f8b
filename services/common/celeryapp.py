"""The Celery application shared by the policy and deliver workers.

Every setting says why it is set. Tasks are thin wrappers over domain code and are registered by
the service that owns them (``services/policy/tasks.py``, ``services/deliver/tasks.py``). Task
messages are produced by :mod:`services.common.queueing` (inside our own Redis transactions), so
this app is only ever used to *consume*.

Metrics: the worker's main process serves ``/metrics`` for its whole pool (prometheus_client
multiprocess mode, see :mod:`services.common.metrics`); :func:`wire_metrics` connects the pool
processes' start and exit to it.

Start (:func:`run_worker`): Celery's ``worker`` command alone, not the ``celery`` umbrella
command, and each pool process's parent-death signal set without cffi
(:func:`spare_cffi_parser`): 9.4 and 4.2 MB less in every pool process (bench/README.md,
"Session 12").

Privileges: Celery warns (a multi-line ``SecurityWarning``) when its worker runs as root or in
the ``sudo``/``wheel`` group; :func:`wire_privilege_note` replaces it with one structured log line
per worker, and an unprivileged worker (the container image's uid 10001) logs nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Final
from wsgiref.simple_server import WSGIServer

import redis
from celery import Celery, bootsteps
from celery.exceptions import SecurityWarning
from celery.signals import (
    celeryd_init,
    task_received,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from kombu import Exchange, Queue

from services.common import broker, liveness, queueing, spool
from services.common.config import Config
from services.common.health import Heartbeat

log = logging.getLogger("tlsrelay.worker")
PR_SET_PDEATHSIG: Final = 1  # prctl(2), linux/prctl.h


def settings(config: Config, redis_url: str) -> dict[str, Any]:
    return {
        "broker_url": _broker_url(redis_url),
        # Only JSON crosses the queues: pickle from a shared Redis is remote code execution.
        "task_serializer": "json",
        "accept_content": ["json"],
        # Nothing reads task results; a result backend would double the Redis writes per task.
        "task_ignore_result": True,
        "result_backend": None,
        # Acknowledge after the task ran, so a worker that dies mid-task leaves it in the queue.
        "task_acks_late": True,
        # ... and when the worker *process* is killed (OOM, SIGKILL), requeue rather than ack.
        "task_reject_on_worker_lost": True,
        # With acks_late, a task that raised is rejected *without* requeue and kombu deletes it
        # (whatever this setting says; True would ack it): so the tasks never raise — they park
        # failed work in our own retry set (services/common/retry.py).
        "task_acks_on_failure_or_timeout": False,
        # One task reserved per process: a slow delivery must not hold others hostage.
        "worker_prefetch_multiplier": 1,
        # Explicit queues; nothing is auto-created by a typo in a routing key.
        "task_create_missing_queues": False,
        "task_default_queue": queueing.QUEUE_DELIVER,
        "task_queues": [
            Queue(queueing.QUEUE_POLICY, Exchange(queueing.QUEUE_POLICY), queueing.QUEUE_POLICY),
            Queue(queueing.QUEUE_DELIVER, Exchange(queueing.QUEUE_DELIVER), queueing.QUEUE_DELIVER),
        ],
        "task_routes": {
            queueing.TASK_CLASSIFY: {"queue": queueing.QUEUE_POLICY},
            queueing.TASK_DELIVER: {"queue": queueing.QUEUE_DELIVER},
        },
        "broker_transport_options": {
            # kombu's keys (queue lists, unacked, bindings) under our prefix, so tlsrelay can
            # share a Redis database; kombu prefixes in its client, and every place that reads
            # or writes those keys directly uses queueing's prefixed names (services/common/
            # broker.py moves what an older release left in the unprefixed ones).
            "global_keyprefix": queueing.KEY_PREFIX,
            # Unacked tasks go back to the queue after this long; longer than any delivery.
            "visibility_timeout": int(config.celery.visibility_timeout),
            # ... and the sweep that hands them back runs this often (kombu's default is about
            # 100 s; a sixth of the visibility timeout keeps a SIGKILLed worker's task from
            # waiting much longer than the timeout itself).
            "unacked_restore_interval": max(1, min(60, int(config.celery.visibility_timeout / 6))),
            "unacked_restore_throttle": 1,
            # A broker that vanishes without closing TCP (failover, NAT) must not hang a publish.
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
            **_sentinel_options(redis_url),
        },
        # Keep retrying the broker forever (at start-up too): a Redis outage must not stop workers.
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Nobody consumes task events; sending them costs a Redis publish per task.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        # Remote control (pidbox) adds fan-out traffic per worker; we manage workers by signals.
        "worker_enable_remote_control": False,
        # Our own JSON logging/printing; Celery must not reconfigure the root logger.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # Recycle a worker process now and then so a slow leak cannot grow without bound.
        "worker_max_tasks_per_child": 10000,
    }


def _broker_url(redis_url: str) -> str:
    spec = spool.SentinelUrl.parse(redis_url)
    return spec.kombu_url() if spec else redis_url


def _sentinel_options(redis_url: str) -> dict[str, Any]:
    """kombu takes the Sentinel master's name (and the sentinels' password) as options."""
    spec = spool.SentinelUrl.parse(redis_url)
    if spec is None:
        return {}
    options: dict[str, Any] = {"master_name": spec.master}
    if spec.password:
        options["sentinel_kwargs"] = {"password": spec.password}
    return options


def make_app(config: Config, redis_url: str, name: str) -> Celery:
    broker.free_slots_on_failure()  # a failed ack must not stop the worker consuming
    app = Celery(f"tlsrelay-{name}", set_as_current=True)
    app.conf.update(settings(config, redis_url))
    return app


def worker_argv(queue: str, concurrency: int, hostname: str) -> list[str]:
    """Options of Celery's ``worker`` command: one queue, no gossip/mingle (we run no remote
    control), no ``celeryev`` heartbeats (nobody listens; a publish every 2 s per worker)."""
    return [
        "--queues", queue,
        "--concurrency", str(concurrency),
        "--pool", "prefork",
        "--hostname", f"{queue}@{hostname}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel", "INFO",
    ]  # fmt: skip


def run_worker(app: Celery, queue: str, concurrency: int, hostname: str) -> None:
    """Run the worker until it stops: Celery's ``worker`` command itself, its options
    (:func:`worker_argv`) parsed as ``celery worker`` parses them, quiet (no banner on stdout:
    logs are JSON lines on stderr, services/common/logs.py).

    Not through ``app.worker_main`` (the ``celery`` umbrella command): that imports every
    subcommand's module, among them ``celery amqp``'s interactive shell (click_repl with
    prompt_toolkit) — 9.4 MB of each worker process, and so of every pool process forked from
    it, for commands a worker never runs; the ``worker`` command alone imports 0.24 MB (and
    pygments, 1.9 MB, where it is installed: the dev lock's venv, not the runtime's;
    bench/README.md, "Session 12"). What the umbrella adds before it hands over is its
    context object (app, ``--quiet``; ``--no-color`` only colours the banner, not shown) and
    the app's user options, of which ours has none — and its options' unprefixed environment
    variables, which no longer apply: ``APP`` named another application (the worker did not
    start), ``BROKER_URL`` became ``CELERY_BROKER_URL``, which overrides the configured
    broker. The configuration alone says which Redis a worker consumes."""
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker

    spare_cffi_parser()
    context = CLIContext(app=app, no_color=False, workdir=None, quiet=True)
    worker.main(
        args=worker_argv(queue, concurrency, hostname),
        prog_name="celery worker",
        standalone_mode=False,  # as worker_main: return here, the caller decides the exit
        obj=context,
    )


def spare_cffi_parser() -> None:
    """Each pool process asks the kernel to kill it when the main process dies (Celery's
    ``process_initializer`` calls billiard's ``set_pdeathsig``, which Celery imported as
    ``celery.platforms._set_pdeathsig``). billiard makes that ``prctl`` call through cffi whenever
    cffi is imported — and it always is: billiard imports it itself when installed, and
    cryptography requires it — so each pool process parses a C declaration at start, importing
    pycparser for it: 4.2 MB of every pool process, for one system call (bench/README.md,
    "Session 12"). This makes Celery call :func:`set_pdeathsig` instead: the same call
    through ctypes, as billiard makes it when cffi is not imported. Call it before the pool
    forks; idempotent."""
    import celery.platforms

    celery.platforms._set_pdeathsig = set_pdeathsig


def set_pdeathsig(signum: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, signum)``: this process gets ``signum`` when its parent dies.
    :class:`OSError` where that cannot be done (not Linux, or refused), which Celery ignores,
    as it does billiard's."""
    if not sys.platform.startswith("linux"):
        raise OSError("pdeathsig is only supported on linux")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0)
    except (AttributeError, OSError) as exc:
        raise OSError(f"prctl is not available: {exc}") from exc
    if done != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")


def wire_liveness(redis_url: str, role: str) -> None:
    """Beat in Redis (services/common/liveness.py) from the main process — naming the delivery
    tags of the tasks it holds, so a sweep can hand back those of a dead worker — and from each
    pool process (for claims that name the process doing the work; naming what it holds past
    its task's acknowledgement, :func:`liveness.hold`)."""
    from celery.signals import worker_init

    def held() -> list[str]:
        from celery.worker import state

        for _ in range(10):  # the consumer adds requests while we copy: try again
            try:
                return [r.message.delivery_tag for r in list(state.reserved_requests)]
            except RuntimeError:
                continue
        return []

    def start_main(**_: object) -> None:
        liveness.Beacon(redis_url, liveness.new_id(role), held).start()

    def start_child(**_: object) -> None:
        liveness.Beacon(redis_url, liveness.new_id(f"{role}-process"), liveness.holding).start()

    worker_init.connect(start_main, weak=False)
    worker_process_init.connect(start_child, weak=False)


def wire_heartbeat(app: Celery, path: Path, interval: float) -> None:
    """A worker bootstep that keeps ``path`` fresh while the worker runs (liveness probes read
    it with ``tlsrelay healthcheck``). A thread, not the worker's event loop: the loop blocks
    while the broker reconnects, and a Redis outage must not look like a dead worker."""

    class HeartbeatStep(bootsteps.StartStopStep):  # type: ignore[misc]
        def __init__(self, worker: object, **kwargs: object) -> None:
            super().__init__(worker, **kwargs)
            self.thread: Heartbeat | None = None

        def start(self, worker: object) -> None:
            self.thread = Heartbeat(path, interval)
            self.thread.start()

        def stop(self, worker: object) -> None:
            if self.thread is not None:
                self.thread.stop()

    app.steps["worker"].add(HeartbeatStep)


class Watchdog(threading.Thread):
    """Celery's consumer can stop consuming after the broker restarts while a task runs
    (celery#8030, #9054, #10205): the process lives, the heartbeat beats, the queue grows. This
    thread, in the worker's main process, ends such a worker so its supervisor (Kubernetes,
    ``tlsrelay run``) starts a fresh one: when ``queue`` has waited tasks for ``stall_after``
    seconds while this worker received none and runs none, it exits with status 3."""

    def __init__(self, redis_url: str, queue: str, stall_after: float) -> None:
        super().__init__(name="tlsrelay-watchdog", daemon=True)
        self.redis_url, self.queue, self.stall_after = redis_url, queue, stall_after
        self.last_received = time.monotonic()
        self._stopped = threading.Event()

    def received(self, **_: object) -> None:
        self.last_received = time.monotonic()

    def run(self) -> None:
        client = spool.connect(self.redis_url)
        while not self._stopped.wait(min(5.0, self.stall_after / 3)):
            if self._stalled(client):
                why = "worker stopped consuming queue %r for %.0fs while it has tasks; exiting"
                log.critical(why, self.queue, self.stall_after)
                os._exit(3)

    def _stalled(self, client: redis.Redis) -> bool:
        from celery.worker import state

        if state.active_requests or time.monotonic() - self.last_received < self.stall_after:
            return False
        try:
            return bool(client.llen(queueing.LISTS[self.queue]))
        except redis.exceptions.RedisError:
            self.last_received = time.monotonic()  # Redis is down: not a stall of ours
            return False

    def stop(self) -> None:
        self._stopped.set()


def wire_watchdog(app: Celery, redis_url: str, queue: str, stall_after: float) -> None:
    watchdog = Watchdog(redis_url, queue, stall_after)
    task_received.connect(watchdog.received, weak=False)
    worker_ready.connect(lambda **_: watchdog.start(), weak=False)
    worker_shutdown.connect(lambda **_: watchdog.stop(), weak=False)


def _privileged() -> bool:
    """Celery's own test (celery.platforms.check_privileges): root, or a sudo/wheel group."""
    import grp

    if os.getuid() == 0 or os.geteuid() == 0:
        return True
    names = set()
    for gid in {os.getgid(), os.getegid()}:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            return True  # Celery assumes root when the group is unknown
    return bool(names & {"sudo", "wheel"})


def _note_privileges(**_: object) -> None:
    if _privileged():
        ids = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid()}
        why = "worker runs with superuser privileges; run it as an unprivileged user"
        log.warning(why, extra=ids)


def wire_privilege_note() -> None:
    """One log line instead of Celery's multi-line SecurityWarning (it is sent right before
    the check, once per worker, in the main process)."""
    warnings.filterwarnings(
        "ignore", "You're running the worker with superuser privileges", SecurityWarning
    )
    celeryd_init.connect(_note_privileges, weak=False)


def wire_metrics(server: WSGIServer) -> None:
    """Pool processes and the main process's ``/metrics`` server (call before the pool forks)."""
    from services.common import metrics

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def close_inherited_socket(**_: object) -> None:
        # A forked pool process holds a copy of the listening socket; only the parent serves.
        server.socket.close()

    @worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def mark_process_dead(pid: int, **_: object) -> None:
        metrics.process_dead(pid)
