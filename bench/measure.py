"""One measurement: a load through a relay (tlsrelay or Postfix) into the sinks, and its numbers.

Steps (:func:`measure`):

1. Warm-up: ``warmup`` messages with the load client, waited for at the sink (the workers have
   imported everything, opened their Redis connections, built their TLS contexts).
2. Snapshot: CPU of every measured process tree (:mod:`bench.procstat`), the sink's counters.
3. The load: :mod:`bench.load` (accept time and queue id per message) or Postfix's
   ``smtp-source`` (no per-message times: the window starts when it is started).
4. Wait until every delivery has arrived at a sink, or the deadline (seconds after the client
   finished) has passed.
5. Snapshot again; peak RSS of every process; the sink's arrivals (matched by ``X-Bench-Id``,
   or ``Message-Id`` for ``smtp-source``).

Failure: :class:`bench.relay.TargetError` when a relay process dies or a client fails to run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import redis

from bench import procstat
from bench.env import REPO, python_env
from bench.relay import REDIS_LINE, TargetError
from bench.sink import Arrival
from bench.workload import Workload

ClientKind = Literal["load", "smtp-source"]
SMTP_SOURCE = "/usr/sbin/smtp-source"
POLL = 0.05  # seconds between looks at the sink's counters
NOT_RELAY = ("sink", REDIS_LINE)  # measured, but not the relay's CPU (delay lines are in both)


class Target(Protocol):
    name: str
    smtp_port: int

    def processes(self) -> dict[str, int]: ...

    def check_alive(self) -> None: ...


# --------------------------------------------------------------------------- the sink


class SinkProcess:
    """``python -m bench.sink`` as a child process, driven over its stdin/stdout."""

    def __init__(self, log: Path, rtt: float = 0.0, chunking: bool = True) -> None:
        self.log = log
        self.rtt = rtt  # seconds between the relay and the sink (bench/delayline.py); 0: none
        self.chunking = chunking  # the sink offers CHUNKING (RFC 3030)
        self.proc: subprocess.Popen[str] | None = None
        self.tls_port = self.plain_port = self.pid = 0

    def __enter__(self) -> SinkProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.sink", str(self.rtt)]
                + ([] if self.chunking else ["--no-chunking"]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO,
                env=python_env(),
            )
        hello = self._line()
        self.tls_port, self.plain_port, self.pid = (
            hello["tls_port"],
            hello["plain_port"],
            hello["pid"],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _line(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise TargetError(f"the sink exited; see {self.log}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def stats(self) -> dict[str, int]:
        return {key: int(value) for key, value in self._ask("stats").items()}

    def mark(self) -> dict[str, int]:
        """Stats, and the peak of open sessions counted from now on."""
        return {key: int(value) for key, value in self._ask("mark").items()}

    def arrivals(self, path: Path) -> list[Arrival]:
        self._ask(f"dump {path}")
        with path.open() as lines:
            rows = [json.loads(line) for line in lines]
        return [Arrival(ident, at, tls, tuple(domains)) for ident, at, tls, domains in rows]


def routes(workload: Workload, sink: SinkProcess) -> dict[str, str]:
    """Each benchmark domain → the TLS sink or the plain one (per ``tls_mix``)."""
    tls = workload.tls_domains
    return {
        domain: f"127.0.0.1:{sink.tls_port if domain in tls else sink.plain_port}"
        for domain in workload.domain_names
    }


# --------------------------------------------------------------------------- clients


@dataclass
class ClientResult:
    started: float
    finished: float
    cpu_s: float
    accepted: dict[str, float]  # bench id → accept time (empty for smtp-source)
    queue_ids: int  # accepted messages whose 250 reply named a queue id
    failed: list[tuple[str, str]] = field(default_factory=list)
    sent: int = 0  # messages the client says it sent successfully


def run_load_client(
    target: Target, workload: Workload, run_id: str, out: Path, log: IO[bytes]
) -> ClientResult:
    argv = [
        sys.executable,
        "-m",
        "bench.load",
        "--port",
        str(target.smtp_port),
        "--workload",
        json.dumps(workload.to_json()),
        "--run-id",
        run_id,
        "--out",
        str(out),
    ]
    code = subprocess.run(
        argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO, env=python_env()
    ).returncode
    if code != 0:
        raise TargetError(f"the load client failed (exit {code})")
    doc = json.loads(out.read_text())
    accepted = {ident: at for ident, at, _ in doc["accepted"]}
    return ClientResult(
        started=doc["started"],
        finished=doc["finished"],
        cpu_s=doc["cpu_s"],
        accepted=accepted,
        queue_ids=sum(1 for _, _, qid in doc["accepted"] if qid),
        failed=[(ident, why) for ident, why in doc["failed"]],
        sent=len(accepted),
    )


def run_smtp_source(target: Target, workload: Workload, log: IO[bytes]) -> ClientResult:
    """Postfix's test generator: ``-d`` keeps each session for many messages; no STARTTLS, no
    PIPELINING, one destination domain (recipients ``1r0@…``, ``2r0@…``: ``-r``)."""
    if workload.domains != 1 or workload.client_tls or workload.rate:
        raise TargetError("smtp-source sends to one domain, in clear, unpaced: use --client load")
    header_bytes = 160  # From, To, Date, Message-Id, Subject as smtp-source writes them
    argv = [
        SMTP_SOURCE,
        "-d",
        "-s",
        str(workload.sessions),
        "-m",
        str(workload.messages),
        "-l",
        str(max(workload.size - header_bytes, 1)),
        "-r",
        str(workload.recipients),
        "-f",
        "bench@load.bench.test",
        "-t",
        "r0@d0.bench.test",
        "-M",
        "load.bench.test",
        "-S",
        "bench",
        f"127.0.0.1:{target.smtp_port}",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    code = subprocess.run(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL).returncode
    finished = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    failed = [] if code == 0 else [("smtp-source", f"exit {code}")]
    sent = workload.messages if code == 0 else 0
    return ClientResult(started, finished, cpu, {}, 0, failed, sent)


# --------------------------------------------------------------------------- measuring


@dataclass
class Snapshot:
    cpu: dict[str, float]  # per measured process tree
    sink: dict[str, int]
    machine: float  # busy CPU seconds of the whole machine
    own: float  # CPU seconds of this (orchestrating) process
    at: float
    redis: dict[str, int] = field(default_factory=dict)  # calls per command (INFO commandstats)


def snapshot(
    pids: dict[str, int], sink: SinkProcess, target: Target | None = None, mark: bool = False
) -> Snapshot:
    cpu = {n: procstat.tree_cpu(p) for n, p in pids.items()}
    times = os.times()
    stats = sink.mark() if mark else sink.stats()
    commands = redis_commands(target) if target is not None else {}
    return Snapshot(
        cpu,
        stats,
        procstat.machine_busy(),
        times.user + times.system,
        time.monotonic(),
        commands,
    )


READS = "(reads)"  # redis_commands' entry for INFO stats total_reads_processed


def redis_commands(target: Target) -> dict[str, int]:
    """Calls per Redis command so far (``INFO commandstats``) of a target with a Redis (its
    ``redis_url``); empty for one without (Postfix)."""
    url = getattr(target, "redis_url", None)
    if not url:
        return {}
    client = redis.Redis.from_url(url)
    try:
        info = client.info("commandstats")
        reads = client.info("stats").get("total_reads_processed")
    finally:
        client.close()
    calls = {
        name.removeprefix("cmdstat_"): int(stats["calls"])
        for name, stats in info.items()
        if isinstance(stats, dict) and "calls" in stats
    }
    if reads is not None:  # requests read from client sockets: round trips (pipelines count 1)
        calls[READS] = int(reads)
    return calls


def wait_arrived(
    sink: SinkProcess, target: Target, base: int, count: int, deadline: float
) -> float | None:
    """Wait until the sink has ``count`` more messages than ``base``; the time, or None."""
    while time.monotonic() < deadline:
        if sink.stats()["messages"] - base >= count:
            return time.monotonic()
        target.check_alive()
        time.sleep(POLL)
    return None


def warm_up(target: Target, sink: SinkProcess, workload: Workload, count: int, root: Path) -> None:
    if count <= 0:
        return
    small = replace(workload, messages=count, sessions=min(count, workload.sessions), rate=0.0)
    base = sink.stats()["messages"]
    with (root / "warmup.log").open("ab") as log:
        result = run_load_client(target, small, "warmup", root / "warmup.json", log)
    if result.failed:
        raise TargetError(f"warm-up: {len(result.failed)} messages refused: {result.failed[0]}")
    if wait_arrived(sink, target, base, small.deliveries, time.monotonic() + 120) is None:
        raise TargetError("warm-up: the messages did not arrive within 120 s")


@dataclass
class Measurement:
    """Raw material of a report."""

    target: str
    client: ClientKind
    workload: Workload
    settings: dict[str, Any]
    result: ClientResult
    before: Snapshot
    after: Snapshot
    rss: dict[str, list[procstat.Memory]]
    arrivals: list[Arrival]
    complete: bool  # every delivery arrived before the deadline
    rtt: float = 0.0  # seconds between the relay and the sink


def measure(
    target: Target,
    sink: SinkProcess,
    workload: Workload,
    root: Path,
    client: ClientKind = "load",
    deadline: float = 300.0,
    warmup: int = 20,
    settings: dict[str, Any] | None = None,
    progress: Callable[[str], None] = lambda text: None,
) -> Measurement:
    progress(f"{target.name}: warming up ({warmup} messages)")
    warm_up(target, sink, workload, warmup, root)
    pids = {**target.processes(), "sink": sink.pid}
    before = snapshot(pids, sink, target, mark=True)
    run_id = f"run{int(time.time())}"
    progress(f"{target.name}: sending {workload.messages} messages with {client}")
    with (root / "client.log").open("ab") as log:
        if client == "load":
            result = run_load_client(target, workload, run_id, root / "load.json", log)
        else:
            result = run_smtp_source(target, workload, log)
    expected = result.sent * workload.deliveries_per_message
    progress(f"{target.name}: client done; waiting for {expected} deliveries")
    base = before.sink["messages"]
    done = wait_arrived(sink, target, base, expected, time.monotonic() + deadline)
    after = snapshot(pids, sink, target)
    rss = {name: procstat.peak_rss(pid) for name, pid in pids.items()}
    arrivals = [a for a in sink.arrivals(root / "arrivals.jsonl") if not _is_warmup(a.id)]
    return Measurement(
        target.name,
        client,
        workload,
        settings or {},
        result,
        before,
        after,
        rss,
        arrivals,
        done is not None,
        sink.rtt,
    )


def _is_warmup(ident: str | None) -> bool:
    return ident is not None and ident.startswith("warmup-")


# --------------------------------------------------------------------------- the report


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def report(m: Measurement) -> dict[str, Any]:
    """The numbers of one measurement as one JSON-ready document (see README "The report")."""
    w = m.workload
    arrived: dict[str, list[tuple[float, str]]] = {}
    for arrival in m.arrivals:
        if arrival.id is not None:
            got = arrived.setdefault(arrival.id, [])
            got.extend((arrival.at, domain) for domain in dict.fromkeys(arrival.domains))
    per_message = w.deliveries_per_message
    complete = {i for i, got in arrived.items() if len({d for _, d in got}) >= per_message}
    if m.client == "load":
        complete &= set(m.result.accepted)
    delivered = len(complete)
    first = min(m.result.accepted.values(), default=m.result.started)
    last_accept = max(m.result.accepted.values(), default=m.result.finished)
    last_arrival = max((a.at for a in m.arrivals), default=m.after.at)
    window = m.after.at - m.before.at
    latencies = sorted(
        (at - m.result.accepted[i]) * 1000
        for i, got in arrived.items()
        if i in m.result.accepted
        for at, _ in got
    )
    sink = {k: m.after.sink[k] - m.before.sink[k] for k in m.after.sink}
    cpu = {n: (m.after.cpu[n] - m.before.cpu[n]) / w.messages for n in m.after.cpu}
    relay_cpu = sum(v for n, v in cpu.items() if n not in NOT_RELAY)
    ours = sum(m.after.cpu[n] - m.before.cpu[n] for n in m.after.cpu)
    ours += m.result.cpu_s + (m.after.own - m.before.own)
    other = max(0.0, (m.after.machine - m.before.machine) - ours)
    return {
        "target": m.target,
        "client": m.client,
        **w.to_json(),
        **m.settings,
        "accepted": len(m.result.accepted) if m.client == "load" else m.result.sent,
        "refused": len(m.result.failed),
        "queue_ids": m.result.queue_ids,
        "delivered": delivered,
        "lost": w.messages - delivered,
        "duplicates": sum(max(0, len(got) - per_message) for got in arrived.values()),
        "e2e_msgs_per_s": _rate(delivered, last_arrival - first),
        "accept_msgs_per_s": _rate(m.result.sent, last_accept - m.result.started),
        "e2e_seconds": round(last_arrival - first, 3),
        "latency_ms": {
            "p50": _round(percentile(latencies, 50)),
            "p95": _round(percentile(latencies, 95)),
            "p99": _round(percentile(latencies, 99)),
            "max": _round(latencies[-1] if latencies else None),
        },
        "tls_handshakes_per_msg": round(sink["handshakes"] / w.messages, 3),
        "tls_resumed_per_msg": round(sink["resumed"] / w.messages, 3),
        "sink_connections_per_msg": round(sink["connections"] / w.messages, 3),
        "tls_delivery_share": round(sink["tls_messages"] / max(sink["messages"], 1), 3),
        "rtt_ms": round(m.rtt * 1000, 1),
        "sink_sessions_peak": m.after.sink.get("peak_open", 0),
        "redis_commands_per_msg": redis_per_message(m.before.redis, m.after.redis, w.messages),
        "cpu_ms_per_msg": {
            **{n: round(v * 1000, 3) for n, v in cpu.items() if n != "sink"},
            "relay_total": round(relay_cpu * 1000, 3),
            "sink": round(cpu.get("sink", 0.0) * 1000, 3),
            "client": round(m.result.cpu_s / w.messages * 1000, 3),
        },
        "peak_rss_mb": {
            name: [{"pid": p.pid, "role": p.role, "mb": round(p.peak_kb / 1024, 1)} for p in procs]
            for name, procs in m.rss.items()
        },
        "other_load_cores": round(other / window, 2) if window > 0 else 0.0,
        "complete_before_deadline": m.complete,
    }


def redis_per_message(
    before: dict[str, int], after: dict[str, int], messages: int
) -> dict[str, Any] | None:
    """Redis commands per message in the window: the total and each command's share (most
    first); None when the target has no Redis. The snapshots' own ``INFO`` is left out; the
    workers' idle polling (``BRPOP``, heartbeats) is in, as part of what the relay costs."""
    if not after:
        return None
    calls = {c: n - before.get(c, 0) for c, n in after.items() if c != "info"}
    calls = {c: n for c, n in calls.items() if n > 0}
    reads = calls.pop(READS, None)
    by_command = {
        c: round(n / messages, 2) for c, n in sorted(calls.items(), key=lambda kv: -kv[1])
    }
    scripts = sum(calls.get(c, 0) for c in ("eval", "evalsha", "eval_ro", "evalsha_ro"))
    return {
        "total": round(sum(calls.values()) / messages, 2),
        # EVAL/EVALSHA calls: one round trip each (the commands they run are in the total)
        "scripts": round(scripts / messages, 3),
        "by_command": by_command,
        # reads of client requests by Redis (INFO stats total_reads_processed): round trips,
        # a pipeline or transaction one (or a few, when large); the snapshots' INFOs are in
        "round_trips": round(reads / messages, 2) if reads is not None else None,
    }


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
