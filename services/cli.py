"""The ``tlsrelay`` command.

The composition root, on top of every service: the services import ``common`` and never this
module; it imports them (lazily, for the command that runs) and wires them together.

- ``tlsrelay run --config FILE``: the whole relay on one machine (:mod:`services.supervisor`):
  a lock on ``data_dir``, the embedded Redis (when no ``redis_url``), then ``ingest``, ``policy``
  and ``deliver`` as child processes, restarted when they die. SIGINT/SIGTERM stops every child
  (warm shutdown), then the embedded Redis.
- ``tlsrelay ingest|policy|deliver --config FILE``: one service (a Kubernetes container's command).
- ``tlsrelay trace ID [--json]``: the recorded events of one message (without ``redis_url`` it
  finds the embedded server of a running ``tlsrelay run`` with the same config).
- ``tlsrelay queue ...`` and ``tlsrelay tlsrpt build --date YYYY-MM-DD``: the deferred mail and
  the day's RFC 8460 TLS reports (``services/deliver/cli.py``); ``tlsrelay rules check|explain``
  (``services/policy/cli.py``).
- ``tlsrelay posture [--days 7] [--domain GLOB] [--top N] [--json | --csv]``: deliveries per
  destination domain as recorded, with what would have been deferred under a stricter mode.
- ``tlsrelay check DOMAIN [--json]``: a live probe of a destination, no mail sent; the decision
  the rules give the domain comes from the policy service's ``decide`` and is handed to the
  deliver side's check (``services/deliver/check.py``). Exit 0 when the domain can take mail at
  that mode, 1 when it cannot, 2 on usage errors. Redis is optional: when the relay's is
  reachable, the "TLS broken" memory is read from it.

``--config`` may be replaced by ``$TLSRELAY_CONFIG``; ``$TLSRELAY_REDIS_URL`` overrides
``redis_url``. A bad configuration prints ``file:line: key: problem`` and exits 2 before anything
listens.

Every command that runs a service (``run``, ``ingest``, ``policy``, ``deliver``) first checks
that Redis never evicts (``maxmemory-policy noeviction``, services/common/eviction.py); another
policy stops it with a message naming the setting (exit 1) before it serves anything.

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
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from services import supervisor
from services.common.cliargs import parse_anywhere
from services.common.config import ENV_CONFIG, ENV_REDIS_URL, Config, ConfigError, load_config
from services.common.logs import setup_logging
from services.deliver import cli as deliver_cli

EXIT_CONFIG = 2
SERVICES = ("ingest", "policy", "deliver")


def main(argv: Sequence[str] | None = None) -> int:
    """The command; a reader that stops early (``trace --json ID | head``) ends it quietly."""
    try:
        code = _main(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()
    except BrokenPipeError:
        # As Unix tools do: no traceback; stdout pointed at /dev/null so the flush at exit
        # does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


def _main(argv: list[str]) -> int:
    if argv[:1] == ["passwd"]:
        return _passwd(argv[1:])
    if argv[:1] == ["rules"]:  # `tlsrelay rules check|explain`: its own exit codes (bad file → 1)
        from services.policy.cli import main as rules_main

        return rules_main(argv[1:])
    parser = _parser()
    args = parse_anywhere(parser, _commands(parser), argv)
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
        "check": _check,
        "posture": _posture,
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
        "queue": "list deferred mail; 'queue retry [ID]' makes it due now; 'queue bounce ID'; "
        "'queue suspend|resume DOMAIN|SITE', 'queue sites' (traffic shaping)",
        "tenants": "list tenants, their domains, regions and where their mail goes",
        "healthcheck": "exit 0 while the named worker's heartbeat is fresh (liveness probe)",
        "tlsrpt": "'tlsrpt build --date YYYY-MM-DD': write (and mail) the day's TLS reports",
        "check": "probe a destination live (no mail sent): TLS facts and a verdict per mode",
        "posture": "deliveries per destination domain as recorded: TLS, and what would defer",
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
    deliver_cli.add_check_arguments(sub.choices["check"])
    deliver_cli.add_posture_arguments(sub.choices["posture"])
    parser.set_defaults(commands=sub.choices)
    return parser


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    commands: dict[str, argparse.ArgumentParser] = parser.get_default("commands")
    return commands


def _require_redis(config: Config, command: str, tool: bool = False) -> str:
    url_file = supervisor.embedded_url_file(config)
    if not config.redis_url and tool and url_file.exists():
        return url_file.read_text().strip()
    if not config.redis_url:
        where = (
            f"no 'tlsrelay run' is running with data_dir {supervisor.shown(config.data_dir)}"
            if tool
            else "only 'tlsrelay run' starts an embedded server"
        )
        print(
            f"tlsrelay {command}: redis_url is not configured and {where} (config: "
            f"{config.source or 'none'}); pass --config FILE of the running relay (or set "
            f"${ENV_CONFIG}=FILE), or set redis_url in it or ${ENV_REDIS_URL}",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_CONFIG)
    return config.redis_url


def _refuse_evicting(redis_url: str, service: str) -> int | None:
    """Exit status 1 (message printed) when Redis may evict keys; None when it may be used."""
    from services.common import eviction, spool

    client = spool.connect(redis_url)
    try:
        eviction.check(client)
    except eviction.UnfitRedis as exc:
        print(f"tlsrelay {service}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return None


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


def _listen_failed(service: str, error: Exception) -> int:
    """A listening address (SMTP or /metrics) cannot be bound: say which key, exit 1."""
    print(f"tlsrelay {service}: {error}", file=sys.stderr)
    return 1


def _ingest(config: Config, args: argparse.Namespace) -> int:
    _metrics_mode(config, "ingest")
    from services.common import metrics
    from services.ingest.server import ListenError, serve

    redis_url = _require_redis(config, "ingest")
    if (refused := _refuse_evicting(redis_url, "ingest")) is not None:
        return refused
    if config.metrics.ingest is not None:
        try:
            metrics.serve(config.metrics.ingest, "metrics.ingest", "ingest")
        except metrics.MetricsError as exc:
            return _listen_failed("ingest", exc)
    try:
        serve(config, redis_url)  # prints the listeners, then the metrics URL
    except ListenError as exc:
        return _listen_failed("ingest", exc)
    return 0


def _worker(config: Config, args: argparse.Namespace) -> int:
    _metrics_mode(config, args.command)
    from services.common import metrics, queueing
    from services.common.celeryapp import (
        make_app,
        run_worker,
        wire_heartbeat,
        wire_liveness,
        wire_metrics,
        wire_privilege_note,
        wire_watchdog,
    )
    from services.common.health import heartbeat_path

    redis_url = _require_redis(config, args.command)
    if (refused := _refuse_evicting(redis_url, args.command)) is not None:
        return refused
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
    wire_privilege_note()
    address = getattr(config.metrics, args.command)
    if address is not None:
        try:
            key = f"metrics.{args.command}"
            wire_metrics(metrics.serve_workers(address, key, args.command, redis_url))
        except metrics.MetricsError as exc:
            return _listen_failed(args.command, exc)
        print(f"{args.command} metrics on http://{address}/metrics", flush=True)
    print(f"{args.command} worker consuming queue '{queue}' on {redis_url}", flush=True)
    run_worker(app, queue, concurrency, config.hostname)
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


def _check(config: Config, args: argparse.Namespace) -> int:
    from services.deliver import cli
    from services.policy.cli import plain_decision

    return cli.check(config, plain_decision(config, args.domain), _optional_redis(config), args)


def _optional_redis(config: Config) -> Any:
    """The relay's Redis when one is configured or running (embedded), else None."""
    from services.common import spool

    url_file = supervisor.embedded_url_file(config)
    url = config.redis_url or (url_file.read_text().strip() if url_file.exists() else None)
    return spool.connect(url) if url else None


def _posture(config: Config, args: argparse.Namespace) -> int:
    from services.common import spool
    from services.deliver import cli

    return cli.posture(config, spool.connect(_require_redis(config, "posture", tool=True)), args)


def _queue(config: Config, args: argparse.Namespace) -> int:
    from services.common import spool
    from services.deliver import cli

    return cli.queue(config, spool.connect(_require_redis(config, "queue", tool=True)), args)


def _run(config: Config, args: argparse.Namespace) -> int:
    from services import supervisor

    return supervisor.run(config, args.config)


if __name__ == "__main__":
    sys.exit(main())
