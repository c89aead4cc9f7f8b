"""The readable table of a report (:func:`bench.measure.report`), and of a comparison."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def table(r: dict[str, Any]) -> str:
    rate = f"{r['rate']:g} msg/s offered" if r["rate"] else "as fast as possible"
    lat = r["latency_ms"]
    cpu = r["cpu_ms_per_msg"]
    services = [k for k in cpu if k not in ("relay_total", "sink", "client")]
    workers = ", ".join(
        f"{k.split('_')[0]} {r[k]}" for k in ("policy_workers", "deliver_workers") if k in r
    )
    lines = [
        f"{r['target']}: {r['messages']} messages × {r['size']} B, {r['sessions']} sessions, "
        f"{r['recipients']} rcpt/msg, {r['domains']} domain(s), TLS share {r['tls_mix']:g}, "
        f"{rate}, client {r['client']}{' (STARTTLS)' if r['client_tls'] else ''}"
        + (f", RTT to the sink {r['rtt_ms']:g} ms" if r.get("rtt_ms") else "")
        + (f", RTT to Redis {r['redis_rtt_ms']:g} ms" if r.get("redis_rtt_ms") else "")
        + (f"; workers: {workers}" if workers else "")
        + "".join(f"; {key}={value}" for key, value in r.get("settings", {}).items()),
        f"  end-to-end          {r['e2e_msgs_per_s']:>9.1f} msg/s  "
        f"(first accept → last arrival {r['e2e_seconds']:.1f} s)",
        f"  accept at ingest    {r['accept_msgs_per_s']:>9.1f} msg/s",
        f"  latency accept→sink p50 {_ms(lat['p50'])}, p95 {_ms(lat['p95'])}, "
        f"p99 {_ms(lat['p99'])}, max {_ms(lat['max'])}",
        f"  TLS handshakes/msg  {r['tls_handshakes_per_msg']:>9.3f}  (resumed "
        f"{r['tls_resumed_per_msg']:.3f}; sink connections/msg {r['sink_connections_per_msg']:.3f};"
        f" TLS deliveries {r['tls_delivery_share']:.0%})",
        f"  delivered / lost    {r['delivered']:>9} / {r['lost']}  (refused {r['refused']}, "
        f"duplicates {r['duplicates']})",
        "  CPU ms/msg          "
        + ", ".join(f"{k} {cpu[k]:.2f}" for k in services)
        + f"  = {cpu['relay_total']:.2f}   (sink {cpu['sink']:.2f}, client {cpu['client']:.2f})",
    ]
    lines.append(f"  sessions at sink    {r.get('sink_sessions_peak', 0):>9}  (most open at once)")
    commands = r.get("redis_commands_per_msg")
    if commands:
        top = ", ".join(f"{c} {n:g}" for c, n in list(commands["by_command"].items())[:8])
        lines.append(f"  Redis commands/msg  {commands['total']:>9.1f}  ({top}, …)")
        lines.append(
            f"  Redis scripts/msg   {commands.get('scripts', 0):>9.3f}  (EVAL/EVALSHA: one round"
            " trip each)"
        )
        if commands.get("round_trips") is not None:
            lines.append(
                f"  Redis round trips   {commands['round_trips']:>9.2f}  per message (requests"
                " read: a pipeline or transaction is one)"
            )
    busy = r["other_load_cores"]
    note = "  ← ≥ 0.1: was the machine quiet? (README: other load)" if busy >= 0.1 else ""
    lines.append(f"  other load          {busy:>9.2f} cores (not in the processes measured){note}")
    for index, (name, procs) in enumerate(r["peak_rss_mb"].items()):
        label = "  peak RSS MB         " if index == 0 else " " * 22
        lines.append(f"{label}{name}: {_memory(procs)}")
    return "\n".join(lines)


def _memory(procs: list[dict[str, Any]]) -> str:
    """``main 63, 4× python 64`` (largest peak shown for a group of same-named processes)."""
    groups: dict[str, list[float]] = {}
    for proc in procs:
        groups.setdefault(proc["role"], []).append(proc["mb"])
    parts = [
        f"{role} {max(mbs):.0f}" if len(mbs) == 1 else f"{len(mbs)}× {role} ≤{max(mbs):.0f}"
        for role, mbs in groups.items()
    ]
    return ", ".join(parts) or "-"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}"


def comparison(reports: Sequence[dict[str, Any]]) -> str:
    """One row per target; the ratio tlsrelay / each Postfix run."""
    head = (
        f"{'target':<28}{'e2e msg/s':>10}{'accept/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'TLS hs/msg':>11}{'conn/msg':>9}{'sessions':>9}{'CPU ms/msg':>11}{'lost':>6}"
    )
    rows = [head, "-" * len(head)]
    for r in reports:
        lat = r["latency_ms"]
        rows.append(
            f"{r['label']:<28}{r['e2e_msgs_per_s']:>10.1f}{r['accept_msgs_per_s']:>10.1f}"
            f"{_num(lat['p50']):>9}{_num(lat['p99']):>9}{r['tls_handshakes_per_msg']:>11.3f}"
            f"{r['sink_connections_per_msg']:>9.3f}{r.get('sink_sessions_peak', 0):>9}"
            f"{r['cpu_ms_per_msg']['relay_total']:>11.2f}"
            f"{r['lost']:>6}"
        )
    ours = reports[0]
    for other in reports[1:]:
        throughput = ratio(ours["e2e_msgs_per_s"], other["e2e_msgs_per_s"])
        cpu = ratio(ours["cpu_ms_per_msg"]["relay_total"], other["cpu_ms_per_msg"]["relay_total"])
        handshakes = ratio(ours["tls_handshakes_per_msg"], other["tls_handshakes_per_msg"])
        rows.append(
            f"{ours['label']} / {other['label']}: throughput {throughput}, "
            f"CPU per message {cpu}, TLS handshakes per message {handshakes}"
        )
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
