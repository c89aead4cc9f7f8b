"""``make bench`` / ``python -m bench.run``: the throughput and latency of tlsrelay on this machine.

Starts a sink (:mod:`bench.sink`), tlsrelay with an embedded Redis (:mod:`bench.relay`), sends
the load (:mod:`bench.load`), waits for every delivery and prints a readable table and, as the
last line of stdout, one JSON document (:func:`bench.measure.report`). ``--json-only`` prints the
JSON line alone. Progress goes to stderr.

Exit status: 0 when every message arrived; 1 when some did not arrive before the deadline
(``lost`` > 0) or a relay process died; 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.measure import SinkProcess, measure, report, routes
from bench.relay import TargetError, TlsRelay
from bench.report import table
from bench.workload import Workload


def add_load_options(parser: argparse.ArgumentParser) -> None:
    w = Workload()
    add = parser.add_argument
    add("--messages", type=int, default=w.messages, help="messages to send (default %(default)s)")
    add("--size", type=int, default=w.size, help="bytes per message (default %(default)s)")
    add("--sessions", type=int, default=w.sessions, help="concurrent client sessions")
    add("--recipients", type=int, default=w.recipients, help="recipients per message")
    add("--domains", type=int, default=w.domains, help="destination domains")
    add(
        "--tls-mix",
        type=float,
        default=w.tls_mix,
        help="share of destination domains whose sink offers STARTTLS (default %(default)s)",
    )
    add(
        "--rate",
        type=float,
        default=w.rate,
        help="messages/s offered by the client; 0 = as fast as possible (default)",
    )
    add("--client-tls", action="store_true", help="the client uses STARTTLS towards the relay")
    add("--policy-workers", type=int, default=None, help="policy.concurrency (default: 2)")
    add("--deliver-workers", type=int, default=None, help="delivery.concurrency (default: 2)")
    add(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tlsrelay setting for this run, e.g. delivery.concurrency=8 (value in YAML); "
        "repeatable",
    )
    add(
        "--deadline",
        type=float,
        default=300.0,
        help="seconds after the client finished by which every message must have arrived",
    )
    add(
        "--rtt",
        type=parse_rtt,
        default=0.0,
        metavar="TIME",
        help="round-trip time between the relay and the sink, e.g. 40ms (a user-space delay "
        "line, bench/delayline.py; default 0: plain loopback)",
    )
    add(
        "--redis-rtt",
        type=parse_rtt,
        default=0.0,
        metavar="TIME",
        help="round-trip time between the relay's services and its Redis, e.g. 2ms (a delay "
        "line, bench/delayline.py; default 0: plain loopback)",
    )
    add(
        "--sink-chunking",
        choices=("on", "off"),
        default="on",
        help="the sink offers CHUNKING (RFC 3030), as Postfix and the big mailbox providers do "
        "(default on; off: DATA only, as the sink before session 6)",
    )
    add("--warmup", type=int, default=20, help="messages sent and delivered before measuring")
    add("--workdir", type=Path, default=None, help="keep logs and data here (default: a temp dir)")
    add("--json-only", action="store_true", help="print only the JSON line")


def parse_rtt(text: str) -> float:
    """``40ms``, ``0.04s`` or ``40`` (milliseconds) → seconds."""
    value = text.strip().lower()
    try:
        if value.endswith("ms"):
            seconds = float(value[:-2]) / 1000
        elif value.endswith("s"):
            seconds = float(value[:-1])
        else:
            seconds = float(value) / 1000
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (e.g. 40ms)") from None
    if not 0 <= seconds <= 10:
        raise argparse.ArgumentTypeError(f"--rtt {text!r}: between 0 and 10 s")
    return seconds


def workload_of(args: argparse.Namespace) -> Workload:
    return Workload(
        messages=args.messages,
        size=args.size,
        sessions=args.sessions,
        recipients=args.recipients,
        domains=args.domains,
        tls_mix=args.tls_mix,
        rate=args.rate,
        client_tls=args.client_tls,
    )


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """``--set a.b=VALUE`` options as ``{"a.b": value}`` (VALUE parsed as YAML)."""
    out = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def run_tlsrelay(args: argparse.Namespace, workload: Workload, root: Path) -> dict[str, object]:
    root.mkdir(parents=True, exist_ok=True)
    with SinkProcess(root / "sink.log", args.rtt, args.sink_chunking == "on") as sink:
        relay = TlsRelay(
            root / "tlsrelay",
            routes(workload, sink),
            args.policy_workers,
            args.deliver_workers,
            overrides_of(args),
            args.redis_rtt,
        )
        say(f"starting tlsrelay (logs in {relay.root})")
        with relay:
            m = measure(
                relay,
                sink,
                workload,
                root,
                "load",
                args.deadline,
                args.warmup,
                relay.settings_summary(),
                say,
            )
    return {**report(m), "sink_chunking": args.sink_chunking}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    add_load_options(parser)
    args = parser.parse_args(argv)
    try:
        workload = workload_of(args)
        overrides_of(args)
    except ValueError as exc:
        parser.error(str(exc))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="tlsrelay-bench-"))
    try:
        result = run_tlsrelay(args, workload, root)
    except TargetError as exc:
        say(f"{exc} (logs kept in {root})")
        return 1
    if args.workdir is None and not result["lost"]:
        shutil.rmtree(root, ignore_errors=True)
    if not args.json_only:
        print(table(result))
    print(json.dumps(result), flush=True)
    if result["lost"]:
        say(f"{result['lost']} messages did not arrive within the deadline (logs in {root})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
