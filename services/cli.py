"""The ``tlsrelay`` command.

The composition root, on top of every service: the services import ``common`` and never this
module; it imports them (lazily, for the command that runs) and wires them together.

- ``tlsrelay run --config FILE``: the whole relay on one machine — the embedded Redis (when no
  ``redis_url``), then ``ingest``, ``policy`` and ``deliver`` as child processes. SIGINT/SIGTERM
  stops every child (SIGTERM, then SIGKILL after a grace period) and the embedded Redis. If a child
  dies on its own, the others are stopped and ``run`` exits 1.
- ``tlsrelay ingest|policy|deliver --config FILE``: one service (a Kubernetes container's command).
- ``tlsrelay trace ID [--json]``: the recorded events of one message (without ``redis_url`` it
  finds the embedded server of a running ``tlsrelay run`` with the same config).
- ``tlsrelay queue ...`` and ``tlsrelay tlsrpt build --date YYYY-MM-DD``: the deferred mail and
  the day's RFC 8460 TLS reports (``services/deliver/cli.py``); ``tlsrelay rules check|explain``
  (``services/policy/cli.py``).

``--config`` may be replaced by ``$TLSRELAY_CONFIG``; ``$TLSRELAY_REDIS_URL`` overrides
``redis_url``. A bad configuration prints ``file:line: key: problem`` and exits 2 before anything
listens.

Each service serves Prometheus ``/metrics`` at ``metrics.<service>`` (``null``: not served); a
port that cannot be bound stops the service at start-up with a message naming that key (exit 1).
The Celery workers use prometheus_client's multiprocess mode: :func:`_metrics_mode` sets
``PROMETHEUS_MULTIPROC_DIR`` (``data_dir/metrics/<service>``) before anything imports
prometheus_client, and the main process serves the sum of its pool processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from services.common.config import ENV_REDIS_URL, Config, ConfigError, load_config
from services.common.logs import setup_logging
from services.deliver import cli as deliver_cli

EXIT_CONFIG = 2
SERVICES = ("ingest", "policy", "deliver")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["passwd"]:
        return _passwd(argv[1:])
    if argv[:1] == ["rules"]:  # `tlsrelay rules check|explain`: its own exit codes (bad file → 1)
        from services.policy.cli import main as rules_main

        return rules_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging(args.command if args.command in (*SERVICES, "run") else "cli")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"tlsrelay: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    handler = {
        "run": _run,
        "ingest": _ingest,
        "policy": _worker,
        "deliver": _worker,
        "trace": _trace,
        "queue": _queue,
        "tenants": _tenants,
        "healthcheck": _healthcheck,
        "tlsrpt": _tlsrpt,
    }[args.command]
    return handler(config, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlsrelay", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "run": "run the whole relay locally (embedded Redis when no redis_url)",
        "ingest": "run the SMTP ingest service",
        "policy": "run a policy (classification) worker",
        "deliver": "run a deliver worker",
        "trace": "print the event log of one message",
        "queue": "list deferred mail; 'queue retry [ID]' makes it due now; 'queue bounce ID'",
        "tenants": "list tenants, their domains, regions and where their mail goes",
        "healthcheck": "exit 0 while the named worker's heartbeat is fresh (liveness probe)",
        "tlsrpt": "'tlsrpt build --date YYYY-MM-DD': write (and mail) the day's TLS reports",
    }
    # Listed for --help only: main() hands `rules ...` to services.policy.cli before parsing.
    sub.add_parser("rules", help="check the rules of a config file; explain decisions (see -h)")
    sub.add_parser("passwd", help="print a password hash for tenants.*.users (reads stdin)")
    for name, text in helps.items():
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", help="YAML configuration file (default: $TLSRELAY_CONFIG)")
    sub.choices["trace"].add_argument("id", help="message id, as in '250 2.0.0 Ok: queued as ID'")
    sub.choices["trace"].add_argument("--json", action="store_true", help="one JSON document")
    sub.choices["healthcheck"].add_argument("service", choices=("policy", "deliver"))
    deliver_cli.add_tlsrpt_arguments(sub.choices["tlsrpt"])
    deliver_cli.add_queue_arguments(sub.choices["queue"])
    return parser


def _embedded_url_file(config: Config) -> Path:
    """Where a running ``tlsrelay run`` leaves its embedded server's URL for the tools."""
    return config.data_dir / "redis" / "url"


def _require_redis(config: Config, command: str, tool: bool = False) -> str:
    if not config.redis_url and tool and _embedded_url_file(config).exists():
        return _embedded_url_file(config).read_text().strip()
    if not config.redis_url:
        print(
            f"tlsrelay {command}: redis_url is not configured (set it in the config file or "
            f"${ENV_REDIS_URL}); only 'tlsrelay run' starts an embedded server",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_CONFIG)
    return config.redis_url


def _metrics_mode(config: Config, service: str) -> None:
    """Choose prometheus_client's mode for this process; it reads the variable when it is first
    imported, so this runs before anything imports it. Workers with metrics: multiprocess, in a
    per-service directory (``metrics.serve_workers`` removes earlier runs' files once it listens).
    """
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        os.environ.pop(name, None)
    if service != "ingest" and getattr(config.metrics, service) is not None:
        directory = config.data_dir / "metrics" / service
        directory.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def _metrics_failed(service: str, error: Exception) -> int:
    print(f"tlsrelay {service}: {error}", file=sys.stderr)
    return 1


def _ingest(config: Config, args: argparse.Namespace) -> int:
    _metrics_mode(config, "ingest")
    from services.common import metrics
    from services.ingest.server import serve

    redis_url = _require_redis(config, "ingest")
    if config.metrics.ingest is not None:
        try:
            metrics.serve(config.metrics.ingest, "metrics.ingest", "ingest")
        except metrics.MetricsError as exc:
            return _metrics_failed("ingest", exc)
    serve(config, redis_url)  # prints the listeners, then the metrics URL
    return 0


def _worker(config: Config, args: argparse.Namespace) -> int:
    _metrics_mode(config, args.command)
    from services.common import metrics, queueing
    from services.common.celeryapp import (
        make_app,
        wire_heartbeat,
        wire_liveness,
        wire_metrics,
        wire_watchdog,
        worker_argv,
    )
    from services.common.health import heartbeat_path

    redis_url = _require_redis(config, args.command)
    app = make_app(config, redis_url, args.command)
    if args.command == "policy":
        from services.policy.tasks import PolicyService
        from services.policy.tasks import register as register_policy

        register_policy(app, PolicyService(config, redis_url))
        queue, concurrency = queueing.QUEUE_POLICY, config.policy.concurrency
    else:
        from services.deliver.tasks import DeliverService
        from services.deliver.tasks import register as register_deliver

        register_deliver(app, DeliverService(config, redis_url))
        queue, concurrency = queueing.QUEUE_DELIVER, config.delivery.concurrency
    beat = heartbeat_path(config.data_dir, args.command)
    wire_heartbeat(app, beat, config.celery.heartbeat_interval)
    wire_watchdog(app, redis_url, queue, config.celery.stall_after)
    wire_liveness(redis_url, args.command)
    address = getattr(config.metrics, args.command)
    if address is not None:
        try:
            key = f"metrics.{args.command}"
            wire_metrics(metrics.serve_workers(address, key, args.command, redis_url))
        except metrics.MetricsError as exc:
            return _metrics_failed(args.command, exc)
        print(f"{args.command} metrics on http://{address}/metrics", flush=True)
    print(f"{args.command} worker consuming queue '{queue}' on {redis_url}", flush=True)
    app.worker_main(worker_argv(queue, concurrency, config.hostname))
    return 0


def _trace(config: Config, args: argparse.Namespace) -> int:
    from services.common import spool

    client = spool.connect(_require_redis(config, "trace", tool=True))
    events = spool.read_trace(client, args.id)
    if not events:
        print(f"tlsrelay trace: no events for message {args.id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"id": args.id, "events": events}, indent=2))
        return 0
    for ev in events:
        at = datetime.fromtimestamp(ev.pop("at"), UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        kind = ev.pop("event")
        print(f"{at} {kind:<10} {json.dumps(ev, sort_keys=True)}")
    return 0


def _passwd(argv: Sequence[str]) -> int:
    """``tlsrelay passwd``: read a password (first line of stdin), print its scrypt hash."""
    from services.common.passwords import hash_password

    if argv:
        print("usage: tlsrelay passwd < password-file   (prints the hash)", file=sys.stderr)
        return EXIT_CONFIG
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("tlsrelay passwd: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def _healthcheck(config: Config, args: argparse.Namespace) -> int:
    """``tlsrelay healthcheck policy|deliver``: the worker's heartbeat file is fresh (no Redis)."""
    from services.common.health import check_heartbeat, heartbeat_path

    path = heartbeat_path(config.data_dir, args.service)
    ok, why = check_heartbeat(path, config.celery.heartbeat_max_age)
    print(
        f"{args.service}: {'ok' if ok else 'unhealthy'}: {why}",
        file=sys.stdout if ok else sys.stderr,
    )
    return 0 if ok else 1


def _tenants(config: Config, args: argparse.Namespace) -> int:
    """``tlsrelay tenants``: the directory as loaded (the config loader validated it)."""
    from services.common.tenants import Directory

    directory = Directory(config)
    print(f"region {config.region}; {len(directory.tenants)} tenants")
    for name, tenant in directory.tenants.items():
        endpoint = directory.endpoint(name)
        users = ", ".join(sorted(tenant.users)) or "-"
        print(f"{name}: region {tenant.region}; domains {', '.join(tenant.domains)}")
        print(f"  mail goes to {endpoint.route} ({endpoint.hop}); users {users}; "
              f"rate limit {tenant.rate_limit or '-'}")  # fmt: skip
    return 0


def _tlsrpt(config: Config, args: argparse.Namespace) -> int:
    from services.common import spool
    from services.deliver import cli

    return cli.tlsrpt(config, spool.connect(_require_redis(config, "tlsrpt", tool=True)), args)


def _queue(config: Config, args: argparse.Namespace) -> int:
    from services.common import spool
    from services.deliver import cli

    return cli.queue(config, spool.connect(_require_redis(config, "queue", tool=True)), args)


# --------------------------------------------------------------------------- run


def _run(config: Config, args: argparse.Namespace) -> int:
    from services.common.redisserver import EmbeddedRedis

    embedded = None
    redis_url = config.redis_url
    if redis_url is None:
        embedded = EmbeddedRedis(config.data_dir / "redis", appendfsync=config.redis_appendfsync)
        redis_url = embedded.start()
        _embedded_url_file(config).write_text(redis_url + "\n")
        print(
            f"redis: embedded server at {redis_url} (data in {embedded.data_dir}, "
            f"AOF on, appendfsync {config.redis_appendfsync})"
        )
    print(f"ingest: smtp://{config.ingest.listen}", flush=True)
    for name in SERVICES:
        address = getattr(config.metrics, name)
        print(f"metrics: {name} {f'http://{address}/metrics' if address else 'off'}", flush=True)
    children = _spawn(args.config, redis_url)
    try:
        return _supervise(children, args.config, redis_url)
    finally:
        _stop(children)
        if embedded is not None:
            _embedded_url_file(config).unlink(missing_ok=True)
            embedded.stop()
        print("tlsrelay: stopped", flush=True)


def _spawn(config_path: str | None, redis_url: str) -> dict[str, subprocess.Popen[bytes]]:
    return {name: _start(name, config_path, redis_url) for name in SERVICES}


def _start(name: str, config_path: str | None, redis_url: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "services.cli", name]
    if config_path:
        argv += ["--config", config_path]
    return subprocess.Popen(argv, env={**os.environ, ENV_REDIS_URL: redis_url})


RESTARTS_PER_MINUTE = 5  # more than this and the failure is not transient: stop everything


def _supervise(
    children: dict[str, subprocess.Popen[bytes]], config_path: str | None, redis_url: str
) -> int:
    """Restart a child that dies (as Kubernetes would); give up (exit 1) when one keeps dying."""
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
            if len(recent) > RESTARTS_PER_MINUTE:
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


if __name__ == "__main__":
    sys.exit(main())
