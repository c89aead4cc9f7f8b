"""The deliver side's commands: ``tlsrelay queue``, ``tlsrpt`` and ``check`` (wired in by
``services/cli.py``, which resolves the configuration, the Redis client and, for ``check``, the
decision the rules give the domain first).

- ``tlsrelay queue [list] [ID] [--json]``: the deferred deliveries (all, or one message's);
  ``queue retry [ID]`` makes them due now; ``queue bounce ID`` bounces the message's pending
  recipients with a DSN (2 without an ID). For an ID with nothing deferred both say why and
  exit 1: ``unknown message ID``, or ``no deferred delivery for ID (delivered 3m ago)`` (its
  last trace event and when).
- ``tlsrelay tlsrpt build --date YYYY-MM-DD [--out DIR]``: the day's RFC 8460 TLS reports, one
  gzip JSON file per policy domain, mailed through the relay where the domain asks for it
  (``services/deliver/tlsrpt.py``). Exit 0 (also when there was nothing to report).
- ``tlsrelay check DOMAIN [--json]``: a live probe of the destination that sends no mail
  (``services/deliver/check.py``). Exit 0 when the domain can take mail at the mode the rules
  give it, 1 when it cannot.

The delivery modules are imported when a command runs, not when the parser is built: the
command line of every service builds it, and ``prometheus_client`` must not be imported before
the service chose its metrics mode. Redis errors propagate (the caller reports them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.config import Config
from services.common.model import Decision
from services.common.values import format_duration

if TYPE_CHECKING:
    import redis

EXIT_USAGE = 2  # as the command line's usage and configuration errors


def add_queue_arguments(queue: argparse.ArgumentParser) -> None:
    queue.add_argument("action", nargs="?", choices=("list", "retry", "bounce"), default="list")
    queue.add_argument("id", nargs="?", help="message id (required for bounce)")
    queue.add_argument("--json", action="store_true", help="list as one JSON document")


def add_tlsrpt_arguments(tlsrpt: argparse.ArgumentParser) -> None:
    tlsrpt.add_argument("action", choices=("build",))
    tlsrpt.add_argument("--date", required=True, type=_day, help="the UTC day, YYYY-MM-DD")
    tlsrpt.add_argument("--out", default=".", help="directory for the .json.gz reports")


def add_check_arguments(check: argparse.ArgumentParser) -> None:
    check.add_argument("domain", type=_domain, help="the destination domain")
    check.add_argument("--json", action="store_true", help="one JSON document")


def _domain(text: str) -> str:
    from services.common.values import is_hostname

    domain = text.strip().lower().rstrip(".")
    if not is_hostname(domain):
        raise argparse.ArgumentTypeError(f"expected a domain such as example.com, got {text!r}")
    return domain


def _day(text: str) -> str:
    try:
        return datetime.strptime(text, "%Y-%m-%d").strftime("%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def tlsrpt(config: Config, client: redis.Redis, args: argparse.Namespace) -> int:
    """``tlsrelay tlsrpt build --date D``: write the day's reports, queue those with a rua."""
    import asyncio

    from services.deliver import mx
    from services.deliver import tlsrpt as reports

    delivery = config.delivery
    resolver = mx.make_resolver(delivery.dns_servers, timeout=delivery.mta_sts_timeout)
    built = asyncio.run(
        reports.build(client, resolver, config.hostname, args.date, Path(args.out),
                      config.trace_ttl)
    )  # fmt: skip
    for report in built:
        sent = f"mailed to {', '.join(report.mailed_to)}" if report.mailed_to else report.note
        print(f"{report.path}: {sent}")
    print(f"-- {len(built)} reports for {args.date}")
    return 0


def check(
    config: Config, decision: Decision, relay: redis.Redis | None, args: argparse.Namespace
) -> int:
    """``tlsrelay check DOMAIN``: 0 when the domain can take mail at the rules' mode, else 1."""
    import asyncio

    from services.deliver import check as live

    report = asyncio.run(live.run(config, decision, relay))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        ca_name = str(config.delivery.ca_file) if config.delivery.ca_file else "the system CAs"
        print("\n".join(live.text_lines(report, ca_name)))
    return 0 if report.ok else 1


def queue(config: Config, client: redis.Redis, args: argparse.Namespace) -> int:
    """``tlsrelay queue [list|retry|bounce] [ID]``."""
    from services.deliver import queue as deferred

    if args.action == "retry":
        count = deferred.retry(client, args.id)
        if args.id is not None and not count:
            return _nothing_deferred(client, args.id)
        print(f"{count} deferred deliveries made due now")
        return 0
    if args.action == "bounce":
        if not args.id:
            print("tlsrelay queue bounce: a message id is required", file=sys.stderr)
            return EXIT_USAGE
        bounced = deferred.bounce(config, client, args.id)
        if not bounced:
            return _nothing_deferred(client, args.id)
        print(f"bounced {len(bounced)} recipients of {args.id}: {', '.join(bounced)}")
        return 0
    return _print_queue(deferred.deferred(client, args.id), args.json)


def _nothing_deferred(client: redis.Redis, message_id: str) -> int:
    """``queue retry|bounce ID`` found nothing deferred: say why (exit 1)."""
    from services.common import spool

    events = spool.read_trace(client, message_id)
    if not events:
        print(f"unknown message {message_id}", file=sys.stderr)
        return 1
    telling = [e for e in events if e.get("event") not in ("completed", "dsn")] or events
    last = telling[-1]
    ago = format_duration(time.time() - float(last.get("at", time.time())))
    what = f"{last.get('event', '?')} {ago} ago"
    print(f"no deferred delivery for {message_id} ({what})", file=sys.stderr)
    return 1


def _print_queue(entries: list[Any], as_json: bool) -> int:
    now = time.time()
    docs = [e.to_json(now) for e in entries]
    if as_json:
        print(json.dumps({"deferred": docs}, indent=2))
        return 0
    print(f"{'ID':<20} {'AGE':>8} {'NEXT':>8} {'TRIES':>5}  DOMAIN / RECIPIENTS / LAST ERROR")
    for doc in docs:
        age = format_duration(doc["age_seconds"]) if doc["age_seconds"] is not None else "?"
        print(
            f"{doc['id']:<20} {age:>8} {format_duration(doc['next_attempt_in_seconds']):>8} "
            f"{doc['attempts']:>5}  {doc['domain']}: {', '.join(doc['recipients'])}\n"
            f"{'':<46}{doc['last_error']}"
        )
    print(f"-- {len(docs)} deferred deliveries")
    return 0
