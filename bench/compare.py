"""``make bench-compare`` / ``python -m bench.compare``: the same load through tlsrelay and Postfix.

Three measurements, one after the other, each with a fresh sink and the same load and client:
tlsrelay (as ``make bench`` runs it), then a private Postfix instance (:mod:`bench.postfix`) with
``smtp_tls_connection_reuse = no`` and with ``= yes``. The client is Postfix's ``smtp-source``
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    add_load_options(parser)
    parser.add_argument(
        "--client",
        choices=("smtp-source", "load"),
        default="smtp-source",
        help="the load generator for all three runs (default %(default)s)",
    )
    args = parser.parse_args(argv)
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
    reports = []
    try:
        for index, label in enumerate(LABELS):
            reports.append(run_one(label, args, workload, root / str(index), args.client))
    except TargetError as exc:
        say(f"{exc} (logs kept in {root})")
        return 1
    lost = sum(r["lost"] for r in reports)
    if args.workdir is None and not lost:
        shutil.rmtree(root, ignore_errors=True)
    if not args.json_only:
        print("\n\n".join(table(r) for r in reports))
        print()
        print(comparison(reports))
    print(json.dumps({"reports": reports, "ratios": ratios(reports)}), flush=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
