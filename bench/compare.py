"""``make bench-compare`` / ``python -m bench.compare``: the same load through tlsrelay and Postfix.

Three measurements, one after the other, each with a fresh sink and the same load and client:
tlsrelay (as ``make bench`` runs it), then a private Postfix instance (:mod:`bench.postfix`) with
``smtp_tls_connection_reuse = no`` and with ``= yes`` (``--targets`` picks some of them).
``--rounds N`` runs them N times in alternating order and takes each ratio within its round,
then the median: on a machine whose speed drifts within minutes (bench/README.md, "Session 7")
one round's order decides too much. The client is Postfix's ``smtp-source``
(``--client smtp-source``, the default: one domain, in clear, unpaced, no per-message accept
times, so no latency) or this package's load client for all three (``--client load``: latency
too, and every load option). Prints each table, a comparison with the ratios tlsrelay / Postfix
(throughput, CPU per message, TLS handshakes per message), and one JSON line
``{"reports": [...], "ratios": {...}}``.

Postfix is installed with apt when missing (root); when that is impossible the command fails
with exit 2 and says why. Exit 1 when any run lost messages or a process died.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.measure import ClientKind, SinkProcess, measure, report, routes
from bench.postfix import PostfixRelay, PostfixUnavailable, ensure_installed
from bench.relay import TargetError, TlsRelay
from bench.report import comparison, table
from bench.run import add_load_options, overrides_of, say, workload_of
from bench.workload import Workload


def run_one(
    label: str, args: argparse.Namespace, workload: Workload, root: Path, client: ClientKind
) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    with SinkProcess(root / "sink.log", args.rtt, args.sink_chunking == "on") as sink:
        where = routes(workload, sink)
        target: TlsRelay | PostfixRelay
        settings: dict[str, Any] = {}
        if label == "tlsrelay":
            target = TlsRelay(
                root / "tlsrelay",
                where,
                args.policy_workers,
                args.deliver_workers,
                overrides_of(args),
                args.redis_rtt,
            )
            settings = target.settings_summary()
        else:
            target = PostfixRelay(root / "postfix", where, label.endswith("reuse=yes"))
        say(f"starting {label}")
        with target:
            m = measure(
                target, sink, workload, root, client, args.deadline, args.warmup, settings, say
            )
    result = report(m)
    result["label"] = label
    return result


def ratios(reports: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    ours = reports[0]
    out = {}
    for other in reports[1:]:
        out[f"tlsrelay/{other['label']}"] = {
            "e2e_msgs_per_s": _div(ours["e2e_msgs_per_s"], other["e2e_msgs_per_s"]),
            "accept_msgs_per_s": _div(ours["accept_msgs_per_s"], other["accept_msgs_per_s"]),
            "cpu_ms_per_msg": _div(
                ours["cpu_ms_per_msg"]["relay_total"], other["cpu_ms_per_msg"]["relay_total"]
            ),
            "tls_handshakes_per_msg": _div(
                ours["tls_handshakes_per_msg"], other["tls_handshakes_per_msg"]
            ),
        }
    return out


def _div(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


LABELS = ("tlsrelay", "postfix reuse=no", "postfix reuse=yes")
TARGETS = {"tlsrelay": LABELS[0], "reuse=no": LABELS[1], "reuse=yes": LABELS[2]}


def order(labels: Sequence[str], round_: int) -> list[str]:
    """The targets' order in round ``round_`` (from 0): as given, then reversed, and so on —
    so that a machine whose speed drifts during the sitting favours none of them."""
    return list(labels) if round_ % 2 == 0 else list(reversed(labels))


def paired(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """The median over the rounds of each ratio tlsrelay / Postfix, each taken within its round
    (the two runs minutes apart, not a whole sitting)."""
    per_round = [ratios([r[label] for label in LABELS if label in r]) for r in rounds]
    out: dict[str, dict[str, float | None]] = {}
    for key in per_round[0]:
        out[key] = {}
        for field in per_round[0][key]:
            values = [v for r in per_round if (v := r[key][field]) is not None]
            out[key][field] = round(statistics.median(values), 3) if values else None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    add_load_options(parser)
    parser.add_argument(
        "--client",
        choices=("smtp-source", "load"),
        default="smtp-source",
        help="the load generator for all three runs (default %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the targets this many times, in alternating order (A B C, C B A, …): this "
        "machine's speed drifts within minutes, and each round's ratios are taken within it; "
        "the summary is their median (default %(default)s)",
    )
    parser.add_argument(
        "--targets",
        default="tlsrelay,reuse=no,reuse=yes",
        help="which runs, comma-separated, tlsrelay first: tlsrelay, reuse=no, reuse=yes "
        "(default %(default)s)",
    )
    args = parser.parse_args(argv)
    labels = [TARGETS.get(t.strip(), "") for t in args.targets.split(",")]
    if "" in labels or not labels or labels[0] != "tlsrelay" or len(set(labels)) != len(labels):
        parser.error(f"--targets {args.targets!r}: tlsrelay first, then reuse=no and/or reuse=yes")
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    try:
        workload = workload_of(args)
        overrides_of(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        ensure_installed()
    except PostfixUnavailable as exc:
        print(f"bench-compare: {exc}", file=sys.stderr)
        return 2
    root = args.workdir
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="tlsrelay-compare-"))
        root.chmod(0o755)  # Postfix's daemons (user postfix) must reach their directories
    reports: list[dict[str, Any]] = []
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        for round_ in range(args.rounds):
            done: dict[str, dict[str, Any]] = {}
            for label in order(labels, round_):
                where = root / f"{round_}-{LABELS.index(label)}"
                done[label] = run_one(label, args, workload, where, args.client)
                done[label]["round"] = round_
            rounds.append(done)
            reports += [done[label] for label in labels]
    except TargetError as exc:
        say(f"{exc} (logs kept in {root})")
        return 1
    lost = sum(r["lost"] for r in reports)
    if args.workdir is None and not lost:
        shutil.rmtree(root, ignore_errors=True)
    if not args.json_only:
        print("\n\n".join(table(r) for r in reports))
        for round_, done in enumerate(rounds):
            print()
            if args.rounds > 1:
                print(f"round {round_ + 1} (order: {', '.join(order(labels, round_))})")
            print(comparison([done[label] for label in labels]))
    summary = paired(rounds)
    if args.rounds > 1 and not args.json_only:
        print(f"\nmedian of the {args.rounds} rounds' ratios:")
        for key, values in summary.items():
            print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    print(json.dumps({"reports": reports, "ratios": summary}), flush=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
