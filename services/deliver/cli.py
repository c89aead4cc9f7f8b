"""The deliver side's commands: ``tlsrelay queue`` and ``tlsrelay tlsrpt`` (wired in by
``services/cli.py``, which resolves the configuration and the Redis client first).

- ``tlsrelay queue [list] [ID] [--json]``: the deferred deliveries (all, or one message's);
  ``queue retry [ID]`` makes them due now; ``queue bounce ID`` bounces the message's pending
  recipients with a DSN (2 without an ID). For an ID with nothing deferred both say why and
  exit 1: ``unknown message ID``, or ``no deferred delivery for ID (delivered 3m ago)`` (its
  last trace event and when).
- ``tlsrelay tlsrpt build --date YYYY-MM-DD [--out DIR]``: the day's RFC 8460 TLS reports, one
  gzip JSON file per policy domain, mailed through the relay where the domain asks for it
  (``services/deliver/tlsrpt.py``). Exit 0 (also when there was nothing to report).

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

from services.common.config import DEFAULT_SITE, Config
from services.common.values import format_duration, parse_duration

if TYPE_CHECKING:
    import redis

EXIT_USAGE = 2  # as the command line's usage and configuration errors


QUEUE_ACTIONS = ("list", "retry", "bounce", "suspend", "resume", "sites")


def add_queue_arguments(queue: argparse.ArgumentParser) -> None:
    queue.add_argument("action", nargs="?", choices=QUEUE_ACTIONS, default="list")
    queue.add_argument(
        "id", nargs="?", help="message id (required for bounce); DOMAIN|SITE for suspend, resume"
    )
    queue.add_argument("--json", action="store_true", help="list as one JSON document")
    queue.add_argument(
        "--for", dest="duration", type=_duration, help="suspend: for this long (e.g. 2h)"
    )
    queue.add_argument("--reason", default="", help="suspend: why (shown by 'queue sites')")


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 2h, got {text!r}")
    return seconds


def add_tlsrpt_arguments(tlsrpt: argparse.ArgumentParser) -> None:
    tlsrpt.add_argument("action", choices=("build",))
    tlsrpt.add_argument("--date", required=True, type=_day, help="the UTC day, YYYY-MM-DD")
    tlsrpt.add_argument("--out", default=".", help="directory for the .json.gz reports")


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
    if args.action in ("suspend", "resume", "sites"):
        return _shaping(config, client, args)
    return _print_queue(deferred.deferred(client, args.id), args.json)


def _shaping(config: Config, client: redis.Redis, args: argparse.Namespace) -> int:
    """``queue suspend|resume DOMAIN|SITE`` and ``queue sites`` (services/deliver/shaping.py)."""
    from services.deliver import queue as deferred

    if args.action == "sites":
        return _print_sites(deferred.sites(config, client), deferred.suspensions(client), args.json)
    if not args.id:
        print(f"tlsrelay queue {args.action}: a domain or site is required", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "suspend" and args.id.lower() == DEFAULT_SITE:
        print(
            "tlsrelay queue suspend: 'default' is the label of every site without an entry of "
            "its own; name a domain, a configured site or a site id (tlsrelay queue sites)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.action == "suspend":
        doc = deferred.suspend(config, client, args.id, args.duration, args.reason)
        until = f"for {format_duration(args.duration)}" if args.duration else "until resumed"
        print(f"{args.id} suspended {until} (site label {doc['label']})")
        return 0
    was, due = deferred.resume(client, args.id)
    if not was and not due:
        print(f"{args.id} was not suspended", file=sys.stderr)
        return 1
    print(f"{args.id} resumed: {due} waiting deliveries made due now")
    return 0


def _print_sites(states: list[Any], suspensions: dict[str, Any], as_json: bool) -> int:
    docs = [s.to_json() for s in states]
    if as_json:
        print(json.dumps({"sites": docs, "suspensions": suspensions}, indent=2))
        return 0
    print(f"{'SITE':<28} {'LABEL':<12} {'CONN':>9} {'RATE':>10} {'BACKOFF':>7} {'WAIT':>5}  STATE")
    for d in docs:
        conns = f"{d['connections']}/{d['limit']}"
        rate = f"{d['messages_this_minute'] or 0}/min" if d["rate"] else "-"
        stop = d["suspended"]
        state = (
            "ok" if not stop else "suspended" + (f": {stop['reason']}" if stop["reason"] else "")
        )
        print(
            f"{d['site'][:28]:<28} {d['label'][:12]:<12} {conns:>9} {rate:>10} "
            f"{d['backoff_steps']:>7} {d['waiting']:>5}  {state}"
        )
    for target, stop in sorted(suspensions.items()):
        until = stop.get("until")
        left = f"for {format_duration(float(until) - time.time())}" if until else "until resumed"
        why = f": {stop['reason']}" if stop.get("reason") else ""
        print(f"suspended {target} {left}{why}")
    print(f"-- {len(docs)} sites")
    return 0


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


def _why(doc: dict[str, Any]) -> str:
    """The last line of a queue entry: throttled (waiting for a shaping limit, not failed), or
    the last error."""
    if doc.get("throttled"):
        after = f"; last error: {doc['last_error']}" if doc["last_error"] else ""
        return f"throttled ({doc['throttled']}): waiting for a traffic-shaping limit{after}"
    return str(doc["last_error"])


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
            f"{'':<46}{_why(doc)}"
        )
    print(f"-- {len(docs)} deferred deliveries")
    return 0
