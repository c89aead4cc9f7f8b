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
- ``tlsrelay posture [--days 7] [--domain GLOB] [--top N] [--json | --csv]``: deliveries per
  destination domain over the last days, as recorded (``services/deliver/posture.py``): how they
  rode TLS and how many would have been deferred under ``enforced`` / ``verified``; sorted by
  clear-text volume. Exit 0.
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
from services.common.deliveryconfig import DEFAULT_SITE
from services.common.model import Decision
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


def add_check_arguments(check: argparse.ArgumentParser) -> None:
    check.add_argument("domain", type=_domain, help="the destination domain")
    check.add_argument("--json", action="store_true", help="one JSON document")


def add_posture_arguments(posture: argparse.ArgumentParser) -> None:
    posture.add_argument("--days", type=_positive, default=7, help="the last N UTC days (7)")
    posture.add_argument(
        "--domain", metavar="GLOB", help="only domains matching (e.g. *.bank.example)"
    )
    posture.add_argument("--top", type=_positive, metavar="N", help="only the first N domains")
    output = posture.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON document")
    output.add_argument("--csv", action="store_true", help="CSV, one row per domain")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


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
    from services.deliver import checkreport

    report = asyncio.run(live.run(config, decision, relay))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        ca_name = str(config.delivery.ca_file) if config.delivery.ca_file else "the system CAs"
        print("\n".join(checkreport.text_lines(report, ca_name)))
    return 0 if report.ok else 1


def posture(config: Config, client: redis.Redis, args: argparse.Namespace) -> int:
    """``tlsrelay posture``: the recorded deliveries per domain, with the what-if columns."""
    import csv
    from datetime import UTC, datetime

    from services.deliver import posture as store

    days = store.window(args.days, datetime.now(UTC).date())
    rows = store.select(store.read(client, days), args.domain, args.top)
    retention = config.posture.retention
    if args.json:
        doc = {"days": days, "retention_days": retention, "domains": [r.to_json() for r in rows]}
        print(json.dumps(doc, indent=2))
    elif args.csv:
        fields = [*rows[0].to_json()] if rows else ["domain", *store.COUNTS]
        writer = csv.DictWriter(sys.stdout, fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.to_json().items()})
    else:
        print("\n".join(_posture_lines(rows, days, retention)))
    return 0


def _cell(value: Any) -> Any:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return value


def _posture_lines(rows: list[Any], days: list[str], retention: int) -> list[str]:
    kept = f"; counts are kept {retention} days" if len(days) > retention else ""
    lines = [
        f"deliveries {days[0]} .. {days[-1]} (UTC, {len(days)} days{kept}), most clear text first",
        f"{'DOMAIN':<32} {'DELIV':>7} {'TLS%':>5} {'VERIF%':>6} {'CLEAR':>6}  "
        f"{'IF-ENFORCED':>11} {'IF-VERIFIED':>11} {'UNKNOWN':>7}  VERSIONS / WHY",
    ]
    for row in rows:
        doc = row.to_json()
        clear = {k[6:]: doc[k] for k in doc if k.startswith("clear_") and doc[k]}
        versions = " ".join(f"{k}:{v}" for k, v in doc["versions"].items())
        parts = [f"clear {_pairs(clear)}"] if clear else []
        unverifiable = {k: v for k, v in doc["why_verified"].items() if k != "clear"}
        if unverifiable:
            parts.append(f"unverifiable {_pairs(unverifiable)}")
        why = "; ".join(parts)
        lines.append(
            f"{row.domain:<32} {doc['deliveries']:>7} {doc['share_tls']:>5.0%} "
            f"{doc['share_tls_verified']:>6.0%} {doc['clear']:>6}  "
            f"{doc['would_defer_enforced']:>11} {doc['would_defer_verified']:>11} "
            f"{doc['verified_unknown']:>7}  {versions}{' / ' + why if why else ''}"
        )
    lines.append(f"-- {len(rows)} domains")
    return lines


def _pairs(counts: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items())


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
